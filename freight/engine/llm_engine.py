"""LLMEngine: the synchronous engine. One step = schedule -> run the model -> process outputs.

Both the offline LLM class and the server's async loop drive this object.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import psutil
import torch

from freight.config import EngineConfig
from freight.core.kv_cache_manager import KVCacheManager
from freight.core.request import Request, RequestStatus
from freight.core.scheduler import Scheduler, SchedulerConfig
from freight.engine.output_processor import OutputProcessor
from freight.model_config import ModelConfig
from freight.model_loader import configure_threads, load_model, resolve_device, resolve_dtype, resolve_model_dir
from freight.outputs import RequestOutput
from freight.sampling_params import SamplingParams, SamplingParamsError
from freight.tokenizer import eos_token_ids, load_tokenizer
from freight.worker.model_runner import ModelRunner, kv_bytes_per_block

logger = logging.getLogger(__name__)

PromptType = Union[str, list[int], dict]
_DEFAULT_BATCHED_TOKENS = 2048
_CPU_KV_DEFAULT = 4 * 1024**3   # like vLLM's VLLM_CPU_KVCACHE_SPACE default
_CPU_KV_MAX_FRACTION = 0.3      # of available RAM
_CUDA_KV_FRACTION = 0.85        # of free device memory after the weights


class PromptError(ValueError):
    """A prompt the engine can never run (empty, too long, bad token ids)."""


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float        # 0..1, blocks held by requests
    num_free_blocks: int
    num_total_blocks: int
    num_preemptions: int         # totals since start from here on
    prefix_cache_queries: int    # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int       # of them found there
    num_computed_prompt_tokens: int  # prompt tokens actually run through the model
    num_generated_tokens: int
    num_steps: int
    num_allocated_blocks: int    # block allocations so far (shared blocks count once)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        configure_threads(config.num_threads)
        torch.manual_seed(config.seed)
        self.model_dir = resolve_model_dir(config.model, config.revision)
        self.model_config = ModelConfig.from_dir(self.model_dir)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.model_config, self.device)
        self.tokenizer = load_tokenizer(config.tokenizer or str(self.model_dir), config.revision,
                                        config.trust_remote_code)
        self.eos_token_ids = eos_token_ids(self.model_dir, self.tokenizer)
        t0 = time.perf_counter()
        model = load_model(self.model_dir, self.model_config, self.dtype, self.device)
        logger.info("loaded %s (%s, %s) in %.2fs", self.model_dir, self.dtype, self.device, time.perf_counter() - t0)

        num_blocks = self._num_kv_blocks()
        self.max_model_len = self._max_model_len(num_blocks)
        max_batched = config.max_num_batched_tokens or (
            _DEFAULT_BATCHED_TOKENS if config.enable_chunked_prefill else max(self.max_model_len, _DEFAULT_BATCHED_TOKENS))
        self.kv_cache = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, max_batched, self.max_model_len,
                                                   config.enable_chunked_prefill), self.kv_cache)
        self.runner = ModelRunner(model, self.model_config, self.dtype, self.device, config.block_size,
                                  num_blocks, config.seed)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._num_computed_prompt_tokens = 0
        self._num_generated_tokens = 0
        self._num_steps = 0
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB), max_model_len %d, max_num_batched_tokens %d",
                    num_blocks, config.block_size,
                    num_blocks * kv_bytes_per_block(self.model_config, config.block_size, self.dtype) / 2**20,
                    self.max_model_len, max_batched)

    # -- set-up ---------------------------------------------------------------
    def _num_kv_blocks(self) -> int:
        per_block = kv_bytes_per_block(self.model_config, self.config.block_size, self.dtype)
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

    def _max_model_len(self, num_blocks: int) -> int:
        limit = self.model_config.max_position_embeddings
        asked = self.config.max_model_len
        if asked is not None and asked > limit:
            raise ValueError(f"max_model_len={asked} is larger than the model's max_position_embeddings ({limit})")
        capacity = num_blocks * self.config.block_size
        length = asked or limit
        if length > capacity:
            if asked is not None:
                raise ValueError(f"max_model_len={asked} needs more KV cache than kv_cache_memory gives "
                                 f"({capacity} tokens); raise kv_cache_memory or lower max_model_len")
            logger.warning("max_model_len lowered from %d to %d tokens to fit the KV cache", length, capacity)
            length = capacity
        return length

    # -- requests ---------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise PromptError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            return prompt, self.tokenizer(prompt).input_ids
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise PromptError(f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    arrival_time: Optional[float] = None) -> None:
        n = params.n_seqs
        seq_ids = [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]
        if self.output_processor.in_use([request_id, *seq_ids]):
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self.tokenize_prompt(prompt)
        self.validate_request(ids, params)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        seqs = [Request(request_id=sid, prompt_token_ids=ids, sampling_params=params.for_sample(i),
                        max_tokens=params.max_tokens if params.max_tokens is not None else self.max_model_len,
                        eos_token_ids=self.eos_token_ids, arrival_time=arrival)
                for i, sid in enumerate(seq_ids)]
        # The first sequence computes the prompt; the others fork from it (sharing its blocks).
        seqs[0].pending_forks = seqs[1:]
        self.output_processor.add_request(request_id, seqs, text)
        self.scheduler.add_request(seqs[0])

    def validate_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise PromptError / SamplingParamsError for input this engine can never run."""
        self._validate_params(params)
        self._validate_prompt(prompt_ids)

    def _validate_params(self, params: SamplingParams) -> None:
        """Limits that depend on this engine (SamplingParams checks the rest by itself)."""
        if params.n_seqs > self.config.max_num_seqs:
            name = "best_of" if params.best_of else "n"
            raise SamplingParamsError(f"{name}={params.n_seqs} is more sequences than max_num_seqs "
                                      f"({self.config.max_num_seqs})", name)
        limit = min(self.config.max_logprobs, self.model_config.vocab_size)
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > limit:
                raise SamplingParamsError(f"{name}={k} is more than the maximum of {limit} (max_logprobs)", name)
        vocab = self.model_config.vocab_size
        bad = [t for t in (params.logit_bias or {}) if t >= vocab]
        if bad:
            raise SamplingParamsError(f"logit_bias has token ids outside the vocabulary [0, {vocab}): {bad[:5]}",
                                      "logit_bias")
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise SamplingParamsError(f"stop_token_ids outside the vocabulary [0, {vocab}): {bad[:5]}",
                                      "stop_token_ids")

    def _validate_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise PromptError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise PromptError(f"the prompt is {len(ids)} tokens long, but this model's context (max_model_len) is "
                              f"{self.max_model_len} tokens and at least one must be left to generate")
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise PromptError(f"prompt token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}")

    def abort_request(self, request_ids: Union[str, Iterable[str]]) -> list[RequestOutput]:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        seq_ids = [s for rid in ids for s in self.output_processor.sequence_ids(rid)]
        aborted = self.scheduler.finish_requests(seq_ids, RequestStatus.FINISHED_ABORTED)
        return self.output_processor.process([], None, aborted)[0]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.num_unfinished

    # -- the step -----------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched_out = self.scheduler.schedule()
        runner_out = self.runner.execute(sched_out)
        for s in sched_out.scheduled:
            prompt_end = min(s.num_computed_tokens + s.num_new_tokens, s.request.num_prompt_tokens)
            self._num_computed_prompt_tokens += max(0, prompt_end - s.num_computed_tokens)
        sampled = {rid: t.token_id for rid, t in runner_out.sampled.items()}
        updated = self.scheduler.update_from_output(sched_out, sampled)
        finished = [r for r in updated if r.status.finished]
        self._num_generated_tokens += len(updated)
        self._num_steps += 1
        outputs, stopped = self.output_processor.process(updated, runner_out, finished)
        if stopped:  # stop strings: the text is final, free the sequences' blocks now
            self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        return outputs

    def get_stats(self) -> EngineStats:
        kv = self.kv_cache
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=kv.usage(), num_free_blocks=kv.num_free_blocks, num_total_blocks=kv.pool.num_blocks,
            num_preemptions=self.scheduler.num_preemptions, prefix_cache_queries=kv.prefix_stats.queries,
            prefix_cache_hits=kv.prefix_stats.hits, num_computed_prompt_tokens=self._num_computed_prompt_tokens,
            num_generated_tokens=self._num_generated_tokens, num_steps=self._num_steps,
            num_allocated_blocks=kv.num_allocated_blocks)

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache.reset_prefix_cache()
