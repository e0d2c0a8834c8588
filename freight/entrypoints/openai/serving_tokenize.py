"""vLLM's POST /tokenize and /detokenize, and GET /v1/models."""

from __future__ import annotations

from freight.entrypoints.openai.errors import bad_request
from freight.entrypoints.openai.protocol import (DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList,
                                                 TokenizeRequest, TokenizeResponse)
from freight.entrypoints.openai.serving_chat import parse_messages, render_chat
from freight.entrypoints.openai.tool_calls import plan_tools
from freight.entrypoints.openai.serving_engine import OpenAIServing


class OpenAIServingTokenization(OpenAIServing):
    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("Give exactly one of 'prompt' and 'messages'.", param="prompt")
        if req.prompt is not None:
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
            ids = await self.prep.tokenize(req.prompt, add_special)
        else:
            _, ids = await self.prep.render(render_chat, parse_messages(req.messages), req.chat_template,
                                            add_generation_prompt=req.add_generation_prompt,
                                            continue_final_message=req.continue_final_message,
                                            template_kwargs=req.chat_template_kwargs,
                                            add_special_tokens=bool(req.add_special_tokens),
                                            tools=plan_tools(req.tools, None, True).tools or None)
        strs = await self.prep.run(self.prep.tokenizer.convert_ids_to_tokens, ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.engine.max_model_len, tokens=ids,
                                token_strs=strs)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(req.model)
        vocab = self.engine.processor.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token ids must be in [0, {vocab}), got {bad[:5]}", param="tokens",
                              code="invalid_value")
        return DetokenizeResponse(prompt=await self.prep.run(self.prep.tokenizer.decode, req.tokens))

    def models(self, root: str) -> ModelList:
        return ModelList(data=[ModelCard(id=name, root=root, max_model_len=self.engine.max_model_len)
                               for name in self.served_model_names])
