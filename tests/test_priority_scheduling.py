"""Priority scheduling (vLLM's --scheduling-policy priority and the requests' `priority`).

Scheduler unit tests (which request is admitted, which is preempted), the offline engine
serving requests in priority order, and the refusal of a priority under fcfs, offline and
over HTTP (vLLM: "Priority scheduling is not enabled.").
"""

from __future__ import annotations

import httpx
import pytest
from server_utils import SERVED_NAME, chat_model_dir, server  # noqa: F401  (session fixtures)
from test_scheduler_properties import EOS, _fake_step

from freight.core.kv_cache_manager import KVCacheManager
from freight.core.request import Request, RequestStatus
from freight.core.scheduler import Scheduler, SchedulerConfig
from freight.sampling_params import SamplingParams


def _request(rid: str, prompt: list[int], priority: int, arrival: float, max_tokens: int = 8) -> Request:
    return Request(request_id=rid, prompt_token_ids=prompt, max_tokens=max_tokens, arrival_time=arrival,
                   sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   eos_token_ids=frozenset({EOS}), priority=priority)


def _scheduler(policy: str, num_blocks: int = 16, max_num_seqs: int = 4) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64, max_model_len=32,
                                     policy=policy), KVCacheManager(num_blocks, 2, enable_caching=False))


def _admitted(out) -> list[str]:
    return [r.req_id for r in out.scheduled_new_reqs]


@pytest.mark.parametrize("policy, order", [("priority", ["b", "d", "c", "a"]), ("fcfs", ["a", "b", "c", "d"])])
def test_admission_order(policy, order):
    """One seat: requests are served one at a time, by (priority, arrival) or by arrival alone."""
    sched = _scheduler(policy, max_num_seqs=1)
    for rid, prio, arrival in [("a", 5, 1.0), ("b", -1, 2.0), ("c", 3, 3.0), ("d", 3, 2.5)]:
        sched.add_request(_request(rid, [1, 2, 3], prio, arrival, max_tokens=2))
    served = []
    while sched.num_unfinished:
        served += _admitted(_fake_step(sched))
    assert served == order


def test_priority_admits_in_key_order_within_one_step():
    sched = _scheduler("priority")
    for rid, prio, arrival in [("late-low", 1, 3.0), ("high", 0, 2.0), ("early-low", 1, 1.0)]:
        sched.add_request(_request(rid, [1, 2], prio, arrival))
    assert _admitted(_fake_step(sched)) == ["high", "early-low", "late-low"]
    assert [r.request_id for r in sched.running] == ["high", "early-low", "late-low"]


def _fill_cache(policy: str) -> tuple[Scheduler, dict[str, Request]]:
    """Three running requests in a cache that runs out within a few decode steps."""
    sched = _scheduler(policy, num_blocks=7)
    reqs = {rid: _request(rid, [1, 2, 3, 4], prio, arrival, max_tokens=8)
            for rid, prio, arrival in [("first-low", 2, 1.0), ("second-high", 0, 2.0), ("third-mid", 1, 3.0)]}
    for r in reqs.values():
        sched.add_request(r)
    _fake_step(sched)
    assert all(r.status == RequestStatus.RUNNING for r in reqs.values())
    return sched, reqs


@pytest.mark.parametrize("policy, victim", [("priority", "first-low"), ("fcfs", "third-mid")])
def test_victim_of_preemption(policy, victim):
    """Out of blocks: priority preempts the running request with the largest (priority, arrival) even
    though it was admitted first; fcfs preempts the most recently admitted."""
    sched, reqs = _fill_cache(policy)
    while sched.num_preemptions == 0:
        _fake_step(sched)
    assert [r.request_id for r in reqs.values() if r.num_preemptions] == [victim]
    assert reqs[victim].status == RequestStatus.PREEMPTED and reqs[victim] in sched.waiting
    while sched.num_unfinished:
        _fake_step(sched)
    assert all(r.status == RequestStatus.FINISHED_LENGTH and len(r.output_token_ids) == 8 for r in reqs.values())
    assert sched.kv.num_free_blocks == 7


def test_waiting_high_priority_does_not_preempt_running():
    """As in vLLM v1: a waiting request, however urgent, waits for a seat; it never evicts a running one."""
    sched = _scheduler("priority", max_num_seqs=1)
    low = _request("low", [1, 2, 3], 9, 1.0, max_tokens=4)
    sched.add_request(low)
    _fake_step(sched)
    high = _request("high", [4, 5, 6], -9, 2.0, max_tokens=4)
    sched.add_request(high)
    while low.status == RequestStatus.RUNNING:
        _fake_step(sched)
        assert high.status == RequestStatus.WAITING or low.status.finished
    assert low.num_preemptions == 0 and low.status == RequestStatus.FINISHED_LENGTH
    while sched.num_unfinished:
        _fake_step(sched)
    assert high.status == RequestStatus.FINISHED_LENGTH


def test_preempted_low_priority_request_queues_behind_higher_ones():
    """A preempted request goes back by its key (vLLM's PriorityRequestQueue), not to the front."""
    sched, reqs = _fill_cache("priority")
    waiting_high = _request("waiting-high", [7, 7], 0, 4.0)
    sched.add_request(waiting_high)
    while sched.num_preemptions == 0:
        _fake_step(sched)
    assert [r.request_id for r in sched.waiting] == ["waiting-high", "first-low"]


def test_priority_crosses_the_process_boundary():
    """EngineCoreRequest carries the priority in its msgpack form (the engine core's own process)."""
    from freight.engine.messages import EngineCoreRequest, RequestType, decode_input, encode

    req = EngineCoreRequest("r", [1, 2], SamplingParams(max_tokens=2), [0], 2, 1.5, priority=-3)
    assert decode_input(RequestType.ADD, encode(req)).priority == -3
    default = EngineCoreRequest("r", [1], SamplingParams(), [0], 2, 1.5)
    assert decode_input(RequestType.ADD, encode(default)).priority == 0


def test_scheduler_config_rejects_unknown_policy():
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=8, max_model_len=8, policy="lifo")


# -- the engine ----------------------------------------------------------------------------------

def test_offline_engine_serves_in_priority_order(make_llm, stories_dir):
    """max_num_seqs=1: LLM.generate's requests are served one by one, lowest priority value first."""
    llm = make_llm(stories_dir, max_num_seqs=1, scheduling_policy="priority", kv_cache_memory="16MiB")
    prompts = ["Once upon a time", "The cat", "A little girl", "One day"]
    priority = [2, 0, 3, 1]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False, priority=priority)
    by_start = sorted(range(len(outs)), key=lambda i: outs[i].metrics.first_scheduled_time)
    by_finish = sorted(range(len(outs)), key=lambda i: outs[i].metrics.finished_time)
    assert [priority[i] for i in by_start] == [0, 1, 2, 3]
    assert by_finish == by_start
    # The order changes nothing in what is generated.
    again = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in again]


def test_offline_priority_refused_under_fcfs(make_llm, stories_dir):
    llm = make_llm(stories_dir, kv_cache_memory="16MiB")
    with pytest.raises(ValueError, match="Priority scheduling is not enabled"):
        llm.generate(["Once upon a time"], SamplingParams(max_tokens=2), use_tqdm=False, priority=[1])
    with pytest.raises(ValueError, match="priorities for"):
        llm.generate(["a", "b"], SamplingParams(max_tokens=2), use_tqdm=False, priority=[0])
    # priority 0 is every request's default: accepted under fcfs
    assert llm.generate(["Once"], SamplingParams(max_tokens=2), use_tqdm=False, priority=[0])[0].finished


def test_llm_rejects_unknown_scheduling_policy(stories_dir):
    from freight.config import EngineConfig

    with pytest.raises(ValueError, match="scheduling_policy"):
        EngineConfig(model=str(stories_dir), scheduling_policy="sjf")


# -- the server (the shared session server runs fcfs) ----------------------------------------------

@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
])
def test_server_refuses_priority_under_fcfs(server, path, body):  # noqa: F811
    url, headers = server.url(path), server.headers()
    r = httpx.post(url, json={"model": SERVED_NAME, **body, "priority": 3}, headers=headers, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "Priority scheduling is not enabled" in err["message"] and err["param"] == "priority"
    # The default priority (0), sent explicitly, is fine; a non-integer is a 400 naming the field.
    r = httpx.post(url, json={"model": SERVED_NAME, **body, "priority": 0}, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(url, json={"model": SERVED_NAME, **body, "priority": "high"}, headers=headers, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority", r.text
