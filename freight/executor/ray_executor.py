"""RayExecutor: tensor-parallel ranks 1..N-1 as Ray actors, so a model can span machines.

Rank 0 stays in the engine core's process; the other ranks are actors placed by a
placement group on the cluster named by RAY_ADDRESS (or a local Ray instance started
for this engine). They join rank 0's torch.distributed group at rank 0's node address,
with the shared-memory collectives only when every actor landed on rank 0's node.
Calls are the same plain-data worker_calls the process executor sends, so a rank runs
identically either way. `ray` is an optional extra: pip install "freight[ray]".
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Optional

from freight.distributed.parallel_state import DistributedInit
from freight.executor.distributed import DistributedExecutor, ExecutorDeadError, RankPlan
from freight.executor.worker_calls import WorkerCall, decode_call, encode, handle
from freight.model_config import ModelConfig

logger = logging.getLogger(__name__)

_PLACEMENT_TIMEOUT_S = 120.0


class RayRank:
    """One rank > 0 inside a Ray actor."""

    def __init__(self, log_level: int):
        logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [tp ray actor] %(name)s: %(message)s")
        self.worker = None

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def start(self, plan: RankPlan, model_dir: str, model_config: ModelConfig, init: DistributedInit) -> None:
        from freight.worker.worker import Worker

        if plan.cpus:
            os.sched_setaffinity(0, plan.cpus)
        self.worker = Worker(plan.config, Path(model_dir), model_config, plan.rank, init)

    def call(self, frame: bytes) -> Optional[int]:
        return handle(self.worker, decode_call(frame))

    def stop(self) -> None:
        from freight.distributed.parallel_state import destroy_tensor_parallel

        destroy_tensor_parallel()


class RayExecutor(DistributedExecutor):
    def _launch(self, plans: list[RankPlan], model_dir: Path, model_config: ModelConfig) -> DistributedInit:
        try:
            import ray
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        except ImportError:
            raise ValueError("distributed_executor_backend='ray' needs Ray: pip install 'freight[ray]'") from None

        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            address = os.environ.get("RAY_ADDRESS")
            ray.init(address=address, include_dashboard=False, log_to_driver=True, configure_logging=False,
                     **({} if address else {"object_store_memory": 256 * 2**20}))
        device_type = "cuda" if self.config.device.startswith("cuda") or (
            self.config.device == "auto" and _cuda_available()) else "cpu"
        bundle = {"GPU": 1, "CPU": 1} if device_type == "cuda" else {"CPU": plans[0].config.num_threads or 1}
        self._pg = placement_group([dict(bundle) for _ in plans], strategy="PACK")
        ready, _ = ray.wait([self._pg.ready()], timeout=_PLACEMENT_TIMEOUT_S)
        if not ready:
            raise TimeoutError(f"Ray could not place {len(plans)} tensor-parallel ranks of {bundle} within "
                               f"{_PLACEMENT_TIMEOUT_S:.0f}s; cluster resources: {ray.cluster_resources()}")
        actor_cls = ray.remote(RayRank)
        self._actors = [
            actor_cls.options(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                              scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, i)
                              ).remote(logging.root.level)
            for i in range(len(plans))]
        here = ray.get_runtime_context().get_node_id()
        same_host = all(n == here for n in ray.get([a.node_id.remote() for a in self._actors]))
        host = "127.0.0.1" if same_host else ray.util.get_node_ip_address()
        init = self.distributed_init(self.world_size, host, same_host, device_type)
        self._loading = [a.start.remote(p if same_host else _unpinned(p), str(model_dir), model_config, init)
                         for a, p in zip(self._actors, plans)]
        self._inflight: list = []
        self._lock = threading.Lock()
        threading.Thread(target=self._monitor, daemon=True, name="freight-ray-monitor").start()
        return init

    def _monitor(self) -> None:
        """Surface a failed or dead actor while rank 0 may be waiting in a collective."""
        import ray

        while not self._closed and self._dead is None:
            with self._lock:
                refs = list(self._inflight) + list(self._loading)
            if not refs:
                threading.Event().wait(0.5)
                continue
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0.5)
            for ref in ready:
                try:
                    ray.get(ref)
                except Exception as e:
                    self._mark_dead(f"a Ray tensor-parallel rank failed: {type(e).__name__}: {e}")
            with self._lock:
                done = set(ready)
                self._inflight = [r for r in self._inflight if r not in done]

    def _wait_loaded(self) -> None:
        import ray

        try:
            ray.get(self._loading)
        except Exception as e:
            raise ExecutorDeadError(f"a Ray tensor-parallel rank could not load the model: {e}") from e
        self._loading = []

    def _send(self, call: WorkerCall) -> None:
        frame = encode(call)
        refs = [a.call.remote(frame) for a in self._actors]
        with self._lock:
            self._last = refs
            self._inflight.extend(refs)

    def _replies(self) -> list[Optional[int]]:
        import ray

        try:
            return ray.get(self._last)
        except Exception as e:
            self._mark_dead(f"a Ray tensor-parallel rank failed: {e}")
            raise ExecutorDeadError(str(e)) from e

    def _stop_workers(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        for a in getattr(self, "_actors", []):
            try:
                ray.get(a.stop.remote(), timeout=10)
            except Exception:
                pass
            ray.kill(a)
        if getattr(self, "_pg", None) is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._pg)
        if getattr(self, "_owns_ray", False):
            ray.shutdown()


def _unpinned(plan: RankPlan) -> RankPlan:
    """On another machine this host's CPU numbers mean nothing."""
    return RankPlan(plan.rank, plan.config, None)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
