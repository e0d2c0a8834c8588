"""Worker: one device's share of the engine: loads the model, sizes and owns the KV cache
(through its ModelRunner), and executes steps. The executor drives one worker per rank."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import psutil
import torch

from freight.config import EngineConfig
from freight.model_config import ModelConfig
from freight.model_loader import configure_threads, load_model, resolve_device, resolve_dtype
from freight.step_contract import GrammarOutput, ModelRunnerOutput, SchedulerOutput
from freight.worker.model_runner import ModelRunner, kv_bytes_per_block

logger = logging.getLogger(__name__)

_CPU_KV_DEFAULT = 4 * 1024**3   # like vLLM's VLLM_CPU_KVCACHE_SPACE default
_CPU_KV_MAX_FRACTION = 0.3      # of available RAM
_CUDA_KV_FRACTION = 0.85        # of free device memory after the weights


class Worker:
    def __init__(self, config: EngineConfig, model_dir: Path, model_config: ModelConfig):
        self.config = config
        self.model_config = model_config
        configure_threads(config.num_threads)
        torch.manual_seed(config.seed)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, model_config, self.device)
        t0 = time.perf_counter()
        self.model = load_model(model_dir, model_config, self.dtype, self.device)
        logger.info("loaded %s (%s, %s) in %.2fs", model_dir, self.dtype, self.device, time.perf_counter() - t0)
        self.model_runner: ModelRunner | None = None

    def kv_bytes_per_block(self) -> int:
        return kv_bytes_per_block(self.model_config, self.config.block_size, self.dtype)

    def determine_num_blocks(self) -> int:
        """How many KV blocks fit the configured (or default) memory on this device."""
        per_block = self.kv_bytes_per_block()
        budget = self.config.kv_cache_memory
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * _CUDA_KV_FRACTION)
            else:
                budget = min(_CPU_KV_DEFAULT, int(psutil.virtual_memory().available * _CPU_KV_MAX_FRACTION))
            # No more than max_num_seqs full-length sequences can use (plus room for the prefix cache).
            length = self.config.max_model_len or self.model_config.max_position_embeddings
            budget = min(budget, 2 * self.config.max_num_seqs * length * per_block // self.config.block_size)
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={budget} bytes holds no block of {per_block} bytes; give more")
        return num_blocks

    def initialize_cache(self, num_blocks: int, max_model_len: int) -> None:
        self.model_runner = ModelRunner(self.model, self.model_config, self.dtype, self.device,
                                        self.config.block_size, num_blocks, self.config.seed,
                                        self.config.max_num_seqs, max_model_len)

    def execute_model(self, scheduler_output: SchedulerOutput) -> None:
        self.model_runner.execute_model(scheduler_output)

    def sample_tokens(self, grammar: Optional[GrammarOutput]) -> ModelRunnerOutput:
        return self.model_runner.sample_tokens(grammar)
