"""Scheduler: iteration-level (continuous) batching under a token budget.

Each step first gives every running request its next tokens (one for a decode, the
next chunk for a partly prefilled prompt), then admits waiting requests with the
budget that is left. When the KV cache cannot hold a running request's next tokens,
the most recently admitted running request is preempted: its blocks are freed and
it goes back to the front of the queue, to be recomputed (largely from the prefix
cache) later.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Optional

from freight.core.kv_cache_manager import KVCacheManager
from freight.core.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_computed_tokens: int  # before this step
    num_new_tokens: int
    block_ids: list[int]

    @property
    def completes_sequence(self) -> bool:
        """True when this step reaches the request's last token, so a new token gets sampled."""
        return self.num_computed_tokens + self.num_new_tokens == self.request.num_tokens

    @property
    def sampled_requests(self) -> list[Request]:
        """The sequences that get a token from this request's last row (itself, plus forks)."""
        if not self.completes_sequence:
            return []
        return [self.request, *self.request.pending_forks]


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    finished_request_ids: set[str] = field(default_factory=set)  # since the previous step
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst), before the forward
    num_preempted: int = 0

    @property
    def total_num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
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
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: set[str] = set()
        self.num_preemptions = 0

    # -- queue management -------------------------------------------------
    def add_request(self, request: Request) -> None:
        num_seqs = 1 + len(request.pending_forks)
        if num_seqs > self.config.max_num_seqs:
            raise ValueError(f"the request needs {num_seqs} sequences (n/best_of) but max_num_seqs is "
                             f"{self.config.max_num_seqs}")
        self.requests[request.request_id] = request
        self.waiting.append(request)

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
        self._finished_ids.add(req.request_id)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- one step ---------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = set()
        budget = self.config.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.num_preempted += 1
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break
            out.scheduled.append(self._scheduled(req, num_new))
            budget -= num_new
            i += 1

        if out.num_preempted == 0:
            self._admit_waiting(out, budget)
        for s in out.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
        out.block_copies = self.kv.take_pending_copies()
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0:
            req = self.waiting[0]
            if self._num_seats() + 1 + len(req.pending_forks) > self.config.max_num_seqs:
                break
            cached_blocks, num_cached = self.kv.get_computed_blocks(req)
            num_new = req.num_tokens - num_cached
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if not self.kv.allocate_slots(req, num_new, cached_blocks):
                break
            self.waiting.popleft()
            self.kv.record_lookup(req.num_tokens, num_cached)
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
                req.first_scheduled_time = time.monotonic()
            req.num_computed_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(self._scheduled(req, num_new))
            budget -= num_new

    def _num_seats(self) -> int:
        # A running prompt's siblings (n > 1) take their seats when it forks, so they
        # count already: admitting past them would overshoot max_num_seqs later.
        return len(self.running) + sum(len(r.pending_forks) for r in self.running)

    def _scheduled(self, req: Request, num_new: int) -> ScheduledRequest:
        return ScheduledRequest(req, req.num_computed_tokens, num_new, self.kv.block_ids(req.request_id))

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # -- after the model ran -----------------------------------------------
    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Append each sampled token, apply token-level stops; returns the requests that got a token."""
        updated = []
        for s in out.scheduled:
            req = s.request
            if req.request_id not in sampled or req.status != RequestStatus.RUNNING:
                continue
            seqs = [req, *self._fork(req)]
            for seq in seqs:
                seq.append_token(sampled[seq.request_id])
                updated.append(seq)
                status = seq.check_stop(self.config.max_model_len)
                if status is not None:
                    self.running.remove(seq)
                    self._free(seq, status)
        return updated

    def _fork(self, req: Request) -> list[Request]:
        """Start the sibling sequences of req now that its prompt is in the cache."""
        children, req.pending_forks = req.pending_forks, []
        for child in children:
            self.kv.fork(req, child)
            child.num_computed_tokens = req.num_computed_tokens
            child.num_cached_tokens = req.num_cached_tokens
            child.first_scheduled_time = req.first_scheduled_time
            child.status = RequestStatus.RUNNING
            self.requests[child.request_id] = child
            self.running.append(child)
        return children

    def get_request(self, request_id: str) -> Optional[Request]:
        return self.requests.get(request_id)
