"""`freight bench allreduce`: tensor-parallel all-reduce on one host, gloo against shared memory.

Spawns --world-size processes (one torch thread each), joins them into a gloo group and a
ShmCommunicator, and times all_reduce of each size with both: microseconds per call, the
median of --iters on rank 0, after a warm-up. Each call gets a fresh copy of the input
(outside the timed region), as a model's activations would be.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid

from freight.benchmarks.report import write_json
from freight.distributed.parallel_state import free_port

WARMUP = 20


def add_arguments(parser) -> None:
    parser.add_argument("--world-size", type=int, default=2, help="processes (ranks) on this host")
    parser.add_argument("--sizes", default="576,4608,36864,294912,1179648",
                        help="comma-separated element counts of the all-reduced tensor")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--iters", type=int, default=200, help="timed calls per size and method")
    parser.add_argument("--output-json", default=None, help="also write the result to this file")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def _median_us(fn, x, src, iters: int) -> float:
    for _ in range(WARMUP):
        fn(x.copy_(src))
    times = []
    for _ in range(iters):
        x.copy_(src)
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _worker(rank: int, world_size: int, port: int, shm_name: str, sizes: list, dtype_name: str, iters: int,
            queue) -> None:
    import os

    import torch
    import torch.distributed as dist

    from freight.distributed.shm_comm import ShmCommunicator

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    comm = None
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        comm = ShmCommunicator(shm_name, rank, world_size)
        dtype = getattr(torch, dtype_name)
        rows = []
        for n in sizes:
            src = torch.randn(n, generator=torch.Generator().manual_seed(rank)).to(dtype)
            x = torch.empty_like(src)
            dist.barrier()
            gloo = _median_us(dist.all_reduce, x, src, iters)
            dist.barrier()
            shm = _median_us(comm.all_reduce, x, src, iters)
            rows.append({"elements": n, "bytes": n * src.element_size(), "gloo_us": round(gloo, 1),
                         "shm_us": round(shm, 1), "speedup": round(gloo / shm, 2)})
        dist.barrier()
        queue.put((rank, rows, comm.slot_bytes))
    except BaseException as e:
        if comm is not None:
            comm.abort()
        queue.put((rank, f"{type(e).__name__}: {e}", None))
    finally:
        if comm is not None:
            comm.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args) -> dict:
    import multiprocessing

    from freight.distributed.shm_comm import ShmCommunicator

    if not ShmCommunicator.available():
        raise SystemExit("freight bench allreduce: the shared-memory all-reduce kernel is not available here "
                         "(no C compiler, FREIGHT_DISABLE_C_KERNELS=1 or no /dev/shm): nothing to compare gloo with")
    sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port, name = free_port(), f"freight-bench-allreduce-{uuid.uuid4().hex[:12]}"
    procs = [ctx.Process(target=_worker, args=(r, args.world_size, port, name, sizes, args.dtype, args.iters, queue),
                         daemon=True) for r in range(args.world_size)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, rows, slot_bytes = queue.get(timeout=600)
            if isinstance(rows, str):
                raise RuntimeError(f"allreduce benchmark rank {rank} failed: {rows}")
            results[rank] = (rows, slot_bytes)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    rows, slot_bytes = results[0]
    result = {"benchmark": "allreduce", "world_size": args.world_size, "dtype": args.dtype, "cpu": _cpu_model(),
              "iters": args.iters, "shm_slot_bytes": slot_bytes, "results": rows}
    print(json.dumps(result))
    write_json(args.output_json, result)
    return result
