"""Data-parallel engine cores as Ray actors (`--distributed-executor-backend ray` with `-dp N`).

Each core runs the same process entry point as a spawned core (core_proc.run_engine_core),
inside an actor the cluster places; it reaches the API process over ZMQ on TCP at this
node's address instead of IPC files. With tensor parallelism its ranks are Ray actors too
(RayExecutor). RayCoreProcess gives MPCoreClient the part of multiprocessing.Process's
interface it uses, so the client does not care where its cores run.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from freight.config import EngineConfig

logger = logging.getLogger(__name__)


class _EngineCoreActor:
    def pid(self) -> int:
        return os.getpid()

    def run(self, config: EngineConfig, engine_index: int, input_address: str, output_address: str,
            log_level: int) -> None:
        from freight.engine.core_proc import run_engine_core

        run_engine_core(config, engine_index, input_address, output_address, None, log_level, watch_parent=False)


def ensure_ray() -> bool:
    """Connect to RAY_ADDRESS's cluster, or start a local one; True if this call started Ray."""
    try:
        import ray
    except ImportError:
        raise ValueError("distributed_executor_backend='ray' needs Ray: pip install 'freight[ray]'") from None
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    ray.init(address=address, include_dashboard=False, configure_logging=False,
             **({} if address else {"object_store_memory": 256 * 2**20}))
    return True


def node_address() -> str:
    """This node's address as the cluster's other nodes reach it."""
    import ray

    return ray.util.get_node_ip_address()


class RayCoreProcess:
    def __init__(self, config: EngineConfig, engine_index: int, input_address: str, output_address: str,
                 log_level: int):
        import ray

        self.name = f"freight-engine-core-{engine_index}"
        self._actor = ray.remote(_EngineCoreActor).options(num_cpus=config.num_threads or 1).remote()
        self.pid: Optional[int] = ray.get(self._actor.pid.remote())
        self._run = self._actor.run.remote(config, engine_index, input_address, output_address, log_level)
        self.exitcode: Optional[int] = None

    def is_alive(self) -> bool:
        import ray

        if self.exitcode is not None:
            return False
        if not ray.wait([self._run], timeout=0)[0]:
            return True
        try:
            ray.get(self._run)
            self.exitcode = 0
        except Exception as e:  # the core raised, or the actor died
            logger.error("engine core actor %s ended: %s", self.name, e)
            self.exitcode = 1
        return False

    def join(self, timeout: Optional[float] = None) -> None:
        import ray

        ray.wait([self._run], timeout=timeout)

    def kill(self) -> None:
        import ray

        ray.kill(self._actor)
        self.exitcode = self.exitcode if self.exitcode is not None else -9
