"""Scheduler: iteration-level (continuous) batching under a token budget.

Each step first gives every running request its next tokens (one for a decode, the
next chunk for a partly prefilled prompt), then admits waiting requests with the
budget that is left. When the KV cache cannot hold a running request's next tokens,
the last running request is preempted: its blocks are freed and it goes back to the
waiting queue, to be recomputed (largely from the prefix cache) later.

The scheduling policy (as vLLM's) orders both queues. fcfs: arrival order, so the victim
is the most recently admitted request and a preempted request resumes first. priority:
by (priority, arrival time), lower first, so the victim is the running request with the
largest key. The running list stays sorted by that key: a victim always comes after every
request already scheduled in the step (none has to be unscheduled), and a waiting request
never preempts a running one, however high its priority (vLLM v1 does not either).

The decision goes out as a plain-data SchedulerOutput (freight.step_contract): a
request the runner has not seen is sent whole once, afterwards only its new blocks.
The runner's ModelRunnerOutput comes back to update_from_output.

With speculative decoding (n-gram), a running decode is scheduled for 1 + K tokens: its last
token and K drafts proposed from its own context (scheduled_spec_decode_tokens). The drafts get KV
slots but never enter the request's tokens; once the runner has verified them, num_computed_tokens
steps back over the rejected ones, whose slots the next step overwrites. Drafts are dropped before
anyone is preempted for them, and none are proposed while more than disable_by_batch_size requests
are in the engine, or for requests with structured outputs.

A request with structured outputs waits (without holding up the queue behind it) until
its grammar has compiled; each sampled token then advances its matcher, and a grammar
that has accepted a stop token ends the sequence with "stop".
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from typing import Iterable, Optional

from freight.core.kv_cache_manager import KVCacheManager
from freight.core.request import Request, RequestStatus
from freight.core.request_queue import SchedulingPolicy, create_request_queue, priority_key
from freight.core.stats import SchedulerStats, SpecDecodingStats
from freight.spec_decode.config import SpeculativeConfig
from freight.spec_decode.ngram_proposer import NgramProposer
from freight.step_contract import CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    policy: SchedulingPolicy = SchedulingPolicy.FCFS
    speculative: Optional[SpeculativeConfig] = None

    def __post_init__(self) -> None:
        self.policy = SchedulingPolicy(self.policy)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            # Without chunking a sequence is prefilled whole: one longer than the budget
            # (a long prompt, or a recompute after preemption) could never be scheduled.
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than max_model_len "
                f"({self.max_model_len}) with chunked prefill disabled; raise max_num_batched_tokens "
                "or enable chunked prefill")


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager):
        self.config = config
        self.kv = kv_cache
        self.waiting = create_request_queue(config.policy)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: list[str] = []
        # Requests the runner holds -> the block-table length it knows (-1: preempted, its table is stale).
        self._sent_blocks: dict[str, int] = {}
        self._failed: list[Request] = []  # failed in the scheduler (grammar); reported by the next update
        self.num_preemptions = 0
        self.num_computed_prompt_tokens = 0
        self.num_generated_tokens = 0
        self.num_steps = 0
        spec = config.speculative
        self.proposer = (NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max, spec.num_speculative_tokens)
                         if spec is not None else None)
        self.spec_stats = SpecDecodingStats.empty(spec.num_speculative_tokens if spec is not None else 0)

    # -- queue management -------------------------------------------------
    def add_request(self, request: Request) -> None:
        num_seqs = 1 + len(request.pending_forks)
        if num_seqs > self.config.max_num_seqs:
            raise ValueError(f"the request needs {num_seqs} sequences (n/best_of) but max_num_seqs is "
                             f"{self.config.max_num_seqs}")
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.add_request(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Remove requests (abort, or a stop string seen by the output processor)."""
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.status.finished:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            self._free(req, status)
            done.append(req)
            for child in req.pending_forks:  # never forked: they hold no blocks
                child.status = status
                done.append(child)
            req.pending_forks = []
        return done

    def _free(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        self.kv.free(req)
        del self.requests[req.request_id]
        if self._sent_blocks.pop(req.request_id, None) is not None:
            self._finished_ids.append(req.request_id)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- one step ---------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        speculate = (self.proposer is not None
                     and len(self.running) + len(self.waiting) <= self.config.speculative.disable_by_batch_size)

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            drafts = self._propose(req, budget - 1) if speculate and num_new == 1 else []
            while not self.kv.allocate_slots(req, num_new + len(drafts)):
                if drafts:  # drafts never cost anyone a preemption
                    drafts = []
                    continue
                victim = self.running.pop()  # the newest (fcfs) or the largest (priority, arrival)
                self._preempt(victim)
                out.num_preempted += 1
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break
            if drafts:
                out.scheduled_spec_decode_tokens[req.request_id] = drafts
                num_new += len(drafts)
            scheduled.append((req, num_new))
            budget -= num_new
            i += 1

        if out.num_preempted == 0:
            self._admit_waiting(scheduled, budget)
        rewritten = self.kv.take_rewritten_tables()
        for req, num_new in scheduled:
            self._describe(out, req, num_new, req.request_id in rewritten)
            self._count_prompt_tokens(req, num_new)
            req.num_computed_tokens += num_new
        for req, _ in scheduled:  # after every allocation: nothing forked now can be preempted this step
            if req.pending_forks and req.num_computed_tokens == req.num_tokens:
                self._fork(out, req)
        out.total_num_scheduled_tokens = sum(out.num_scheduled_tokens.values())
        out.block_copies = self.kv.take_pending_copies()
        return out

    def _propose(self, req: Request, budget: int) -> list[int]:
        """Drafts for a decode: never more than its max_tokens, the context or the budget leave room for."""
        if req.structured is not None or req.pooling_params is not None or not req.output_token_ids:
            # (a draft would need the grammar's mask per position; a prompt's last token may still
            # have forks to start from its row, which must then be the request's last)
            return []
        room = min(req.max_tokens - len(req.output_token_ids), self.config.max_model_len - req.num_tokens) - 1
        return self.proposer.propose(req.all_token_ids, min(room, budget))

    def _admit_waiting(self, scheduled: list[tuple[Request, int]], budget: int) -> None:
        compiling: list[Request] = []  # skipped this step, keep their places
        while self.waiting and budget > 0:
            req = self.waiting[0]
            if req.structured is not None and not req.structured.ready():
                compiling.append(self.waiting.pop_request())
                continue
            if req.structured is not None and req.structured.error is not None:
                self.waiting.pop_request()
                self._fail(req, req.structured.error)
                continue
            if self._num_seats() + 1 + len(req.pending_forks) > self.config.max_num_seqs:
                break
            cached_blocks, num_cached = self.kv.get_computed_blocks(req)
            num_new = req.num_tokens - num_cached
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if not self.kv.allocate_slots(req, num_new, cached_blocks):
                break
            self.waiting.pop_request()
            self.kv.record_lookup(req.num_tokens, num_cached)
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
                req.first_scheduled_time = time.monotonic()
            req.num_computed_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self._add_running(req)
            scheduled.append((req, num_new))
            budget -= num_new
        self.waiting.prepend_requests(compiling)

    def _add_running(self, req: Request) -> None:
        if self.config.policy == SchedulingPolicy.PRIORITY:
            bisect.insort_right(self.running, req, key=priority_key)
        else:
            self.running.append(req)

    def _fail(self, req: Request, error: str) -> None:
        """End a request taken off its queue (and its unforked siblings) with an error."""
        req.error = error
        self._free(req, RequestStatus.FINISHED_ERROR)
        self._failed.append(req)
        for child in req.pending_forks:
            child.status, child.error = RequestStatus.FINISHED_ERROR, error
            self._failed.append(child)
        req.pending_forks = []

    def compiling_grammars(self) -> list:
        """The compile futures of waiting requests whose grammar is not ready yet."""
        return [r.structured.compiled for r in self.waiting if r.structured is not None and not r.structured.ready()]

    def grammar_requests(self, out: SchedulerOutput) -> list[Request]:
        """The step's constrained sequences that sample a token (their prompt is fully computed).

        A fork makes its own matcher here; if that fails, the fork alone fails (the runner's
        token for it is dropped, as for any request that ended during the step)."""
        reqs = []
        for rid in out.num_scheduled_tokens:
            req = self.requests.get(rid)
            if req is None or req.structured is None or req.num_computed_tokens != req.num_tokens:
                continue
            req.structured.ready()
            if req.structured.error is not None:
                self.running.remove(req)
                self._fail(req, req.structured.error)
            else:
                reqs.append(req)
        return reqs

    def _num_seats(self) -> int:
        # A running prompt's siblings (n > 1) take their seats when it forks, so they
        # count already: admitting past them would overshoot max_num_seqs later.
        return len(self.running) + sum(len(r.pending_forks) for r in self.running)

    def _describe(self, out: SchedulerOutput, req: Request, num_new: int, rewritten: bool) -> None:
        """Add req to the step's contract: whole the first time, then only what changed."""
        rid = req.request_id
        block_ids = self.kv.block_ids(rid)
        known = self._sent_blocks.get(rid)
        if known is None:
            out.scheduled_new_reqs.append(NewRequestData(
                rid, req.prompt_token_ids, req.sampling_params, sorted(req.eos_token_ids), block_ids,
                req.num_computed_tokens, pooling_params=req.pooling_params))
        else:
            # After a preemption (a fresh table) or a copy on write the whole table goes again.
            reset = rewritten or known < 0
            out.scheduled_cached_reqs.append(CachedRequestData(
                rid, req.num_computed_tokens, block_ids if reset else block_ids[known:], reset))
        self._sent_blocks[rid] = len(block_ids)
        out.num_scheduled_tokens[rid] = num_new

    def _count_prompt_tokens(self, req: Request, num_new: int) -> None:
        prompt_end = min(req.num_computed_tokens + num_new, req.num_prompt_tokens)
        self.num_computed_prompt_tokens += max(0, prompt_end - req.num_computed_tokens)

    def _fork(self, out: SchedulerOutput, parent: Request) -> None:
        """Start the sibling sequences of parent: this step computes the end of its prompt."""
        children, parent.pending_forks = parent.pending_forks, []
        for child in children:
            self.kv.fork(parent, child)
            child.num_computed_tokens = parent.num_computed_tokens
            child.num_cached_tokens = parent.num_cached_tokens
            child.first_scheduled_time = parent.first_scheduled_time
            child.status = RequestStatus.RUNNING
            self.requests[child.request_id] = child
            self._add_running(child)
            block_ids = self.kv.block_ids(child.request_id)
            out.scheduled_new_reqs.append(NewRequestData(
                child.request_id, child.prompt_token_ids, child.sampling_params, sorted(child.eos_token_ids),
                block_ids, child.num_computed_tokens, parent_req_id=parent.request_id))
            self._sent_blocks[child.request_id] = len(block_ids)
            out.num_scheduled_tokens[child.request_id] = 0

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        self._sent_blocks[req.request_id] = -1
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.prepend_request(req)

    # -- after the model ran -----------------------------------------------
    def update_from_output(self, out: SchedulerOutput, result: ModelRunnerOutput) -> list[tuple[Request, int]]:
        """Append each sampled token, apply token-level stops.

        Returns the sequences that got tokens, each with how many of its sampled tokens it
        kept (the tokens after one that stops the sequence are dropped)."""
        self.num_steps += 1
        updated = [(req, 0) for req in self._failed]
        self._failed = []
        for rid, error in result.failed.items():
            req = self.requests.get(rid)
            if req is not None and req.status == RequestStatus.RUNNING:
                self.running.remove(req)
                req.error = error
                self._free(req, RequestStatus.FINISHED_ERROR)
                updated.append((req, 0))
        for rid in result.pooler_output:
            req = self.requests.get(rid)
            if req is None or req.status != RequestStatus.RUNNING:
                continue
            # As in vLLM, a pooling request stops ("stop") as soon as its vector is out.
            self.running.remove(req)
            self._free(req, RequestStatus.FINISHED_STOPPED)
            updated.append((req, 0))
        drafts_of = out.scheduled_spec_decode_tokens
        for rid, tokens in zip(result.req_ids, result.sampled_token_ids):
            req = self.requests.get(rid)
            if req is None or req.status != RequestStatus.RUNNING:
                continue
            drafts = drafts_of.get(rid)
            if drafts and tokens:
                # The runner returns the accepted drafts and one token of its own: step back over the rest.
                self.spec_stats.observe(len(drafts), len(tokens) - 1)
                req.num_computed_tokens -= len(drafts) + 1 - len(tokens)
            kept = 0
            for tok in tokens:
                req.append_token(tok)
                kept += 1
                status = req.check_stop(self.config.max_model_len)
                if req.structured is not None:
                    status = self._advance_grammar(req, tok, status)
                if status is not None:
                    self.running.remove(req)
                    self._free(req, status)
                    break
            self.num_generated_tokens += kept
            updated.append((req, kept))
        return updated

    @staticmethod
    def _advance_grammar(req: Request, token: int, status: Optional[RequestStatus]) -> Optional[RequestStatus]:
        """Feed the sampled token to req's matcher; a grammar completed by a stop token stops the sequence.

        (llguidance reports termination already after the last content token: the next mask then
        allows only EOS, so the sequence still ends on a stop token, whose text is never output.)"""
        if not req.structured.matcher.accept_token(token):
            req.error = f"token {token} sampled outside the grammar"  # a masking bug; never silently
            return RequestStatus.FINISHED_ERROR
        is_stop_token = token in req.eos_token_ids or token in req.sampling_params.stop_token_ids
        if status is None and is_stop_token and req.structured.matcher.is_terminated():
            # (check_stop went on past EOS because of ignore_eos, but the grammar allows nothing more)
            req.stop_reason = None
            return RequestStatus.FINISHED_STOPPED
        return status

    def get_request(self, request_id: str) -> Optional[Request]:
        return self.requests.get(request_id)

    def make_stats(self) -> SchedulerStats:
        kv = self.kv
        return SchedulerStats(
            num_running=len(self.running), num_waiting=len(self.waiting), kv_cache_usage=kv.usage(),
            num_free_blocks=kv.num_free_blocks, num_total_blocks=kv.pool.num_blocks,
            num_preemptions=self.num_preemptions, prefix_cache_queries=kv.prefix_stats.queries,
            prefix_cache_hits=kv.prefix_stats.hits, num_computed_prompt_tokens=self.num_computed_prompt_tokens,
            num_generated_tokens=self.num_generated_tokens, num_steps=self.num_steps,
            num_allocated_blocks=kv.num_allocated_blocks, spec_decoding=self.spec_stats.snapshot())
