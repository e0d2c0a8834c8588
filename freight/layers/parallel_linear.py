"""Tensor-parallel layers in the Megatron shape, and how each takes its slice of a checkpoint.

- ColumnParallelLinear splits output features: each rank computes a slice of the heads
  (fused Q/K/V) or of the intermediate channels (fused gate/up); no communication.
- RowParallelLinear splits input features (o_proj, down_proj): each rank's partial
  product is summed with one all-reduce.
- VocabParallelEmbedding and ParallelLMHead split the vocabulary: rows outside a rank's
  range embed to zero before the all-reduce; the head's logits are all-gathered.

Each layer has a `weight_loader(name, param, checkpoint_tensor, shard)` that reads only
its rank's slice of a lazily opened checkpoint tensor (nano-vllm's way, on the module
rather than the parameter because building on the meta device replaces parameters), so
the loader is one loop with no special cases, and a rank never reads others' slices.
With one rank every layer is the plain layer it replaces.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from freight.distributed.parallel_state import get_tp_group, split_units
from freight.layers.linear import Linear


class CheckpointTensor(Protocol):
    shape: tuple[int, ...]

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor: ...

    def full(self) -> torch.Tensor: ...


def default_weight_loader(name: str, param: nn.Parameter, loaded: CheckpointTensor,
                          shard: Optional[int] = None) -> None:
    _copy(param.data, loaded.full(), loaded)


def _copy(dst: torch.Tensor, src: torch.Tensor, loaded: CheckpointTensor) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"has shape {tuple(loaded.shape)}, which does not fit a parameter of this model's "
                         f"shape {tuple(dst.shape)} (this rank's slice)")
    dst.copy_(src)


class ColumnParallelLinear(Linear):
    """Output features split over ranks. `shards` lists the checkpoint tensors fused into this one
    as (units, unit_size), e.g. Q/K/V as heads of head_dim, gate/up as channels of 1; each shard
    is split on its own, so a rank holds its heads of Q, of K and of V side by side."""

    quantizable = True  # quantize_linear_weights quantizes each rank's slice after loading

    def __init__(self, in_features: int, shards: list[tuple[int, int]], bias: bool):
        tp = get_tp_group()
        self.splits = [split_units(units, tp.world_size, tp.rank) for units, _ in shards]
        self.unit_sizes = [size for _, size in shards]
        self.local_sizes = [count * size for (_, count), size in zip(self.splits, self.unit_sizes)]
        self.num_shards = len(shards)  # checkpoint tensors per parameter
        super().__init__(in_features, sum(self.local_sizes), bias=bias)

    def weight_loader(self, name: str, param: nn.Parameter, loaded: CheckpointTensor,
                      shard: Optional[int] = None) -> None:
        shard = shard or 0
        (first, count), size = self.splits[shard], self.unit_sizes[shard]
        offset = sum(self.local_sizes[:shard])
        dst = param.data.narrow(0, offset, self.local_sizes[shard])
        _copy(dst, loaded.narrow(0, first * size, count * size), loaded)


class RowParallelLinear(Linear):
    """Input features split over ranks (in `units` of `unit_size`); the partial outputs are summed."""

    quantizable = True

    def __init__(self, units: int, unit_size: int, out_features: int, bias: bool):
        self.tp = get_tp_group()
        self.first, count = split_units(units, self.tp.world_size, self.tp.rank)
        self.unit_size = unit_size
        super().__init__(count * unit_size, out_features, bias=bias)

    def weight_loader(self, name: str, param: nn.Parameter, loaded: CheckpointTensor,
                      shard: Optional[int] = None) -> None:
        if name == "bias":  # the full output: every rank holds it (and adds it after the sum)
            return default_weight_loader(name, param, loaded)
        _copy(param.data, loaded.narrow(1, self.first * self.unit_size, self.in_features), loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return super().forward(x)
        bias, self.bias = self.bias, None  # added once, after the sum
        try:
            y = self.tp.all_reduce(super().forward(x))
        finally:
            self.bias = bias
        return y if bias is None else y.add_(bias)


def _vocab_rows(vocab_size: int) -> tuple[int, int]:
    """This rank's (first row, rows) of a vocabulary split into equal, zero-padded slices."""
    tp = get_tp_group()
    rows = -(-vocab_size // tp.world_size)
    return tp.rank * rows, rows


def _load_vocab_rows(param: nn.Parameter, loaded: CheckpointTensor, vocab_size: int, first: int) -> None:
    if loaded.shape[0] != vocab_size:
        raise ValueError(f"has {loaded.shape[0]} rows; config.json says vocab_size {vocab_size}")
    count = max(min(param.shape[0], vocab_size - first), 0)
    param.data[count:].zero_()
    _copy(param.data[:count], loaded.narrow(0, first, count), loaded)


class VocabParallelEmbedding(nn.Module):
    """Each rank holds ceil(vocab / ranks) rows (the last rank's tail is zero padding)."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.tp = get_tp_group()
        self.vocab_size = vocab_size
        self.first, self.rows = _vocab_rows(vocab_size)
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size))

    def weight_loader(self, name: str, param: nn.Parameter, loaded: CheckpointTensor,
                      shard: Optional[int] = None) -> None:
        _load_vocab_rows(param, loaded, self.vocab_size, self.first)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.first
        outside = (local < 0) | (local >= self.rows)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(x)


class ParallelLMHead(Linear):
    """The vocabulary split like VocabParallelEmbedding's (so a tied head shares its slice); every
    rank gets the full logits, gathered."""

    def __init__(self, hidden_size: int, vocab_size: int):
        self.tp = get_tp_group()
        self.vocab_size = vocab_size
        self.first, rows = _vocab_rows(vocab_size)
        super().__init__(hidden_size, rows, bias=False)

    def weight_loader(self, name: str, param: nn.Parameter, loaded: CheckpointTensor,
                      shard: Optional[int] = None) -> None:
        _load_vocab_rows(param, loaded, self.vocab_size, self.first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        if self.tp.world_size == 1:
            return logits
        return self.tp.all_gather(logits, dim=-1)[:, :self.vocab_size]
