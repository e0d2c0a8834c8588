"""Model-free tests of the Scheduler + KVCacheManager: random workloads driven with fake tokens.

A `Harness` plays the engine core: it adds requests, aborts some, calls `schedule()`, emulates the
model runner from the plain-data step contract (freight.step_contract) and feeds sampled tokens
back through `update_from_output()`. The "model" is a deterministic function of a request's whole
token history, so every request's output is known in advance no matter how it was batched,
chunked, prefix-cached or preempted.

The runner emulation keeps only what the contract gives it, the way the real runner does: per
request the block table rebuilt from the diffs (NewRequestData once, then CachedRequestData's new
blocks, or a whole table when reset_block_ids) and its own token history (the prompt plus the
tokens it sampled). After every schedule() its table must equal the KV cache manager's, and after
every step its history must equal the scheduler's Request.all_token_ids.

It also keeps a shadow KV cache: each cache slot records which token history its K/V was computed
from (a key for all tokens up to and including that position). After every step, every running
request must find its own history in each slot of its block table it has computed; that is the
end-to-end property a paged cache with prefix sharing must keep (a shared or reused block holds
exactly the prefix the reader expects).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from freight.core.kv_cache_manager import KVCacheManager
from freight.core.request import Request, RequestStatus
from freight.core.request_queue import priority_key
from freight.core.scheduler import Scheduler, SchedulerConfig
from freight.sampling_params import SamplingParams
from freight.spec_decode.config import SpeculativeConfig
from freight.step_contract import ModelRunnerOutput, SchedulerOutput

EOS = 0


def model_token(tokens: list[int], vocab: int, salt: int, seq: int = 0) -> int:
    """The fake model + sampler: a deterministic function of the full token history (and, like
    a seeded sampler, of which sequence of an n > 1 request it samples for)."""
    return hash((salt, seq, tuple(tokens))) % vocab


def seq_index(request_id: str) -> int:
    return int(request_id.rsplit("#", 1)[1]) if "#" in request_id else 0


def history_key(keys: list[int], tokens: list[int], pos: int) -> int:
    """A key for tokens[:pos + 1] (chained, memoised in `keys`; histories only ever grow)."""
    while len(keys) <= pos:
        keys.append(hash((keys[-1] if keys else -1, tokens[len(keys)])))
    return keys[pos]


def reference_output(prompt: list[int], max_tokens: int, ignore_eos: bool, max_model_len: int,
                     vocab: int, salt: int, seq: int = 0) -> tuple[list[int], RequestStatus]:
    """What a sequence must produce, computed directly without any scheduler."""
    toks, out = list(prompt), []
    while True:
        t = model_token(toks, vocab, salt, seq)
        toks.append(t)
        out.append(t)
        if not ignore_eos and t == EOS:
            return out, RequestStatus.FINISHED_STOPPED
        if len(out) >= max_tokens or len(toks) >= max_model_len:
            return out, RequestStatus.FINISHED_LENGTH


def contract_entries(out: SchedulerOutput) -> dict[str, tuple[int, int, Optional[str]]]:
    """req id -> (num_computed_tokens before the step, tokens scheduled, parent id of a fork)."""
    entries = {}
    for r in out.scheduled_new_reqs:
        entries[r.req_id] = (r.num_computed_tokens, out.num_scheduled_tokens[r.req_id], r.parent_req_id)
    for r in out.scheduled_cached_reqs:
        entries[r.req_id] = (r.num_computed_tokens, out.num_scheduled_tokens[r.req_id], None)
    return entries


def sampling_req_ids(out: SchedulerOutput, num_tokens: Callable[[str], int]) -> list[str]:
    """The sequences that sample in a step: those whose scheduled tokens reach their last token
    (num_tokens(req id): its length as the runner knows it), then every fork of the step."""
    entries = contract_entries(out)
    rows = [rid for rid, (c, n, parent) in entries.items() if parent is None and c + n == num_tokens(rid)]
    return rows + [rid for rid, (_, _, parent) in entries.items() if parent is not None]


def runner_output(sampled: dict[str, list[int]]) -> ModelRunnerOutput:
    return ModelRunnerOutput(req_ids=list(sampled), sampled_token_ids=list(sampled.values()),
                             sampled_logprobs=[[0.0] * len(t) for t in sampled.values()])


@dataclass
class Spec:
    rid: str
    prompt: list[int]
    max_tokens: int
    ignore_eos: bool
    arrival: int = 0              # step before which it is added
    abort_at: Optional[int] = None  # step before which it is aborted (if still alive)
    n: int = 1                    # sequences (n > 1: the first computes the prompt, the rest fork)
    prompt_logprobs: Optional[int] = None  # (no prefix-cache hits for such a request)
    priority: int = 0             # lower is served earlier (the priority policy only)

    @property
    def seq_ids(self) -> list[str]:
        return [self.rid] if self.n == 1 else [f"{self.rid}#{i}" for i in range(self.n)]


@dataclass
class Config:
    block_size: int
    num_blocks: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    chunked: bool
    caching: bool
    vocab: int
    salt: int
    policy: str = "fcfs"
    spec_k: int = 0               # > 0: n-gram speculative decoding with this many drafts


@dataclass
class RunnerSeq:
    """What the emulated runner holds about one sequence: only what the contract told it."""

    table: list[int]
    tokens: list[int]             # the prompt, then every token the runner sampled for it
    keys: list[int] = field(default_factory=list)  # history_key memo over `tokens`


class Harness:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.bs = cfg.block_size
        self.kv = KVCacheManager(cfg.num_blocks, cfg.block_size, cfg.caching)
        spec = (SpeculativeConfig(num_speculative_tokens=cfg.spec_k, prompt_lookup_min=1, prompt_lookup_max=2,
                                  disable_by_batch_size=1 << 30) if cfg.spec_k else None)
        self.sched = Scheduler(SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                               cfg.max_model_len, cfg.chunked, cfg.policy, spec), self.kv)
        self.reqs: dict[str, Request] = {}   # every sequence ever added, by sequence id
        self.specs: dict[str, Spec] = {}
        self.aborted: set[str] = set()
        self.unreported: set[str] = set()   # sent to the runner, finished since the last schedule()
        self.runner: dict[str, RunnerSeq] = {}  # the runner's requests: sent and not yet reported finished
        self.ever_sent: set[str] = set()
        self.stale: set[str] = set()        # held by the runner but preempted: its table is out of date
        self.slots: dict[tuple[int, int], int] = {}  # (block_id, offset) -> history key
        self.prefix_keys: dict[str, list[int]] = {}
        self.steps = 0
        self.saw_preemption = False
        self.saw_prefix_hit = False
        self.saw_shared_block = False
        self.saw_fork = False
        self.saw_copy = False
        self.saw_reset = False

    # -- engine-side actions --------------------------------------------------------------
    def add(self, spec: Spec) -> Request:
        """Add a request the way EngineCore.add_request does; returns its first sequence."""
        assert 1 <= len(spec.prompt) < self.cfg.max_model_len <= self.cfg.num_blocks * self.bs
        assert spec.n <= self.cfg.max_num_seqs
        params = SamplingParams(n=spec.n, max_tokens=spec.max_tokens, ignore_eos=spec.ignore_eos,
                                prompt_logprobs=spec.prompt_logprobs)
        seqs = [Request(request_id=sid, prompt_token_ids=list(spec.prompt), sampling_params=params.for_sample(i),
                        max_tokens=spec.max_tokens, eos_token_ids=frozenset({EOS}), priority=spec.priority)
                for i, sid in enumerate(spec.seq_ids)]
        seqs[0].pending_forks = seqs[1:]
        for r in seqs:
            self.reqs[r.request_id] = r
        self.specs[spec.rid] = spec
        self.sched.add_request(seqs[0])
        assert self.sched.get_request(seqs[0].request_id) is seqs[0]
        return seqs[0]

    def abort(self, rid: str) -> None:
        """Abort all sequences of request `rid` (like EngineCore.finish_requests)."""
        spec = self.specs.get(rid)
        seq_ids = spec.seq_ids if spec else [rid]
        known = {sid for sid in seq_ids if self.sched.get_request(sid) is not None}
        pending = {c.request_id for sid in known for c in self.sched.get_request(sid).pending_forks}
        done = self.sched.finish_requests(seq_ids, RequestStatus.FINISHED_ABORTED)
        assert sorted(r.request_id for r in done) == sorted(known | pending)
        for r in done:
            assert r.status == RequestStatus.FINISHED_ABORTED
            assert r.pending_forks == []
            self.aborted.add(r.request_id)
        # The runner must drop exactly the aborted sequences it was sent (running or preempted);
        # waiting ones it never saw, and pending forks were never started.
        self.unreported |= known & set(self.runner)
        for sid in seq_ids:
            assert self.sched.get_request(sid) is None
        self.check()

    # -- one engine step ------------------------------------------------------------------
    def key(self, req: Request, pos: int) -> int:
        return history_key(self.prefix_keys.setdefault(req.request_id, []), req.all_token_ids, pos)

    def apply_finished(self, out: SchedulerOutput) -> None:
        """The runner drops the state of finished sequences: exactly those it was sent that
        finished (stopped, or were aborted) since the previous step."""
        assert len(set(out.finished_req_ids)) == len(out.finished_req_ids), out.finished_req_ids
        assert set(out.finished_req_ids) == self.unreported
        for rid in out.finished_req_ids:
            assert rid in self.runner and self.sched.get_request(rid) is None
            del self.runner[rid]
            self.stale.discard(rid)
        self.unreported = set()

    def apply_diff(self, out: SchedulerOutput, waiting_before: set[str]) -> None:
        """Rebuild each scheduled request's block table from the contract, as the runner must."""
        kv = self.kv
        copied_to = {dst for _, dst in out.block_copies}
        for new in out.scheduled_new_reqs:
            rid = new.req_id
            assert rid not in self.ever_sent, f"{rid} sent whole twice"
            req = self.sched.get_request(rid)
            assert req is not None
            assert new.prompt_token_ids == req.prompt_token_ids
            assert new.sampling_params == req.sampling_params
            assert set(new.eos_token_ids) == set(req.eos_token_ids)
            if new.parent_req_id is None:
                assert rid in waiting_before, f"{rid} sent whole but it was not waiting"
            else:
                # (its blocks may include a block copied to in this step: the copy runs before
                # the forward, so the fork sees the copied and newly written K/V, as the parent)
                assert rid not in waiting_before
            self.ever_sent.add(rid)
            self.runner[rid] = RunnerSeq(table=list(new.block_ids), tokens=list(new.prompt_token_ids))
        for cached in out.scheduled_cached_reqs:
            rid = cached.req_id
            seq = self.runner.get(rid)
            assert seq is not None, f"{rid} sent as cached but the runner does not hold it"
            # The whole table goes again only after a preemption or a copy on write; otherwise
            # only the blocks added since the runner last heard of it.
            expect_reset = rid in self.stale or bool(copied_to & set(kv.block_ids(rid)))
            assert cached.reset_block_ids == expect_reset, (rid, cached, rid in self.stale)
            if cached.reset_block_ids:
                self.saw_reset = True
                seq.table = list(cached.new_block_ids)
            else:
                seq.table.extend(cached.new_block_ids)
            self.stale.discard(rid)
        # Every running request (scheduled this step or not): the runner's table is the manager's.
        for req in self.sched.running:
            rid = req.request_id
            assert rid in self.runner, f"{rid} is running but was never sent"
            assert rid not in self.stale
            assert self.runner[rid].table == kv.block_ids(rid), (
                f"{rid}: runner's table {self.runner[rid].table} != {kv.block_ids(rid)}")
        # A preempted request the runner holds keeps its state; its table is stale until resumed.
        for req in self.sched.waiting:
            if req.request_id in self.runner:
                assert req.status == RequestStatus.PREEMPTED
                self.stale.add(req.request_id)
        assert set(self.runner) <= set(self.sched.requests)

    def step(self) -> None:
        cfg, bs = self.cfg, self.bs
        waiting_before = {r.request_id for r in self.sched.waiting}
        running_before = {r.request_id for r in self.sched.running}
        held_before = {rid: {b.block_id for b in blocks} for rid, blocks in self.kv.req_blocks.items()}
        out = self.sched.schedule()
        self.steps += 1
        self.apply_finished(out)
        if out.num_preempted:
            self.saw_preemption = True
        assert out.num_preempted == sum(1 for r in self.sched.waiting if r.request_id in running_before)
        if cfg.policy == "priority":
            self.check_priority_order(waiting_before, running_before)

        # (1) budgets, and the contract's bookkeeping
        entries = contract_entries(out)
        assert len(entries) == len(out.scheduled_new_reqs) + len(out.scheduled_cached_reqs), "sent twice in a step"
        assert set(entries) == set(out.num_scheduled_tokens)
        assert out.scheduled_req_ids == list(entries)
        assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())
        assert out.total_num_scheduled_tokens <= cfg.max_num_batched_tokens
        assert out.is_empty == (out.total_num_scheduled_tokens == 0)
        drafts = out.scheduled_spec_decode_tokens
        if not cfg.spec_k:
            assert drafts == {}
        for rid, d in drafts.items():
            # Drafts only for decodes (the last token to compute), at most K, within max_tokens and the context.
            c, n, parent = entries[rid]
            req = self.sched.get_request(rid)
            assert parent is None and 1 <= len(d) <= cfg.spec_k and n == 1 + len(d)
            assert c + 1 == req.num_tokens and req.output_token_ids
            assert len(req.output_token_ids) + 1 + len(d) <= req.max_tokens
            assert req.num_tokens + 1 + len(d) <= cfg.max_model_len
        assert len(self.sched.running) <= cfg.max_num_seqs
        assert len(entries) <= cfg.max_num_seqs
        assert self.sched.num_unfinished == 0 or not out.is_empty, "nothing scheduled with work pending"

        self.apply_diff(out, waiting_before)

        for rid, (c, n, parent) in entries.items():
            req = self.sched.get_request(rid)
            assert req.status == RequestStatus.RUNNING and req in self.sched.running
            assert len(self.kv.block_ids(rid)) >= math.ceil(req.num_computed_tokens / bs)
            assert c >= 0
            if parent is None:
                assert n >= 1
                assert req.num_computed_tokens == c + n  # advanced
                assert c + n - len(drafts.get(rid, ())) <= req.num_tokens
                if not cfg.chunked:
                    assert c + n - len(drafts.get(rid, ())) == req.num_tokens, \
                        "a prompt was split with chunked prefill off"
                if rid in waiting_before and c > 0:
                    self.saw_prefix_hit = True
                    assert c % bs == 0
            else:
                # A fork: started in the step that computes the end of its parent's prompt, with
                # the parent's blocks and computed prompt, and no tokens of its own to run.
                self.saw_fork = True
                assert n == 0 and parent in entries and entries[parent][2] is None
                pc, pn, _ = entries[parent]
                p = self.sched.get_request(parent)
                assert pc + pn == p.num_tokens == p.num_prompt_tokens
                assert c == req.num_computed_tokens == req.num_tokens == p.num_tokens
                assert req.prompt_token_ids == p.prompt_token_ids and not req.output_token_ids
                assert self.kv.block_ids(rid) == self.kv.block_ids(parent)
                assert p.pending_forks == [] and req.pending_forks == []
                assert rid.split("#")[0] == parent.split("#")[0] and seq_index(parent) == 0

        # Emulate the runner: block copies first, then all new K/V are written before anything is read.
        for src, dst in out.block_copies:
            self.saw_copy = True
            assert src != dst
            # The target is a fresh block: no sequence that held it before this step still does
            # (a preempted one may have freed it this step). It may be shared within this step
            # already (a prefix-cache hit on it, or a fork of its owner): the copy runs before the
            # forward writes or reads anything, so they all see the copy.
            assert not any(dst in blocks and dst in self.kv.block_ids(rid) for rid, blocks in held_before.items()), \
                "copy-on-write target was in use"
            for off in range(bs):
                if (src, off) in self.slots:
                    self.slots[(dst, off)] = self.slots[(src, off)]
                else:
                    self.slots.pop((dst, off), None)
        for rid, (c, n, _) in entries.items():
            seq = self.runner[rid]
            d = drafts.get(rid, [])
            assert c + n <= len(seq.tokens) + len(d), f"{rid}: scheduled tokens the runner does not have"
            # Draft positions get K/V of the drafted history (a copy of the memo: drafts are not history).
            keys, tokens = (seq.keys, seq.tokens) if not d else (list(seq.keys), seq.tokens + d)
            for p in range(c, c + n):
                self.slots[(seq.table[p // bs], p % bs)] = history_key(keys, tokens, p)

        # Which rows sample: decided from the runner's own history, and it must agree with the scheduler.
        sampling = sampling_req_ids(out, lambda rid: len(self.runner[rid].tokens) + len(drafts.get(rid, ())))
        for rid, (c, n, parent) in entries.items():
            if parent is None:
                assert (rid in sampling) == (c + n == self.sched.get_request(rid).num_tokens + len(drafts.get(rid, ())))
        sampled: dict[str, list[int]] = {}
        for rid in sampling:
            parent = entries[rid][2]
            history = self.runner[rid if parent is None else parent].tokens
            # Forks draw from the parent's last row: same history (the shared prompt).
            assert self.runner[rid].tokens == history
            # Verification: sample each position; go on while the token sampled is the draft fed there.
            d, toks = drafts.get(rid, []), []
            while True:
                toks.append(model_token(history + toks, cfg.vocab, cfg.salt, seq_index(rid)))
                if len(toks) > len(d) or toks[-1] != d[len(toks) - 1]:
                    break
            sampled[rid] = toks
        self.check_shadow()
        if cfg.spec_k:  # (the hooks' subclasses drive a runner-side batch without speculation)
            assert type(self).on_schedule is Harness.on_schedule and type(self).on_update is Harness.on_update
        else:
            self.on_schedule(out, entries, {rid: toks[0] for rid, toks in sampled.items()})

        updated = self.sched.update_from_output(out, runner_output(sampled))
        assert sorted(r.request_id for r, _ in updated) == sorted(sampled)
        for r, kept in updated:
            toks = sampled[r.request_id]
            assert 1 <= kept <= len(toks) and (kept == len(toks) or r.status.finished)
            assert r.output_token_ids[-kept:] == toks[:kept]
            assert r.pending_forks == []
            if r.status.finished:
                assert r not in self.sched.running and self.sched.get_request(r.request_id) is None
                assert r.request_id in self.runner
                self.unreported.add(r.request_id)
            else:
                assert r.status == RequestStatus.RUNNING and self.sched.get_request(r.request_id) is r
        for rid, toks in sampled.items():  # the runner appends what it sampled itself
            self.runner[rid].tokens.extend(toks)
        for rid, seq in self.runner.items():
            req = self.reqs[rid]
            if req.status.finished:  # (tokens accepted after a stop are the runner's only; it drops them)
                assert seq.tokens[:req.num_tokens] == req.all_token_ids, f"{rid}: runner history differs"
            else:
                assert seq.tokens == req.all_token_ids, f"{rid}: runner history differs"
        if not cfg.spec_k:
            self.on_update(out, {rid: toks[0] for rid, toks in sampled.items()})
        else:  # rejected drafts stepped back over: every computed position holds the request's own history
            self.check_shadow()
        self.check()

    # Hooks for a subclass that also drives a real runner-side batch (tests/test_input_batch.py).
    def on_schedule(self, out: SchedulerOutput, entries: dict, sampled: dict[str, int]) -> None:
        pass

    def on_update(self, out: SchedulerOutput, sampled: dict[str, int]) -> None:
        pass

    # -- invariants -----------------------------------------------------------------------
    def check_priority_order(self, waiting_before: set[str], running_before: set[str]) -> None:
        """The priority policy: admission in (priority, arrival) order, victims with the largest keys."""
        sched = self.sched
        admitted = [r for r in sched.running if r.request_id in waiting_before]
        still_waiting = [r for r in sched.waiting if r.request_id in waiting_before]
        if admitted and still_waiting:
            # (every request here fits once it is at the head: the queue only stops at one that does not)
            assert max(map(priority_key, admitted)) <= min(map(priority_key, still_waiting)), (
                "a waiting request was admitted before one with a smaller (priority, arrival)")
        preempted = [r for r in sched.waiting if r.request_id in running_before]
        if preempted and sched.running:
            assert max(map(priority_key, sched.running)) <= min(map(priority_key, preempted)), (
                "preempted a request while one with a larger (priority, arrival) kept running")
        assert [priority_key(r) for r in sched.running] == sorted(priority_key(r) for r in sched.running)
        assert [priority_key(r) for r in sched.waiting] == sorted(priority_key(r) for r in sched.waiting)

    def check_shadow(self) -> None:
        """Every computed position of every running request holds that request's own history."""
        bs = self.bs
        for req in self.sched.running:
            table = self.kv.block_ids(req.request_id)
            # (before update_from_output, positions past the request's tokens hold drafts: checked once accepted)
            for p in range(min(req.num_computed_tokens, req.num_tokens)):
                got = self.slots.get((table[p // bs], p % bs))
                assert got == self.key(req, p), (
                    f"{req.request_id}: slot for position {p} (block {table[p // bs]}) holds K/V of another "
                    f"history")

    def check(self) -> None:
        cfg, bs, kv, sched, pool = self.cfg, self.bs, self.kv, self.sched, self.kv.pool
        running, waiting = sched.running, list(sched.waiting)
        # queues
        ids_r = [r.request_id for r in running]
        ids_w = [r.request_id for r in waiting]
        assert len(set(ids_r)) == len(ids_r) and len(set(ids_w)) == len(ids_w)
        assert not set(ids_r) & set(ids_w)
        assert set(sched.requests) == set(ids_r) | set(ids_w)
        assert sched.num_unfinished == len(ids_r) + len(ids_w)
        assert len(running) <= cfg.max_num_seqs
        for r in running:
            assert r.status == RequestStatus.RUNNING
            assert 0 < r.num_computed_tokens < r.num_tokens
            # (4) block table covers exactly the computed tokens (and, after rejected drafts, at most
            # the blocks of K more: their slots are written again before anything reads them)
            held = len(kv.req_blocks[r.request_id])
            assert math.ceil(r.num_computed_tokens / bs) <= held <= math.ceil((r.num_computed_tokens + cfg.spec_k) / bs)
            assert kv.num_cached_blocks.get(r.request_id, 0) <= len(kv.req_blocks[r.request_id])
        for r in running:
            if r.pending_forks:  # still prefilling its prompt (chunked)
                assert not r.output_token_ids and r.num_computed_tokens < r.num_prompt_tokens
        # Each request's seat count includes its pending forks.
        assert len(running) + sum(len(r.pending_forks) for r in running) <= cfg.max_num_seqs
        pending = [c for r in running + waiting for c in r.pending_forks]
        for c in pending:
            assert c.status == RequestStatus.WAITING and c.request_id not in sched.requests
            assert c.request_id not in kv.req_blocks and c.num_computed_tokens == 0 and not c.output_token_ids
        for r in waiting:
            if r.pending_forks:
                assert not r.output_token_ids
            assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert r.num_computed_tokens == 0
            assert kv.req_blocks.get(r.request_id, []) == []
            assert r.request_id not in kv.num_cached_blocks
        for r in self.reqs.values():
            assert r.num_tokens == r.num_prompt_tokens + len(r.output_token_ids)
            assert r.all_token_ids[:r.num_prompt_tokens] == r.prompt_token_ids
            assert r.num_tokens <= cfg.max_model_len
            if r.request_id not in sched.requests and r not in pending:
                assert r.status.finished
        assert set(kv.req_blocks) <= set(sched.requests)
        assert set(kv.num_cached_blocks) <= set(sched.requests)

        # (2) ref counts == number of tables holding the block; ref 0 <=> in the free queue
        holders: dict[int, list[tuple[str, int]]] = {}
        for rid, blocks in kv.req_blocks.items():
            assert len({id(b) for b in blocks}) == len(blocks), f"{rid} holds a block twice"
            for i, b in enumerate(blocks):
                assert pool.blocks[b.block_id] is b
                holders.setdefault(b.block_id, []).append((rid, i))
        for b in pool.blocks:
            assert b.ref_cnt == len(holders.get(b.block_id, ())), f"block {b.block_id}"
            assert (b.ref_cnt == 0) == (b.block_id in pool.free_queue)
        for bid, b in pool.free_queue.items():
            assert pool.blocks[bid] is b
        assert kv.num_free_blocks == sum(1 for b in pool.blocks if b.ref_cnt == 0)

        # (3) a shared block sits at the same index and holds the same prefix in every holder: up to
        # the block's end, or for a partly written block (only forks share those, until one of them
        # writes and copies it) up to where every holder has computed.
        for bid, hs in holders.items():
            if len(hs) < 2:
                continue
            self.saw_shared_block = True
            (rid0, i0) = hs[0]
            end = (i0 + 1) * bs
            upto = min([end] + [sched.requests[rid].num_computed_tokens for rid, _ in hs])
            if upto < end:
                assert all(i == len(kv.req_blocks[rid]) - 1 for rid, i in hs), "shared partial block not last"
                assert pool.blocks[bid].block_hash is None
                fam = {rid.split("#")[0] for rid, _ in hs}
                assert len(fam) == 1 and all("#" in rid for rid, _ in hs), "partial block shared across requests"
            prefix = sched.requests[rid0].all_token_ids[:upto]
            assert len(prefix) == upto
            for rid, i in hs[1:]:
                assert i == i0, f"block {bid} at index {i0} in {rid0} but {i} in {rid}"
                assert sched.requests[rid].all_token_ids[:upto] == prefix, f"block {bid} shared by different prefixes"

        # (5) the prefix cache map is consistent both ways
        for h, b in pool.cached.items():
            assert b.block_hash == h
        for b in pool.blocks:
            if b.block_hash is not None:
                assert pool.cached.get(b.block_hash) is b
        if not cfg.caching:
            assert pool.cached == {}
        # A published block in a request's table carries that request's hash for that index.
        for rid, blocks in kv.req_blocks.items():
            req = sched.requests[rid]
            for i, b in enumerate(blocks):
                if b.block_hash is not None:
                    assert i < len(req.block_hashes) and b.block_hash == req.block_hashes[i]
        assert 0 <= kv.prefix_stats.hits <= kv.prefix_stats.queries

    def check_final(self, specs: list[Spec]) -> None:
        """After everything finished: the cache is empty and outputs are right."""
        out = self.sched.schedule()  # flush the last finished ids
        assert out.is_empty and out.num_preempted == 0
        assert not out.scheduled_new_reqs and not out.scheduled_cached_reqs and not out.block_copies
        self.apply_finished(out)
        assert self.runner == {}, f"the runner still holds {sorted(self.runner)}"
        self.on_schedule(out, {}, {})
        kv, pool, sched = self.kv, self.kv.pool, self.sched
        assert not sched.waiting and not sched.running and not sched.requests
        assert kv.req_blocks == {} and kv.num_cached_blocks == {}
        assert pool.num_free_blocks == pool.num_blocks == self.cfg.num_blocks
        assert all(b.ref_cnt == 0 for b in pool.blocks)
        assert sorted(pool.free_queue) == list(range(pool.num_blocks))
        for spec in specs:
            for sid in spec.seq_ids:
                req = self.reqs.get(sid)
                if req is None:
                    continue
                want, status = reference_output(spec.prompt, spec.max_tokens, spec.ignore_eos,
                                                self.cfg.max_model_len, self.cfg.vocab, self.cfg.salt,
                                                seq_index(sid))
                if sid in self.aborted:
                    assert req.status == RequestStatus.FINISHED_ABORTED
                    assert req.output_token_ids == want[:len(req.output_token_ids)]
                    assert len(req.output_token_ids) < len(want)
                else:
                    assert req.status == status, sid
                    assert req.output_token_ids == want, sid
        if self.cfg.caching:
            pool_ok = pool.reset_prefix_cache()
            assert pool_ok and pool.cached == {}


def step_bound(cfg: Config, specs: list[Spec]) -> int:
    """Steps within which everything must finish: the oldest running request is never preempted
    (it always fits alone) and gets >= 1 token a step, and an empty running list always admits."""
    last = max((s.arrival for s in specs), default=0)
    bound = sum(s.n for s in specs) * cfg.max_model_len
    if cfg.policy == "priority":
        # The running request with the smallest key is never preempted, but a waiting one with a smaller
        # key displaces it once admitted (and it may be preempted later): each admission can cost a redo.
        bound *= 1 + len(specs)
    return last + bound + 2


def run_scenario(cfg: Config, specs: list[Spec], harness: type[Harness] = Harness) -> Harness:
    h = harness(cfg)
    bound = step_bound(cfg, specs)
    arrivals = sorted(specs, key=lambda s: s.arrival)
    aborts = sorted((s for s in specs if s.abort_at is not None), key=lambda s: s.abort_at)
    ai = bi = 0
    while True:
        while ai < len(arrivals) and arrivals[ai].arrival <= h.steps:
            h.add(arrivals[ai])
            ai += 1
        while bi < len(aborts) and aborts[bi].abort_at <= h.steps:
            if aborts[bi].rid in h.specs:
                h.abort(aborts[bi].rid)
            bi += 1
        if ai == len(arrivals) and h.sched.num_unfinished == 0:
            break
        assert h.steps < bound, f"no progress: {h.sched.num_unfinished} unfinished after {h.steps} steps"
        h.step()
    h.check_final(specs)
    return h


# -- strategies ---------------------------------------------------------------------------------

MAX_LEN = 40


@st.composite
def configs(draw, chunked=None, caching=None, policy: str = "fcfs", spec: bool = False) -> Config:
    bs = draw(st.sampled_from([1, 2, 4, 16]))
    mml = draw(st.integers(2, MAX_LEN))
    # max_model_len never exceeds the cache; keep the cache tight so requests preempt each other.
    min_nb = -(-mml // bs)
    nb = draw(st.one_of(st.integers(min_nb, min_nb + 2), st.integers(min_nb, 3 * min_nb + 2)))
    chunked = draw(st.booleans()) if chunked is None else chunked
    if chunked:
        mbt = draw(st.one_of(st.integers(1, 4), st.integers(1, 2 * mml)))
    else:
        # Without chunking a whole sequence (up to max_model_len - 1 tokens when recomputed after
        # preemption) must fit the budget; like vLLM, SchedulerConfig demands >= max_model_len.
        mbt = draw(st.integers(mml, mml + 8))
    return Config(block_size=bs, num_blocks=nb, max_model_len=mml,
                  max_num_seqs=draw(st.integers(1, 6)), max_num_batched_tokens=mbt, chunked=chunked,
                  caching=draw(st.booleans()) if caching is None else caching,
                  vocab=draw(st.integers(2, 10)), salt=draw(st.integers(0, 1000)), policy=policy,
                  spec_k=draw(st.sampled_from([1, 2, 4])) if spec else 0)


@st.composite
def workloads(draw, cfg: Config, aborts: bool = True, max_requests: int = 8, forks: bool = False) -> list[Spec]:
    """Random requests; under the priority policy each gets a priority (ties are common)."""
    mml = cfg.max_model_len
    tok = st.integers(0, cfg.vocab - 1)
    # A small pool of prefixes: most prompts start with one of them, so prefix caching hits.
    pool = draw(st.lists(st.lists(tok, min_size=mml, max_size=mml), min_size=1, max_size=2))
    n = draw(st.integers(1, max_requests))
    specs = []
    for i in range(n):
        plen = draw(st.integers(1, mml - 1))
        shared = draw(st.one_of(st.just(plen), st.integers(0, plen)))
        base = draw(st.sampled_from(pool))
        prompt = base[:shared] + draw(st.lists(tok, min_size=plen - shared, max_size=plen - shared))
        specs.append(Spec(
            rid=f"r{i}", prompt=prompt,
            max_tokens=draw(st.one_of(st.just(mml), st.integers(1, mml))),
            ignore_eos=draw(st.sampled_from([True, True, False])),
            arrival=draw(st.one_of(st.just(0), st.integers(0, 12))),
            abort_at=draw(st.one_of(st.none(), st.integers(0, 40))) if aborts else None,
            n=draw(st.sampled_from([1, 1, 1, 2, 3])) if forks else 1,
            priority=draw(st.integers(-2, 2)) if cfg.policy == "priority" else 0))
    for sp in specs:
        sp.n = min(sp.n, cfg.max_num_seqs)
    return specs


@st.composite
def scenarios(draw, aborts: bool = True, chunked=None, caching=None, forks: bool = False, policy: str = "fcfs",
              spec: bool = False):
    cfg = draw(configs(chunked=chunked, caching=caching, policy=policy, spec=spec))
    return cfg, draw(workloads(cfg, aborts=aborts, forks=forks))


def _events(h: Harness) -> None:
    event(f"preempted={h.saw_preemption}")
    event(f"prefix_hit={h.saw_prefix_hit}")
    event(f"shared_block={h.saw_shared_block}")
    event(f"aborted={bool(h.aborted)}")
    event(f"forked={h.saw_fork}")
    event(f"copy_on_write={h.saw_copy}")
    event(f"table_resent={h.saw_reset}")


# -- property tests -----------------------------------------------------------------------------

@settings(max_examples=250, deadline=None)
@given(scenarios())
def test_random_workloads_keep_invariants(scenario):
    cfg, specs = scenario
    h = run_scenario(cfg, specs)
    _events(h)


@settings(max_examples=150, deadline=None)
@given(scenarios(spec=True, forks=True))
def test_random_workloads_with_speculation(scenario):
    """n-gram drafts verified by the fake model: outputs equal the reference (check_final), every computed
    slot holds its own history after rejected drafts are stepped back over (check_shadow), blocks add up."""
    cfg, specs = scenario
    h = run_scenario(cfg, specs)
    stats = h.sched.spec_stats
    assert stats.num_accepted_tokens <= stats.num_draft_tokens <= cfg.spec_k * stats.num_drafts
    assert sum(stats.accepted_per_pos) == stats.num_accepted_tokens
    event(f"drafts_accepted={stats.num_accepted_tokens > 0}")
    event(f"drafts_rejected={stats.num_accepted_tokens < stats.num_draft_tokens}")
    _events(h)


@settings(max_examples=100, deadline=None)
@given(scenarios(aborts=False, chunked=True, caching=True))
def test_random_workloads_no_aborts_chunked_cached(scenario):
    cfg, specs = scenario
    h = run_scenario(cfg, specs)
    for s in specs:
        for sid in s.seq_ids:
            assert h.reqs[sid].status.finished and sid not in h.aborted
    _events(h)


@settings(max_examples=60, deadline=None)
@given(scenarios(aborts=False, chunked=False))
def test_random_workloads_no_chunked_prefill(scenario):
    cfg, specs = scenario
    run_scenario(cfg, specs)


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_output_independent_of_cache_size(data):
    """Same tokens with a cache so small it preempts as with one that never does."""
    cfg = data.draw(configs(), label="cfg")
    specs = data.draw(workloads(cfg, aborts=False), label="specs")
    small = run_scenario(cfg, specs)
    # Room for every request's whole sequence at once: nothing is ever preempted or evicted.
    big_cfg = Config(**{**cfg.__dict__,
                        "num_blocks": sum(s.n for s in specs) * -(-cfg.max_model_len // cfg.block_size),
                        "max_num_batched_tokens": 10_000, "max_num_seqs": 64})
    big = run_scenario(big_cfg, specs)
    assert big.sched.num_preemptions == 0
    for s in specs:
        for sid in s.seq_ids:
            assert small.reqs[sid].output_token_ids == big.reqs[sid].output_token_ids
            assert small.reqs[sid].status == big.reqs[sid].status
    event(f"preempted={small.saw_preemption}")


@settings(max_examples=200, deadline=None)
@given(scenarios(forks=True))
def test_random_workloads_with_forks(scenario):
    """n > 1 requests: forks share the parent's prompt blocks, copy a shared partial block before
    writing into it, and each sequence still produces exactly its own tokens."""
    cfg, specs = scenario
    h = run_scenario(cfg, specs)
    _events(h)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_forks_output_independent_of_cache_size(data):
    cfg = data.draw(configs(), label="cfg")
    specs = data.draw(workloads(cfg, aborts=False, forks=True), label="specs")
    small = run_scenario(cfg, specs)
    big_cfg = Config(**{**cfg.__dict__,
                        "num_blocks": sum(s.n for s in specs) * -(-cfg.max_model_len // cfg.block_size),
                        "max_num_batched_tokens": 10_000, "max_num_seqs": 64})
    big = run_scenario(big_cfg, specs)
    for s in specs:
        for sid in s.seq_ids:
            assert small.reqs[sid].output_token_ids == big.reqs[sid].output_token_ids


# -- deterministic scenarios that must exercise preemption and prefix hits ----------------------

def _cfg(**kw) -> Config:
    base = dict(block_size=2, num_blocks=8, max_model_len=16, max_num_seqs=4, max_num_batched_tokens=64,
                chunked=True, caching=True, vocab=7, salt=3)
    base.update(kw)
    return Config(**base)


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("caching", [True, False])
def test_preempted_requests_resume_with_same_tokens(chunked, caching):
    """Four requests that each need most of the cache: they must preempt each other, and
    recomputing after preemption must give exactly the tokens of an uncontended run."""
    cfg = _cfg(num_blocks=8, max_model_len=16, chunked=chunked, caching=caching,
               max_num_batched_tokens=64 if chunked else 16)
    specs = [Spec(f"r{i}", [1 + i, 2, 3, 4, 5, 6][: 3 + i], max_tokens=16, ignore_eos=True) for i in range(4)]
    small = run_scenario(cfg, specs)
    assert small.sched.num_preemptions > 0
    assert any(r.num_preemptions > 0 for r in small.reqs.values())
    big = run_scenario(_cfg(num_blocks=200, chunked=chunked, caching=caching), specs)
    assert big.sched.num_preemptions == 0
    for s in specs:
        assert len(small.reqs[s.rid].output_token_ids) == 16 - len(s.prompt)
        assert small.reqs[s.rid].output_token_ids == big.reqs[s.rid].output_token_ids
        assert small.reqs[s.rid].status == RequestStatus.FINISHED_LENGTH


def test_preemption_recompute_uses_prefix_cache():
    """A preempted request finds its own earlier blocks (prompt and output) in the prefix cache."""
    cfg = _cfg(block_size=2, num_blocks=6, max_model_len=12, max_num_seqs=2)
    h = Harness(cfg)
    specs = [Spec("a", [1, 2, 3, 4], max_tokens=4, ignore_eos=True),
             Spec("b", [5, 6, 1, 2], max_tokens=4, ignore_eos=True)]
    a, b = h.add(specs[0]), h.add(specs[1])
    while not h.saw_preemption:
        h.step()
    # Both grew to 3 blocks; a's 4th block had to come from b, the most recently admitted.
    assert b.status == RequestStatus.PREEMPTED and b.num_preemptions == 1 and h.sched.num_preemptions == 1
    assert a.status.finished
    assert h.sched.waiting[0] is b and b.num_tokens == 7
    stats = (h.kv.prefix_stats.queries, h.kv.prefix_stats.hits)
    h.step()
    # Readmitted with its first two blocks (prompt) from the cache; b's third block was evicted
    # for a, so the two output tokens and the last token are recomputed.
    assert (h.kv.prefix_stats.queries - stats[0], h.kv.prefix_stats.hits - stats[1]) == (7, 4)
    assert b.num_cached_tokens == 0  # first admission's figure is kept
    while h.sched.num_unfinished:
        h.step()
    h.check_final(specs)


def test_shared_prefix_is_shared_and_hit_counted():
    cfg = _cfg(block_size=4, num_blocks=16, max_model_len=32)
    h = Harness(cfg)
    prefix = [1, 2, 3, 4, 5, 6, 7, 8]
    a = h.add(Spec("a", prefix + [9], max_tokens=3, ignore_eos=True))
    h.step()
    b = h.add(Spec("b", prefix + [6, 6], max_tokens=3, ignore_eos=True))
    h.step()
    assert b.num_cached_tokens == 8
    assert h.kv.block_ids("a")[:2] == h.kv.block_ids("b")[:2]
    assert h.kv.block_ids("a")[2] != h.kv.block_ids("b")[2]
    # Same tokens as the second block of `prefix`, after a different first block: no hit.
    c = h.add(Spec("c", [4, 4, 4, 4, 5, 6, 7, 8, 9], max_tokens=3, ignore_eos=True))
    h.step()
    assert c.num_cached_tokens == 0
    assert not set(h.kv.block_ids("c")) & set(h.kv.block_ids("a"))
    while h.sched.num_unfinished:
        h.step()
    assert (h.kv.prefix_stats.queries, h.kv.prefix_stats.hits) == (9 + 10 + 9, 8)


def test_same_step_admission_shares_blocks_being_written():
    """Two identical prompts admitted in one step: the second hits the first one's blocks,
    which the runner writes in that same step before attention reads them."""
    cfg = _cfg(block_size=2, num_blocks=16, max_model_len=16)
    h = Harness(cfg)
    a = h.add(Spec("a", [1, 2, 3, 4, 5], max_tokens=2, ignore_eos=True))
    b = h.add(Spec("b", [1, 2, 3, 4, 5], max_tokens=2, ignore_eos=True))
    h.step()
    assert b.num_cached_tokens == 4
    assert h.kv.block_ids("a")[:2] == h.kv.block_ids("b")[:2]
    while h.sched.num_unfinished:
        h.step()
    assert a.output_token_ids == b.output_token_ids


def test_fully_cached_prompt_computes_one_token():
    cfg = _cfg(block_size=2, num_blocks=16, max_model_len=16)
    h = Harness(cfg)
    h.add(Spec("a", [1, 2, 3, 4], max_tokens=1, ignore_eos=True))
    while h.sched.num_unfinished:
        h.step()
    b = h.add(Spec("b", [1, 2, 3, 4], max_tokens=1, ignore_eos=True))
    out = h.sched.schedule()
    h.steps += 1
    assert out.finished_req_ids == ["a"]
    assert out.scheduled_cached_reqs == [] and out.block_copies == []
    (s,) = out.scheduled_new_reqs
    assert h.sched.get_request(s.req_id) is b and s.num_computed_tokens == 2
    assert out.num_scheduled_tokens == {"b": 2} and out.total_num_scheduled_tokens == 2
    assert s.block_ids == h.kv.block_ids("b") and len(s.block_ids) == 2
    assert s.num_computed_tokens + out.num_scheduled_tokens["b"] == b.num_tokens  # samples
    assert sampling_req_ids(out, lambda rid: h.reqs[rid].num_tokens) == ["b"]


def test_chunked_prefill_splits_by_budget():
    cfg = _cfg(block_size=4, num_blocks=16, max_model_len=32, max_num_batched_tokens=5)
    h = Harness(cfg)
    h.add(Spec("a", list(range(1, 13)), max_tokens=2, ignore_eos=True))
    h.add(Spec("b", [7, 7, 7], max_tokens=2, ignore_eos=True))
    seen = []
    while h.sched.num_unfinished:
        before = {rid: r.num_computed_tokens for rid, r in h.reqs.items()}
        h.step()
        seen.append({rid: h.reqs[rid].num_computed_tokens - before[rid] for rid in before})
    # a's 12-token prompt goes in chunks of 5, 5, then 2 with b's first 3 alongside.
    assert seen[0] == {"a": 5, "b": 0}
    assert seen[1] == {"a": 5, "b": 0}
    assert seen[2] == {"a": 2, "b": 3}


def test_chunked_prefill_off_waits_for_whole_prompt_budget():
    cfg = _cfg(block_size=4, num_blocks=16, max_model_len=15, max_num_batched_tokens=15, chunked=False,
               max_num_seqs=4)
    h = Harness(cfg)
    h.add(Spec("a", list(range(1, 11)), max_tokens=3, ignore_eos=True))
    h.add(Spec("b", list(range(21, 27)), max_tokens=3, ignore_eos=True))
    h.step()
    # 10 + 6 > 15: b waits (not split) even though 5 tokens of budget are left.
    assert h.reqs["b"].status == RequestStatus.WAITING
    h.step()
    assert h.reqs["b"].status == RequestStatus.RUNNING


def test_eos_stops_unless_ignored():
    cfg = _cfg(vocab=2)  # tokens 0/1: EOS comes quickly
    specs = [Spec(f"r{i}", [1, 1, i % 2], max_tokens=12, ignore_eos=bool(i % 2)) for i in range(6)]
    h = run_scenario(cfg, specs)
    stopped = [s.rid for s in specs if h.reqs[s.rid].status == RequestStatus.FINISHED_STOPPED]
    assert stopped and all(not s.ignore_eos for s in specs if s.rid in stopped)
    for s in specs:
        if s.ignore_eos:
            assert h.reqs[s.rid].status == RequestStatus.FINISHED_LENGTH
            assert len(h.reqs[s.rid].output_token_ids) == min(12, cfg.max_model_len - 3)


def test_max_model_len_caps_generation():
    cfg = _cfg(max_model_len=10)
    h = run_scenario(cfg, [Spec("a", [1, 2, 3, 4, 5, 6], max_tokens=100, ignore_eos=True)])
    assert h.reqs["a"].num_tokens == 10 and h.reqs["a"].status == RequestStatus.FINISHED_LENGTH


def test_abort_waiting_running_and_finished():
    cfg = _cfg(max_num_seqs=1)
    h = Harness(cfg)
    a = h.add(Spec("a", [1, 2, 3], max_tokens=4, ignore_eos=True))
    b = h.add(Spec("b", [4, 5, 6], max_tokens=4, ignore_eos=True))
    h.step()
    assert a.status == RequestStatus.RUNNING and b.status == RequestStatus.WAITING
    h.abort("b")                     # waiting
    h.abort("a")                     # running
    h.abort("a")                     # already gone: no-op
    h.abort("nope")                  # unknown: no-op
    assert h.kv.num_free_blocks == cfg.num_blocks
    h.check_final([])
    assert a.status == b.status == RequestStatus.FINISHED_ABORTED


def test_abort_preempted_request():
    cfg = _cfg(block_size=2, num_blocks=6, max_model_len=12, max_num_seqs=2)
    h = Harness(cfg)
    h.add(Spec("a", [1, 2, 3, 4], max_tokens=8, ignore_eos=True))
    b = h.add(Spec("b", [5, 6, 1, 2], max_tokens=8, ignore_eos=True))
    while b.status != RequestStatus.PREEMPTED:
        h.step()
    h.abort("b")
    while h.sched.num_unfinished:
        h.step()
    h.check_final([Spec("a", [1, 2, 3, 4], 8, True)])


# -- known problems found by these tests ---------------------------------------------------------

def _seqs(rid: str, prompt: list[int], n: int = 1, max_tokens: int = 4, **params) -> Request:
    """The first sequence of a request, with n - 1 pending forks (as LLMEngine.add_request builds it)."""
    p = SamplingParams(n=n, max_tokens=max_tokens, ignore_eos=True, **params)
    seqs = [Request(request_id=f"{rid}#{i}" if n > 1 else rid, prompt_token_ids=list(prompt),
                    sampling_params=p.for_sample(i), max_tokens=max_tokens, eos_token_ids=frozenset({EOS}))
            for i in range(n)]
    seqs[0].pending_forks = seqs[1:]
    return seqs[0]


def _fake_step(sched: Scheduler, token: int = 7) -> SchedulerOutput:
    """One step with a runner that samples `token` for every sequence that samples."""
    out = sched.schedule()
    sampled = {rid: [token] for rid in sampling_req_ids(out, lambda rid: sched.get_request(rid).num_tokens)}
    updated = sched.update_from_output(out, runner_output(sampled))
    assert sorted(r.request_id for r, _ in updated) == sorted(sampled)
    return out


def test_max_num_seqs_counts_pending_forks_of_running_requests():
    """A running n > 1 request that has not forked yet still needs seats for its forks: admitting
    another request into them puts max_num_seqs + 1 sequences in the running batch once it forks."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=32),
                      KVCacheManager(16, 4))
    sched.add_request(_seqs("a", [1, 2, 3], n=2))
    sched.add_request(_seqs("b", [4, 5, 6]))
    for _ in range(10):
        _fake_step(sched)
        assert len(sched.running) <= 2, [r.request_id for r in sched.running]


def test_request_with_more_sequences_than_max_num_seqs_does_not_hang():
    """n (or best_of) > max_num_seqs: the request can never get 1 + n - 1 seats, so it waits forever
    at the head of the queue and blocks everything behind it. It must either be refused when
    added or still make progress."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=32),
                      KVCacheManager(16, 4))
    try:
        sched.add_request(_seqs("a", [1, 2, 3], n=3))
    except ValueError:
        return  # refused up front: fine
    sched.add_request(_seqs("b", [4, 5]))
    for _ in range(100):
        if not sched.num_unfinished:
            break
        _fake_step(sched)
    assert sched.num_unfinished == 0, f"stuck: {[r.request_id for r in sched.waiting]} never admitted"


def test_chunked_prefill_off_with_budget_below_max_model_len_does_not_hang():
    """With chunked prefill off a waiting request must be scheduled whole. If max_num_batched_tokens
    < max_model_len (EngineConfig allows it), a request preempted after generating enough tokens
    (or a long prompt) exceeds the budget and is never scheduled again. Such a config must be
    refused (vLLM refuses it) or the request must still make progress."""
    try:
        sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=6, max_model_len=16,
                                          enable_chunked_prefill=False),
                          KVCacheManager(4, 4, enable_caching=False))
    except ValueError:
        return
    sched.add_request(_seqs("b", [6], max_tokens=15))
    sched.add_request(_seqs("a", [1, 2, 3, 4, 5], max_tokens=11))
    for _ in range(200):
        if not sched.num_unfinished:
            break
        _fake_step(sched)
    assert sched.num_preemptions >= 1
    assert sched.num_unfinished == 0, [(r.request_id, r.num_tokens, r.status.name) for r in sched.waiting]


def test_prompt_logprob_rows_not_repeated_after_preemption():
    """Prompt logprobs are emitted for each prompt position as its chunk is computed. A preempted
    request recomputes its prompt, and the rows come again; OutputProcessor extends its list with
    them, so the request ends with more prompt logprobs than prompt tokens and reports None.
    The runner's persistent batch keeps what it sent across the preemption."""
    import torch

    from freight.worker.input_batch import InputBatch, build_model_input

    cpu = torch.device("cpu")
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=12),
                      KVCacheManager(6, 2))
    batch = InputBatch(max_num_reqs=2, max_blocks_per_req=6, vocab_size=16, device=cpu)
    sched.add_request(_seqs("a", [1, 2, 3, 4], max_tokens=8))
    b = _seqs("b", [5, 6, 7, 8], max_tokens=8, prompt_logprobs=1)
    sched.add_request(b)
    positions = []
    resumed = False
    while sched.num_unfinished:
        out = sched.schedule()
        batch.update_states(out)
        resumed |= any(c.req_id == "b" and c.reset_block_ids for c in out.scheduled_cached_reqs)
        inp = build_model_input(batch, out, 2, cpu)
        for pr in inp.prompt_rows:
            assert pr.state is batch.requests[pr.state.req_id]
            if pr.state.req_id == "b":
                positions.extend(range(pr.first_position, pr.first_position + pr.count))
        sampled = {s.req_id: [9] for s in inp.sampling}
        assert sorted(sampled) == sorted(sampling_req_ids(out, lambda rid: sched.get_request(rid).num_tokens))
        for s in inp.sampling:  # as ModelRunner._sample does
            s.append_token(9)
            s.fork_of = None
        sched.update_from_output(out, runner_output(sampled))
    assert b.num_preemptions >= 1 and resumed
    assert positions == [0, 1, 2], "each prompt position's logprobs must be produced exactly once"


# -- a rule-based state machine: interleaved adds, aborts, steps and prefix-cache resets --------

class SchedulerMachine(RuleBasedStateMachine):
    max_n = 1  # sequences per request

    def __init__(self):
        super().__init__()
        self.h: Optional[Harness] = None
        self.specs: list[Spec] = []

    @initialize(cfg=configs())
    def setup(self, cfg):
        self.h = Harness(cfg)

    @precondition(lambda self: self.h is not None and len(self.specs) < 10)
    @rule(data=st.data())
    def add_request(self, data):
        cfg = self.h.cfg
        mml = cfg.max_model_len
        tok = st.integers(0, cfg.vocab - 1)
        plen = data.draw(st.integers(1, mml - 1))
        if self.specs and data.draw(st.booleans()):
            # share a prefix with an earlier request (its prompt plus whatever it generated)
            other = self.h.reqs[data.draw(st.sampled_from(self.specs)).seq_ids[0]]
            base = other.all_token_ids[:plen]
        else:
            base = []
        prompt = base + data.draw(st.lists(tok, min_size=plen - len(base), max_size=plen - len(base)))
        spec = Spec(f"r{len(self.specs)}", prompt, data.draw(st.integers(1, mml)), data.draw(st.booleans()),
                    arrival=self.h.steps, n=data.draw(st.integers(1, min(self.max_n, cfg.max_num_seqs))),
                    priority=data.draw(st.integers(-2, 2)) if cfg.policy == "priority" else 0)
        self.specs.append(spec)
        self.failed = True
        self.h.add(spec)
        self.failed = False

    @precondition(lambda self: self.h is not None and self.specs)
    @rule(data=st.data())
    def abort(self, data):
        self.failed = True
        self.h.abort(data.draw(st.sampled_from(self.specs)).rid)
        self.failed = False

    @precondition(lambda self: self.h is not None)
    @rule(n=st.integers(1, 6))
    def step(self, n):
        self.failed = True
        for _ in range(n):
            self.h.step()
        self.failed = False

    @precondition(lambda self: self.h is not None)
    @rule()
    def reset_prefix_cache(self):
        pool = self.h.kv.pool
        in_use = any(b.ref_cnt > 0 for b in pool.cached.values())
        self.failed = True
        assert self.h.kv.reset_prefix_cache() is (not in_use)
        if not in_use:
            assert pool.cached == {} and all(b.block_hash is None for b in pool.blocks)
        self.failed = False

    @invariant()
    def consistent(self):
        if self.h is not None:
            self.failed = True  # cleared only if the whole check passes
            self.h.check()
            self.failed = False

    def teardown(self):
        h = self.h
        if h is None or getattr(self, "failed", False):
            return  # a rule or invariant already failed: don't pile a second error on it
        bound = h.steps + step_bound(h.cfg, self.specs)
        while h.sched.num_unfinished:
            assert h.steps < bound, "no progress"
            h.step()
        h.check_final(self.specs)


class ForkingSchedulerMachine(SchedulerMachine):
    max_n = 3


class PrioritySchedulerMachine(ForkingSchedulerMachine):
    """The priority policy: requests with random priorities (Harness.step checks the order)."""

    @initialize(cfg=configs(policy="priority"))
    def setup(self, cfg):
        self.h = Harness(cfg)


def test_scheduler_state_machine():
    run_state_machine_as_test(SchedulerMachine,
                              settings=settings(max_examples=60, stateful_step_count=30, deadline=None))


def test_scheduler_state_machine_with_forks():
    run_state_machine_as_test(ForkingSchedulerMachine,
                              settings=settings(max_examples=60, stateful_step_count=30, deadline=None))


def test_priority_scheduler_state_machine():
    run_state_machine_as_test(PrioritySchedulerMachine,
                              settings=settings(max_examples=40, stateful_step_count=30, deadline=None))


@settings(max_examples=150, deadline=None)
@given(scenarios(forks=True, policy="priority"))
def test_priority_policy_random_workloads(scenario):
    """The priority policy keeps every invariant (blocks freed or cached, ref counts, outputs), admits
    in (priority, arrival) order and preempts the running requests with the largest keys."""
    cfg, specs = scenario
    h = run_scenario(cfg, specs)
    _events(h)
