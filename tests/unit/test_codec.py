"""The FP8 codec as a specification: decoding is exact, encoding follows docs/quantized.md's rule bit for bit
in float64 (checked against ``quantized.quantize_blocks``, a block-by-block loop), chunking never
changes a bit, and what cannot be encoded (NaN, Inf) is refused naming the tensor."""
from __future__ import annotations

import math

import pytest
import torch

from quantized import FMAX, TORCH, dequantize, quantize_blocks
from graft.engine.compute.codec import Transcoder, decode_into
from graft.engine.errors import NonFiniteError
from graft.engine.plan.chunks import iter_chunks, shard_read_bytes
from graft.engine.plan.tasks import ExecSettings, OutScales, Scales, ShardTask, Source, TensorTask, Term

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _values(rows: int, cols: int, seed: int) -> torch.Tensor:
    """float64 values spanning several binades per block, with an all-zero block row when possible."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    w *= torch.exp2(torch.randint(-12, 6, (rows, 1), generator=g).double())
    if rows > 8:
        w[:4] = 0.0
    return w


def _encode(w: torch.Tensor, block: tuple[int, int], code: str, scale: str, compute: str = "float64",
            chunk_size: int = 1024, scale_shape: tuple[int, ...] | None = None, pow2: bool = False):  # noqa: ANN202
    """Run graft's transcoder over ``w`` (a plain F64 target written as FP8) chunk by chunk; returns
    the codes, the scales and the chunks it used."""
    rows, cols = w.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    out_scales = OutScales("w_scale", scale, scale_shape or grid, block, pow2)
    task = TensorTask("w", code, (rows, cols), Source("target", "f", "F64", 0, w.numel() * 8),
                      scales=out_scales)
    shard = ShardTask(0, "f", (task,), (), 0, ExecSettings(compute, chunk_size, False))
    tc = Transcoder(compute, rows * cols)
    codes = torch.empty(rows * cols, dtype=TORCH[code])
    scales = torch.empty(grid, dtype=TORCH[scale])
    chunks = list(iter_chunks(shard))
    flat = w.reshape(-1)
    for c in chunks:
        out = None if c.measure else codes[c.start:c.start + c.count]
        got = tc.run(c, {("target", "codes"): flat[c.start:c.start + c.count]}, out, "f")
        if got is not None:
            lo, hi = c.scale_rows(out_scales)
            scales[lo:hi] = got
    return codes.view(rows, cols), scales, chunks


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("code", [E4M3, E5M2], ids=["E4M3", "E5M2"])
@pytest.mark.parametrize("compute", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_the_code_table_is_exactly_torchs_own_cast(code, compute):
    codes = torch.arange(256, dtype=torch.uint8).view(code)
    out = torch.empty(256, dtype=compute)
    decode_into(out, codes.view(16, 16), None, None, 0, torch.empty(256, dtype=torch.int32),
                codes.to(compute))
    want = codes.to(compute)
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    assert torch.equal(out.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("shape,block", [
    ((100, 70), (32, 32)),     # partial edge blocks on both sides
    ((257, 33), (128, 16)),
    ((64, 96), (64, 96)),      # one block = per tensor
    ((48, 80), (1, 80)),       # per channel
    ((1, 5), (1, 5)),
], ids=str)
@pytest.mark.parametrize("code,scale", [("F8_E4M3", "F32"), ("F8_E4M3", "BF16"), ("F8_E5M2", "F16")])
def test_float64_encoding_is_bit_identical_to_the_block_by_block_reference(shape, block, code, scale):
    w = _values(*shape, seed=sum(shape))
    codes, scales, chunks = _encode(w, block, code, scale, chunk_size=8 * shape[1] * 3)
    want_codes, want_scales = quantize_blocks(w, block, TORCH[code], TORCH[scale])
    assert torch.equal(_bits(codes), _bits(want_codes))
    assert torch.equal(_bits(scales), _bits(want_scales))
    assert len([c for c in chunks if not c.measure]) > 1 or shape[0] == 1  # really chunked


@pytest.mark.parametrize("shape,block", [((100, 70), (32, 32)), ((90, 40), (90, 40))], ids=["block", "tensor"])
def test_power_of_two_scales_for_a_ue8m0_target_follow_the_reference_and_never_saturate(shape, block):
    w = _values(*shape, seed=7)
    w[40:44, :4] = 448 * 2.0**-3  # amax / 448 exactly a power of two: kept, not doubled
    codes, scales, _ = _encode(w, block, "F8_E4M3", "F32", chunk_size=8 * shape[1] * 9, pow2=True)
    want_codes, want_scales = quantize_blocks(w, block, E4M3, torch.float32, pow2=True)
    assert torch.equal(_bits(codes), _bits(want_codes)) and torch.equal(scales, want_scales)
    mantissa, _ = torch.frexp(scales)
    assert bool((mantissa == 0.5).all())  # every scale a power of two
    assert float(codes.float().abs().max()) <= 448


def test_a_per_tensor_scale_over_several_chunks_is_found_by_a_first_pass_that_writes_nothing():
    w = _values(90, 40, seed=3)
    codes, scales, chunks = _encode(w, (90, 40), "F8_E4M3", "F32", chunk_size=40 * 8 * 7, scale_shape=(1,))
    measure = [c for c in chunks if c.measure]
    assert measure and all(c.out_bytes == 0 and not c.last for c in measure)
    assert sum(c.count for c in measure) == w.numel() == sum(c.count for c in chunks if not c.measure)
    want_codes, want_scales = quantize_blocks(w, (90, 40))
    assert torch.equal(_bits(codes), _bits(want_codes)) and torch.equal(scales, want_scales)
    # The same tensor in one chunk takes the one-pass path: the same bits.
    one, one_scales, one_chunks = _encode(w, (90, 40), "F8_E4M3", "F32", chunk_size=2**20, scale_shape=(1,))
    assert len(one_chunks) == 1 and torch.equal(_bits(one), _bits(codes)) and torch.equal(one_scales, scales)


def test_chunk_size_never_changes_a_bit():
    w = _values(200, 64, seed=5)
    first = _encode(w, (32, 32), "F8_E4M3", "BF16", chunk_size=64 * 8 * 32)
    for size in (64 * 8 * 64, 64 * 8 * 96, 2**20, 1):
        codes, scales, chunks = _encode(w, (32, 32), "F8_E4M3", "BF16", chunk_size=size)
        assert all(c.start % (32 * 64) == 0 for c in chunks)  # whole block rows, whatever the size
        assert torch.equal(_bits(codes), _bits(first[0])) and torch.equal(_bits(scales), _bits(first[1]))


def test_an_all_zero_block_gets_scale_one_and_zero_codes_and_an_underflowing_scale_too():
    w = torch.zeros(4, 8, dtype=torch.float64)
    w[:, 4:] = 1e-44  # amax / 448 is below the smallest float32
    codes, scales, _ = _encode(w, (4, 4), "F8_E4M3", "F32")
    assert scales.tolist() == [[1.0, 1.0]]
    assert torch.equal(codes.float(), torch.zeros(4, 8))


@pytest.mark.parametrize("code", ["F8_E4M3", "F8_E5M2"])
def test_codes_saturate_at_the_largest_finite_code_never_nan_or_inf(code):
    # Each block's amax / FMAX rounds down in BF16, so amax / scale exceeds FMAX: clamped, not NaN.
    w = _values(64, 64, seed=9) * 1e4
    codes, scales, _ = _encode(w, (16, 16), code, "BF16")
    values = codes.double()
    assert torch.isfinite(values).all()
    assert float(values.abs().max()) == FMAX[TORCH[code]]
    real = dequantize(codes, scales, (16, 16))
    assert bool(((real - w).abs() <= w.abs().amax() * 2**-2).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_or_inf_cannot_be_encoded_and_the_error_names_the_tensor(bad):
    w = _values(32, 32, seed=1)
    w[17, 3] = bad
    with pytest.raises(NonFiniteError, match=r"tensor 'w' in f: NaN or Inf"):
        _encode(w, (16, 16), "F8_E4M3", "F32")


def test_float32_encoding_is_within_one_e4m3_rounding_of_the_float64_one():
    w = _values(96, 160, seed=11)
    c64, s64, _ = _encode(w, (32, 32), "F8_E4M3", "F32", compute="float64")
    c32, s32, _ = _encode(w.float().double(), (32, 32), "F8_E4M3", "F32", compute="float32")
    real32 = dequantize(c32, s32, (32, 32))
    scale = s32.double().repeat_interleave(32, 0).repeat_interleave(32, 1)
    step = torch.exp2(torch.floor(torch.log2((w.abs() / scale).clamp(min=2**-6))) - 3)  # E4M3 spacing
    assert bool(((real32 - w).abs() <= step * scale).all())
    assert (c32.view(torch.uint8) == c64.view(torch.uint8)).float().mean() > 0.99


@pytest.mark.parametrize("row0", [0, 7, 32, 45])
def test_decoding_rows_that_start_inside_a_block_uses_each_rows_own_scale(row0):
    g = torch.Generator().manual_seed(row0)
    codes = torch.randn(100, 70, generator=g).to(E4M3)
    scales = torch.rand(4, 3, generator=g) + 0.5
    want = dequantize(codes, scales, (32, 32))
    rows = 40
    lo, hi = row0 // 32, math.ceil((row0 + rows) / 32)
    out = torch.empty(rows, 70, dtype=torch.float64)
    decode_into(out, codes[row0:row0 + rows], scales[lo:hi], (32, 32), row0 - lo * 32)
    assert torch.equal(out, want[row0:row0 + rows])


def test_reads_of_a_chunk_cover_exactly_its_codes_and_its_scale_rows():
    sc = Scales("w_scale_inv", "F32", (4, 3), (32, 32), file="s.safetensors", begin=1000, end=1000 + 48)
    src = Source("base", "c.safetensors", "F8_E4M3", 500, 500 + 100 * 70, None, sc)
    plain = Source("target", "t.safetensors", "BF16", 0, 100 * 70 * 2)
    task = TensorTask("w", "BF16", (100, 70), plain,
                      (Term(plain.__class__(**{**plain.__dict__, "role": "finetuned"}), src, 1.0),))
    shard = ShardTask(0, "o", (task,), (), 0, ExecSettings("float32", 70 * 4 * 40, False))
    chunks = list(iter_chunks(shard))
    assert [c.rows for c in chunks] == [(0, 32), (32, 32), (64, 32), (96, 4)]  # base's blocks matched
    scale_reads = [r for c in chunks for r in c.reads() if r.kind == "scales"]
    assert [(r.file, r.begin, r.end) for r in scale_reads] == [
        ("s.safetensors", 1000 + 12 * i, 1000 + 12 * (i + 1)) for i in range(4)]
    assert shard_read_bytes(shard) == 100 * 70 * (2 + 2 + 1) + 48


def test_an_fp8_outputs_sampled_change_is_measured_on_its_decoded_codes():
    """Blocks 0 and 32 of 256Ki elements (rows 0-31 and 1024-1055 of one chunk): (out - t) over
    them is the written codes times their new scales, minus the target, decoded row span by span."""
    from graft.engine.compute.kernel import CPU_BLOCK, STATS

    rows, cols = 1088, 8192
    torch.manual_seed(37)
    codes, scales = quantize_blocks(torch.randn(rows, cols) * 0.02, (128, 128))
    t = dequantize(codes, scales, (128, 128))
    f = torch.randn(rows, cols).to(torch.bfloat16)
    sc = Scales("w_scale_inv", "F32", tuple(scales.shape), (128, 128), file="s", begin=0, end=scales.numel() * 4)
    task = TensorTask("w", "F8_E4M3", (rows, cols), Source("target", "t", "F8_E4M3", 0, rows * cols, None, sc),
                      (Term(Source("finetuned", "f", "BF16", 0, rows * cols * 2),
                            Source("base", "b", "BF16", 0, rows * cols * 2), 0.01),), sc.as_output())
    (chunk,) = iter_chunks(ShardTask(0, "o", (task,), (), 0, ExecSettings("float32", 2**30, False)))
    stats = torch.zeros(len(STATS), dtype=torch.float64)
    out = torch.empty(rows * cols, dtype=torch.float8_e4m3fn)
    inputs = {("target", "codes"): codes.view(-1), ("target", "scales"): scales.reshape(-1),
              ("finetuned", "codes"): f.view(-1), ("base", "codes"): torch.zeros(rows * cols, dtype=torch.bfloat16)}
    new = Transcoder("float32", chunk.count).run(chunk, inputs, out, "o", stats, 32)
    got = dict(zip(STATS, stats.tolist()))
    assert got["measured"] == 2 * CPU_BLOCK
    written = dequantize(out.view(rows, cols), new, (128, 128)).reshape(-1)
    picked = torch.cat([torch.arange(0, CPU_BLOCK), torch.arange(32 * CPU_BLOCK, 33 * CPU_BLOCK)])
    change = written[picked] - t.reshape(-1)[picked]
    assert got["out_delta_sq"] == pytest.approx(float(change @ change), rel=1e-5)


def test_the_report_samples_the_same_grid_blocks_on_the_codec_path():
    from graft.engine.compute.kernel import CPU_BLOCK, STATS

    rows, cols = 2048, 8192  # 64 blocks of CPU_BLOCK elements: blocks 0 and 32 are measured
    torch.manual_seed(31)
    codes, scales = quantize_blocks(torch.randn(rows, cols) * 0.02, (128, 128))
    b = dequantize(codes, scales, (128, 128))
    f = (b + 0.001 * torch.randn(rows, cols, dtype=torch.float64)).to(torch.bfloat16)
    t = torch.randn(rows, cols).to(torch.bfloat16)
    sc = Scales("w_scale_inv", "F32", tuple(scales.shape), (128, 128), file="s", begin=0, end=scales.numel() * 4)
    task = TensorTask("w", "BF16", (rows, cols), Source("target", "t", "BF16", 0, rows * cols * 2),
                      (Term(Source("finetuned", "f", "BF16", 0, rows * cols * 2),
                            Source("base", "b", "F8_E4M3", 0, rows * cols, None, sc), 1.0),))
    shard = ShardTask(0, "o", (task,), (), 0, ExecSettings("float32", 16 * 2**20, False))
    chunks = list(iter_chunks(shard))
    tc = Transcoder("float32", max(c.count for c in chunks))
    stats = torch.zeros(len(STATS), dtype=torch.float64)
    out = torch.empty(rows * cols, dtype=torch.bfloat16)
    for c in chunks:
        lo, hi = c.scale_rows(sc)
        part = slice(c.start, c.start + c.count)
        inputs = {("target", "codes"): t.view(-1)[part], ("finetuned", "codes"): f.view(-1)[part],
                  ("base", "codes"): codes.view(-1)[part], ("base", "scales"): scales[lo:hi].reshape(-1)}
        assert tc.run(c, inputs, out[part], "o", stats, 32) is None
    got = dict(zip(STATS, stats.tolist()))
    assert got["elements"] == rows * cols and got["measured"] == 2 * CPU_BLOCK and got["differs"] == 1
    picked = torch.cat([torch.arange(0, CPU_BLOCK), torch.arange(32 * CPU_BLOCK, 33 * CPU_BLOCK)])
    tt, ff, bb, oo = (x.double().reshape(-1)[picked] for x in (t, f, b, out))
    want = {"target_sq": tt @ tt, "out_delta_sq": (oo - tt) @ (oo - tt), "delta_sq": (ff - bb) @ (ff - bb),
            "moved_sq": (tt - bb) @ (tt - bb), "dot": (ff - bb) @ (tt - bb), "unchanged": (ff == bb).sum()}
    for key, value in want.items():
        assert got[key] == pytest.approx(float(value), rel=1e-4, abs=1e-6), key
