"""Run llama.cpp's convert_hf_to_gguf.py on bench-135m, whose tokenizer it does not know.

    $LLAMACPP_DIR/venv/bin/python scripts/peer_llamacpp_convert.py --llama-cpp $LLAMACPP_DIR/llama.cpp \\
        /tmp/bench-135m --outtype bf16 --outfile $LLAMACPP_DIR/bench-135m-bf16.gguf

The converter names a BPE tokenizer's pre-tokenizer ("tokenizer.ggml.pre") by hashing how it
encodes a fixed string and looking the hash up in a table generated from known hub models
(get_vocab_base_pre). bench-135m's byte-level BPE was trained on Python sources by
../shared/bench/make_bench_model.py, so its hash is in no table and the converter stops with
"BPE pre-tokenizer was not recognized". Its pre-tokenizer is plain GPT-2's (ByteLevel with the GPT-2
regex, no normalizer, no digit splitting), which is llama.cpp's "gpt-2" pre-tokenizer type. This
wrapper leaves the llama.cpp tree untouched: it falls back to "gpt-2" only when the hash is unknown
AND tokenizer.json's pre-tokenizer is exactly that; any other unknown tokenizer still fails.
All other arguments go to convert_hf_to_gguf.py unchanged.
"""
import argparse
import json
import logging
import runpy
import sys
from pathlib import Path


def _is_plain_gpt2_bytelevel(model_dir: Path) -> bool:
    try:
        tok = json.loads((model_dir / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return False
    pre = tok.get("pre_tokenizer") or {}
    return (tok.get("normalizer") is None and tok.get("model", {}).get("type") == "BPE"
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False))


def main():
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--llama-cpp", required=True, help="the llama.cpp source tree")
    args, rest = ap.parse_known_args()
    root = Path(args.llama_cpp).resolve()
    sys.path.insert(0, str(root))
    sys.path.insert(1, str(root / "gguf-py"))
    from conversion import base  # the converter's own package, from the tree

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if not _is_plain_gpt2_bytelevel(Path(self.dir_model)):
                raise
            logging.getLogger("peer_llamacpp_convert").warning(
                "unknown tokenizer hash; tokenizer.json's pre-tokenizer is plain GPT-2 ByteLevel: using 'gpt-2'")
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    script = root / "convert_hf_to_gguf.py"
    sys.argv = [str(script)] + rest
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
