"""EngineCore: schedule -> execute -> update, on plain data.

It owns the scheduler and KV cache manager and calls an Executor; requests come in as
EngineCoreRequests (token ids, SamplingParams) and leave as EngineCoreOutputs (new
token ids, logprobs, finish reasons). Text never reaches it. The offline LLM calls it
in-process; the server runs it in its own process (core_proc.py).

With structured outputs in the batch, the grammar bitmask of the constrained rows is
filled on a helper thread while the forward runs on this one (torch stays on the step
thread), then handed to sample_tokens. Only where a core is left over: when the forward's
threads take every core (a small CPU box), a concurrent fill would stall the forward's
thread team for longer than the fill itself, so it runs before the forward instead.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Optional

from freight.config import EngineConfig
from freight.core.kv_cache_manager import KVCacheManager
from freight.core.request import Request, RequestStatus
from freight.core.scheduler import Scheduler, SchedulerConfig
from freight.core.stats import SchedulerStats, StepTokenHistogram
from freight.core.status import EngineCoreStatus, RecentSteps, StatusLease, build_status
from freight.engine.messages import EngineCoreOutput, EngineCoreOutputs, EngineCoreReady, EngineCoreRequest
from freight.executor.executor import Executor
from freight.model_config import ModelConfig
from freight.model_loader import resolve_model_dir
from freight.step_contract import GrammarOutput, LogprobsLists
from freight.structured_output.manager import StructuredOutputManager

logger = logging.getLogger(__name__)

DEFAULT_BATCHED_TOKENS = 2048


def resolve_max_model_len(config: EngineConfig, model_config: ModelConfig, capacity: int) -> int:
    """max_model_len as asked (checked against the model and the KV cache's capacity in tokens)."""
    limit = model_config.max_position_embeddings
    asked = config.max_model_len
    if asked is not None and asked > limit:
        raise ValueError(f"max_model_len={asked} is larger than the model's max_position_embeddings ({limit})")
    length = asked or limit
    if length > capacity:
        if asked is not None:
            raise ValueError(f"max_model_len={asked} needs more KV cache than kv_cache_memory gives "
                             f"({capacity} tokens); raise kv_cache_memory or lower max_model_len")
        logger.warning("max_model_len lowered from %d to %d tokens to fit the KV cache", length, capacity)
        length = capacity
    return length


class EngineCore:
    def __init__(self, config: EngineConfig, engine_index: int = 0):
        self.config = config
        self.engine_index = engine_index
        self._num_received = 0  # requests taken in so far; the frontend counts those still in transit
        self._iteration_tokens = StepTokenHistogram()  # tokens per step: vllm:iteration_tokens_total
        model_dir = resolve_model_dir(config.model, config.revision)
        self.model_config = ModelConfig.from_dir(model_dir)
        self.executor = Executor.create(config, model_dir, self.model_config)
        num_blocks = self.executor.determine_num_blocks()
        self.max_model_len = resolve_max_model_len(config, self.model_config, num_blocks * config.block_size)
        self.executor.initialize_cache(num_blocks, self.max_model_len)
        max_batched = config.max_num_batched_tokens or (
            DEFAULT_BATCHED_TOKENS if config.enable_chunked_prefill
            else max(self.max_model_len, DEFAULT_BATCHED_TOKENS))
        self.kv_cache = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, max_batched, self.max_model_len,
                                                   config.enable_chunked_prefill, config.scheduling_policy,
                                                   config.speculative_config),
                                   self.kv_cache)
        self.model_dir = model_dir
        self.recent_steps = RecentSteps()   # step times and batch sizes, for the status page
        self.status_lease = StatusLease()   # renewed by want_status while a status page watches
        self._structured: Optional[StructuredOutputManager] = None
        self._mask_thread: Optional[ThreadPoolExecutor] = None
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB), max_model_len %d, max_num_batched_tokens %d",
                    num_blocks, config.block_size, num_blocks * self.executor.kv_bytes_per_block() / 2**20,
                    self.max_model_len, max_batched)
        if config.speculative_config is not None:
            logger.info("speculative decoding: %s", config.speculative_config.to_dict())

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.pool.num_blocks

    def ready_message(self) -> EngineCoreReady:
        return EngineCoreReady(self.engine_index, self.max_model_len, self.num_blocks, str(self.executor.device),
                               str(self.executor.dtype).removeprefix("torch."))

    # -- requests ---------------------------------------------------------------
    def add_request(self, req: EngineCoreRequest) -> None:
        self._num_received += 1  # (taken, even if it fails below: no longer in transit)
        params = req.sampling_params
        eos = frozenset(req.eos_token_ids)
        seqs = [Request(request_id=sid, prompt_token_ids=req.prompt_token_ids, sampling_params=params.for_sample(i),
                        max_tokens=req.max_tokens, eos_token_ids=eos, arrival_time=req.arrival_time,
                        pooling_params=req.pooling_params, priority=req.priority)
                for i, sid in enumerate([req.request_id, *req.fork_ids])]
        if params.structured_outputs is not None:
            grammar = self.structured_outputs(req.eos_token_ids).request(params.structured_outputs)
            for i, seq in enumerate(seqs):  # every sample has its own matcher
                seq.structured = grammar if i == 0 else grammar.fork()
        seqs[0].pending_forks = seqs[1:]
        self.scheduler.add_request(seqs[0])

    def structured_outputs(self, eos_token_ids: list[int]) -> StructuredOutputManager:
        """The grammar manager, made on the first constrained request (its tokenizer is loaded lazily)."""
        if self._structured is None:
            from freight.structured_output.backends import make_backend_factory

            factory = make_backend_factory(self.config.tokenizer or str(self.model_dir), self.config,
                                           self.model_config.vocab_size, sorted(eos_token_ids))
            self._structured = StructuredOutputManager(factory, self.model_config.vocab_size,
                                                       self.config.structured_outputs_backend,
                                                       self.config.structured_output_defaults())
            if _has_spare_core(self.executor.device):
                self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="freight-bitmask")
        return self._structured

    def finish_requests(self, request_ids: Iterable[str], stopped: bool = False) -> list[str]:
        """Abort sequences (or end them for a stop string); returns the ids that were still unfinished."""
        status = RequestStatus.FINISHED_STOPPED if stopped else RequestStatus.FINISHED_ABORTED
        return [r.request_id for r in self.scheduler.finish_requests(request_ids, status)]

    def abort_all(self) -> list[str]:
        return self.finish_requests(list(self.scheduler.requests))

    def recover_from_failed_step(self) -> list[str]:
        """After a step raised (the forward itself): abort everything in flight and forget the prefix
        cache, whose blocks of that step may never have been written. Returns the aborted ids."""
        aborted = self.abort_all()
        self.kv_cache.reset_prefix_cache()
        return aborted

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # -- the step -----------------------------------------------------------------
    def step(self) -> EngineCoreOutputs:
        started = time.perf_counter()
        tokens_before = self.scheduler.num_computed_prompt_tokens + self.scheduler.num_generated_tokens
        sched_out = self.scheduler.schedule()
        mask_job = self._start_bitmask(sched_out)
        self.executor.execute_model(sched_out)
        runner_out = self.executor.sample_tokens(mask_job.result() if mask_job is not None else None)
        updated = self.scheduler.update_from_output(sched_out, runner_out)
        step_tokens = self.scheduler.num_computed_prompt_tokens + self.scheduler.num_generated_tokens - tokens_before
        if step_tokens:  # (idle steps, waiting on a grammar, are not iterations)
            self._iteration_tokens.observe(step_tokens)
        if sched_out.is_empty and not updated:
            compiling = self.scheduler.compiling_grammars()
            if compiling:  # only grammars are pending: wait for one instead of spinning (inputs wait <= 50 ms)
                futures.wait(compiling, timeout=0.05, return_when=futures.FIRST_COMPLETED)
        sampled = dict(zip(runner_out.req_ids, zip(runner_out.sampled_token_ids, runner_out.sampled_logprobs)))
        outputs = []
        for req, n in updated:
            tokens, lps = sampled.get(req.request_id, ([], []))
            outputs.append(EngineCoreOutput(
                req.request_id, tokens[:n], lps[:n], _first_rows(runner_out.logprobs.get(req.request_id), n),
                runner_out.prompt_logprobs.get(req.request_id),
                req.status.value if req.status.finished else None, req.stop_reason,
                max(req.num_cached_tokens, 0), req.first_scheduled_time, req.error,
                runner_out.pooler_output.get(req.request_id), req.num_preemptions))
        seen = {r.request_id for r, _ in updated}
        for rid, lps in runner_out.prompt_logprobs.items():  # prompt chunks that sampled nothing yet
            if rid not in seen:
                outputs.append(EngineCoreOutput(rid, [], [], new_prompt_logprobs=lps))
        self.recent_steps.record(time.perf_counter() - started, sched_out.total_num_scheduled_tokens,
                                 len(sched_out.num_scheduled_tokens))
        return EngineCoreOutputs(self.engine_index, outputs, self.make_stats(), self.due_status())

    def _start_bitmask(self, sched_out) -> Optional["Future[GrammarOutput]"]:
        """Fill the bitmask of the step's constrained rows on the helper thread (None: no such rows)."""
        if self._structured is None:
            return None
        reqs = self.scheduler.grammar_requests(sched_out)
        if not reqs:
            return None
        banned = [_min_tokens_banned(r) for r in reqs]

        def fill() -> GrammarOutput:
            return GrammarOutput.from_array([r.request_id for r in reqs],
                                            self._structured.fill_bitmask([r.structured for r in reqs], banned))

        if self._mask_thread is not None:
            return self._mask_thread.submit(fill)
        done: Future = Future()
        done.set_result(fill())
        return done

    def make_stats(self) -> SchedulerStats:
        stats = self.scheduler.make_stats()
        stats.num_requests_received = self._num_received
        stats.iteration_tokens = self._iteration_tokens.snapshot()
        return stats

    # -- the live status page (core/status.py) --------------------------------------
    def want_status(self) -> None:
        """A utility call: send status snapshots for the next LEASE_S seconds."""
        self.status_lease.renew()

    def make_status(self) -> EngineCoreStatus:
        return build_status(self.engine_index, self.scheduler, self.kv_cache, self.recent_steps, self.make_stats())

    def due_status(self) -> Optional[EngineCoreStatus]:
        """A snapshot if one is wanted and due (at most every MIN_INTERVAL_S), else None."""
        return self.make_status() if self.status_lease.take_due() else None

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache.reset_prefix_cache()

    def map_kv_cache(self, seq_lens: list[int]) -> None:
        """Map the pages of the KV blocks that new sequences of these lengths would take first (the pool
        hands out blocks in id order), before a timed run."""
        self.executor.map_kv_cache(sum(-(-n // self.config.block_size) for n in seq_lens))

    def shutdown(self) -> None:
        if self._structured is not None:
            self._structured.shutdown()
        if self._mask_thread is not None:
            self._mask_thread.shutdown(wait=False)
        self.executor.shutdown()


def _has_spare_core(device) -> bool:
    """Whether a bitmask fill can run beside the forward without taking a core from it."""
    import torch

    if device.type != "cpu":
        return True  # the host mostly waits on the device
    return len(os.sched_getaffinity(0)) > torch.get_num_threads()


def _first_rows(logprobs: Optional[LogprobsLists], n: int) -> Optional[LogprobsLists]:
    """The logprobs of the tokens a sequence kept (a stop among accepted drafts drops those after it)."""
    if logprobs is None or len(logprobs.token_ids) <= n:
        return logprobs
    return LogprobsLists(logprobs.token_ids[:n], logprobs.logprobs[:n])


def _min_tokens_banned(req: Request) -> list[int]:
    """The stop tokens a request may not sample yet (it has fewer than min_tokens outputs)."""
    p = req.sampling_params
    if len(req.output_token_ids) >= p.min_tokens:
        return []
    return list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(req.eos_token_ids))
