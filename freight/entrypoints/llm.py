"""LLM: the offline API, shaped like vLLM's so scripts migrate by changing the import."""

from __future__ import annotations

import itertools
import logging
from typing import Any, Optional, Sequence, Union

from tqdm import tqdm

from freight.config import EngineConfig
from freight.engine.llm_engine import LLMEngine, PromptType
from freight.entrypoints.chat_template import load_chat_template
from freight.outputs import EmbeddingRequestOutput, RequestOutput
from freight.pooling_params import PoolingParams
from freight.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# vLLM knobs that have no meaning for freight; accepted so scripts run unchanged.
_IGNORED_VLLM_ARGS = {"enforce_eager", "gpu_memory_utilization", "swap_space", "disable_log_stats",
                      "compilation_config", "disable_custom_all_reduce", "load_format"}


def _default_model() -> str:
    try:
        from freight.model_dir import default_model_path
    except ImportError:
        raise ValueError("no model given: pass model=<Hugging Face directory or hub id>") from None
    return default_model_path()


class LLM:
    def __init__(self, model: Optional[str] = None, tokenizer: Optional[str] = None, dtype: str = "auto",
                 seed: int = 0, block_size: int = 16, kv_cache_memory: Union[int, str, None] = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: Optional[int] = None,
                 max_model_len: Optional[int] = None, enable_prefix_caching: bool = True,
                 enable_chunked_prefill: bool = True, device: str = "auto", revision: Optional[str] = None,
                 trust_remote_code: bool = False, tensor_parallel_size: int = 1, data_parallel_size: int = 1,
                 structured_outputs_config: Optional[dict] = None,
                 distributed_executor_backend: Optional[str] = None, model_impl: str = "auto",
                 generation_config: str = "auto", override_generation_config: Optional[dict] = None,
                 scheduling_policy: str = "fcfs", quantization: Optional[str] = None,
                 speculative_config: Optional[dict] = None, **kwargs: Any):
        unknown = set(kwargs) - _IGNORED_VLLM_ARGS
        if unknown:
            raise TypeError(f"LLM() got unexpected arguments: {', '.join(sorted(unknown))}")
        config = EngineConfig(
            model=model or _default_model(), tokenizer=tokenizer, revision=revision, dtype=dtype, device=device,
            seed=seed, block_size=block_size, kv_cache_memory=kv_cache_memory, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching, enable_chunked_prefill=enable_chunked_prefill,
            trust_remote_code=trust_remote_code, structured_outputs_config=structured_outputs_config,
            tensor_parallel_size=tensor_parallel_size, distributed_executor_backend=distributed_executor_backend,
            model_impl=model_impl, generation_config=generation_config,
            override_generation_config=override_generation_config, scheduling_policy=scheduling_policy,
            quantization=quantization, speculative_config=speculative_config)
        # tensor_parallel_size > 1: the model split over that many ranks (processes, or Ray actors with
        # distributed_executor_backend="ray"), the engine core in its own process as rank 0.
        # data_parallel_size > 1: that many engine-core processes, each with the whole model and its own
        # KV cache (the CPUs split between them); requests go to the least loaded.
        self.llm_engine = LLMEngine(config, data_parallel_size)
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What generate() and chat() use without sampling_params: the model's generation config
        (generation_config="auto"), else SamplingParams()'s own defaults."""
        return self.llm_engine.processor.get_default_sampling_params()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (e.g. between benchmark runs); False if blocks were still in use."""
        return self.llm_engine.reset_prefix_cache()

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = True, priority: Optional[Sequence[int]] = None) -> list[RequestOutput]:
        """priority: one per prompt, lower first (needs scheduling_policy="priority", as in vLLM)."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        priorities = [0] * len(prompts) if priority is None else list(priority)
        if len(priorities) != len(prompts):
            raise ValueError(f"got {len(priorities)} priorities for {len(prompts)} prompts")
        # Tokenize and validate every request before queueing any, so one bad request leaves nothing behind.
        tokenized = [self.llm_engine.tokenize_prompt(p) for p in prompts]
        for (_, prompt_ids), sp in zip(tokenized, params):
            self.llm_engine.validate_request(prompt_ids, sp)
        ids = []
        for p in priorities:
            self.llm_engine.processor.validate_priority(p)
        for (text, prompt_ids), sp, p in zip(tokenized, params, priorities):
            rid = str(next(self._counter))
            self.llm_engine.add_request(rid, {"prompt": text, "prompt_token_ids": prompt_ids}, sp, priority=p)
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def embed(self, prompts: Union[PromptType, Sequence[PromptType]],
              pooling_params: Union[PoolingParams, Sequence[PoolingParams], None] = None,
              use_tqdm: bool = True) -> list[EmbeddingRequestOutput]:
        """Embeddings of the prompts (the model's pooling over its final hidden states), as in vLLM."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if pooling_params is None or isinstance(pooling_params, PoolingParams):
            params = [pooling_params] * len(prompts)
        else:
            params = list(pooling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} pooling params for {len(prompts)} prompts")
        engine = self.llm_engine
        # Tokenize and validate every request before queueing any, so one bad request leaves nothing behind.
        tokenized = [engine.tokenize_prompt(p) for p in prompts]
        resolved = [engine.processor.resolve_pooling_params(p) for p in params]
        for _, prompt_ids in tokenized:
            engine.processor._validate_prompt(prompt_ids)
        ids = []
        for (text, prompt_ids), pp in zip(tokenized, resolved):
            rid = str(next(self._counter))
            engine.add_pooling_request(rid, {"prompt": text, "prompt_token_ids": prompt_ids}, pp)
            ids.append(rid)
        outs = self._run(ids, use_tqdm)
        failed = [o.request_id for o in outs if not o.outputs.embedding]
        if failed:
            raise RuntimeError(f"embedding requests {failed} failed in the engine (see the log)")
        return outs

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        try:
            while len(finished) < len(ids) and self.llm_engine.has_unfinished_requests():
                for out in self.llm_engine.step():
                    if out.finished and out.request_id in wanted:
                        finished[out.request_id] = out
                        bar.update(1)
        except BaseException:
            self.llm_engine.abort_request([i for i in ids if i not in finished])
            raise
        finally:
            bar.close()
        return [finished[i] for i in ids]

    def chat(self, messages: Union[list[dict], list[list[dict]]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             use_tqdm: bool = True, chat_template: Optional[str] = None,
             add_generation_prompt: bool = True, tools: Optional[list[dict]] = None) -> list[RequestOutput]:
        """Generate replies to conversations; tools (OpenAI's shape) go into the chat template, as in vLLM."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.apply_chat_template(conv, chat_template, add_generation_prompt, tools)
                   for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(self, conversation: list[dict], chat_template: Optional[str] = None,
                            add_generation_prompt: bool = True, tools: Optional[list[dict]] = None) -> dict:
        tok = self.get_tokenizer()
        chat_template = load_chat_template(chat_template)  # a file or the template itself
        if chat_template is None and not getattr(tok, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; pass chat_template=... or use generate()")
        text = tok.apply_chat_template(conversation, chat_template=chat_template, tokenize=False,
                                       add_generation_prompt=add_generation_prompt, tools=tools)
        # The template already holds any BOS token: tokenize without adding specials again.
        return {"prompt": text, "prompt_token_ids": tok(text, add_special_tokens=False).input_ids}
