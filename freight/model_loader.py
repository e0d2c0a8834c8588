"""Loads a Hugging Face model directory (or hub id) into one of freight's models.

Weights are read tensor by tensor from memory-mapped safetensors files straight
into the model's (possibly fused) parameters, so the checkpoint is never held in
memory twice. Each parameter's weight_loader reads only the slice its tensor-parallel
rank holds (layers/parallel_linear.py).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from freight.kernels.cpu_features import has_native_bf16
from freight.layers.linear import pack_linear_weights, quantize_linear_weights
from freight.layers.moe import FusedMoE
from freight.layers.parallel_linear import default_weight_loader
from freight.layers.rotary import RotaryEmbedding
from freight.model_config import ModelConfig
from freight.models.registry import resolve_model_class

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16}


def resolve_model_dir(model: str, revision: Optional[str] = None) -> Path:
    """A local directory as is; anything else is taken as a Hugging Face hub id."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ValueError(f"model path {model!r} is a file; give the model's directory")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise FileNotFoundError(f"model directory {model!r} does not exist")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(model, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # offline, unknown repo, gated...: one clear message
        raise FileNotFoundError(f"model {model!r} is neither a local directory nor a reachable Hugging Face "
                                f"hub id ({type(e).__name__}: {e})") from e


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available")
    return dev


def resolve_dtype(dtype: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        chosen = _DTYPES.get(str(cfg.torch_dtype), torch.float32)
        if device.type == "cpu" and chosen == torch.float16:
            chosen = torch.bfloat16  # CPU float16 matmuls are slow; bf16 has the same memory cost
        if device.type == "cpu" and chosen == torch.bfloat16 and not has_native_bf16():
            # emulated bf16 matmuls run several times slower than float32 (FREIGHT_KERNEL_ISA lowers the probe)
            logger.info("CPU has no native bf16 (AVX512_BF16/AMX): running in float32")
            chosen = torch.float32
        if not _runs(chosen, device):
            chosen = torch.float32
        return chosen
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    chosen = _DTYPES[dtype]
    if not _runs(chosen, device):
        raise ValueError(f"dtype {dtype} is not supported on device {device}; use float32")
    return chosen


def _runs(dtype: torch.dtype, device: torch.device) -> bool:
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.cuda.is_bf16_supported()
    try:
        a = torch.ones(4, 4, dtype=dtype, device=device)
        torch.nn.functional.silu(a @ a)
        return True
    except (RuntimeError, TypeError):
        return False


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"safetensors shards listed in {index.name} are missing: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for ext in ("*.bin", "*.pt", "*.pth") for p in model_dir.glob(ext))
        hint = (f"; this directory has PyTorch pickle weights ({', '.join(pickles[:3])}"
                f"{', ...' if len(pickles) > 3 else ''}); convert them to safetensors") if pickles else ""
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir} (freight loads safetensors only){hint}")
    return files


class _LazyTensor:
    """A checkpoint tensor not read yet: a weight loader reads the part it needs."""

    def __init__(self, st, name: str):
        self._st, self._name = st, name
        self._slice = st.get_slice(name)
        self.shape = tuple(self._slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = (slice(None),) * dim + (slice(start, start + length),)
        return self._slice[index]

    def full(self) -> torch.Tensor:
        return self._st.get_tensor(self._name)


def iterate_weights(model_dir: Path) -> Iterator[tuple[str, _LazyTensor]]:
    files = _safetensors_files(model_dir)
    for f in tqdm(files, desc="Loading safetensors shards", disable=len(files) < 2):
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():
                yield name, _LazyTensor(st, name)


def build_empty(cls: type, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """cls(cfg) built on the meta device in dtype (no init work), then given uninitialised storage on
    device, for the weights to fill; tied weights are tied again (to_empty gives each name its own)."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(default_dtype)
    model.to_empty(device=device)
    model.tie_weights()
    return model


def load_model(model_dir: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
               model_impl: str = "auto", quantization: Optional[str] = None) -> nn.Module:
    """model_impl: "freight" (freight's own class), "transformers" (the Transformers backend) or "auto"
    (the own class when freight has one for the architecture, else the Transformers backend).
    quantization: "int8" quantizes the linear layers' weights once loaded (layers/quantization)."""
    from freight.models.transformers_backend import load_transformers_model, resolve_model_impl
    impl = resolve_model_impl(cfg.architecture, model_impl)
    logger.info("model implementation for %s: %s", cfg.architecture,
                "freight (native)" if impl == "freight" else "Transformers backend")
    if impl == "transformers":
        if quantization is not None:
            raise ValueError(f"quantization={quantization!r} needs freight's own model class (model_impl='freight'); "
                             f"the Transformers backend runs {cfg.architecture} unquantized")
        return load_transformers_model(model_dir, cfg, dtype, device)
    model = build_empty(resolve_model_class(cfg.architecture), cfg, dtype, device)
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            m.build_cache(device)
    _load_weights(model, model_dir)
    if quantization is not None:
        count = quantize_linear_weights(model, quantization)
        logger.info("quantized %d linear layers to %s", count, quantization)
        if any(isinstance(m, FusedMoE) for m in model.modules()):
            logger.info("MoE expert weights stay in %s (quantization covers the dense linear layers)", dtype)
    if device.type == "cpu" and os.environ.get("FREIGHT_DISABLE_WEIGHT_PACKING") != "1":
        pack_linear_weights(model)
    return model.eval()


def _load_weights(model: nn.Module, model_dir: Path) -> None:
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for ckpt_name, tensor in iterate_weights(model_dir):
        name = model.checkpoint_name(ckpt_name)
        if "rotary_emb" in name:
            continue  # old checkpoints store inv_freq; freight recomputes it
        if name == "lm_head.weight" and model.cfg.tie_word_embeddings:
            continue
        shard = None
        fused = next((k for k in model.stacked_params if f".{k}." in name), None)
        if fused is not None:
            target, shard = model.stacked_params[fused]
            name = name.replace(f".{fused}.", f".{target}.")
        if name not in params:
            raise ValueError(f"checkpoint tensor {ckpt_name!r} has no place in {type(model).__name__}")
        module_name, _, attr = name.rpartition(".")
        loader = getattr(model.get_submodule(module_name), "weight_loader", default_weight_loader)
        try:
            loader(attr, params[name], tensor, shard)
        except ValueError as e:
            raise ValueError(f"checkpoint tensor {ckpt_name!r} {e}") from None
        loaded.add(name if shard is None else f"{name}#{shard}")
    expected = set()
    for name, p in params.items():
        n = getattr(model.get_submodule(name.rpartition(".")[0]), "num_shards", 1)
        expected.update(f"{name}#{i}" for i in range(n)) if n > 1 else expected.add(name)
    if model.cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(_hf_name(model, n) for n in expected - loaded)
    if missing:
        raise ValueError(f"checkpoint in {model_dir} lacks weights: {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def _hf_name(model: nn.Module, name: str) -> str:
    """The checkpoint name of a parameter (or fused shard 'name#i'), for error messages."""
    name, _, shard = name.partition("#")
    if shard:
        name = next(name.replace(f".{target}.", f".{part}.") for part, (target, i) in model.stacked_params.items()
                    if i == int(shard) and f".{target}." in name)
    # Hugging Face *ForCausalLM checkpoints nest everything but the output head under 'model.'
    return name if name.startswith("lm_head.") else f"model.{name}"


def configure_threads(num_threads: Optional[int]) -> None:
    """Use every core the process may run on unless told otherwise."""
    if num_threads is None:
        try:
            num_threads = len(os.sched_getaffinity(0))
        except AttributeError:
            num_threads = os.cpu_count() or 1
    torch.set_num_threads(num_threads)
