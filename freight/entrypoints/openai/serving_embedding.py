"""POST /v1/embeddings in OpenAI's shape: inputs (text or token ids, one or many) -> pooled vectors.

The pooling (last token or mean, normalised or not) is the model's, read from its
directory (freight/pooling.py); `dimensions` truncates (Matryoshka) only where the model
declares it may, otherwise a 400 naming `dimensions`.
"""

from __future__ import annotations

import asyncio
import base64
import time

import numpy as np
from fastapi import Request
from starlette.responses import JSONResponse, Response

from freight.entrypoints.openai.errors import bad_request
from freight.entrypoints.openai.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, UsageInfo
from freight.entrypoints.openai.serving_engine import (MAX_PROMPTS, OpenAIServing, engine_error, random_id,
                                                      until_disconnect)
from freight.pooling_params import PoolingParams


class OpenAIServingEmbedding(OpenAIServing):
    async def create(self, req: EmbeddingRequest, raw: Request) -> Response:
        self.check_model(req.model)
        if req.dimensions is not None and req.dimensions < 1:
            raise bad_request(f"Invalid 'dimensions': expected a positive integer, got {req.dimensions}.",
                              param="dimensions", code="invalid_value")
        try:
            params = self.engine.processor.resolve_pooling_params(
                PoolingParams(normalize=req.normalize, dimensions=req.dimensions))
        except ValueError as e:
            raise bad_request(str(e), param="dimensions", code="unsupported_parameter") from None
        inputs = await self._inputs(req)
        limit = self.engine.max_model_len
        for _, ids in inputs:
            if len(ids) >= limit:
                raise bad_request(f"This model's maximum context length is {limit} tokens. However, your input is "
                                  f"{len(ids)} tokens long. Please reduce the length of the input.",
                                  param="input", code="context_length_exceeded")
        request_id = random_id("embd")
        streams = []
        try:
            for i, (text, ids) in enumerate(inputs):
                rid = request_id if len(inputs) == 1 else f"{request_id}-{i}"
                streams.append(self.engine.add_pooling_request(
                    rid, {"prompt": text, "prompt_token_ids": ids}, params))
        except Exception as e:
            for s in streams:
                s.abort()
            raise engine_error(e, "input") from None
        try:
            return await until_disconnect(raw, self._full(req, request_id, inputs, streams))
        finally:
            for s in streams:
                s.abort()

    async def _full(self, req: EmbeddingRequest, request_id: str, inputs, streams) -> Response:
        try:
            outs = await asyncio.gather(*(s.get() for s in streams))
        except Exception as e:
            raise engine_error(e, "input") from None
        data = []
        for i, out in enumerate(outs):
            vec = out.outputs.embedding
            if req.encoding_format == "base64":
                emb = base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode("ascii")
            else:
                emb = vec
            data.append(EmbeddingData(index=i, embedding=emb))
        n = sum(len(ids) for _, ids in inputs)
        resp = EmbeddingResponse(id=request_id, created=int(time.time()), model=self.model_name, data=data,
                                 usage=UsageInfo(prompt_tokens=n, total_tokens=n))
        return JSONResponse(resp.model_dump())

    async def _inputs(self, req: EmbeddingRequest) -> list[tuple]:
        p = req.input
        if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)):
            items = [p]
        else:
            items = list(p)
        if not items:
            raise bad_request("'input' must not be empty.", param="input")
        if len(items) > MAX_PROMPTS:
            raise bad_request(f"Too many inputs: {len(items)}; at most {MAX_PROMPTS} in one request.",
                              param="input", code="too_many_inputs")
        vocab = self.engine.processor.vocab_size
        out = []
        for item in items:
            if isinstance(item, str):
                if not item:
                    raise bad_request("'input' must not contain an empty string.", param="input")
                out.append((item, await self.prep.tokenize(item, req.add_special_tokens, param="input")))
            else:
                if not item:
                    raise bad_request("'input' must not contain an empty list of token ids.", param="input")
                if min(item) < 0 or max(item) >= vocab:
                    raise bad_request(f"token ids must be in [0, {vocab})", param="input", code="invalid_value")
                out.append((None, list(item)))
        return out
