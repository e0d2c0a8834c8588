"""The step contract and the engine-core messages survive msgpack exactly.

The scheduler's SchedulerOutput and the runner's ModelRunnerOutput (freight.step_contract), and
the frontend <-> engine-core messages (freight.engine.messages), are plain msgspec data that may
cross a process boundary. Here:

- arbitrary (hypothesis-generated) values round-trip through encode/decode to equal values of
  the same types: SamplingParams with stop strings, int-keyed logit_bias and 64-bit seeds, forks'
  parent ids, block copies as (src, dst) tuples, LogprobsLists;
- a real Scheduler's outputs round-trip, and an InputBatch fed the decoded copies builds exactly
  the model input (and samples the same rows, with the same seeded generators) as one fed the
  originals, so the runner never depends on sharing objects with the scheduler;
- EngineCoreRequest / CoreFinish / CoreUtility (decode_input) and EngineCoreOutputs with
  SchedulerStats / EngineCoreReady (decode_output) round-trip.
"""

from __future__ import annotations

import time

import msgspec
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from freight.core.kv_cache_manager import KVCacheManager
from freight.core.request import Request, RequestStatus
from freight.core.scheduler import Scheduler, SchedulerConfig
from freight.core.stats import SchedulerStats
from freight.engine import messages
from freight.engine.messages import (CoreFinish, CoreUtility, EngineCoreOutput, EngineCoreOutputs, EngineCoreReady,
                                     EngineCoreRequest, RequestType)
from freight.sampling_params import SamplingParams
from freight.step_contract import (CachedRequestData, LogprobsLists, ModelRunnerOutput, NewRequestData,
                                   SchedulerOutput, decode, encode)
from freight.worker.input_batch import InputBatch, build_model_input

CPU = torch.device("cpu")

# -- strategies ----------------------------------------------------------------------------------

token_ids = st.integers(0, 2**31 - 1)
req_ids = st.text(min_size=1, max_size=12)
seeds = st.one_of(st.none(), st.sampled_from([0, 2**63, 2**63 - 1, -2**63, 2**32]), st.integers(-2**63, 2**63))
# allow_subnormal=False: once a model has run, the CPU kernels (or oneDNN) leave flush-to-zero on, and
# hypothesis refuses to draw subnormal floats then.
finite = dict(allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def sampling_params(draw) -> SamplingParams:
    n = draw(st.integers(1, 4))
    max_tokens = draw(st.one_of(st.none(), st.integers(1, 4096)))
    return SamplingParams(
        n=n,
        best_of=draw(st.one_of(st.none(), st.integers(n, 8))),
        presence_penalty=draw(st.floats(-2.0, 2.0, **finite)),
        frequency_penalty=draw(st.floats(-2.0, 2.0, **finite)),
        repetition_penalty=draw(st.floats(1e-6, 1e4, **finite)),  # (0, 1e4]; no next_up(0) under FTZ
        temperature=draw(st.floats(0.0, 1e4, **finite)),
        top_p=draw(st.floats(1e-6, 1.0, **finite)),
        top_k=draw(st.integers(-1, 1000)),
        min_p=draw(st.floats(0.0, 1.0, **finite)),
        seed=draw(seeds),
        stop=draw(st.one_of(st.none(), st.text(min_size=1, max_size=8),
                            st.lists(st.text(min_size=1, max_size=8), max_size=4))),
        stop_token_ids=draw(st.one_of(st.none(), st.lists(token_ids, max_size=4))),
        ignore_eos=draw(st.booleans()),
        max_tokens=max_tokens,
        min_tokens=draw(st.integers(0, max_tokens or 64)),
        logprobs=draw(st.one_of(st.none(), st.integers(0, 20))),
        prompt_logprobs=draw(st.one_of(st.none(), st.integers(0, 20))),
        include_stop_str_in_output=draw(st.booleans()),
        skip_special_tokens=draw(st.booleans()),
        spaces_between_special_tokens=draw(st.booleans()),
        logit_bias=draw(st.one_of(st.none(), st.dictionaries(token_ids, st.floats(-100.0, 100.0, **finite),
                                                             max_size=5))),
    )


@st.composite
def new_request_data(draw) -> NewRequestData:
    return NewRequestData(
        req_id=draw(req_ids), prompt_token_ids=draw(st.lists(token_ids, min_size=1, max_size=20)),
        sampling_params=draw(sampling_params()), eos_token_ids=draw(st.lists(token_ids, max_size=3)),
        block_ids=draw(st.lists(st.integers(0, 10**6), max_size=10)),
        num_computed_tokens=draw(st.integers(0, 10**6)),
        parent_req_id=draw(st.one_of(st.none(), req_ids)))


cached_request_data = st.builds(CachedRequestData, req_id=req_ids, num_computed_tokens=st.integers(0, 10**6),
                                new_block_ids=st.lists(st.integers(0, 10**6), max_size=10),
                                reset_block_ids=st.booleans())


@st.composite
def scheduler_outputs(draw) -> SchedulerOutput:
    new = draw(st.lists(new_request_data(), max_size=4))
    cached = draw(st.lists(cached_request_data, max_size=4))
    num_sched = {r.req_id: draw(st.integers(0, 4096)) for r in [*new, *cached]}
    return SchedulerOutput(
        scheduled_new_reqs=new, scheduled_cached_reqs=cached, num_scheduled_tokens=num_sched,
        total_num_scheduled_tokens=sum(num_sched.values()),
        scheduled_spec_decode_tokens=draw(st.dictionaries(req_ids, st.lists(token_ids, max_size=3), max_size=2)),
        finished_req_ids=draw(st.lists(req_ids, max_size=4)),
        block_copies=draw(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)), max_size=4)),
        num_preempted=draw(st.integers(0, 64)))


@st.composite
def logprobs_lists(draw) -> LogprobsLists:
    rows = draw(st.integers(0, 4))
    widths = [draw(st.integers(1, 4)) for _ in range(rows)]
    # Logprobs of masked tokens are -inf: that must survive too.
    lp = st.one_of(st.floats(max_value=0.0, allow_nan=False, allow_subnormal=False), st.just(float("-inf")))
    return LogprobsLists(token_ids=[draw(st.lists(token_ids, min_size=w, max_size=w)) for w in widths],
                         logprobs=[draw(st.lists(lp, min_size=w, max_size=w)) for w in widths])


@st.composite
def runner_outputs(draw) -> ModelRunnerOutput:
    ids = draw(st.lists(req_ids, max_size=5, unique=True))
    lp = st.floats(max_value=0.0, allow_nan=False, allow_subnormal=False)
    return ModelRunnerOutput(
        req_ids=ids,
        sampled_token_ids=[draw(st.lists(token_ids, min_size=1, max_size=3)) for _ in ids],
        sampled_logprobs=[[draw(lp)] for _ in ids],
        logprobs=draw(st.dictionaries(st.sampled_from(ids), logprobs_lists(), max_size=3)) if ids else {},
        prompt_logprobs=draw(st.dictionaries(req_ids, logprobs_lists(), max_size=2)))


def roundtrip(obj, cls):
    data = encode(obj)
    assert isinstance(data, bytes)
    back = decode(data, cls)
    assert type(back) is cls
    assert back == obj
    assert encode(back) == data  # stable: nothing is lost or reordered
    return back


def assert_same_params(a: SamplingParams, b: SamplingParams) -> None:
    assert type(b) is SamplingParams and a == b
    assert type(b.stop) is list and all(type(s) is str for s in b.stop)
    assert b.seed is None or type(b.seed) is int
    if a.logit_bias:
        assert all(type(k) is int and type(v) is float for k, v in b.logit_bias.items())


# -- hypothesis round trips ----------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(scheduler_outputs())
def test_scheduler_output_roundtrip(out):
    back = roundtrip(out, SchedulerOutput)
    assert back.is_empty == out.is_empty and back.scheduled_req_ids == out.scheduled_req_ids
    for a, b in zip(out.scheduled_new_reqs, back.scheduled_new_reqs):
        assert type(b) is NewRequestData and b.parent_req_id == a.parent_req_id
        assert_same_params(a.sampling_params, b.sampling_params)
    assert all(type(c) is CachedRequestData for c in back.scheduled_cached_reqs)
    assert all(type(c) is tuple and len(c) == 2 for c in back.block_copies)


@settings(max_examples=150, deadline=None)
@given(runner_outputs())
def test_model_runner_output_roundtrip(out):
    back = roundtrip(out, ModelRunnerOutput)
    for d in (back.logprobs, back.prompt_logprobs):
        assert all(type(v) is LogprobsLists for v in d.values())
    for rid, lists in out.logprobs.items():
        assert back.logprobs[rid].to_dicts() == lists.to_dicts()


def test_roundtrip_edge_values():
    params = SamplingParams(n=2, seed=2**63, stop=["\n\n", "END", "ü😀"], stop_token_ids=[7],
                            logit_bias={0: -100, 5: 2.5, 2**31 - 1: 100.0}, temperature=0.7, top_k=-1,
                            prompt_logprobs=3, logprobs=0)
    out = SchedulerOutput(
        scheduled_new_reqs=[NewRequestData("r", [1, 2, 3], params, [2], [4, 5], 2),
                            NewRequestData("r#1", [1, 2, 3], params.for_sample(1), [2], [4, 5], 3, parent_req_id="r")],
        scheduled_cached_reqs=[CachedRequestData("q", 9, [6], reset_block_ids=True), CachedRequestData("p", 1, [])],
        num_scheduled_tokens={"r": 1, "r#1": 0, "q": 1, "p": 1}, total_num_scheduled_tokens=3,
        finished_req_ids=["old"], block_copies=[(5, 6), (0, 1)], num_preempted=1)
    back = roundtrip(out, SchedulerOutput)
    assert back.scheduled_new_reqs[0].sampling_params.seed == 2**63
    assert back.scheduled_new_reqs[1].sampling_params.seed == 2**63 + 1
    assert back.scheduled_new_reqs[1].parent_req_id == "r" and back.scheduled_new_reqs[0].parent_req_id is None
    assert back.scheduled_new_reqs[0].sampling_params.logit_bias == {0: -100.0, 5: 2.5, 2**31 - 1: 100.0}
    assert back.scheduled_new_reqs[0].sampling_params.stop == ["\n\n", "END", "ü😀"]
    assert back.block_copies == [(5, 6), (0, 1)]
    assert back.scheduled_cached_reqs[1].reset_block_ids is False
    empty = roundtrip(SchedulerOutput(), SchedulerOutput)
    assert empty.is_empty and empty.scheduled_new_reqs == [] and empty.num_scheduled_tokens == {}
    lists = LogprobsLists([[3, 3, 1]], [[-0.5, -0.5, float("-inf")]])
    runner = ModelRunnerOutput(["r", "r#1"], [[3], [1]], [[-0.5], [-1.25]], logprobs={"r": lists},
                               prompt_logprobs={"r": LogprobsLists([[2], [3]], [[-1.0], [-2.0]])})
    assert roundtrip(runner, ModelRunnerOutput).logprobs["r"].to_dicts() == [{3: -0.5, 1: float("-inf")}]
    roundtrip(ModelRunnerOutput(), ModelRunnerOutput)


# -- a real scheduler's steps, fed to the runner's batch as originals and as decoded copies -----

def _seqs(rid: str, prompt: list[int], n: int = 1, max_tokens: int = 6, **params) -> Request:
    p = SamplingParams(n=n, max_tokens=max_tokens, ignore_eos=True, **params)
    ids = [rid] + [f"{rid}#{i}" for i in range(1, n)]
    seqs = [Request(request_id=sid, prompt_token_ids=list(prompt), sampling_params=p.for_sample(i),
                    max_tokens=max_tokens, eos_token_ids=frozenset({0})) for i, sid in enumerate(ids)]
    seqs[0].pending_forks = seqs[1:]
    return seqs[0]


def _inputs_equal(a, b) -> None:
    for name in ("input_ids", "positions", "logits_indices"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    aa, ba = a.attn, b.attn
    assert torch.equal(aa.slot_mapping, ba.slot_mapping)
    assert aa.num_decodes == ba.num_decodes
    for name in ("decode_block_tables", "decode_seq_lens", "prefill_block_tables", "prefill_rows"):
        x, y = getattr(aa, name), getattr(ba, name)
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), name
    assert len(aa.prefills) == len(ba.prefills)
    for p, q in zip(aa.prefills, ba.prefills):
        assert (p.start, p.end, p.num_computed) == (q.start, q.end, q.num_computed)
        assert (p.block_table is None) == (q.block_table is None)
        assert p.block_table is None or torch.equal(p.block_table, q.block_table)
    assert [s.req_id for s in a.sampling] == [s.req_id for s in b.sampling]
    assert [(r.state.req_id, r.first_position, r.count) for r in a.prompt_rows] == \
        [(r.state.req_id, r.first_position, r.count) for r in b.prompt_rows]


def test_real_schedule_roundtrips_and_decoded_copy_builds_same_input():
    vocab, bs = 16, 2
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=6, max_model_len=16),
                      KVCacheManager(9, bs))
    originals = InputBatch(4, 8, vocab, CPU)
    decoded = InputBatch(4, 8, vocab, CPU)
    sched.add_request(_seqs("a", [1, 2, 3, 4, 5], max_tokens=8))
    sched.add_request(_seqs("b", [6, 7, 8], n=2, seed=2**63, stop=["xy", "\n"], logit_bias={3: 2.5, 9: -1},
                            temperature=0.8))
    sched.add_request(_seqs("c", [1, 2, 3, 9], prompt_logprobs=2, repetition_penalty=1.2, max_tokens=5))
    sched.add_request(_seqs("d", [1, 2, 3, 4, 5, 6], max_tokens=4, min_tokens=2, stop_token_ids=[11]))
    seen = {"fork": False, "reset": False, "copy": False, "preempt": False, "prompt_rows": False, "finished": False}
    steps = 0
    while sched.num_unfinished:
        steps += 1
        assert steps < 100
        out = sched.schedule()
        back = roundtrip(out, SchedulerOutput)
        seen["fork"] |= any(r.parent_req_id is not None for r in out.scheduled_new_reqs)
        seen["reset"] |= any(c.reset_block_ids for c in out.scheduled_cached_reqs)
        seen["copy"] |= bool(out.block_copies)
        seen["preempt"] |= out.num_preempted > 0
        seen["finished"] |= bool(out.finished_req_ids)
        originals.update_states(out)
        decoded.update_states(back)
        assert set(originals.requests) == set(decoded.requests)
        assert [s.req_id for s in originals.reqs[:originals.num_reqs]] == \
            [s.req_id for s in decoded.reqs[:decoded.num_reqs]]
        if out.is_empty:
            continue
        a = build_model_input(originals, out, bs, CPU)
        b = build_model_input(decoded, back, bs, CPU)
        _inputs_equal(a, b)
        seen["prompt_rows"] |= bool(a.prompt_rows)
        # Fake tokens drawn from each request's own seeded generator (or a fixed rule without one):
        # the decoded batch's generators must give the same draws.
        tokens = []
        for s, t in zip(a.sampling, b.sampling):
            assert s.sampling_params == t.sampling_params and s.token_ids == t.token_ids
            if s.generator is not None:
                x = torch.randint(1, vocab, (1,), generator=s.generator).item()
                assert torch.randint(1, vocab, (1,), generator=t.generator).item() == x
            else:
                x = 1 + (sum(s.token_ids) + len(s.token_ids)) % (vocab - 1)
            tokens.append(x)
        for states in (a.sampling, b.sampling):
            for s, x in zip(states, tokens):
                s.append_token(x)
                s.fork_of = None
        result = ModelRunnerOutput([s.req_id for s in a.sampling], [[x] for x in tokens], [[-1.0] for _ in tokens])
        sched.update_from_output(out, roundtrip(result, ModelRunnerOutput))
        for rid, s in originals.requests.items():
            t = decoded.requests[rid]
            assert (s.token_ids, s.num_computed_tokens, s.block_ids, s.num_prompt_logprobs_done) == \
                (t.token_ids, t.num_computed_tokens, t.block_ids, t.num_prompt_logprobs_done)
            if s.token_counts is not None:
                assert torch.equal(s.token_counts.output_counts, t.token_counts.output_counts)
                assert torch.equal(s.token_counts.seen, t.token_counts.seen)
    assert all(seen.values()), seen


# -- frontend <-> engine core messages -------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(sampling_params(), st.lists(token_ids, min_size=1, max_size=20), st.lists(req_ids, max_size=3))
def test_engine_core_request_roundtrip(params, prompt, fork_ids):
    req = EngineCoreRequest("req-1", prompt, params, [2, 7], 128, time.monotonic(), fork_ids=fork_ids)
    back = messages.decode_input(RequestType.ADD, messages.encode(req))
    assert type(back) is EngineCoreRequest and back == req
    assert_same_params(params, back.sampling_params)


def test_core_inputs_roundtrip():
    finish = CoreFinish(["a", "b#1"], stopped=True)
    assert messages.decode_input(RequestType.ABORT, messages.encode(finish)) == finish
    assert messages.decode_input(RequestType.ABORT, messages.encode(CoreFinish(["x"]))) == CoreFinish(["x"], False)
    util = CoreUtility("reset_prefix_cache")
    assert messages.decode_input(RequestType.UTILITY, messages.encode(util)) == util
    assert messages.decode_input(RequestType.SHUTDOWN, b"") is None
    with pytest.raises(msgspec.ValidationError):  # the kind decides the type: no silent mix-up
        messages.decode_input(RequestType.ADD, messages.encode(finish))


def test_engine_core_outputs_roundtrip():
    # Stats from a real scheduler after a few steps (every counter non-trivial).
    sched = Scheduler(SchedulerConfig(4, 8, 16), KVCacheManager(8, 2))
    sched.add_request(_seqs("a", [1, 2, 3, 4, 5]))
    sched.add_request(_seqs("b", [1, 2, 3, 4, 6]))
    for _ in range(3):
        out = sched.schedule()
        rows = [r.req_id for r in [*out.scheduled_new_reqs, *out.scheduled_cached_reqs]
                if r.num_computed_tokens + out.num_scheduled_tokens[r.req_id] == sched.requests[r.req_id].num_tokens]
        sched.update_from_output(out, ModelRunnerOutput(rows, [[5] for _ in rows], [[0.0] for _ in rows]))
    stats = sched.make_stats()
    assert stats.num_steps == 3 and stats.num_generated_tokens > 0 and stats.num_allocated_blocks > 0
    outs = EngineCoreOutputs(engine_index=2, outputs=[
        EngineCoreOutput("a", [5], [-0.25], LogprobsLists([[5, 1]], [[-0.25, -2.0]]), None, None, None, 4,
                         123.5),
        EngineCoreOutput("b", [], [], new_prompt_logprobs=LogprobsLists([[2], [3]], [[-1.0], [-3.0]])),
        EngineCoreOutput("c", [11, 0], [-0.5, -0.1], finish_reason=RequestStatus.FINISHED_STOPPED.value,
                         stop_reason=11),
        EngineCoreOutput("d", [9], [-0.5], finish_reason="stop", stop_reason="END"),
        EngineCoreOutput("e", [], [], finish_reason="abort"),
    ], stats=stats)
    back = messages.decode_output(messages.encode(outs))
    assert type(back) is EngineCoreOutputs and back == outs
    assert type(back.stats) is SchedulerStats and back.stats == stats
    assert type(back.outputs[0].new_logprobs) is LogprobsLists
    assert back.outputs[2].stop_reason == 11 and back.outputs[3].stop_reason == "END"
    err = EngineCoreOutputs(outputs=[EngineCoreOutput("x", [], [], finish_reason="error", error="boom")])
    assert messages.decode_output(messages.encode(err)) == err
    empty = messages.decode_output(messages.encode(EngineCoreOutputs()))
    assert type(empty) is EngineCoreOutputs and empty == EngineCoreOutputs()


def test_engine_core_ready_roundtrip():
    for ready in (EngineCoreReady(0, max_model_len=2048, num_blocks=512),
                  EngineCoreReady(3, error="CUDA out of memory"), EngineCoreReady(1)):
        back = messages.decode_output(messages.encode(ready))
        assert type(back) is EngineCoreReady and back == ready
