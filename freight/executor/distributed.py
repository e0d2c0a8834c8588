"""DistributedExecutor: a tensor-parallel group, rank 0 in this process and ranks 1..N-1 elsewhere.

Every rank runs the same Worker on the same plain-data calls: each step's SchedulerOutput
and GrammarOutput go to the other ranks first, then rank 0 runs them itself, and rank
0's ModelRunnerOutput is the step's (the logits are all-gathered, so every rank samples
the same tokens and keeps the same runner state). Keeping rank 0 here costs no transfer
of outputs and no extra process. Subclasses say where the other ranks run: processes of
this host (MultiprocExecutor) or actors of a Ray cluster (RayExecutor).

A rank that dies or fails kills the group: ranks in a collective are released (the
shared-memory communicator is aborted, gloo sees the closed socket) and every later
call raises ExecutorDeadError, which the engine core does not survive.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from abc import abstractmethod
from pathlib import Path
from typing import Callable, Optional, TypeVar

from freight.config import EngineConfig
from freight.distributed.parallel_state import (DistributedInit, abort_collectives, destroy_tensor_parallel,
                                                free_port)
from freight.executor.executor import Executor
from freight.executor.worker_calls import (DetermineNumBlocks, ExecuteModel, InitializeCache, SampleTokens, Shutdown,
                                           WorkerCall)
from freight.model_config import ModelConfig
from freight.step_contract import GrammarOutput, ModelRunnerOutput, SchedulerOutput
from freight.worker.worker import Worker

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ExecutorDeadError(RuntimeError):
    """A rank of the tensor-parallel group is gone; the group cannot run another step."""


@dataclasses.dataclass
class RankPlan:
    rank: int
    config: EngineConfig            # num_threads set to the rank's share of the CPUs
    cpus: Optional[list[int]]       # CPUs to pin the rank to; None: leave as is


def plan_ranks(config: EngineConfig, world_size: int) -> list[RankPlan]:
    """Split this process's CPUs between the ranks (OpenMP teams that share cores slow each other
    down), unless num_threads was given or there are fewer CPUs than ranks."""
    cpus = sorted(os.sched_getaffinity(0))
    if config.num_threads is not None or len(cpus) < world_size:
        threads = config.num_threads or max(len(cpus) // world_size, 1)
        return [RankPlan(r, dataclasses.replace(config, num_threads=threads), None) for r in range(world_size)]
    share = len(cpus) // world_size
    return [RankPlan(r, dataclasses.replace(config, num_threads=share), cpus[r * share:(r + 1) * share])
            for r in range(world_size)]


class DistributedExecutor(Executor):
    def __init__(self, config: EngineConfig, model_dir: Path, model_config: ModelConfig):
        super().__init__(config, model_dir, model_config)
        self.world_size = config.tensor_parallel_size
        model_config.check_tensor_parallel(self.world_size)
        self._dead: Optional[str] = None
        self._closed = False
        plans = plan_ranks(config, self.world_size)
        try:
            init = self._launch(plans[1:], model_dir, model_config)
            if plans[0].cpus:
                os.sched_setaffinity(0, plans[0].cpus)  # this process is rank 0 (and the engine core)
            self.worker = Worker(plans[0].config, model_dir, model_config, 0, init)
            self._wait_loaded()
        except BaseException:
            self.shutdown()
            raise
        self.device, self.dtype = self.worker.device, self.worker.dtype
        logger.info("tensor parallelism: %d ranks (%s, collectives over %s)", self.world_size,
                    type(self).__name__, self.collective_path)

    @property
    def collective_path(self) -> str:
        from freight.distributed.parallel_state import get_tp_group

        return get_tp_group().collective_path

    @staticmethod
    def distributed_init(world_size: int, host: str, same_host: bool, device_type: str) -> DistributedInit:
        return DistributedInit(init_method=f"tcp://{host}:{free_port(host)}", world_size=world_size,
                               backend="nccl" if device_type == "cuda" else "gloo",
                               shm_name=f"freight-tp-{uuid.uuid4().hex[:12]}"
                               if same_host and device_type == "cpu" else None)

    # -- what a subclass provides ---------------------------------------------------
    @abstractmethod
    def _launch(self, plans: list[RankPlan], model_dir: Path, model_config: ModelConfig) -> DistributedInit:
        """Start ranks 1..N-1; return once each is about to join the group (they finish joining
        when rank 0 does) and say how to join."""

    @abstractmethod
    def _wait_loaded(self) -> None:
        """Wait until every other rank has built its model; raise if one failed."""

    @abstractmethod
    def _send(self, call: WorkerCall) -> None:
        """Hand a call to every other rank, in order."""

    @abstractmethod
    def _replies(self) -> list[Optional[int]]:
        """The other ranks' replies to the last replied call; raise if one failed."""

    @abstractmethod
    def _stop_workers(self) -> None: ...

    # -- the group ------------------------------------------------------------------
    def _mark_dead(self, why: str) -> None:
        """A rank is gone (called from a monitor thread too): release rank 0 from any collective."""
        if self._dead is None and not self._closed:
            self._dead = why
            logger.error("tensor-parallel group lost a rank: %s", why)
            abort_collectives()

    def _run(self, call: WorkerCall, local: Callable[[], T]) -> T:
        if self._dead is not None:
            raise ExecutorDeadError(self._dead)
        self._send(call)
        try:
            return local()
        except Exception as e:
            if self._dead is not None:
                raise ExecutorDeadError(self._dead) from e
            raise

    def determine_num_blocks(self) -> int:
        mine = self._run(DetermineNumBlocks(), self.worker.determine_num_blocks)
        return min([mine, *self._replies()])

    def kv_bytes_per_block(self) -> int:
        return self.worker.kv_bytes_per_block()

    def initialize_cache(self, num_blocks: int, max_model_len: int) -> None:
        self._run(InitializeCache(num_blocks, max_model_len),
                  lambda: self.worker.initialize_cache(num_blocks, max_model_len))
        self._replies()

    def execute_model(self, scheduler_output: SchedulerOutput) -> None:
        self._run(ExecuteModel(scheduler_output), lambda: self.worker.execute_model(scheduler_output))

    def sample_tokens(self, grammar: Optional[GrammarOutput]) -> ModelRunnerOutput:
        return self._run(SampleTokens(grammar), lambda: self.worker.sample_tokens(grammar))

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._dead is None:
                self._send(Shutdown())
        except Exception:
            pass
        self._stop_workers()
        destroy_tensor_parallel()
