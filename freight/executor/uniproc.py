"""UniProcExecutor: one worker, in the engine core's own process and thread."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from freight.config import EngineConfig
from freight.executor.executor import Executor
from freight.model_config import ModelConfig
from freight.step_contract import GrammarOutput, ModelRunnerOutput, SchedulerOutput
from freight.worker.worker import Worker


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig, model_dir: Path, model_config: ModelConfig):
        super().__init__(config, model_dir, model_config)
        self.worker = Worker(config, model_dir, model_config)
        self.device, self.dtype = self.worker.device, self.worker.dtype

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def kv_bytes_per_block(self) -> int:
        return self.worker.kv_bytes_per_block()

    def initialize_cache(self, num_blocks: int, max_model_len: int) -> None:
        self.worker.initialize_cache(num_blocks, max_model_len)

    def map_kv_cache(self, num_blocks: int) -> None:
        self.worker.map_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> None:
        self.worker.execute_model(scheduler_output)

    def sample_tokens(self, grammar: Optional[GrammarOutput]) -> ModelRunnerOutput:
        return self.worker.sample_tokens(grammar)
