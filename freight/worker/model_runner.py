"""ModelRunner: owns the model weights and the KV cache tensors, runs one step."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch

from freight.core.scheduler import SchedulerOutput
from freight.layers.attention import kv_cache_shape, needs_zeroed_cache
from freight.model_config import ModelConfig
from freight.worker.input_batch import ModelInput, build_model_input
from freight.worker.kv_prefault import prefault_in_background
from freight.worker.sampler import Sampler
from freight.worker.sampling_tensors import SamplingTensors

logger = logging.getLogger(__name__)

Logprobs = dict[int, float]  # token id -> logprob: the chosen token first, then the top-k


@dataclass
class SampledToken:
    token_id: int
    logprob: float
    top_logprobs: Optional[Logprobs] = None  # when the request asked for logprobs


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, SampledToken] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[Logprobs]] = field(default_factory=dict)  # this step's prompt positions


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


def _logprob_dicts(chosen: list[int], chosen_lp: list[float], top_ids, top_lps, ks: list[int]) -> list[Logprobs]:
    out = []
    for i, (tok, lp, k) in enumerate(zip(chosen, chosen_lp, ks)):
        d = {tok: lp}
        if k > 0:
            d.update(zip(top_ids[i][:k], top_lps[i][:k]))
        out.append(d)
    return out


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                 block_size: int, num_blocks: int, seed: int):
        self.model = model
        self.cfg = cfg
        self.device = device
        self.block_size = block_size
        shape = kv_cache_shape(cfg.num_kv_heads, num_blocks, block_size, cfg.head_dim)
        # Allocated empty (start-up stays fast, pages are touched only when used). The gathered
        # decode path (CUDA, no C compiler) reads whole blocks and masks the unused slots, but a
        # masked NaN from uninitialised memory would still poison its sum: there, blocks are
        # zeroed a range at a time on first use. The native kernels never read those slots.
        self.kv_caches = [(torch.empty(shape, dtype=dtype, device=device),
                           torch.empty(shape, dtype=dtype, device=device)) for _ in range(cfg.num_layers)]
        self._zeroed_blocks = 0  # blocks [0, this) have been zeroed
        self._zero_on_first_use = needs_zeroed_cache(dtype, device)
        if not self._zero_on_first_use:
            prefault_in_background([t for pair in self.kv_caches for t in pair])
        self.sampler = Sampler(seed, device)
        self.generators: dict[str, torch.Generator] = {}

    def _generator(self, req) -> Optional[torch.Generator]:
        seed = req.sampling_params.seed
        if seed is None:
            return None
        g = self.generators.get(req.request_id)
        if g is None:
            g = self.generators[req.request_id] = torch.Generator(device=self.device)
            g.manual_seed(seed)
        return g

    def _zero_new_blocks(self, max_block_id: int) -> None:
        if max_block_id < self._zeroed_blocks:
            return
        # Zero ahead in chunks so a growing cache is not zeroed one block per step.
        end = min(max(max_block_id + 1, 2 * self._zeroed_blocks, 256), self.kv_caches[0][0].shape[1])
        for k, v in self.kv_caches:
            k[:, self._zeroed_blocks:end].zero_()
            v[:, self._zeroed_blocks:end].zero_()
        self._zeroed_blocks = end

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        src = torch.tensor([c[0] for c in copies], device=self.device)
        dst = torch.tensor([c[1] for c in copies], device=self.device)
        for k, v in self.kv_caches:
            k[:, dst] = k[:, src]
            v[:, dst] = v[:, src]

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for rid in out.finished_request_ids:
            self.generators.pop(rid, None)
        result = ModelRunnerOutput()
        if out.is_empty:
            return result
        if self._zero_on_first_use:
            self._zero_new_blocks(max(max(s.block_ids) for s in out.scheduled))
        if out.block_copies:
            self._copy_blocks(out.block_copies)
        inp = build_model_input(out, self.block_size, self.device)
        logits = self.model(inp.input_ids, inp.positions, self.kv_caches, inp.attn, inp.logits_indices)
        n = len(inp.sampling)
        if n:
            self._sample(logits[:n], inp, result)
        if inp.prompt_rows:
            self._prompt_logprobs(logits[n:], inp, result)
        return result

    def _sample(self, logits: torch.Tensor, inp: ModelInput, result: ModelRunnerOutput) -> None:
        reqs = inp.sampling
        st = SamplingTensors.from_requests(reqs, [self._generator(r) for r in reqs], self.cfg.vocab_size,
                                           self.device)
        so = self.sampler(logits, st)
        token_ids = so.token_ids.tolist()
        logprobs = so.logprobs.tolist()
        tops = None
        if so.top_token_ids is not None:
            ks = [r.sampling_params.logprobs or 0 for r in reqs]
            tops = _logprob_dicts(token_ids, logprobs, so.top_token_ids.tolist(), so.top_logprobs.tolist(), ks)
        for i, req in enumerate(reqs):
            tok = SampledToken(token_ids[i], logprobs[i])
            if req.sampling_params.logprobs is not None:
                tok.top_logprobs = tops[i] if tops is not None else {token_ids[i]: logprobs[i]}
            result.sampled[req.request_id] = tok

    def _prompt_logprobs(self, logits: torch.Tensor, inp: ModelInput, result: ModelRunnerOutput) -> None:
        lps = torch.log_softmax(logits.float(), dim=-1)
        row = 0
        for pr in inp.prompt_rows:
            ids = pr.request.prompt_token_ids
            part = lps[row:row + pr.count]
            row += pr.count
            targets = torch.tensor(ids[pr.first_position + 1:pr.first_position + 1 + pr.count], device=self.device)
            chosen = part.gather(1, targets[:, None]).squeeze(1).tolist()
            k = pr.request.sampling_params.prompt_logprobs
            top_lp, top_ids = part.topk(k, dim=-1) if k > 0 else (None, None)
            result.prompt_logprobs[pr.request.request_id] = _logprob_dicts(
                targets.tolist(), chosen, top_ids.tolist() if k > 0 else None,
                top_lp.tolist() if k > 0 else None, [k] * pr.count)
