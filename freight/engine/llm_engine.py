"""LLMEngine: the synchronous frontend over an in-process EngineCore.

One step = the core's schedule -> execute -> update, then the output processor turns
the new tokens into text and RequestOutputs. The offline LLM class drives this; the
server uses AsyncLLM, which talks to the same EngineCore in its own process.
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional, Union

from freight.config import EngineConfig
from freight.core.stats import SchedulerStats
from freight.engine.core import EngineCore
from freight.engine.output_processor import OutputProcessor
from freight.engine.processor import InputProcessor, PromptError, PromptType, sequence_ids
from freight.model_loader import resolve_model_dir
from freight.outputs import RequestOutput
from freight.sampling_params import SamplingParams
from freight.tokenizer import eos_token_ids, load_tokenizer

logger = logging.getLogger(__name__)

EngineStats = SchedulerStats  # the name this class's get_stats() had before the engine core split


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_dir = resolve_model_dir(config.model, config.revision)
        self.tokenizer = load_tokenizer(config.tokenizer or str(self.model_dir), config.revision,
                                        config.trust_remote_code)
        self.eos_token_ids = eos_token_ids(self.model_dir, self.tokenizer)
        self.engine_core = EngineCore(config)
        self.model_config = self.engine_core.model_config
        self.max_model_len = self.engine_core.max_model_len
        self.device, self.dtype = self.engine_core.executor.device, self.engine_core.executor.dtype
        self.processor = InputProcessor(config, self.tokenizer, self.model_config.vocab_size, self.eos_token_ids,
                                        self.max_model_len)
        self.output_processor = OutputProcessor(self.tokenizer)

    # -- requests ---------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        return self.processor.tokenize_prompt(prompt)

    def validate_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.processor.validate_request(prompt_ids, params)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    arrival_time: Optional[float] = None) -> None:
        if self.output_processor.in_use([request_id, *sequence_ids(request_id, params)]):
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self.tokenize_prompt(prompt)
        self.validate_request(ids, params)
        req = self.processor.make_request(request_id, ids, params, arrival_time)
        self.engine_core.add_request(req)
        self.output_processor.add_request(request_id, [req.request_id, *req.fork_ids], text, ids, params,
                                          req.arrival_time)

    def abort_request(self, request_ids: Union[str, Iterable[str]]) -> list[RequestOutput]:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self.engine_core.finish_requests([s for rid in ids for s in self.output_processor.sequence_ids(rid)])
        outputs = [self.output_processor.finish(rid) for rid in ids]
        return [o for o in outputs if o is not None]

    def has_unfinished_requests(self) -> bool:
        return self.engine_core.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.engine_core.scheduler.num_unfinished

    # -- the step -----------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        core_out = self.engine_core.step()
        outputs, stopped = self.output_processor.process_outputs(core_out.outputs)
        if stopped:  # stop strings: the text is final, free the sequences' blocks now
            self.engine_core.finish_requests(stopped, stopped=True)
        return outputs

    def get_stats(self) -> SchedulerStats:
        return self.engine_core.make_stats()

    def reset_prefix_cache(self) -> bool:
        return self.engine_core.reset_prefix_cache()


__all__ = ["LLMEngine", "EngineStats", "PromptError", "PromptType"]
