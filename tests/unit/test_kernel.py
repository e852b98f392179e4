"""The arithmetic against an independent float64 reference.

ref = (t.double() + alpha * (f.double() - b.double())).to(out_dtype)

* compute_dtype float64: bit-identical to ref (torch.equal), for every target dtype and input mix.
* compute_dtype float32: every element is ref, or within float32 evaluation error of it:
  |out - ref| <= 2**-22 * (|t| + |alpha| * (|f| + |b|)) measured in float64. Where the exact result
  lies within that error of a rounding boundary of the output dtype, float32 may land on the other
  side of it; out is then the correct rounding of a value within the bound of the exact result.
"""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from conftest import ulp, within_float32_contract
from graft.engine.errors import NonFiniteError
from graft.engine.compute.kernel import CPU_BLOCK, STATS, ChunkKernel, check_finite, first_nonfinite, sampled_ranges
from graft.engine.plan.tasks import SUM_ROW, stat_names

N = 20_000
ALPHAS = (1.0, 0.5, -1.3)
TARGET_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
# (finetuned dtype, base dtype) relative to the target's: same, or a float32 fine-tune of a bf16 base.
INPUT_MIXES = ("same", "f32-finetuned-bf16-base", "f64-finetuned-f16-base")
KINDS = ("normal", "large", "cancel")


def _inputs(target_dtype: torch.dtype, mix: str, kind: str, alpha: float, seed: int):
    torch.manual_seed(seed)
    f_dtype, b_dtype = {
        "same": (target_dtype, target_dtype),
        "f32-finetuned-bf16-base": (torch.float32, torch.bfloat16),
        "f64-finetuned-f16-base": (torch.float64, torch.float16),
    }[mix]
    scale = {torch.float16: 1e3, torch.bfloat16: 1e30, torch.float32: 1e30, torch.float64: 1e30}[target_dtype]
    if kind == "normal":
        b = torch.randn(N)
        f = b + 0.01 * torch.randn(N)
        t = torch.randn(N)
    elif kind == "large":
        # Large magnitudes with a wide spread of exponents (kept clear of overflow).
        mag = scale * torch.rand(N) ** 8
        b = torch.randn(N) * mag / 4
        f = b + torch.randn(N) * mag / 8
        t = torch.randn(N) * mag / 4
    else:
        # Near-cancellation: t almost equal to -alpha * (f - b), so the result is far below the operands.
        b = torch.randn(N)
        f = b + torch.randn(N)
        t = -alpha * (f.double() - b.double()) + 1e-6 * torch.randn(N, dtype=torch.float64)
    if b_dtype == torch.float16:
        b = b.clamp(-6e4, 6e4)
    return t.to(target_dtype), f.to(f_dtype), b.to(b_dtype)


def _reference(t, f, b, alpha):
    return (t.double() + alpha * (f.double() - b.double())).to(t.dtype)


def _combine(compute_dtype: str, t, f, b, alpha) -> torch.Tensor:
    out = torch.empty_like(t)
    ChunkKernel(compute_dtype, N + 100).combine(t, f, b, alpha, out)
    return out


CASES = list(itertools.product(TARGET_DTYPES, INPUT_MIXES, KINDS, ALPHAS))


def _id(case) -> str:
    dtype, mix, kind, alpha = case
    return f"{str(dtype).removeprefix('torch.')}-{mix}-{kind}-alpha{alpha}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_float64_compute_is_bit_identical_to_the_float64_reference(case):
    target_dtype, mix, kind, alpha = case
    t, f, b = _inputs(target_dtype, mix, kind, alpha, seed=zlib.crc32(_id(case).encode()))
    ref = _reference(t, f, b, alpha)
    assert torch.isfinite(ref.float()).all()  # the data exercises arithmetic, not overflow
    out = _combine("float64", t, f, b, alpha)
    assert out.dtype == target_dtype
    mismatches = (out.view(torch.uint8) != ref.view(torch.uint8)).sum()
    assert torch.equal(out, ref), f"{int(mismatches)} differing bytes"


def _float32_violations(out, t, f, b, alpha) -> torch.Tensor:
    exact = t.double() + alpha * (f.double() - b.double())
    ref = exact.to(out.dtype).double()
    got = out.double()
    bound = 2.0**-22 * (t.double().abs() + abs(alpha) * (f.double().abs() + b.double().abs()))
    within = (got == ref) | ((got - ref).abs() <= bound)
    # Rounding-boundary allowance: out rounds some value in [exact - bound, exact + bound].
    lo = (exact - bound).to(out.dtype).double()
    hi = (exact + bound).to(out.dtype).double()
    rounds_a_nearby_value = (lo <= got) & (got <= hi)
    return ~(within | rounds_a_nearby_value)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_float32_compute_is_within_float32_evaluation_error_of_the_reference(case):
    target_dtype, mix, kind, alpha = case
    t, f, b = _inputs(target_dtype, mix, kind, alpha, seed=zlib.crc32(_id(case).encode()))
    out = _combine("float32", t, f, b, alpha)
    assert out.dtype == target_dtype
    bad = _float32_violations(out, t, f, b, alpha)
    assert not bad.any(), f"{int(bad.sum())} elements out of contract, first at {int(bad.nonzero()[0, 0])}"


def test_float32_compute_mostly_equals_the_reference_exactly():
    # Guards the contract above from being vacuous: for bf16 targets nearly every element is exact.
    t, f, b = _inputs(torch.bfloat16, "same", "normal", 0.5, seed=1)
    out = _combine("float32", t, f, b, 0.5)
    assert (out == _reference(t, f, b, 0.5)).float().mean() > 0.999


def test_the_float32_contract_rejects_an_off_by_one_ulp_result():
    t, f, b = _inputs(torch.bfloat16, "same", "normal", 1.0, seed=2)
    out = _combine("float32", t, f, b, 1.0)
    assert _float32_violations(out, t, f, b, 1.0).sum() == 0
    wrong = out.clone()
    wrong.view(torch.int16)[123] += 1  # the adjacent bf16 value: one ulp away
    assert _float32_violations(wrong, t, f, b, 1.0).sum() == 1


def test_a_kernel_is_reused_across_chunks_of_any_length():
    kernel = ChunkKernel("float64", 1000)
    torch.manual_seed(3)
    for n in (1000, 7, 1, 0, 513):
        t, f, b = (torch.randn(n).to(torch.bfloat16) for _ in range(3))
        out = torch.full((n,), float("nan"), dtype=torch.bfloat16)
        kernel.combine(t, f, b, -1.3, out)
        assert torch.equal(out, _reference(t, f, b, -1.3)), n


def test_alpha_zero_returns_the_target_and_alpha_one_adds_the_difference():
    t = torch.tensor([1.0, -2.0, 3.5], dtype=torch.bfloat16)
    f = torch.tensor([0.5, 0.25, 8.0])
    b = torch.tensor([0.25, 0.25, 4.0], dtype=torch.bfloat16)
    out = torch.empty_like(t)
    kernel = ChunkKernel("float32", 3)
    kernel.combine(t, f, b, 0.0, out)
    assert torch.equal(out, t)
    kernel.combine(t, f, b, 1.0, out)
    assert out.tolist() == [1.25, -2.0, 7.5]


def test_fp8_targets_are_combined_in_float64_exactly_like_the_reference():
    torch.manual_seed(4)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t, f, b = (torch.randn(N).clamp(-8, 8).to(dtype) for _ in range(3))
        out = torch.empty_like(t)
        ChunkKernel("float64", N).combine(t, f, b, 0.5, out)
        assert torch.equal(out.view(torch.uint8), _reference(t, f, b, 0.5).view(torch.uint8)), dtype


# --- non-finite detection ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_first_nonfinite_is_none_for_finite_values(dtype):
    torch.manual_seed(5)
    assert first_nonfinite(torch.randn(1000).to(dtype)) is None
    assert first_nonfinite(torch.empty(0, dtype=dtype)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_first_nonfinite_finds_the_first_bad_index(dtype, bad):
    values = torch.zeros(1000, dtype=dtype)
    values[777] = bad
    values[901] = float("nan")
    assert first_nonfinite(values) == 777
    values[0] = bad
    assert first_nonfinite(values) == 0


def test_first_nonfinite_works_on_fp8():
    e4m3 = torch.zeros(64).to(torch.float8_e4m3fn)
    assert first_nonfinite(e4m3) is None
    e4m3[17] = float("nan")
    assert first_nonfinite(e4m3) == 17
    e5m2 = torch.zeros(64).to(torch.float8_e5m2)
    e5m2[40] = float("inf")
    assert first_nonfinite(e5m2) == 40


def test_check_finite_names_the_tensor_and_the_absolute_element():
    values = torch.ones(10)
    check_finite(values, "w", "out/model.safetensors", 0)  # finite: no error
    values[3] = float("inf")
    with pytest.raises(NonFiniteError) as caught:
        check_finite(values, "model.layers.0.w", "out/model.safetensors", 5000)
    msg = str(caught.value)
    assert "'model.layers.0.w'" in msg and "out/model.safetensors" in msg
    assert "element 5003" in msg and "allow_nonfinite" in msg


def test_the_shared_float32_contract_allows_one_ulp_and_no_more():
    # tests/conftest.py's within_float32_contract is the statement of the promise, used by
    # the integration tests; the checks above are a stricter form of it.
    t = torch.ones(3, dtype=torch.bfloat16)
    f = b = torch.zeros(3, dtype=torch.bfloat16)
    step = float(ulp(torch.ones(1), torch.bfloat16))
    assert bool(within_float32_contract(t.clone(), t, f, b, 1.0).all())
    assert bool(within_float32_contract((t.double() + step).to(torch.bfloat16), t, f, b, 1.0).all())
    assert not bool(within_float32_contract((t.double() + 2 * step).to(torch.bfloat16), t, f, b, 1.0).any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_first_nonfinite_is_exact_when_a_finite_sum_would_overflow(dtype):
    # The fast path sums; a sum of huge finite values overflows, and that must not be reported.
    big = torch.finfo(dtype).max
    values = torch.full((CPU_BLOCK + 10,), big, dtype=dtype)
    assert first_nonfinite(values) is None
    values[CPU_BLOCK + 3] = float("nan")  # past the first block
    assert first_nonfinite(values) == CPU_BLOCK + 3


def test_kernel_blocks_give_the_same_bits_as_one_pass():
    torch.manual_seed(11)
    n = 3 * CPU_BLOCK + 123  # several blocks and a ragged tail
    t, f, b = (torch.randn(n).to(torch.bfloat16) for _ in range(3))
    out = torch.empty(n, dtype=torch.bfloat16)
    ChunkKernel("float64", n).combine(t, f, b, -0.7, out)
    assert torch.equal(out, (t.double() + -0.7 * (f.double() - b.double())).to(torch.bfloat16))


# --- the transfer report's measures ----------------------------------------------------------------


def _stats(kernel: ChunkKernel, t, f, b, alpha, every: int, chunk: int) -> torch.Tensor:
    """Run the tensor through ``kernel`` in chunks of ``chunk`` elements; its STATS."""
    stats = torch.zeros(len(STATS), dtype=torch.float64)
    out = torch.empty_like(t)
    for s in range(0, t.numel(), chunk):
        e = min(t.numel(), s + chunk)
        assert kernel.combine(t[s:e], f[s:e], b[s:e], alpha, out[s:e], stats, True, s, every) is None
    return stats


def test_every_measure_matches_float64_sums_over_the_elements():
    torch.manual_seed(21)
    n = 2 * CPU_BLOCK + 999
    t, b = torch.randn(n).to(torch.bfloat16), torch.randn(n).to(torch.bfloat16)
    f = (b.double() + 0.01 * torch.randn(n, dtype=torch.float64)).to(torch.bfloat16)
    f[:5000] = b[:5000]
    got = dict(zip(STATS, _stats(ChunkKernel("float32", n), t, f, b, 0.5, 1, n).tolist()))
    out = (t.double() + 0.5 * (f.double() - b.double())).to(torch.bfloat16).double()
    T, F, B = t.double(), f.double(), b.double()
    want = {"elements": n, "measured": n, "differs": 1, "target_sq": (T * T).sum(),
            "out_delta_sq": ((out - T) ** 2).sum(), "delta_sq": ((F - B) ** 2).sum(),
            "moved_sq": ((T - B) ** 2).sum(), "dot": ((F - B) * (T - B)).sum(), "unchanged": (F == B).sum()}
    for key, value in want.items():
        assert got[key] == pytest.approx(float(value), rel=1e-5), key


def test_sampling_takes_the_same_grid_blocks_whatever_the_chunk_size():
    torch.manual_seed(22)
    n = 70 * CPU_BLOCK + 5  # blocks 0, 32 and 64 of 71 are measured
    t, f, b = (torch.randn(n).to(torch.bfloat16) for _ in range(3))
    runs = [_stats(ChunkKernel("float32", min(chunk, CPU_BLOCK)), t, f, b, 1.0, 32, chunk)
            for chunk in (n, 4 * CPU_BLOCK, 100_003)]
    for stats in runs:
        got = dict(zip(STATS, stats.tolist()))
        assert got["elements"] == n and got["measured"] == 3 * CPU_BLOCK
        picked = torch.cat([torch.arange(k * CPU_BLOCK, (k + 1) * CPU_BLOCK) for k in (0, 32, 64)])
        d = f.double()[picked] - b.double()[picked]
        assert got["delta_sq"] == pytest.approx(float((d * d).sum()), rel=1e-5)
    assert all(torch.allclose(r, runs[0], rtol=1e-5) for r in runs)


@pytest.mark.parametrize("every", [1, 32])
def test_the_measures_are_the_same_bits_whatever_the_threads_and_chunks(every):
    """Sums in a fixed order (rows of SUM_ROW elements, then row by row in float64): a float32 dot
    product per block follows torch's thread split, and sums per chunk the chunk size."""
    torch.manual_seed(24)
    n = 33 * CPU_BLOCK + 300  # sampled: blocks 0 and 32, the last one partial
    t, f, b = (torch.randn(n).to(torch.bfloat16) for _ in range(3))
    runs = []
    before = torch.get_num_threads()
    try:
        for threads, chunk in ((2, n), (1, CPU_BLOCK), (2, 3 * SUM_ROW * 1001), (1, 97 * SUM_ROW)):
            torch.set_num_threads(threads)
            runs.append(_stats(ChunkKernel("float32", min(chunk, CPU_BLOCK)), t, f, b, 0.5, every, chunk))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(r, runs[0]) for r in runs[1:]), runs


def test_a_fine_tune_that_changed_only_unsampled_elements_still_counts_as_touched():
    n = 40 * CPU_BLOCK
    b = torch.randn(n).to(torch.bfloat16)
    f = b.clone()
    f[33 * CPU_BLOCK + 7] += 1  # in block 33: not sampled
    stats = dict(zip(STATS, _stats(ChunkKernel("float32", CPU_BLOCK), b.clone(), f, b, 1.0, 32, CPU_BLOCK).tolist()))
    assert stats["differs"] == 1 and stats["delta_sq"] == 0.0 and stats["unchanged"] == stats["measured"]
    untouched = dict(zip(STATS, _stats(ChunkKernel("float32", CPU_BLOCK), b.clone(), b.clone(), b, 1.0, 32,
                                       CPU_BLOCK).tolist()))
    assert untouched["differs"] == 0


@pytest.mark.parametrize("start, count", [(0, 70 * CPU_BLOCK + 5), (5 * CPU_BLOCK + 3, 40 * CPU_BLOCK),
                                          (32 * CPU_BLOCK - 7, 20), (CPU_BLOCK, 31 * CPU_BLOCK)])
def test_sampled_ranges_are_the_blocks_the_kernel_measures(start, count):
    ranges = sampled_ranges(start, count, 32)
    for lo, hi in ranges:  # inside the chunk, inside one sampled grid block
        assert 0 <= lo < hi <= count and (start + lo) // CPU_BLOCK == (start + hi - 1) // CPU_BLOCK
        assert (start + lo) // CPU_BLOCK % 32 == 0
    x = torch.ones(count, dtype=torch.bfloat16)
    stats = torch.zeros(len(STATS), dtype=torch.float64)
    ChunkKernel("float32", CPU_BLOCK).combine(x, x, x, 1.0, torch.empty_like(x), stats, False, start, 32)
    assert dict(zip(STATS, stats.tolist()))["measured"] == sum(hi - lo for lo, hi in ranges)
    assert sampled_ranges(start, count, 1) == [(0, count)]


# --- several diffs ---------------------------------------------------------------------------------


def test_several_diffs_sum_the_change_left_to_right_then_add_the_target_in_any_chunking():
    torch.manual_seed(23)
    n = 2 * CPU_BLOCK + 777
    t = torch.randn(n).to(torch.bfloat16)
    terms = [(torch.randn(n, dtype=torch.float32), torch.randn(n).to(torch.bfloat16), 0.7),
             (torch.randn(n).to(torch.float16), torch.randn(n).to(torch.bfloat16), -1.3),
             (torch.randn(n).to(torch.bfloat16), torch.zeros(n, dtype=torch.float32), 1.0)]  # a stored diff
    change = 0.7 * (terms[0][0].double() - terms[0][1].double())
    change = change + -1.3 * (terms[1][0].double() - terms[1][1].double())
    change = change + (terms[2][0].double() - terms[2][1].double())
    want = (change + t.double()).to(torch.bfloat16)
    for chunk in (n, 100_003):
        kernel = ChunkKernel("float64", min(chunk, n))
        out = torch.empty_like(t)
        stats = torch.zeros(len(stat_names(3)), dtype=torch.float64)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            assert kernel.combine_terms(t[s:e], tuple((f[s:e], b[s:e], a) for f, b, a in terms), out[s:e],
                                        stats, True, s, 1) is None
        assert torch.equal(out, want)
        got = dict(zip(stat_names(3), stats.tolist()))
        T = t.double()
        assert got["elements"] == got["measured"] == n
        assert got["change_sq"] == pytest.approx(float((change ** 2).sum()), rel=1e-9)
        assert got["out_delta_sq"] == pytest.approx(float(((want.double() - T) ** 2).sum()), rel=1e-9)
        for i, (f, b, _) in enumerate(terms):
            key = (lambda k: k) if i == 0 else (lambda k, i=i: f"{k}.{i}")
            d, m = f.double() - b.double(), T - b.double()
            assert got[key("differs")] == 1
            assert got[key("delta_sq")] == pytest.approx(float((d * d).sum()), rel=1e-9)
            assert got[key("moved_sq")] == pytest.approx(float((m * m).sum()), rel=1e-9)
            assert got[key("dot")] == pytest.approx(float((d * m).sum()), rel=1e-9)


def test_each_diff_is_known_touched_or_untouched_when_sampled():
    n = 40 * CPU_BLOCK
    b = torch.randn(n).to(torch.bfloat16)
    touched = b.clone()
    touched[33 * CPU_BLOCK + 7] += 1  # in block 33: not sampled
    kernel = ChunkKernel("float32", CPU_BLOCK)
    stats = torch.zeros(len(stat_names(2)), dtype=torch.float64)
    out = torch.empty_like(b)
    for s in range(0, n, CPU_BLOCK):
        e = s + CPU_BLOCK
        kernel.combine_terms(b[s:e], ((b[s:e], b[s:e], 1.0), (touched[s:e], b[s:e], 1.0)), out[s:e], stats, True,
                             s, 32)
    got = dict(zip(stat_names(2), stats.tolist()))
    assert got["differs"] == 0 and got["differs.1"] == 1 and got["measured"] == 2 * CPU_BLOCK
    assert torch.equal(out, touched)


# --- graft diff ----------------------------------------------------------------------------------


def test_the_difference_alone_is_the_float32_subtraction_and_counts_what_float32_cannot_hold():
    from graft.engine.plan.tasks import DIFF_STATS

    torch.manual_seed(24)
    n = CPU_BLOCK + 333
    b = torch.randn(n).to(torch.bfloat16)
    f = b.float() + 0.01 * torch.randn(n)
    f[:10] = b[:10].float()  # unchanged
    f[10:20] = 1e6  # f - b needs more than 24 bits
    f[20] = -0.0
    b[20] = 0.0  # -0 - +0 = -0, kept: adding a zero target would make it +0
    out = torch.empty(n, dtype=torch.float32)
    stats = torch.zeros(len(DIFF_STATS), dtype=torch.float64)
    assert ChunkKernel("float32", n).difference(f, b, out, stats, True) is None
    assert torch.equal(out, f - b.float()) and torch.signbit(out[20])
    exact = f.double() - b.double()
    got = dict(zip(DIFF_STATS, stats.tolist()))
    assert got["elements"] == n and got["differs"] >= 1
    d = f - b.float()
    assert got["unchanged"] == int(((d == 0) & ~torch.signbit(d)).sum()) >= 10  # a +0 difference
    assert got["inexact"] == int((out.double() != exact).sum()) > 0
    assert got["delta_sq"] == pytest.approx(float((out.double() ** 2).sum()), rel=1e-6)
