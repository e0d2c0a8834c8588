"""Embeddings from decoder models: LLM.embed and POST /v1/embeddings against transformers.

The reference: transformers' base model (AutoModel) in float32, its last_hidden_state
pooled (last token or mean over the prompt) and L2-normalised.
"""

from __future__ import annotations

import base64
import json
import shutil

import numpy as np
import pytest
import torch

from freight.pooling_params import PoolingParams
from freight.sampling_params import SamplingParams

PROMPTS = ["Once upon a time there was a little", "The cat sat on the mat and",
           "a b c d e f g h i j k l m n o p q r s t u v w x y z one two three four five six"]
TOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(random_models_root):
    from model_factory import make_variant

    return make_variant(random_models_root, "llama_gqa")


@pytest.fixture(scope="module")
def mean_model_dir(model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("mean_model") / "m"
    shutil.copytree(model_dir, d)
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 0, "pooling_mode_mean_tokens": True, "pooling_mode_lasttoken": False}))
    return d


@pytest.fixture(scope="module")
def reference(model_dir):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)

    def embed(prompt, mode="last", normalize=True):
        ids = tok(prompt).input_ids if isinstance(prompt, str) else list(prompt)
        with torch.no_grad():
            h = model(input_ids=torch.tensor([ids])).last_hidden_state[0].float()
        v = h[-1] if mode == "last" else h.mean(dim=0)
        if normalize:
            v = torch.nn.functional.normalize(v, dim=-1)
        return v.numpy()

    return embed


def _check(outs, prompts, ref, **kw):
    assert len(outs) == len(prompts)
    for out, p in zip(outs, prompts):
        got = np.asarray(out.outputs.embedding, dtype=np.float32)
        want = ref(p, **kw)
        assert got.shape == want.shape
        assert np.abs(got - want).max() < TOL, np.abs(got - want).max()


def test_last_token_batch_and_prefix_cache(make_llm, model_dir, reference):
    llm = make_llm(model_dir)
    outs = llm.embed(PROMPTS, use_tqdm=False)
    _check(outs, PROMPTS, reference)
    assert outs[0].prompt_token_ids == llm.get_tokenizer()(PROMPTS[0]).input_ids
    assert outs[0].finished and outs[0].request_id
    # the same prompt again: a prefix-cache hit, the same vector
    again = llm.embed([PROMPTS[2], PROMPTS[2]], use_tqdm=False)
    _check(again, [PROMPTS[2]] * 2, reference)
    assert llm.llm_engine.get_stats().prefix_cache_hits > 0
    raw = llm.embed(PROMPTS[:2], PoolingParams(normalize=False), use_tqdm=False)
    _check(raw, PROMPTS[:2], reference, normalize=False)
    assert abs(np.linalg.norm(raw[0].outputs.embedding) - 1.0) > 1e-3


def test_mean_pooling_chunked(make_llm, mean_model_dir, reference):
    llm = make_llm(mean_model_dir, max_num_batched_tokens=16)
    long_prompt = " ".join(PROMPTS)  # longer than a chunk of 16
    assert len(llm.get_tokenizer()(long_prompt).input_ids) > 16
    prompts = PROMPTS + [long_prompt, long_prompt]  # twice: prefix cache on, must not skip rows
    outs = llm.embed(prompts, use_tqdm=False)
    _check(outs, prompts, reference, mode="mean")
    raw = llm.embed([long_prompt], PoolingParams(normalize=False), use_tqdm=False)
    _check(raw, [long_prompt], reference, mode="mean", normalize=False)


def test_last_token_chunked(make_llm, model_dir, reference):
    llm = make_llm(model_dir, max_num_batched_tokens=16)
    long_prompt = " ".join(PROMPTS)
    outs = llm.embed([long_prompt, PROMPTS[0], long_prompt], use_tqdm=False)
    _check(outs, [long_prompt, PROMPTS[0], long_prompt], reference)


def test_dimensions_rejected(make_llm, model_dir):
    llm = make_llm(model_dir)
    with pytest.raises(ValueError, match="dimensions"):
        llm.embed(PROMPTS[0], PoolingParams(dimensions=8), use_tqdm=False)


def test_matryoshka_dimensions(make_llm, model_dir, tmp_path, reference):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    (d / "config_sentence_transformers.json").write_text(json.dumps({"matryoshka_dimensions": [8, 16]}))
    llm = make_llm(d)
    out = llm.embed(PROMPTS[:2], PoolingParams(dimensions=8), use_tqdm=False)
    for o, p in zip(out, PROMPTS[:2]):
        want = reference(p, normalize=False)[:8]
        want = want / np.linalg.norm(want)
        assert len(o.outputs.embedding) == 8
        assert np.abs(np.asarray(o.outputs.embedding) - want).max() < TOL
    with pytest.raises(ValueError, match="dimensions"):
        llm.embed(PROMPTS[0], PoolingParams(dimensions=12), use_tqdm=False)


def test_pooling_mixed_with_generation(make_llm, model_dir, reference):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = make_llm(model_dir, max_num_batched_tokens=32)
    want = [o.outputs[0].token_ids for o in alone.generate(PROMPTS, params, use_tqdm=False)]

    llm = make_llm(model_dir, max_num_batched_tokens=32)
    engine = llm.llm_engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"g{i}", p, params)
    engine.step()  # generation under way, then embeddings join the batch
    for i, p in enumerate(PROMPTS):
        engine.add_pooling_request(f"e{i}", p, PoolingParams())
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert [done[f"g{i}"].outputs[0].token_ids for i in range(len(PROMPTS))] == want
    _check([done[f"e{i}"] for i in range(len(PROMPTS))], PROMPTS, reference)
    stats = engine.get_stats()  # every request finished, its blocks freed
    assert stats.num_running == 0 and stats.num_waiting == 0 and engine.engine_core.kv_cache.usage() == 0
    assert done["e0"].outputs.embedding and all(o.finished for o in done.values())


def test_server_embeddings(make_llm, model_dir, tmp_path):
    from server_utils import RemoteServer

    inputs = PROMPTS[:2]
    llm = make_llm(model_dir)
    offline = [o.outputs.embedding for o in llm.embed(inputs, use_tqdm=False)]
    n_tokens = sum(len(llm.get_tokenizer()(p).input_ids) for p in inputs)
    srv = RemoteServer(model_dir, [], tmp_path / "server.log")
    try:
        client = srv.client()
        model = client.models.list().data[0].id
        resp = client.embeddings.create(model=model, input=inputs)
        assert [d.index for d in resp.data] == [0, 1]
        for d, want in zip(resp.data, offline):
            assert np.abs(np.asarray(d.embedding) - np.asarray(want)).max() < 1e-5
        assert resp.usage.prompt_tokens == n_tokens and resp.usage.total_tokens == n_tokens
        b64 = client.embeddings.with_raw_response.create(model=model, input=inputs, encoding_format="base64")
        body = json.loads(b64.text)
        assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
        for d, want in zip(body["data"], offline):
            vec = np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
            assert np.abs(vec - np.asarray(want)).max() < 1e-5
        ids = llm.get_tokenizer()(inputs[0]).input_ids
        tok = client.embeddings.create(model=model, input=[ids])
        assert np.abs(np.asarray(tok.data[0].embedding) - np.asarray(offline[0])).max() < 1e-5
        import openai

        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(model=model, input=inputs[0], dimensions=8)
        assert e.value.status_code == 400 and "dimensions" in str(e.value)
        err = e.value.response.json()["error"]
        assert err["param"] == "dimensions"
    finally:
        srv.stop()
