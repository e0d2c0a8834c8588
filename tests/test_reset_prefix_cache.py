"""LLM.reset_prefix_cache() and POST /reset_prefix_cache (vLLM's): after a reset, a repeated
prompt is not a prefix-cache hit, for the in-process core, for every data-parallel core,
and through the server (where the route needs the API key)."""

from __future__ import annotations

import httpx

from freight import SamplingParams
from server_utils import chat_model_dir, metric, server, wait_for_idle  # noqa: F401  (fixtures)

# Long enough for two full 16-token blocks: a repeat of it must hit the prefix cache.
PROMPT = ("Once upon a time, there was a little girl named Lily. She liked to play outside with her "
          "ball and her dog. One day, the sun was hot and the sky was blue.")
PARAMS = SamplingParams(temperature=0, max_tokens=2)


def _cached(llm, n: int = 1) -> list[int]:
    return [o.num_cached_tokens for o in llm.generate([PROMPT] * n, PARAMS, use_tqdm=False)]


def test_llm_reset_prefix_cache(stories_dir, make_llm):
    llm = make_llm(stories_dir)
    assert _cached(llm) == [0]
    assert _cached(llm)[0] >= 32
    assert llm.reset_prefix_cache() is True
    assert _cached(llm) == [0]


def test_llm_reset_prefix_cache_reaches_every_data_parallel_core(stories_dir, make_llm):
    llm = make_llm(stories_dir, data_parallel_size=2, kv_cache_memory="16MiB")
    # Two requests at once go to different cores (the least loaded), so each core caches the prompt.
    _cached(llm, 2)
    assert min(_cached(llm, 2)) >= 32
    assert llm.reset_prefix_cache() is True
    assert _cached(llm, 2) == [0, 0]


def test_server_reset_prefix_cache(server):  # noqa: F811
    def complete() -> float:
        r = httpx.post(server.url("/v1/completions"), headers=server.headers(), timeout=120,
                       json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        return metric(wait_for_idle(server), "vllm:prefix_cache_hits_total")

    assert httpx.post(server.url("/reset_prefix_cache"), timeout=30).status_code == 401  # behind the API key
    first = complete()
    repeated = complete()
    assert repeated - first >= 32, "the repeated prompt did not hit the prefix cache"
    r = httpx.post(server.url("/reset_prefix_cache"), headers=server.headers(), timeout=30)
    assert r.status_code == 200
    assert complete() == repeated, "the repeated prompt hit the prefix cache after a reset"
