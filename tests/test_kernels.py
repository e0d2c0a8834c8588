"""Native CPU kernels against the PyTorch code they replace.

Decode attention: the native kernel and the gathered PyTorch path (used on CUDA and without a
compiler) against plain SDPA on unpaged K/V; then the fused elementwise kernels and the small-row
matmul against the ops they stand for. Every native test runs once per ISA build this CPU can
execute (generic, avx2, avx512bf16: see freight/kernels/cpu_features.py); the end of the file
checks the feature probe, dtype "auto" and FREIGHT_DISABLE_C_KERNELS."""

import pytest
import torch
import torch.nn.functional as F

from freight.kernels import paged_decode_attention, paged_decode_available
from freight.kernels.build import reset_kernel_caches
from freight.kernels.cpu_features import supported_isas
from freight.layers.attention import AttentionMetadata, PagedAttention


def _case(dtype, heads, kv_heads, dim, block_size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = 128
    lens = torch.tensor([1, 5, 16, 17, 40, 95])
    width = int((lens.max() + block_size - 1) // block_size)
    # Distinct, scattered blocks per sequence, as a real block table has.
    tables = torch.randperm(num_blocks, generator=g)[:len(lens) * width].view(len(lens), width)
    k_cache = torch.randn(kv_heads, num_blocks, block_size, dim, generator=g).to(dtype)
    v_cache = torch.randn(kv_heads, num_blocks, block_size, dim, generator=g).to(dtype)
    q = torch.randn(len(lens), heads, dim, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, lens


def _reference(q, k_cache, v_cache, tables, lens, window):
    heads, kv_heads = q.shape[1], k_cache.shape[0]
    out = []
    for i, n in enumerate(lens.tolist()):
        k = k_cache[:, tables[i]].flatten(1, 2)[:, :n].float().repeat_interleave(heads // kv_heads, 0)
        v = v_cache[:, tables[i]].flatten(1, 2)[:, :n].float().repeat_interleave(heads // kv_heads, 0)
        first = max(0, n - window) if window else 0
        o = F.scaled_dot_product_attention(q[i].float()[:, None], k[:, first:], v[:, first:],
                                           scale=q.shape[-1] ** -0.5)
        out.append(o[:, 0])
    return torch.stack(out)


SHAPES = [(9, 3, 64), (4, 4, 128), (8, 2, 32), (6, 1, 80)]  # GQA, MHA, MQA; head dims with and without a fast path


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads,dim", SHAPES)
@pytest.mark.parametrize("window", [None, 7])
def test_gathered_torch_path_matches_reference(dtype, tol, heads, kv_heads, dim, window):
    q, kc, vc, tables, lens = _case(dtype, heads, kv_heads, dim)
    attn = PagedAttention(heads, kv_heads, dim, dim ** -0.5, sliding_window=window)
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), num_decodes=len(lens),
                             decode_block_tables=tables, decode_seq_lens=lens, prefills=[])
    got = attn._decode_gathered(q, kc, vc, meta, kc.shape[2])
    torch.testing.assert_close(got.float(), _reference(q, kc, vc, tables, lens, window), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads,dim", SHAPES)
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("block_size", [16, 32, 8])  # runs of 16 keys span blocks differently; 8 has no fast path
def test_native_kernel_matches_reference(isa, dtype, tol, heads, kv_heads, dim, window, block_size):
    q, kc, vc, tables, lens = _case(dtype, heads, kv_heads, dim, block_size)
    if not paged_decode_available(q):
        pytest.skip("no C compiler: the native decode kernel is not built here")
    got = paged_decode_attention(q, kc, vc, tables, lens, dim ** -0.5, window)
    torch.testing.assert_close(got.float(), _reference(q, kc, vc, tables, lens, window), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 7])
def test_native_kernel_ignores_slots_it_cannot_see(isa, dtype, window):
    """Slots past a sequence's end (and before its window) may hold anything, even NaN:
    a freed block keeps its last owner's values. None of it may reach the output."""
    q, kc, vc, tables, lens = _case(dtype, 9, 3, 64)
    if not paged_decode_available(q):
        pytest.skip("no C compiler: the native decode kernel is not built here")
    want = paged_decode_attention(q, kc, vc, tables, lens, 0.125, window)
    block_size = kc.shape[2]
    for i, n in enumerate(lens.tolist()):
        first = max(0, n - window) if window else 0
        for pos in [*range(first), *range(n, tables.shape[1] * block_size)]:
            blk, off = tables[i, pos // block_size], pos % block_size
            kc[:, blk, off] = float("nan")
            vc[:, blk, off] = float("nan")
    got = paged_decode_attention(q, kc, vc, tables, lens, 0.125, window)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_native_kernel_reads_strided_query_rows(isa):
    """q arrives as a view of the fused QKV projection: rows are strided."""
    q, kc, vc, tables, lens = _case(torch.float32, 9, 3, 64)
    if not paged_decode_available(q):
        pytest.skip("no C compiler: the native decode kernel is not built here")
    wide = torch.cat([q.flatten(1), torch.randn(q.shape[0], 100)], dim=1)
    strided = wide[:, :9 * 64].view(q.shape[0], 9, 64)
    assert not strided.is_contiguous()
    torch.testing.assert_close(paged_decode_attention(strided, kc, vc, tables, lens, 0.125, None),
                               paged_decode_attention(q, kc, vc, tables, lens, 0.125, None))


# -- fused elementwise kernels against the PyTorch ops they replace -------------------------------

from freight.kernels import rms_norm, rotary_inplace, silu_and_mul  # noqa: E402
from freight.layers.norm import RMSNorm  # noqa: E402
from freight.layers.rotary import RotaryEmbedding, _rotate_half  # noqa: E402

# bf16: the kernels round where PyTorch rounds, so results agree to the last bit except where
# a float32 intermediate differs in its last ulp (summation order, vectorised exp) and lands on
# a bf16 rounding boundary: allow one bf16 ulp there.
TOL = {torch.float32: dict(atol=2e-6, rtol=2e-6), torch.bfloat16: dict(atol=0, rtol=2 ** -7)}


def _need(ok):
    if not ok:
        pytest.skip("no C compiler: the native elementwise kernels are not built here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_kernel_with_and_without_residual(isa, dtype):
    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(96, eps=1e-5)
    norm.weight.data = torch.randn(96, generator=g).to(dtype)
    x, res = (torch.randn(7, 96, generator=g).to(dtype) * 3 for _ in range(2))
    out = rms_norm(x, norm.weight, norm.eps, None)
    _need(out is not None)
    torch.testing.assert_close(out, norm._norm(x), **TOL[dtype])
    want_sum = x + res
    res_inout = res.clone()
    out = rms_norm(x, norm.weight, norm.eps, res_inout)
    torch.testing.assert_close(res_inout, want_sum, atol=0, rtol=0)
    torch.testing.assert_close(out, norm._norm(want_sum), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_kernel_in_place_on_strided_rows(isa, dtype):
    g = torch.Generator().manual_seed(2)
    rope = RotaryEmbedding(64, 512, 10000.0, None)
    qkv = torch.randn(5, 7 * 64, generator=g).to(dtype)
    positions = torch.tensor([0, 3, 100, 511, 7])
    x = qkv[:, :5 * 64].view(5, 5, 64)  # strided rows, like q and k inside the fused QKV output
    cos = rope.cos_cache[positions].to(dtype)[:, None]
    sin = rope.sin_cache[positions].to(dtype)[:, None]
    want = x * cos + _rotate_half(x) * sin
    tail = qkv[:, 5 * 64:].clone()
    _need(rotary_inplace(x, positions, rope.cos_cache, rope.sin_cache))
    torch.testing.assert_close(x, want, **TOL[dtype])
    assert torch.equal(qkv[:, 5 * 64:], tail), "columns outside the rotated heads must not change"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_kernel(isa, dtype):
    g = torch.Generator().manual_seed(3)
    gate_up = (torch.randn(6, 2 * 80, generator=g) * 4).to(dtype)
    out = silu_and_mul(gate_up)
    _need(out is not None)
    gate, up = gate_up.split(80, dim=-1)
    torch.testing.assert_close(out, F.silu(gate) * up, **TOL[dtype])


# -- prefill attention over the paged cache ---------------------------------------------------

from freight.kernels import paged_prefill_attention, paged_prefill_available  # noqa: E402


def _prefill_case(heads, kv_heads, dim, block_size, chunks, seed=0, dtype=torch.bfloat16):
    """chunks: (tokens already cached, new rows) per sequence; returns the kernel's inputs."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(c + n) // block_size) for c, n in chunks) + 4
    k_cache = torch.randn(kv_heads, num_blocks, block_size, dim, generator=g).to(dtype)
    v_cache = torch.randn(kv_heads, num_blocks, block_size, dim, generator=g).to(dtype)
    width = max(-(-(c + n) // block_size) for c, n in chunks)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(chunks), width, dtype=torch.int64)
    rows, used, start = [], 0, 0
    for i, (c, n) in enumerate(chunks):
        nb = -(-(c + n) // block_size)
        tables[i, :nb] = perm[used:used + nb]
        used += nb
        rows.append([start, n, c])
        start += n
    q = torch.randn(start, heads, dim, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(rows, dtype=torch.int64)


def _prefill_reference(q, k_cache, v_cache, tables, rows, window):
    heads, kv_heads = q.shape[1], k_cache.shape[0]
    out = torch.empty(q.shape, dtype=torch.float32)
    for i, (start, n, c) in enumerate(rows.tolist()):
        total = c + n
        k = k_cache[:, tables[i]].flatten(1, 2)[:, :total].float().repeat_interleave(heads // kv_heads, 0)
        v = v_cache[:, tables[i]].flatten(1, 2)[:, :total].float().repeat_interleave(heads // kv_heads, 0)
        q_pos, k_pos = torch.arange(c, total)[:, None], torch.arange(total)[None]
        mask = k_pos <= q_pos
        if window:
            mask &= k_pos > q_pos - window
        o = F.scaled_dot_product_attention(q[start:start + n].float().transpose(0, 1), k, v, attn_mask=mask,
                                           scale=q.shape[-1] ** -0.5)
        out[start:start + n] = o.transpose(0, 1)
    return out


# fresh prompts, chunks after earlier chunks (or prefix hits), one-row chunks, ragged tiles
PREFILL_CHUNKS = [(0, 37), (20, 5), (0, 1), (33, 64), (100, 17)]


# bf16: probabilities and output rounded, float32 sums; float32: a polynomial exp
PREFILL_TOL = {torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float32: dict(atol=2e-5, rtol=2e-5)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 128), (8, 2, 32)])
@pytest.mark.parametrize("window", [None, 7, 40])
@pytest.mark.parametrize("block_size", [16, 32])
def test_native_prefill_matches_reference(isa, dtype, heads, kv_heads, dim, window, block_size):
    q, kc, vc, tables, rows = _prefill_case(heads, kv_heads, dim, block_size, PREFILL_CHUNKS, dtype=dtype)
    if not paged_prefill_available(q, kc):
        pytest.skip(f"no {dtype} prefill kernel at the {isa} level: prefill attention stays on SDPA")
    out = torch.full(q.shape, float("nan"), dtype=dtype)
    paged_prefill_attention(q, kc, vc, tables, rows, out, dim ** -0.5, window)
    torch.testing.assert_close(out.float(), _prefill_reference(q, kc, vc, tables, rows, window), **PREFILL_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_prefill_ignores_slots_past_the_chunk(isa, dtype):
    """Cache slots after a chunk's last token are not written yet (they may hold NaN)."""
    q, kc, vc, tables, rows = _prefill_case(9, 3, 64, 16, PREFILL_CHUNKS, dtype=dtype)
    if not paged_prefill_available(q, kc):
        pytest.skip(f"no {dtype} prefill kernel at the {isa} level: prefill attention stays on SDPA")
    want = torch.empty(q.shape, dtype=dtype)
    paged_prefill_attention(q, kc, vc, tables, rows, want, 0.125, None)
    for i, (_, n, c) in enumerate(rows.tolist()):
        for pos in range(c + n, -(-(c + n) // 16) * 16):  # the rest of the chunk's last block
            kc[:, tables[i, pos // 16], pos % 16] = float("nan")
            vc[:, tables[i, pos // 16], pos % 16] = float("nan")
    got = torch.empty(q.shape, dtype=dtype)
    paged_prefill_attention(q, kc, vc, tables, rows, got, 0.125, None)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# -- the small-row bf16 matmul of decode steps -------------------------------------------------

from freight.kernels.gemm import pack_weight, small_gemm, small_gemm_max_rows, small_gemm_supported  # noqa: E402
from freight.layers.linear import SMALL_GEMM_MAX_ROWS, Linear  # noqa: E402


# float32 sums in another order; in bf16 also one rounding of the output
GEMM_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=2 ** -7)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 5, 6, 7, 8, 9, 16, 33, 64])  # every row-group remainder of 4, 6 and 8
# tiles of 16 columns: 10 (enough per thread for the prefetch ahead to run; 5 a thread on 2 threads:
# bf16 passes of 3 then 2 tiles), 8 (passes of 3 and 1) and 1
@pytest.mark.parametrize("cols", [160, 128, 16])
def test_small_gemm_matches_linear(isa, dtype, rows, cols):
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(cols, 40, generator=g) * 0.1).to(dtype)
    if not small_gemm_supported(w):
        pytest.skip(f"no {dtype} small-row kernel at the {isa} level: decode matmuls stay on oneDNN")
    wide = torch.randn(rows, 50, generator=g).to(dtype)
    x = wide[:, :40]  # strided rows, as a slice of a larger activation
    got = small_gemm(x, pack_weight(w), cols)
    if rows > small_gemm_max_rows(dtype):  # past the rows where the kernel beats oneDNN at this level
        assert got is None
        return
    torch.testing.assert_close(got.float(), F.linear(x.float(), w.float()), **GEMM_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_layer_uses_small_gemm_for_few_rows_only(isa, dtype):
    g = torch.Generator().manual_seed(5)
    layer = Linear(64, 32, bias=True).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(32, 64, generator=g) * 0.1)
        layer.bias.copy_(torch.randn(32, generator=g))
    ref_weight, ref_bias = layer.weight.detach().float().clone(), layer.bias.detach().float().clone()
    if not layer.pack_for_cpu(release_original=True):
        pytest.skip("oneDNN weight packing is not available here")
    for rows in (1, SMALL_GEMM_MAX_ROWS, SMALL_GEMM_MAX_ROWS + 1, 40):
        x = torch.randn(rows, 64, generator=g).to(dtype)
        want = F.linear(x.float(), ref_weight, ref_bias)
        torch.testing.assert_close(layer(x).float(), want, atol=3e-2, rtol=2e-2)


# -- ISA levels, the feature probe, dtype "auto" -----------------------------------------------

import os  # noqa: E402

from freight.kernels import cpu_features  # noqa: E402
from freight.kernels.build import load  # noqa: E402
from freight.model_loader import resolve_dtype  # noqa: E402

needs_c_kernels = pytest.mark.skipif(os.environ.get("FREIGHT_DISABLE_C_KERNELS") == "1",
                                     reason="FREIGHT_DISABLE_C_KERNELS=1")

# what each level must provide when it builds
PROVIDES = {"generic": {"decode", "elementwise"},
            "avx2": {"decode", "elementwise", "gemm_bf16", "gemm_f32", "prefill_f32"},
            "avx512bf16": {"decode", "elementwise", "gemm_bf16", "gemm_f32", "prefill_bf16", "prefill_f32"}}


@needs_c_kernels
def test_each_isa_level_builds_and_provides_its_kernels(isa):
    if load("elementwise") is None:
        pytest.skip("no C compiler")
    for name in ("paged_attention", "prefill_attention", "elementwise", "gemm", "bitmask", "shm_comm"):
        assert load(name) is not None, f"{name} does not build at the {isa} level"
    q, cache = torch.zeros(1, 4, 64, dtype=torch.bfloat16), torch.zeros(2, 1, 16, 64, dtype=torch.bfloat16)
    have = {"decode"} if paged_decode_available(q) and paged_decode_available(q.float()) else set()
    if rms_norm(torch.ones(1, 8), torch.ones(8), 1e-6, None) is not None:
        have.add("elementwise")
    for dtype in (torch.bfloat16, torch.float32):
        if small_gemm_supported(torch.zeros(16, 8, dtype=dtype)):
            have.add("gemm_bf16" if dtype == torch.bfloat16 else "gemm_f32")
    for dtype in (torch.bfloat16, torch.float32):
        if paged_prefill_available(q.to(dtype), cache.to(dtype)):
            have.add("prefill_bf16" if dtype == torch.bfloat16 else "prefill_f32")
    assert have == PROVIDES[isa]


def test_isa_levels_are_distinct_builds():
    paths = {isa: load("bitmask", isa) for isa in supported_isas()}
    if None in paths.values():
        pytest.skip("no C compiler (or FREIGHT_DISABLE_C_KERNELS=1)")
    assert len({lib._name for lib in paths.values()}) == len(paths)


AVX2_BOX = frozenset("fpu sse2 sse4_2 popcnt avx avx2 fma f16c bmi1 bmi2 abm movbe".split())  # e.g. AMD Zen 3
AVX512_BF16_BOX = AVX2_BOX | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_bf16"}


@pytest.fixture
def cpu_with(monkeypatch):
    """cpu_with(flags): the probe sees an x86 CPU with these /proc/cpuinfo flags."""
    monkeypatch.delenv("FREIGHT_KERNEL_ISA", raising=False)
    monkeypatch.setattr(cpu_features, "is_x86", lambda: True)

    def set_flags(flags):
        monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset(flags))
    return set_flags


def test_probe_picks_the_best_level_and_honours_a_lower_forced_one(cpu_with, monkeypatch):
    cpu_with(AVX2_BOX)
    assert cpu_features.supported_isas() == ("generic", "avx2")
    assert cpu_features.kernel_isa() == "avx2" and not cpu_features.has_native_bf16()
    monkeypatch.setenv("FREIGHT_KERNEL_ISA", "avx512bf16")  # higher than the CPU: ignored
    assert cpu_features.kernel_isa() == "avx2"
    cpu_with(AVX512_BF16_BOX)
    monkeypatch.setenv("FREIGHT_KERNEL_ISA", "")
    assert cpu_features.kernel_isa() == "avx512bf16" and cpu_features.has_native_bf16()
    monkeypatch.setenv("FREIGHT_KERNEL_ISA", "avx2")  # emulates an AVX2 box, dtype "auto" included
    assert cpu_features.kernel_isa() == "avx2" and not cpu_features.has_native_bf16()
    monkeypatch.setenv("FREIGHT_KERNEL_ISA", "sse9")  # unknown: the best level
    assert cpu_features.kernel_isa() == "avx512bf16"
    cpu_with(AVX2_BOX | {"amx_bf16", "amx_tile"})
    assert cpu_features.has_native_bf16()
    monkeypatch.setenv("FREIGHT_KERNEL_ISA", "generic")  # forced below the best: no native bf16 either
    assert not cpu_features.has_native_bf16()
    cpu_with({"fpu", "sse2"})
    assert cpu_features.kernel_isa() == "generic"


class _Checkpoint:
    def __init__(self, torch_dtype):
        self.torch_dtype = torch_dtype


@pytest.mark.parametrize("checkpoint", ["bfloat16", "float16"])
def test_dtype_auto_runs_float32_without_native_bf16(monkeypatch, caplog, checkpoint):
    import freight.model_loader as loader

    cpu = torch.device("cpu")
    monkeypatch.setattr(loader, "has_native_bf16", lambda: False)
    with caplog.at_level("INFO", logger="freight.model_loader"):
        assert resolve_dtype("auto", _Checkpoint(checkpoint), cpu) == torch.float32
    assert "no native bf16" in caplog.text
    assert resolve_dtype("bfloat16", _Checkpoint(checkpoint), cpu) == torch.bfloat16  # asked for: honoured
    assert resolve_dtype("auto", _Checkpoint("float32"), cpu) == torch.float32
    monkeypatch.setattr(loader, "has_native_bf16", lambda: True)
    assert resolve_dtype("auto", _Checkpoint(checkpoint), cpu) == torch.bfloat16


def test_disable_c_kernels_turns_every_kernel_off(monkeypatch):
    monkeypatch.setenv("FREIGHT_DISABLE_C_KERNELS", "1")
    reset_kernel_caches()
    try:
        q = torch.zeros(1, 4, 64)
        assert not paged_decode_available(q) and not paged_decode_available(q.bfloat16())
        assert rms_norm(torch.ones(1, 8), torch.ones(8), 1e-6, None) is None
        assert not small_gemm_supported(torch.zeros(16, 8)) and not small_gemm_supported(torch.zeros(16, 8).bfloat16())
        assert not paged_prefill_available(q.bfloat16(), torch.zeros(2, 1, 16, 64, dtype=torch.bfloat16))
    finally:
        monkeypatch.undo()
        reset_kernel_caches()


# -- greedy sampling (greedy.c) -----------------------------------------------------------------

from freight.kernels.greedy import greedy  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_kernel_matches_argmax_and_log_softmax(isa, dtype):
    g = torch.Generator().manual_seed(6)
    wide = (torch.randn(7, 1100, generator=g) * 4).to(dtype)
    x = wide[:, :1000]  # strided rows
    x[2, 10] = x[2, 900] = x[2].max() + 1  # a tie: the first index wins, as torch.argmax
    x[4, :] = 0.5  # a flat row
    got = greedy(x)
    if got is None:
        assert os.environ.get("FREIGHT_DISABLE_C_KERNELS") == "1"
        return
    ids, logprobs = got
    want = x.float().argmax(dim=-1)
    assert torch.equal(ids, want)
    torch.testing.assert_close(logprobs, torch.log_softmax(x.float(), dim=-1).gather(1, want[:, None]).squeeze(1),
                               atol=1e-5, rtol=1e-6)
    assert greedy(x[:, :0]) is None and greedy(x.t()) is None  # nothing to take / columns not contiguous
