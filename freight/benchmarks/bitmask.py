"""`freight bench bitmask`: the cost of applying a grammar's token bitmask to a batch of logits.

Times freight's apply (the C kernel where it builds, and its PyTorch fallback) against
xgrammar's own apply_token_bitmask_inplace, on random masks (half the tokens allowed, so
every word is mixed: the slow case) and on sparse ones (few tokens allowed, as in JSON
structure). Milliseconds per call, the median of --iters.
"""

from __future__ import annotations

import json
import statistics
import time

from freight.benchmarks.report import write_json


def _median_ms(fn, logits, iters: int) -> float:
    times = []
    for _ in range(iters):
        x = logits.clone()
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 3)


def run(args) -> dict:
    import numpy as np
    import torch
    import xgrammar as xgr

    import freight.worker.bitmask as wb

    rng = np.random.default_rng(0)
    words = (args.vocab_size + 31) // 32
    logits = torch.randn(args.rows, args.vocab_size)
    rows = list(range(args.rows))
    masks = {"half": rng.integers(-2**31, 2**31, size=(args.rows, words), dtype=np.int64).astype(np.int32),
             "sparse": np.where(rng.random((args.rows, words)) < 0.02, -1, 0).astype(np.int32)}
    result = {"benchmark": "bitmask", "rows": args.rows, "vocab_size": args.vocab_size,
              "torch_threads": torch.get_num_threads()}
    fallback = wb.apply_bitmask
    for name, mask in masks.items():
        tensor = torch.from_numpy(mask)
        result[f"xgrammar_ms_{name}"] = _median_ms(lambda x: xgr.apply_token_bitmask_inplace(x, tensor), logits,
                                                   args.iters)
        result[f"freight_ms_{name}"] = _median_ms(lambda x: wb.apply_token_bitmask(x, mask, rows), logits,
                                                  args.iters)
        wb.apply_bitmask = lambda *a: False  # the PyTorch fallback
        try:
            result[f"freight_torch_ms_{name}"] = _median_ms(lambda x: wb.apply_token_bitmask(x, mask, rows), logits,
                                                            args.iters)
        finally:
            wb.apply_bitmask = fallback
    result["c_kernel"] = wb.apply_bitmask(logits[:1].clone(), masks["half"][:1], [0])
    print(json.dumps(result))
    write_json(args.output_json, result)
    return result
