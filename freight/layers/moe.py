"""The mixture-of-experts block: a replicated router and stacked expert weights, computed grouped.

Each expert is a SiLU gate/up MLP. Its weights are stacked over the experts: gate and up
side by side in `experts.gate_up.weight` [E, 2 * I_local, H] and down in
`experts.down.weight` [E, H, I_local]. The tokens routed to an expert are gathered and run
through that expert's matmuls once (sorted by expert, index_select / index_add_), never one
token at a time.

Routing is Hugging Face's: router logits -> softmax in float32 -> top-k -> renormalised to
sum 1 when `renormalize` (Mixtral always; Qwen MoE when norm_topk_prob).

Tensor parallelism as vLLM's FusedMoE: every expert's intermediate channels are split over
the ranks (gate/up column-parallel, down row-parallel); the router is replicated, and the
block's output (with a shared expert's partial sum, see models/qwen_moe.py) is summed with a
single all-reduce by the caller via `reduce`.

Checkpoint formats: Hub checkpoints (and transformers 5's save_pretrained) store one tensor
per expert and projection (`experts.N.w1/w3/w2` for Mixtral, `experts.N.gate_proj/up_proj/
down_proj` for Qwen); transformers 5 in memory stacks them as `experts.gate_up_proj`
[E, 2I, H] and `experts.down_proj` [E, H, I]. Both load: per-expert tensors arrive as shards
(see `expert_stacked_params`), stacked ones whole.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from freight.distributed.parallel_state import get_tp_group, split_units
from freight.kernels import silu_and_mul
from freight.layers.linear import Linear
from freight.layers.parallel_linear import CheckpointTensor, _copy


def expert_stacked_params(num_experts: int, gate: str, up: str, down: str) -> dict[str, tuple[str, int]]:
    """stacked_params entries mapping per-expert checkpoint names onto the stacked weights:
    'experts.N.<gate>' -> ('experts.gate_up', 2N), '<up>' -> 2N + 1, '<down>' -> ('experts.down', N).
    Put them before generic entries such as 'gate_proj' (the loader takes the first match)."""
    out: dict[str, tuple[str, int]] = {}
    for e in range(num_experts):
        out[f"experts.{e}.{gate}"] = ("experts.gate_up", 2 * e)
        out[f"experts.{e}.{up}"] = ("experts.gate_up", 2 * e + 1)
        out[f"experts.{e}.{down}"] = ("experts.down", e)
    return out


class _StackedExpertWeight(nn.Module):
    """One stacked expert weight. `num_shards` counts the per-expert checkpoint tensors it
    expects; after a whole stacked tensor was loaded it expects just that one."""

    def __init__(self, num_experts: int, shape: tuple[int, int], shards_per_expert: int):
        super().__init__()
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, *shape))
        self.num_shards = num_experts * shards_per_expert


class ExpertGateUp(_StackedExpertWeight):
    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        tp = get_tp_group()
        self.first, self.local = split_units(intermediate, tp.world_size, tp.rank)
        self.intermediate = intermediate
        super().__init__(num_experts, (2 * self.local, hidden), 2)

    def weight_loader(self, name: str, param: nn.Parameter, loaded: CheckpointTensor,
                      shard: Optional[int] = None) -> None:
        first, local, full = self.first, self.local, self.intermediate
        if shard is None:  # stacked [E, 2I, H]: gate rows then up rows
            if len(loaded.shape) != 3 or loaded.shape[0] != self.num_experts or loaded.shape[1] != 2 * full:
                raise ValueError(f"has shape {tuple(loaded.shape)}; expected ({self.num_experts}, {2 * full}, H)")
            _copy(param.data[:, :local], loaded.narrow(1, first, local), loaded)
            _copy(param.data[:, local:], loaded.narrow(1, full + first, local), loaded)
            self.num_shards = 1
            return
        expert, part = divmod(shard, 2)
        _copy(param.data[expert, part * local:(part + 1) * local], loaded.narrow(0, first, local), loaded)


class ExpertDown(_StackedExpertWeight):
    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        tp = get_tp_group()
        self.first, self.local = split_units(intermediate, tp.world_size, tp.rank)
        super().__init__(num_experts, (hidden, self.local), 1)

    def weight_loader(self, name: str, param: nn.Parameter, loaded: CheckpointTensor,
                      shard: Optional[int] = None) -> None:
        if shard is None:  # stacked [E, H, I]
            if len(loaded.shape) != 3 or loaded.shape[0] != self.num_experts:
                raise ValueError(f"has shape {tuple(loaded.shape)}; expected ({self.num_experts}, H, I)")
            _copy(param.data, loaded.narrow(2, self.first, self.local), loaded)
            self.num_shards = 1
            return
        _copy(param.data[shard], loaded.narrow(1, self.first, self.local), loaded)


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up = ExpertGateUp(num_experts, hidden, intermediate)
        self.down = ExpertDown(num_experts, hidden, intermediate)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """sum_k weight[t, k] * expert_{ids[t, k]}(x[t]) for every token t (this rank's partial
        sum under tensor parallelism). Tokens are grouped by expert: one matmul pair per expert."""
        t, k = topk_ids.shape
        flat = topk_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs sorted by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token_of = order // k
        xs = x.index_select(0, token_of)
        ws = topk_weights.reshape(-1).index_select(0, order)
        ys = torch.empty_like(xs)
        w13, w2, local = self.gate_up.weight, self.down.weight, self.gate_up.local
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            end = start + c
            gate_up = F.linear(xs[start:end], w13[e])
            h = silu_and_mul(gate_up)
            if h is None:
                gate, up = gate_up.split(local, dim=-1)
                h = F.silu(gate) * up
            ys[start:end] = (F.linear(h, w2[e]) * ws[start:end, None]).to(ys.dtype)
            start = end
        # Rows are in expert order, so each token's contributions are summed in ascending
        # expert order, as transformers' per-expert loop does.
        return torch.zeros_like(x).index_add_(0, token_of, ys)


class FusedMoE(nn.Module):
    """Router (`gate`, replicated) + stacked experts. forward returns this rank's partial sum
    unless reduce=True (then the all-reduced output)."""

    def __init__(self, num_experts: int, top_k: int, hidden: int, intermediate: int, renormalize: bool,
                 weights_in_float32: bool = False):
        super().__init__()
        self.tp = get_tp_group()
        self.top_k = top_k
        self.renormalize = renormalize
        # Mixtral multiplies expert outputs by float32 weights; Qwen MoE casts them to the model dtype
        self.weights_in_float32 = weights_in_float32
        self.gate = Linear(hidden, num_experts, bias=False)
        self.experts = Experts(num_experts, hidden, intermediate)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.weights_in_float32:
            weights = weights.to(logits.dtype)
        return weights, ids

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        weights, ids = self.route(x)
        out = self.experts(x, weights, ids)
        return self.tp.all_reduce(out) if reduce and self.tp.world_size > 1 else out


def naive_moe(x: torch.Tensor, moe: FusedMoE) -> torch.Tensor:
    """Reference: one token and one expert at a time (tests only; one rank)."""
    weights, ids = moe.route(x)
    w13, w2, local = moe.experts.gate_up.weight, moe.experts.down.weight, moe.experts.gate_up.local
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate, up = (w13[e] @ x[t]).split(local)
            out[t] += ((w2[e] @ (F.silu(gate) * up)) * weights[t, j]).to(x.dtype)
    return out
