"""`freight serve` end to end, through the official openai client: the same greedy text as
the offline API (streamed and not), usage counts, logprobs, n/seed/stop, the small
endpoints, 64 concurrent streams, and clients that hang up mid-stream."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from freight import SamplingParams
from server_utils import (SERVED_NAME, chat_model_dir, metric, offline, scrape, server,  # noqa: F401
                          wait_for_idle)

PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went to the park", "One day, a bird",
           "Tom had a red ball", "The sun was", "Sara wanted to", "A big fish"]
MESSAGES = [{"role": "system", "content": "You tell short stories."},
            {"role": "user", "content": "Tell me about a cat."},
            {"role": "assistant", "content": "Once there was a cat."},
            {"role": "user", "content": [{"type": "text", "text": "More"}, {"type": "text", "text": "please."}]}]
# What the template sees for MESSAGES (text parts are joined with a newline).
MESSAGES_FLAT = MESSAGES[:3] + [{"role": "user", "content": "More\nplease."}]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def test_health_version_models(server):
    assert httpx.get(server.url("/health")).status_code == 200
    assert httpx.get(server.url("/version")).json()["version"]
    models = server.client().models.list()
    assert [m.id for m in models.data] == [SERVED_NAME]
    assert models.data[0].max_model_len == 512


@pytest.mark.parametrize("stream", [False, True])
def test_completion_matches_offline(server, offline, stream):
    ref = offline.generate(PROMPTS[0], greedy(24), use_tqdm=False)[0]
    client = server.client()
    if not stream:
        resp = client.completions.create(model=SERVED_NAME, prompt=PROMPTS[0], max_tokens=24, temperature=0)
        text, finish, usage = resp.choices[0].text, resp.choices[0].finish_reason, resp.usage
        assert resp.object == "text_completion" and resp.model == SERVED_NAME
    else:
        chunks = list(client.completions.create(model=SERVED_NAME, prompt=PROMPTS[0], max_tokens=24,
                                                temperature=0, stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        text = "".join(c.text for ch in chunks[:-1] for c in ch.choices)
        finish = [c.finish_reason for ch in chunks[:-1] for c in ch.choices][-1]
        usage = chunks[-1].usage
    assert text == ref.outputs[0].text
    assert finish == "length"
    tok = offline.get_tokenizer()
    assert usage.prompt_tokens == len(tok(PROMPTS[0]).input_ids)
    assert usage.completion_tokens == 24 == len(ref.outputs[0].token_ids)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_chat_matches_offline(server, offline, stream):
    ref = offline.chat(MESSAGES_FLAT, greedy(20), use_tqdm=False)[0]
    prompt_ids = offline.apply_chat_template(MESSAGES_FLAT)["prompt_token_ids"]
    client = server.client()
    if not stream:
        resp = client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_completion_tokens=20,
                                              temperature=0)
        assert resp.object == "chat.completion"
        msg = resp.choices[0].message
        assert msg.role == "assistant"
        text, finish, usage = msg.content, resp.choices[0].finish_reason, resp.usage
    else:
        chunks = list(client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_tokens=20,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        first = chunks[0].choices[0].delta
        assert first.role == "assistant" and not first.content
        assert all(ch.object == "chat.completion.chunk" for ch in chunks)
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert all(ch.usage is None for ch in chunks[:-1])
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1])
        finish = chunks[-2].choices[0].finish_reason
        usage = chunks[-1].usage
    assert text == ref.outputs[0].text
    assert finish == "length"
    assert usage.prompt_tokens == len(prompt_ids) and usage.completion_tokens == 20


def test_chat_without_max_tokens_fills_the_context(server):
    resp = server.client().chat.completions.create(model=SERVED_NAME, messages=[{"role": "user", "content": "Hi"}],
                                                   temperature=0)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.total_tokens == 512  # the model's context


def test_stream_without_usage_has_no_usage_chunk(server):
    chunks = list(server.client().chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, stream=True))
    assert all(ch.choices for ch in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completion_batch_prompts_token_ids_and_echo(server, offline):
    tok = offline.get_tokenizer()
    refs = offline.generate(PROMPTS[:3], greedy(8), use_tqdm=False)
    client = server.client()
    resp = client.completions.create(model=SERVED_NAME, prompt=PROMPTS[:3], max_tokens=8, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [c.text for c in resp.choices] == [r.outputs[0].text for r in refs]
    assert resp.usage.prompt_tokens == sum(len(tok(p).input_ids) for p in PROMPTS[:3])
    assert resp.usage.completion_tokens == 24
    ids = [tok(p).input_ids for p in PROMPTS[:2]]
    resp = client.completions.create(model=SERVED_NAME, prompt=ids, max_tokens=8, temperature=0)
    assert [c.text for c in resp.choices] == [r.outputs[0].text for r in refs[:2]]
    resp = client.completions.create(model=SERVED_NAME, prompt=ids[0], max_tokens=8, temperature=0)
    assert resp.choices[0].text == refs[0].outputs[0].text
    resp = client.completions.create(model=SERVED_NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0, echo=True)
    assert resp.choices[0].text == PROMPTS[0] + refs[0].outputs[0].text


def test_completion_logprobs(server, offline):
    ref = offline.generate(PROMPTS[1], greedy(6, logprobs=2), use_tqdm=False)[0].outputs[0]
    resp = server.client().completions.create(model=SERVED_NAME, prompt=PROMPTS[1], max_tokens=6, temperature=0,
                                              logprobs=2)
    lp = resp.choices[0].logprobs
    assert "".join(lp.tokens) == resp.choices[0].text == ref.text
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for got, want, tid in zip(lp.token_logprobs, ref.logprobs, ref.token_ids):
        assert got == pytest.approx(want[tid], abs=1e-4)
    assert all(2 <= len(t) <= 3 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    # echo: the prompt's tokens come first, the very first one without a logprob
    resp = server.client().completions.create(model=SERVED_NAME, prompt=PROMPTS[1], max_tokens=3, temperature=0,
                                              logprobs=1, echo=True)
    lp = resp.choices[0].logprobs
    n_prompt = resp.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 3 and lp.token_logprobs[0] is None
    assert all(x is not None for x in lp.token_logprobs[1:])
    assert resp.choices[0].text.startswith(PROMPTS[1])


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs(server, stream):
    kw = dict(model=SERVED_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0,
              logprobs=True, top_logprobs=3)
    client = server.client()
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        content = [c for ch in chunks for c in (ch.choices[0].logprobs.content if ch.choices[0].logprobs else [])]
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    else:
        resp = client.chat.completions.create(**kw)
        content, text = resp.choices[0].logprobs.content, resp.choices[0].message.content
    assert len(content) == 5 and "".join(c.token for c in content) == text
    for c in content:
        assert len(c.top_logprobs) == 3
        assert c.logprob == pytest.approx(c.top_logprobs[0].logprob)  # greedy: the best one was taken
        assert c.bytes == list(c.token.encode())


def test_n_seed_and_stop(server, offline):
    client = server.client()
    kw = dict(model=SERVED_NAME, prompt=PROMPTS[0], max_tokens=12, temperature=1.0, seed=1234, n=3)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert a.usage.completion_tokens == 36
    # stop strings end the text before the stop, as offline
    ref = offline.generate(PROMPTS[0], greedy(40, stop=[" girl"]), use_tqdm=False)[0].outputs[0]
    resp = client.completions.create(model=SERVED_NAME, prompt=PROMPTS[0], max_tokens=40, temperature=0,
                                     stop=[" girl"])
    assert resp.choices[0].text == ref.text and " girl" not in ref.text
    assert resp.choices[0].finish_reason == ref.finish_reason == "stop"
    chunks = list(client.completions.create(model=SERVED_NAME, prompt=PROMPTS[0], max_tokens=40, temperature=0,
                                            stop=" girl", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    # vLLM's extra sampling fields pass straight through
    resp = client.completions.create(model=SERVED_NAME, prompt=PROMPTS[0], max_tokens=5, temperature=0.7,
                                     extra_body={"top_k": 5, "min_tokens": 2, "ignore_eos": True})
    assert resp.usage.completion_tokens == 5


def test_tokenize_detokenize(server, offline):
    tok = offline.get_tokenizer()
    h = server.headers()
    r = httpx.post(server.url("/tokenize"), json={"prompt": PROMPTS[2]}, headers=h)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok(PROMPTS[2]).input_ids and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 512
    r = httpx.post(server.url("/tokenize"), json={"messages": MESSAGES}, headers=h)
    assert r.json()["tokens"] == offline.apply_chat_template(MESSAGES_FLAT)["prompt_token_ids"]
    r = httpx.post(server.url("/detokenize"), json={"tokens": tok(PROMPTS[2]).input_ids}, headers=h)
    assert r.status_code == 200 and r.json()["prompt"] == tok.decode(tok(PROMPTS[2]).input_ids)


def test_64_concurrent_streams(server, offline):
    refs = {r.prompt: r.outputs[0].text for r in offline.generate(PROMPTS, greedy(24), use_tqdm=False)}
    before = scrape(server)

    async def one(client, i):
        prompt = PROMPTS[i % len(PROMPTS)]
        stream = await client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in stream:
            text += "".join(c.text for c in chunk.choices)
            usage = chunk.usage or usage
        return prompt, text, usage

    async def run_all():
        async with server.async_client() as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(run_all())
    assert len(results) == 64
    for prompt, text, usage in results:
        assert text == refs[prompt]
        assert usage.completion_tokens == 24
    after = wait_for_idle(server)
    assert metric(after, "vllm:request_success_total", finished_reason="length") - \
        metric(before, "vllm:request_success_total", finished_reason="length") == 64
    assert metric(after, "vllm:generation_tokens_total") - metric(before, "vllm:generation_tokens_total") == 64 * 24


def test_disconnected_streams_free_their_blocks(server):
    before = scrape(server)
    body = {"model": SERVED_NAME, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0,
            "stream": True}

    def hang_up_after_two_chunks(client: httpx.Client) -> None:
        with client.stream("POST", server.url("/v1/completions"), json=body, headers=server.headers()) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    json.loads(line[6:])
                    seen += 1
                    if seen == 2:
                        break  # leaving the block closes the connection mid-stream

    async def run_all():
        loop = asyncio.get_running_loop()
        clients = [httpx.Client(timeout=60) for _ in range(16)]
        try:
            await asyncio.gather(*(loop.run_in_executor(None, hang_up_after_two_chunks, c) for c in clients))
        finally:
            for c in clients:
                c.close()

    asyncio.run(run_all())
    # non-streaming clients that give up waiting are noticed too
    for _ in range(2):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url("/v1/completions"), headers=server.headers(), timeout=httpx.Timeout(60, read=0.3),
                       json=dict(body, stream=False, prompt="Hi", max_tokens=480))
    after = wait_for_idle(server)
    assert metric(after, "vllm:num_requests_running") == 0
    assert metric(after, "freight:kv_cache_free_blocks") == metric(after, "freight:kv_cache_total_blocks")
    assert metric(after, "vllm:kv_cache_usage_perc") == 0
    aborted = metric(after, "vllm:request_success_total", finished_reason="abort") - \
        metric(before, "vllm:request_success_total", finished_reason="abort")
    assert aborted == 16 + 2
    # and the server still serves
    resp = server.client().completions.create(model=SERVED_NAME, prompt="Hi", max_tokens=3)
    assert resp.usage.completion_tokens == 3
