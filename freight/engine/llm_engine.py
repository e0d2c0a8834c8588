"""LLMEngine: the synchronous frontend (the offline LLM drives it).

One step = the engine core's schedule -> execute -> update, then the output processor
turns the new tokens into text and RequestOutputs. With one engine the core runs in
this thread (no IPC); with data_parallel_size > 1 the cores run in processes of their
own, as the server's do, and a step is whichever core's outputs arrive next.
"""

from __future__ import annotations

import logging
import weakref
from typing import Iterable, Optional, Union

from freight.config import EngineConfig
from freight.core.stats import SchedulerStats
from freight.engine.core_client import InprocCoreClient, make_client
from freight.engine.engine_router import EngineRouter
from freight.engine.output_processor import OutputProcessor
from freight.engine.processor import InputProcessor, PromptError, PromptType, sequence_ids
from freight.model_config import ModelConfig
from freight.model_loader import resolve_model_dir
from freight.outputs import RequestOutput
from freight.pooling_params import PoolingParams
from freight.sampling_params import SamplingParams
from freight.tokenizer import eos_token_ids, load_tokenizer

logger = logging.getLogger(__name__)

EngineStats = SchedulerStats  # the name this class's get_stats() had before the engine core split


class LLMEngine:
    def __init__(self, config: EngineConfig, data_parallel_size: int = 1):
        self.config = config
        self.model_dir = resolve_model_dir(config.model, config.revision)
        self.model_config = ModelConfig.from_dir(self.model_dir)
        self.model_config.check_tensor_parallel(config.tensor_parallel_size)  # before any process starts
        # Tensor parallelism pins rank 0 to its share of the CPUs: that is the core's process, not the caller's.
        multiprocess = data_parallel_size > 1 or config.tensor_parallel_size > 1
        self.client = make_client(config, data_parallel_size, multiprocess=multiprocess, threaded=False)
        self.tokenizer = load_tokenizer(config.tokenizer or str(self.model_dir), config.revision,
                                        config.trust_remote_code)
        self.eos_token_ids = eos_token_ids(self.model_dir, self.tokenizer)
        self.client.wait_ready()
        self.max_model_len = self.client.max_model_len
        self.processor = InputProcessor(config, self.tokenizer, self.model_config.vocab_size, self.eos_token_ids,
                                        self.max_model_len, model_dir=self.model_dir)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._router = EngineRouter(data_parallel_size)
        if not isinstance(self.client, InprocCoreClient):  # stop the core processes with this engine
            weakref.finalize(self, self.client.shutdown)

    @property
    def engine_core(self):
        """The in-process EngineCore (one engine only)."""
        if not isinstance(self.client, InprocCoreClient):
            raise AttributeError("the engine cores run in their own processes (data or tensor parallelism)")
        return self.client.engine_core

    @property
    def device(self) -> str:
        return self.client.engines[0].device

    @property
    def dtype(self) -> str:
        return self.client.engines[0].dtype

    # -- requests ---------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        return self.processor.tokenize_prompt(prompt)

    def validate_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.processor.validate_request(prompt_ids, params)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    arrival_time: Optional[float] = None, priority: int = 0) -> None:
        if self.output_processor.in_use([request_id, *sequence_ids(request_id, params)]):
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self.tokenize_prompt(prompt)
        self.validate_request(ids, params)
        req = self.processor.make_request(request_id, ids, params, arrival_time, priority)
        self.client.add_request(req, self._router.assign(request_id))
        self.output_processor.add_request(request_id, [req.request_id, *req.fork_ids], text, ids, params,
                                          req.arrival_time)

    def add_pooling_request(self, request_id: str, prompt: PromptType, params: Optional[PoolingParams] = None,
                            arrival_time: Optional[float] = None) -> None:
        """Queue an embedding request (prefill only); its one output is an EmbeddingRequestOutput."""
        if self.output_processor.in_use([request_id]):
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self.tokenize_prompt(prompt)
        req = self.processor.make_pooling_request(request_id, ids, self.processor.resolve_pooling_params(params),
                                                  arrival_time)
        self.client.add_request(req, self._router.assign(request_id))
        self.output_processor.add_pooling_request(request_id, text, ids, req.arrival_time)

    def abort_request(self, request_ids: Union[str, Iterable[str]]) -> list[RequestOutput]:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        outputs = []
        for rid in ids:
            engine = self._router.release(rid)
            if engine is None:
                continue
            self.client.finish_requests(self.output_processor.sequence_ids(rid), engine)
            out = self.output_processor.finish(rid)
            if out is not None:
                outputs.append(out)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self._router.num_unfinished > 0

    def get_num_unfinished_requests(self) -> int:
        return self._router.num_unfinished

    # -- the step -----------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        core_out = self.client.get_output(timeout=1.0)
        if core_out is None:
            return []
        self._router.record(core_out)
        for o in core_out.outputs:
            if o.finish_reason == "error":  # that request ends with finish_reason "error"; the others go on
                logger.error("request %s failed in the engine: %s", o.request_id, o.error)
        outputs, stopped = self.output_processor.process_outputs(core_out.outputs)
        if stopped:  # stop strings: the text is final, free the sequences' blocks now
            self.client.finish_requests(stopped, core_out.engine_index, stopped=True)
        for out in outputs:
            if out.finished:
                self._router.release(out.request_id)
        return outputs

    def get_stats(self) -> SchedulerStats:
        if isinstance(self.client, InprocCoreClient):
            return self.engine_core.make_stats()
        return self._router.total_stats()

    def reset_prefix_cache(self) -> bool:
        """Forget the prefix cache of every engine core; False if cached blocks were still in use. Cores in
        processes of their own (data or tensor parallelism) reset before any request sent after this call,
        and this returns True without waiting for them."""
        if isinstance(self.client, InprocCoreClient):
            return self.engine_core.reset_prefix_cache()
        self.client.call_utility("reset_prefix_cache")
        return True

    def map_kv_cache(self, seq_lens: list[int]) -> bool:
        """Map the KV cache pages that sequences of these lengths (prompt + output) will use, now rather than on
        first use (benchmarks call this before their timed run); False where the core runs in a process of its
        own."""
        if not isinstance(self.client, InprocCoreClient):
            return False
        self.engine_core.map_kv_cache(seq_lens)
        return True

    def shutdown(self) -> None:
        self.client.shutdown()


__all__ = ["LLMEngine", "EngineStats", "PromptError", "PromptType"]
