"""The `freight` command: generate, serve, bench."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from freight import __version__

# Subcommand modules, each with add_parser(subparsers); missing ones are skipped so a
# partial install still offers what it has.
_SUBCOMMANDS = ["freight.cli.generate", "freight.cli.serve", "freight.cli.bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freight", description="freight: LLM inference and serving engine")
    parser.add_argument("--version", action="version", version=f"freight {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=os.environ.get("FREIGHT_LOG_LEVEL", "INFO"),
                        format="%(levelname)s %(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"freight: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
