"""OutputProcessor: turns the engine core's new tokens into text and RequestOutputs (frontend side).

It owns everything text-level: incremental detokenization, stop strings (matched on
the text, so a stop split across tokens is found; text that might still become part
of a stop is held back from streams), and gathering the sequences of an n > 1
request into one RequestOutput (best_of keeps the n best by cumulative logprob): the
parent request of its sequences, which the core runs as forks of one prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from freight.engine.detokenizer import IncrementalDetokenizer
from freight.engine.messages import EngineCoreOutput
from freight.outputs import (CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, RequestMetrics,
                             RequestOutput)
from freight.sampling_params import SamplingParams

Logprobs = dict[int, float]  # token id -> logprob: the chosen token first, then the top-k


@dataclass
class _SequenceState:
    index: int
    detokenizer: IncrementalDetokenizer
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    logprobs: list[Logprobs] = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: int | str | None = None
    sent_chars: int = 0
    sent_tokens: int = 0
    num_preemptions: int = 0  # the core's count for this sequence

    def check_stop_strings(self, params: SamplingParams, new_chars: int) -> bool:
        """Cut the text at the first stop string that the new characters complete."""
        if not params.stop or len(self.token_ids) < params.min_tokens:
            return False
        best = None
        for stop in params.stop:
            i = self.text.find(stop, max(0, len(self.text) - new_chars - len(stop) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, stop)
        if best is None:
            return False
        i, stop = best
        self.text = self.text[:i + len(stop)] if params.include_stop_str_in_output else self.text[:i]
        self.finish_reason, self.stop_reason = "stop", stop
        return True


@dataclass
class _RequestState:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: dict[str, _SequenceState]
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    prompt_logprobs: list[Optional[Logprobs]] = field(default_factory=lambda: [None])

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs.values())


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, _RequestState] = {}
        self.seq_owner: dict[str, str] = {}  # sequence id -> request id
        # Pooling (embedding) requests: one sequence, no text; one output, at the end.
        self.pooling: dict[str, tuple[Optional[str], list[int], RequestMetrics]] = {}

    def add_pooling_request(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                            arrival_time: float) -> None:
        self.pooling[request_id] = (prompt, prompt_token_ids, RequestMetrics(arrival_time=arrival_time))
        self.seq_owner[request_id] = request_id

    def _pooling_output(self, request_id: str, embedding: Optional[list[float]], now: float,
                        first_scheduled_time: Optional[float] = None) -> EmbeddingRequestOutput:
        prompt, ids, metrics = self.pooling.pop(request_id)
        self.seq_owner.pop(request_id, None)
        metrics.first_scheduled_time = first_scheduled_time
        metrics.first_token_time = metrics.last_token_time = metrics.finished_time = now
        return EmbeddingRequestOutput(request_id, EmbeddingOutput(list(embedding or [])), ids, True, prompt, metrics)

    def add_request(self, request_id: str, seq_ids: list[str], prompt: Optional[str], prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float) -> None:
        self.states[request_id] = _RequestState(
            request_id=request_id, prompt=prompt, prompt_token_ids=prompt_token_ids, params=params,
            seqs={sid: _SequenceState(
                i, IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens))
                for i, sid in enumerate(seq_ids)},
            metrics=RequestMetrics(arrival_time=arrival_time, n_param=params.n, max_tokens_param=params.max_tokens))
        for sid in seq_ids:
            self.seq_owner[sid] = request_id

    def sequence_ids(self, request_id: str) -> list[str]:
        if request_id in self.pooling:
            return [request_id]
        st = self.states.get(request_id)
        return list(st.seqs) if st else []

    def in_use(self, ids: list[str]) -> bool:
        return any(i in self.states or i in self.seq_owner or i in self.pooling for i in ids)

    def owner(self, seq_id: str) -> Optional[str]:
        return self.seq_owner.get(seq_id)

    def process_outputs(self, core_outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """RequestOutputs for requests that progressed, and the sequences stop strings ended."""
        now = time.monotonic()
        touched: dict[str, _RequestState] = {}
        stopped: list[str] = []
        pooled: list[EmbeddingRequestOutput] = []
        for o in core_outputs:
            rid = self.seq_owner.get(o.request_id)
            if rid is None:
                continue  # aborted here while the core was still running it
            if rid in self.pooling:
                if o.finish_reason is not None:
                    pooled.append(self._pooling_output(rid, o.pooling_output, now, o.first_scheduled_time))
                continue
            st = touched[rid] = self.states[rid]
            if o.new_prompt_logprobs is not None:
                st.prompt_logprobs.extend(o.new_prompt_logprobs.to_dicts())
            seq = st.seqs[o.request_id]
            if o.num_preemptions != seq.num_preemptions:
                seq.num_preemptions = o.num_preemptions
                st.metrics.num_preemptions = sum(s.num_preemptions for s in st.seqs.values())
            if o.new_token_ids and seq.finish_reason is None:
                if self._add_tokens(st, seq, o, now):
                    stopped.append(o.request_id)
            if o.finish_reason is not None and seq.finish_reason is None:
                seq.finish_reason, seq.stop_reason = o.finish_reason, o.stop_reason
        return self._outputs(touched, now) + pooled, stopped

    def _add_tokens(self, st: _RequestState, seq: _SequenceState, o: EngineCoreOutput, now: float) -> bool:
        """Append a step's tokens and their text, one token at a time; True when a stop string ended the
        sequence (the tokens after the one that completed it are dropped: a speculative step can bring
        several)."""
        params = st.params
        rows = o.new_logprobs.to_dicts() if params.logprobs is not None and o.new_logprobs is not None else None
        # As in vLLM, the token that stopped the sequence (eos or stop_token_ids) adds no text
        # unless include_stop_str_in_output; it stays in token_ids.
        stop_token = o.finish_reason == "stop" and not params.include_stop_str_in_output
        last = len(o.new_token_ids) - 1
        stopped = False
        for i, tok in enumerate(o.new_token_ids):
            seq.token_ids.append(tok)
            seq.cumulative_logprob += o.new_sampled_logprobs[i]
            if rows is not None:
                seq.logprobs.append(rows[i])
            delta = "" if stop_token and i == last else seq.detokenizer.step(tok)
            seq.text += delta
            if seq.check_stop_strings(params, len(delta)):
                stopped = True
                break
        if st.metrics.first_token_time is None:
            st.metrics.first_token_time = now
            st.metrics.first_scheduled_time = o.first_scheduled_time
            st.num_cached_tokens = o.num_cached_tokens
        st.metrics.last_token_time = now
        return stopped

    def finish(self, request_id: str, reason: str = "abort") -> Optional[RequestOutput]:
        """End a request here (an abort, or an engine failure): its final output, None if unknown."""
        if request_id in self.pooling:
            self.pooling.pop(request_id)
            self.seq_owner.pop(request_id, None)
            return None
        st = self.states.get(request_id)
        if st is None:
            return None
        for seq in st.seqs.values():
            if seq.finish_reason is None:
                seq.finish_reason = reason
        outs = self._outputs({request_id: st}, time.monotonic())
        return outs[0] if outs else None

    def _outputs(self, touched: dict[str, _RequestState], now: float) -> list[RequestOutput]:
        outputs = []
        for rid, st in touched.items():
            out = self._make_output(st, now)
            if out is not None:
                outputs.append(out)
            if st.finished:
                del self.states[rid]
                for seq_id in st.seqs:
                    self.seq_owner.pop(seq_id, None)
        return outputs

    def _make_output(self, st: _RequestState, now: float) -> Optional[RequestOutput]:
        finished = st.finished
        params = st.params
        seqs = list(st.seqs.values())
        if params.n_seqs > params.n:
            if not finished:
                return None  # best_of: which sequences are returned is known only at the end
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[:params.n]
        if finished:
            st.metrics.finished_time = now
        hold = 0 if params.include_stop_str_in_output else max(params.max_stop_len - 1, 0)
        completions, delta_text, delta_ids = [], [], []
        for i, seq in enumerate(seqs):
            # Text that may turn out to start a stop string is not streamed yet.
            ready = len(seq.text) if seq.finish_reason is not None else max(len(seq.text) - hold, seq.sent_chars)
            delta_text.append(seq.text[seq.sent_chars:ready])
            delta_ids.append(seq.token_ids[seq.sent_tokens:])
            seq.sent_chars, seq.sent_tokens = ready, len(seq.token_ids)
            completions.append(CompletionOutput(
                index=i if params.n_seqs > params.n else seq.index, text=seq.text, token_ids=list(seq.token_ids),
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=list(seq.logprobs) if params.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        prompt_lps = None
        if params.prompt_logprobs is not None and len(st.prompt_logprobs) == len(st.prompt_token_ids):
            prompt_lps = st.prompt_logprobs
        return RequestOutput(
            request_id=st.request_id, prompt=st.prompt, prompt_token_ids=st.prompt_token_ids,
            outputs=completions, finished=finished, num_cached_tokens=st.num_cached_tokens, metrics=st.metrics,
            prompt_logprobs=prompt_lps, delta_text=delta_text, delta_token_ids=delta_ids)
