"""InputProcessor: prompts and SamplingParams -> validated EngineCoreRequests (frontend side).

Tokenization and every check that depends on the engine (context length, vocabulary,
max_num_seqs, max_logprobs) happen here, before anything reaches the engine core, so
a bad request fails its caller and never a step. It also holds the model's sampling
defaults (its generation config, see freight/generation_defaults.py) for the frontends.
"""

from __future__ import annotations

import time
from typing import Optional, Union

from freight.config import EngineConfig
from freight.engine.messages import EngineCoreRequest
from freight.generation_defaults import diff_sampling_params, log_defaults
from freight.pooling import PoolerConfig, load_pooler_config, resolve_pooling_params
from freight.pooling_params import PoolingParams
from freight.sampling_params import SamplingParams, SamplingParamsError
from freight.structured_output import GrammarSpecError, choose_backend, with_defaults

PromptType = Union[str, list[int], dict]


class PromptError(ValueError):
    """A prompt the engine can never run (empty, too long, bad token ids)."""


def sequence_ids(request_id: str, params: SamplingParams) -> list[str]:
    """The ids of a request's sequences in the engine core: itself, or one per sample (n/best_of > 1)."""
    n = params.n_seqs
    return [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer, vocab_size: int, eos_token_ids: frozenset[int],
                 max_model_len: int, model_dir=None):
        self.config = config
        self.model_dir = model_dir
        self._pooler: Optional[PoolerConfig] = None
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.max_model_len = max_model_len
        # The sampling defaults requests get where they leave a field unset (the model's generation config).
        self.default_sampling_params = diff_sampling_params(config.generation_config, model_dir,
                                                            config.override_generation_config)
        try:  # a bad value fails the start-up, not every request
            self.get_default_sampling_params()
        except SamplingParamsError as e:
            raise ValueError(f"the generation config's sampling defaults are invalid: {e}") from None
        log_defaults(self.default_sampling_params, config.generation_config,
                     overridden=bool(config.override_generation_config))

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with this model's defaults (vLLM's LLM.get_default_sampling_params)."""
        return SamplingParams(**self.default_sampling_params)

    def tokenize_prompt(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise PromptError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            return prompt, self.tokenizer(prompt).input_ids
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise PromptError(f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def validate_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise PromptError / SamplingParamsError for input this engine can never run."""
        self._validate_params(params)
        self._validate_prompt(prompt_ids)

    def _validate_params(self, params: SamplingParams) -> None:
        """Limits that depend on this engine (SamplingParams checks the rest by itself)."""
        if params.n_seqs > self.config.max_num_seqs:
            name = "best_of" if params.best_of else "n"
            raise SamplingParamsError(f"{name}={params.n_seqs} is more sequences than max_num_seqs "
                                      f"({self.config.max_num_seqs})", name)
        limit = min(self.config.max_logprobs, self.vocab_size)
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > limit:
                raise SamplingParamsError(f"{name}={k} is more than the maximum of {limit} (max_logprobs)", name)
        vocab = self.vocab_size
        bad = [t for t in (params.logit_bias or {}) if t >= vocab]
        if bad:
            raise SamplingParamsError(f"logit_bias has token ids outside the vocabulary [0, {vocab}): {bad[:5]}",
                                      "logit_bias")
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise SamplingParamsError(f"stop_token_ids outside the vocabulary [0, {vocab}): {bad[:5]}",
                                      "stop_token_ids")
        if params.structured_outputs is not None:
            # Parsing the constraint is cheap (no tokenizer); compiling it happens in the engine core.
            spec = with_defaults(params.structured_outputs, self.config.structured_output_defaults())
            try:
                choose_backend(spec, self.config.structured_outputs_backend)
            except GrammarSpecError as e:
                raise SamplingParamsError(str(e), "structured_outputs") from None

    def _validate_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise PromptError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise PromptError(f"the prompt is {len(ids)} tokens long, but this model's context (max_model_len) is "
                              f"{self.max_model_len} tokens and at least one must be left to generate")
        vocab = self.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise PromptError(f"prompt token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}")

    def make_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                     arrival_time: Optional[float] = None, priority: int = 0) -> EngineCoreRequest:
        """The core's request for a validated prompt; its sequence ids are sequence_ids(request_id, params)."""
        self.validate_priority(priority)
        seq_ids = sequence_ids(request_id, params)
        # The core stops a sequence at max_model_len anyway; saying so here keeps the request honest.
        room = self.max_model_len - len(prompt_ids)
        return EngineCoreRequest(
            request_id=seq_ids[0], prompt_token_ids=prompt_ids, sampling_params=params,
            eos_token_ids=self.eos_token_ids,
            max_tokens=min(params.max_tokens, room) if params.max_tokens is not None else room,
            arrival_time=arrival_time if arrival_time is not None else time.monotonic(), fork_ids=seq_ids[1:],
            priority=priority)

    def validate_priority(self, priority: int) -> None:
        # As vLLM: a priority under fcfs would be silently ignored, so it is refused instead.
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise SamplingParamsError(f"priority must be an integer, got {priority!r}", "priority")
        if priority != 0 and self.config.scheduling_policy != "priority":
            raise SamplingParamsError(f"Got priority {priority} but Priority scheduling is not enabled.",
                                      "priority")

    @property
    def pooler_config(self) -> PoolerConfig:
        """How this model pools embeddings (read from its directory on first use)."""
        if self._pooler is None:
            self._pooler = load_pooler_config(self.model_dir) if self.model_dir is not None else PoolerConfig()
        return self._pooler

    def resolve_pooling_params(self, params: Optional[PoolingParams]) -> PoolingParams:
        """params with the model's pooling filled in; PoolingParamsError (a ValueError) for bad ones."""
        try:
            return resolve_pooling_params(params, self.pooler_config)
        except ValueError as e:
            raise SamplingParamsError(str(e), "dimensions") from None

    def make_pooling_request(self, request_id: str, prompt_ids: list[int], params: PoolingParams,
                             arrival_time: Optional[float] = None) -> EngineCoreRequest:
        """The core's request for an embedding of a validated prompt (params resolved): prefill only."""
        self._validate_prompt(prompt_ids)
        return EngineCoreRequest(
            request_id=request_id, prompt_token_ids=prompt_ids, sampling_params=SamplingParams(max_tokens=1),
            eos_token_ids=self.eos_token_ids, max_tokens=0,
            arrival_time=arrival_time if arrival_time is not None else time.monotonic(), pooling_params=params)
