"""The runner's persistent InputBatch (freight/worker/input_batch.py), without a model.

- A rule-based state machine drives add / remove / condense / append_block_ids / set_block_ids
  against a plain dict model: which requests hold rows and what each row's block table is.
- A real Scheduler + KVCacheManager run random workloads (the strategies and the runner
  emulation of test_scheduler_properties) while a real InputBatch applies every step's
  SchedulerOutput: after update_states() the batch holds exactly the scheduled requests in rows
  [0, num_reqs), with the manager's block tables and the scheduler's computed-token counts, and
  build_model_input() feeds each request its own tokens at its own positions and slots, samples
  the rows the contract says sample (a fork its parent's last row), and asks for each prompt
  position's logprob row exactly once over a request's life, preemptions included. The runner's
  token history (appended with the same fake tokens via CachedRequestState.append_token) stays
  equal to the scheduler's.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from freight.sampling_params import SamplingParams
from freight.step_contract import SchedulerOutput
from freight.worker.input_batch import InputBatch, build_model_input
from freight.worker.request_state import CachedRequestState
from test_scheduler_properties import Harness, _events, run_scenario, scenarios

CPU = torch.device("cpu")
VOCAB = 16
PARAMS = SamplingParams()


def make_state(rid: str, block_ids: list[int], prompt=(1, 2, 3)) -> CachedRequestState:
    return CachedRequestState(rid, list(prompt), PARAMS, frozenset({0}), list(block_ids), 0)


def batch_rows(batch: InputBatch) -> dict[str, int]:
    """req id -> row, read from the rows themselves (not from req_index)."""
    return {s.req_id: row for row, s in enumerate(batch.reqs) if s is not None}


def row_table(batch: InputBatch, row: int) -> list[int]:
    return batch.block_table[row, :batch.num_blocks[row]].tolist()


def check_batch(batch: InputBatch, tables: dict[str, list[int]], condensed: bool) -> None:
    """The batch holds exactly the requests of `tables` (req id -> block table), one row each."""
    live = [s.req_id for s in batch.reqs if s is not None]
    assert len(live) == len(set(live)), f"a request holds two rows: {live}"
    rows = batch_rows(batch)
    assert set(rows) == set(tables) == set(batch.req_index)
    assert batch.num_reqs == len(tables)
    for rid, row in rows.items():
        assert batch.req_index[rid] == row
        assert batch.reqs[row].req_id == rid
        assert row < batch.num_rows <= batch.max_num_reqs
        assert row_table(batch, row) == tables[rid], f"{rid} at row {row}"
    if condensed:
        assert sorted(rows.values()) == list(range(batch.num_reqs))
        assert batch.num_rows == batch.num_reqs
        assert all(s is None for s in batch.reqs[batch.num_reqs:])


# -- the batch's row operations against a dict model --------------------------------------------

class InputBatchMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.batch: InputBatch | None = None
        self.tables: dict[str, list[int]] = {}  # the model: live request -> its block table
        self.states: dict[str, CachedRequestState] = {}
        self.condensed = True
        self.next_id = 0

    @initialize(max_num_reqs=st.integers(1, 5), max_blocks=st.integers(1, 6))
    def setup(self, max_num_reqs, max_blocks):
        self.batch = InputBatch(max_num_reqs, max_blocks, VOCAB, CPU)
        self.max_blocks = max_blocks

    def blocks(self, data, at_most: int) -> list[int]:
        return data.draw(st.lists(st.integers(0, 1000), max_size=at_most))

    @precondition(lambda self: self.batch is not None)
    @rule(data=st.data())
    def add(self, data):
        if self.states and data.draw(st.booleans()):  # a request that held a row before
            rid = data.draw(st.sampled_from(sorted(self.states)))
        else:
            rid = f"r{self.next_id}"
            self.next_id += 1
        state = make_state(rid, self.blocks(data, self.max_blocks))
        if rid in self.tables:
            event("add: duplicate id")
            with pytest.raises(ValueError):
                self.batch.add(state)
            return
        if len(self.tables) == self.batch.max_num_reqs:
            event("add: batch full")
            with pytest.raises(RuntimeError):
                self.batch.add(state)
            return
        event(f"add: into a hole={bool(self.batch._holes)}")
        row = self.batch.add(state)
        assert self.batch.reqs[row] is state and self.batch.req_index[rid] == row
        self.tables[rid] = list(state.block_ids)
        self.states[rid] = state
        self.condensed = False

    @precondition(lambda self: self.batch is not None)
    @rule(data=st.data())
    def remove(self, data):
        rid = data.draw(st.sampled_from(sorted(self.states) + ["unknown"]))
        row_before = self.batch.req_index.get(rid)
        row = self.batch.remove(rid)
        assert row == row_before
        if rid in self.tables:
            assert row is not None and self.batch.reqs[row] is None
            del self.tables[rid]
            self.condensed = False
        else:
            assert row is None
        assert rid not in self.batch

    @precondition(lambda self: self.batch is not None)
    @rule()
    def condense(self):
        before = {rid: self.batch.reqs[row] for rid, row in self.batch.req_index.items()}
        self.batch.condense()
        self.condensed = True
        for rid, state in before.items():  # rows move, states don't change
            assert self.batch.reqs[self.batch.req_index[rid]] is state

    @precondition(lambda self: self.batch is not None and self.tables)
    @rule(data=st.data())
    def append_block_ids(self, data):
        rid = data.draw(st.sampled_from(sorted(self.tables)))
        new = self.blocks(data, self.max_blocks - len(self.tables[rid]))
        self.batch.append_block_ids(self.batch.req_index[rid], new)
        self.tables[rid] += new

    @precondition(lambda self: self.batch is not None and self.tables)
    @rule(data=st.data())
    def set_block_ids(self, data):
        rid = data.draw(st.sampled_from(sorted(self.tables)))
        new = self.blocks(data, self.max_blocks)
        self.batch.set_block_ids(self.batch.req_index[rid], new)
        self.tables[rid] = new

    @invariant()
    def consistent(self):
        if self.batch is not None:
            check_batch(self.batch, self.tables, self.condensed)


TestInputBatchMachine = InputBatchMachine.TestCase
TestInputBatchMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_add_fills_holes_before_growing():
    batch = InputBatch(3, 4, VOCAB, CPU)
    for rid in "abc":
        batch.add(make_state(rid, [ord(rid)]))
    with pytest.raises(RuntimeError):
        batch.add(make_state("d", []))
    assert batch.remove("b") == 1 and batch.remove("b") is None
    assert batch.add(make_state("d", [7, 8])) == 1  # the hole, not a fourth row
    with pytest.raises(ValueError):
        batch.add(make_state("d", []))
    batch.remove("a")
    batch.condense()
    check_batch(batch, {"c": [ord("c")], "d": [7, 8]}, condensed=True)


# -- a real scheduler's steps applied to a real batch --------------------------------------------

class BatchHarness(Harness):
    """The Harness's runner emulation, checked against a real InputBatch fed the same contract."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.batch = InputBatch(cfg.max_num_seqs, -(-cfg.max_model_len // cfg.block_size), VOCAB, CPU)
        self.inp = None
        self.prompt_positions: dict[str, list[int]] = {}

    def check_final(self, specs) -> None:
        super().check_final(specs)
        for spec in specs:
            for sid in spec.seq_ids:
                got = self.prompt_positions.get(sid, [])
                if spec.prompt_logprobs is None or sid != spec.seq_ids[0]:  # a fork's went with its parent
                    assert got == [], sid
                elif sid in self.aborted:
                    assert got == list(range(len(got))), sid
                else:
                    assert got == list(range(len(spec.prompt) - 1)), sid

    def on_schedule(self, out: SchedulerOutput, entries: dict, sampled: dict[str, int]) -> None:
        batch, bs = self.batch, self.bs
        batch.update_states(out)
        # Every request sent and not reported finished, preempted ones included; rows: this step's.
        assert set(batch.requests) == set(self.runner)
        check_batch(batch, {rid: self.kv.block_ids(rid) for rid in entries}, condensed=True)
        for rid, (c, n, parent) in entries.items():
            state = batch.requests[rid]
            assert batch.reqs[batch.req_index[rid]] is state
            assert state.block_ids == self.kv.block_ids(rid)
            assert state.num_computed_tokens == c == self.sched.get_request(rid).num_computed_tokens - n
            assert state.token_ids == self.runner[rid].tokens
            assert state.fork_of == parent
        for rid, state in batch.requests.items():
            assert state.token_ids == self.reqs[rid].all_token_ids
            assert state.prompt_token_ids == self.reqs[rid].prompt_token_ids

        if out.is_empty:  # the runner applies the diff and stops there
            self.inp = None
            return
        inp = self.inp = build_model_input(batch, out, bs, CPU)
        # Decodes first, then prefill chunks (each group in row order): each request's own tokens at
        # its own positions and slots.
        in_rows = [s.req_id for s in batch.reqs[:batch.num_reqs]]
        order = [rid for rid in in_rows if entries[rid][1] == 1] + [rid for rid in in_rows if entries[rid][1] > 1]
        ids, pos, slots, last_row, flat_row = [], [], [], {}, {}
        for rid in order:
            c, n, _ = entries[rid]
            table = self.kv.block_ids(rid)
            for p in range(c, c + n):
                flat_row[(rid, p)] = len(ids)
                ids.append(self.reqs[rid].all_token_ids[p])
                pos.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            last_row[rid] = len(ids) - 1
        assert inp.input_ids.tolist() == ids
        assert inp.positions.tolist() == pos
        assert inp.attn.slot_mapping.tolist() == slots
        assert inp.attn.num_decodes == sum(1 for rid in order if entries[rid][1] == 1)
        # The rows that sample are the contract's; a fork reads its parent's last row.
        got = [s.req_id for s in inp.sampling]
        assert len(got) == len(set(got)) and set(got) == set(sampled)
        assert all(s is batch.requests[s.req_id] for s in inp.sampling)
        want_rows = [last_row[rid if entries[rid][2] is None else entries[rid][2]] for rid in got]
        # Then the prompt-logprob rows: positions of this step's chunk whose logits score a prompt
        # token, each position once over the request's life (preempted and recomputed or not).
        for pr in inp.prompt_rows:
            rid = pr.state.req_id
            c, n, parent = entries[rid]
            assert pr.state is batch.requests[rid] and pr.state.sampling_params.prompt_logprobs is not None
            assert parent is None and pr.count > 0
            end = pr.first_position + pr.count
            assert c <= pr.first_position and end <= min(c + n, len(pr.state.prompt_token_ids) - 1)
            positions = list(range(pr.first_position, pr.first_position + pr.count))
            self.prompt_positions.setdefault(rid, []).extend(positions)
            want_rows += [flat_row[(rid, p)] for p in positions]
        assert len({pr.state.req_id for pr in inp.prompt_rows}) == len(inp.prompt_rows)
        assert inp.logits_indices.tolist() == want_rows

    def on_update(self, out: SchedulerOutput, sampled: dict[str, int]) -> None:
        # The runner appends the tokens it sampled itself, as ModelRunner._sample does.
        for s in (self.inp.sampling if self.inp is not None else []):
            s.append_token(sampled[s.req_id])
            s.fork_of = None
        for rid, state in self.batch.requests.items():
            assert state.token_ids == self.reqs[rid].all_token_ids == self.runner[rid].tokens
            assert state.output_token_ids == self.reqs[rid].output_token_ids


def run_batch_scenario(cfg, specs) -> BatchHarness:
    h = run_scenario(cfg, specs, harness=BatchHarness)
    _events(h)
    recomputed = any(s.prompt_logprobs is not None and h.reqs[s.seq_ids[0]].num_preemptions > 0 for s in specs)
    event(f"prompt_logprobs_recomputed={recomputed}")
    return h


@st.composite
def scenarios_with_prompt_logprobs(draw, **kw):
    cfg, specs = draw(scenarios(**kw))
    for spec in specs:
        spec.prompt_logprobs = draw(st.sampled_from([None, None, 0, 2]))
    return cfg, specs


@settings(max_examples=150, deadline=None)
@given(scenarios_with_prompt_logprobs(forks=True))
def test_batch_follows_scheduler(scenario):
    cfg, specs = scenario
    run_batch_scenario(cfg, specs)


@settings(max_examples=60, deadline=None)
@given(scenarios_with_prompt_logprobs(aborts=False, chunked=True, caching=True, forks=True))
def test_batch_follows_scheduler_no_aborts(scenario):
    cfg, specs = scenario
    run_batch_scenario(cfg, specs)
