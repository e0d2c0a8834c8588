"""Executor: the engine core's one handle on the devices.

The core calls determine_num_blocks, initialize_cache, and per step execute_model (the
forward) then sample_tokens (with the grammar bitmask, filled meanwhile) with plain
data; how many workers there are and where they run is the executor's business. A
multi-process tensor-parallel executor broadcasts each SchedulerOutput and GrammarOutput
to its ranks and returns rank 0's ModelRunnerOutput, with no change to the scheduler.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from freight.config import EngineConfig
from freight.model_config import ModelConfig
from freight.step_contract import GrammarOutput, ModelRunnerOutput, SchedulerOutput

if TYPE_CHECKING:
    import torch


class Executor(ABC):
    device: "torch.device"  # where the model runs (rank 0's, with several)
    dtype: "torch.dtype"

    def __init__(self, config: EngineConfig, model_dir: Path, model_config: ModelConfig):
        self.config = config
        self.model_dir = model_dir
        self.model_config = model_config

    @staticmethod
    def create(config: EngineConfig, model_dir: Path, model_config: ModelConfig) -> "Executor":
        if config.tensor_parallel_size > 1:
            if config.distributed_executor_backend == "ray":
                from freight.executor.ray_executor import RayExecutor

                return RayExecutor(config, model_dir, model_config)
            from freight.executor.multiproc import MultiprocExecutor

            return MultiprocExecutor(config, model_dir, model_config)
        # (one rank, with either backend: it runs here, in the engine core's process)
        from freight.executor.uniproc import UniProcExecutor

        return UniProcExecutor(config, model_dir, model_config)

    @abstractmethod
    def determine_num_blocks(self) -> int:
        """KV blocks that fit on every worker (the smallest, with several)."""

    @abstractmethod
    def kv_bytes_per_block(self) -> int: ...

    @abstractmethod
    def initialize_cache(self, num_blocks: int, max_model_len: int) -> None: ...

    def map_kv_cache(self, num_blocks: int) -> None:
        """Map the first num_blocks KV blocks' pages now (see worker/kv_prefault.py). Ranks in processes of
        their own are only reachable from a core in a process of its own, which nobody asks this: they keep
        mapping in the background."""

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> None:
        """Run the step's forward; the logits wait on the workers for sample_tokens."""

    @abstractmethod
    def sample_tokens(self, grammar: Optional[GrammarOutput]) -> ModelRunnerOutput: ...

    def shutdown(self) -> None:
        pass
