"""The per-request timeline: its phases (queue, prefill, decode, inference, e2e), preemptions and
cached prompt tokens, as RequestOutput.metrics offline, as `usage.prompt_tokens_details.cached_tokens`
and the `"return_timeline": true` extension on the server (official openai client), and in the
per-request log line."""

from __future__ import annotations

import re
import time

import pytest

from model_factory import kv_bytes_per_block
from server_utils import SERVED_NAME, chat_model_dir, metric, offline, server, wait_for_idle  # noqa: F401

EPS = 1e-6
TIMELINE_KEYS = {"arrival_time", "queue_time", "prefill_time", "decode_time", "inference_time", "e2e_time",
                 "num_preemptions", "num_cached_tokens"}


def check_phases(queue, prefill, decode, inference, e2e) -> None:
    """Each phase is known and they fit together: prefill + decode is inference, queue + inference fits e2e."""
    assert None not in (queue, prefill, decode, inference, e2e)
    assert min(queue, prefill, decode, inference, e2e) >= 0
    assert prefill > 0, "computing a prompt takes time"
    assert abs(prefill + decode - inference) < EPS
    assert queue + inference <= e2e + EPS


def check_timeline(t: dict, max_cached: int) -> None:
    assert set(t) == TIMELINE_KEYS, t
    check_phases(t["queue_time"], t["prefill_time"], t["decode_time"], t["inference_time"], t["e2e_time"])
    assert abs(t["arrival_time"] - time.time()) < 120, "arrival_time is Unix time"
    assert t["num_preemptions"] == 0  # the shared server's KV cache is large enough
    assert 0 <= t["num_cached_tokens"] <= max_cached


def test_offline_metrics_phases(offline):
    from freight import SamplingParams

    outs = offline.generate(["Once upon a time", "The little dog"], SamplingParams(max_tokens=6, temperature=0,
                                                                                   ignore_eos=True), use_tqdm=False)
    for out in outs:
        m = out.metrics
        check_phases(m.queue_time, m.prefill_time, m.decode_time, m.inference_time, m.e2e_time)
        assert m.decode_time > 0, "five tokens after the first"
        assert m.num_preemptions == 0 and m.n_param == 1 and m.max_tokens_param == 6


def test_preemptions_counted_per_request(stories_dir):
    """A KV cache of 6 blocks cannot hold four 50-token sequences at once: the requests' own counts of
    preemptions add up to the engine's."""
    from freight import LLM, SamplingParams

    llm = LLM(model=str(stories_dir), dtype="float32", device="cpu", seed=0, max_model_len=64,
              kv_cache_memory=6 * kv_bytes_per_block(stories_dir, 16), max_num_batched_tokens=32)
    prompts = ["Once upon a time", "The little dog ran", "Lily wanted to play", "One day, a bird"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=45, temperature=0, ignore_eos=True), use_tqdm=False)
    engine_total = llm.llm_engine.get_stats().num_preemptions
    assert engine_total > 0, "expected preemptions with 6 KV blocks"
    assert sum(o.metrics.num_preemptions for o in outs) == engine_total
    for o in outs:
        m = o.metrics
        check_phases(m.queue_time, m.prefill_time, m.decode_time, m.inference_time, m.e2e_time)


# -- the server -----------------------------------------------------------------------------
PROMPT = " ".join(["a red ball rolled down the long hill"] * 6)  # several full 16-token blocks


def test_timeline_only_when_asked(server):
    client = server.client()
    plain = client.completions.create(model=SERVED_NAME, prompt="Once upon a time", max_tokens=3, temperature=0)
    assert "timeline" not in plain.model_dump()
    chat = client.chat.completions.create(model=SERVED_NAME, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3, temperature=0)
    assert "timeline" not in chat.model_dump()
    chunks = list(client.completions.create(model=SERVED_NAME, prompt="Hi", max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}))
    assert all("timeline" not in c.model_dump() for c in chunks)


def test_completion_timeline(server):
    client = server.client()
    r = client.completions.create(model=SERVED_NAME, prompt="Once upon a time", max_tokens=5, temperature=0,
                                  extra_body={"return_timeline": True, "ignore_eos": True})
    check_timeline(r.model_extra["timeline"], r.usage.prompt_tokens)
    assert r.model_extra["timeline"]["num_cached_tokens"] == r.usage.prompt_tokens_details.cached_tokens


def test_streamed_timeline_in_last_chunk(server):
    client = server.client()
    chunks = list(client.completions.create(model=SERVED_NAME, prompt="Once upon a time", max_tokens=5,
                                            temperature=0, stream=True, extra_body={"return_timeline": True}))
    assert [c for c in chunks[:-1] if "timeline" in c.model_extra] == []
    last = chunks[-1]
    assert last.choices == []
    check_timeline(last.model_extra["timeline"], 64)

    chunks = list(client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=5, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"return_timeline": True}))
    assert [c for c in chunks[:-1] if "timeline" in c.model_extra] == []
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None, "usage and timeline share the last chunk"
    check_timeline(last.model_extra["timeline"], last.usage.prompt_tokens)
    assert last.model_extra["timeline"]["num_cached_tokens"] == last.usage.prompt_tokens_details.cached_tokens


def test_chat_timeline(server):
    r = server.client().chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=4, temperature=0,
        extra_body={"return_timeline": True})
    check_timeline(r.model_extra["timeline"], r.usage.prompt_tokens)


def test_cached_tokens_are_the_prefix_cache_hit(server):
    """A repeated prompt: usage.prompt_tokens_details.cached_tokens is exactly what the engine found in
    its prefix cache for it (the /metrics counter's increase), full blocks of the prompt."""
    client = server.client()
    first = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=2, temperature=0)
    prompt_tokens = first.usage.prompt_tokens
    assert prompt_tokens >= 48
    before = wait_for_idle(server)
    again = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=2, temperature=0)
    after = wait_for_idle(server)
    hits = metric(after, "vllm:prefix_cache_hits_total") - metric(before, "vllm:prefix_cache_hits_total")
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached == hits
    assert cached >= 32 and cached % 16 == 0 and cached < prompt_tokens

    # The same through chat, streamed, with usage in the last chunk.
    messages = [{"role": "user", "content": PROMPT}]
    client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=2, temperature=0)
    chunks = list(client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=2,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 32


def test_log_line_has_the_timeline(server):
    server.client().completions.create(model=SERVED_NAME, prompt="The little dog", max_tokens=3, temperature=0)
    wait_for_idle(server)
    line = re.compile(r"request \S+ finished \(length\): prompt \d+ tokens \(\d+ cached\), generated 3 tokens, "
                      r"queue \d+\.\d{3}s, prefill \d+\.\d{3}s, decode \d+\.\d{3}s, TTFT \d+\.\d{3}s, "
                      r"e2e \d+\.\d{3}s, preemptions 0")
    deadline = time.monotonic() + 10
    while not line.search(server.log_path.read_text(errors="replace")):
        if time.monotonic() > deadline:
            pytest.fail(f"no finished-request line with the timeline in the log:\n{server.log_tail()}")
        time.sleep(0.1)
