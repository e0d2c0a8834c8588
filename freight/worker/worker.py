"""Worker: one device's share of the engine: loads the model, sizes and owns the KV cache
(through its ModelRunner), and executes steps. The executor drives one worker per rank;
a rank of a tensor-parallel group joins it before building its share of the model."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import psutil
import torch

from freight.config import EngineConfig
from freight.distributed.parallel_state import DistributedInit, init_tensor_parallel
from freight.layers.linear import Linear
from freight.model_config import ModelConfig
from freight.model_loader import configure_threads, load_model, resolve_device, resolve_dtype
from freight.step_contract import GrammarOutput, ModelRunnerOutput, SchedulerOutput
from freight.worker.model_runner import ModelRunner, kv_bytes_per_block

logger = logging.getLogger(__name__)

_CPU_KV_DEFAULT = 4 * 1024**3   # like vLLM's VLLM_CPU_KVCACHE_SPACE default
_CPU_KV_MAX_FRACTION = 0.3      # of available RAM
_CUDA_KV_FRACTION = 0.85        # of free device memory after the weights


class Worker:
    def __init__(self, config: EngineConfig, model_dir: Path, model_config: ModelConfig, rank: int = 0,
                 distributed: Optional[DistributedInit] = None):
        self.config = config
        self.model_config = model_config
        self.rank = rank
        self.tp_size = distributed.world_size if distributed else 1
        configure_threads(config.num_threads)
        torch.manual_seed(config.seed)
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and self.device.index is None and self.tp_size > 1:
            self.device = torch.device("cuda", rank % torch.cuda.device_count())
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = resolve_dtype(config.dtype, model_config, self.device)
        if distributed is not None:
            init_tensor_parallel(rank, distributed)
        t0 = time.perf_counter()
        self.model = load_model(model_dir, model_config, self.dtype, self.device, config.model_impl,
                                config.quantization)
        logger.info("loaded %s (%s, %s%s) in %.2fs: %.1f MiB of weights", model_dir, self.dtype, self.device,
                    f", rank {rank} of {self.tp_size}" if self.tp_size > 1 else "", time.perf_counter() - t0,
                    self.weight_bytes() / 2**20)
        self.model_runner: ModelRunner | None = None

    def weight_bytes(self) -> int:
        """Bytes of this rank's weights (a tied head counted once; a packed linear at its logical size,
        an int8 one at its int8 size)."""
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return total + sum(m.held_weight_bytes() for m in self.model.modules() if isinstance(m, Linear))

    def kv_bytes_per_block(self) -> int:
        return kv_bytes_per_block(self.model_config, self.config.block_size, self.dtype, self.tp_size)

    def determine_num_blocks(self) -> int:
        """How many KV blocks fit the configured (or default) memory on this device."""
        per_block = self.kv_bytes_per_block()
        budget = self.config.kv_cache_memory
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * _CUDA_KV_FRACTION)
            else:
                # (a rank's share: the ranks of one host split its memory)
                budget = min(_CPU_KV_DEFAULT,
                             int(psutil.virtual_memory().available * _CPU_KV_MAX_FRACTION / self.tp_size))
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

    def map_kv_cache(self, num_blocks: int) -> None:
        self.model_runner.map_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> None:
        self.model_runner.execute_model(scheduler_output)

    def sample_tokens(self, grammar: Optional[GrammarOutput]) -> ModelRunnerOutput:
        return self.model_runner.sample_tokens(grammar)
