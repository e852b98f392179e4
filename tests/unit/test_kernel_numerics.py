"""The arithmetic against an independent float64 reference."""
from __future__ import annotations

import pytest
import torch

from conftest import ulp, within_float32_contract
from graft.engine.errors import NonFiniteError
from graft.engine.kernel import ChunkKernel, check_finite, first_nonfinite


def ref(t: torch.Tensor, f: torch.Tensor, b: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    return (t.double() + alpha * (f.double() - b.double())).to(dtype)


def operands(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g, dtype=torch.float64) * torch.logspace(-6, 4, n, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    # Near-cancellation: finetuned barely differs from base in a third of the elements.
    f = torch.where(torch.arange(n) % 3 == 0, b * (1 + 1e-7), torch.randn(n, generator=g, dtype=torch.float64))
    return t, f, b


DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("alpha", [1.0, 0.5, -1.3])
@pytest.mark.parametrize("ft_dtype", [None, torch.float32])
def test_float64_compute_is_bit_identical_to_the_reference(out_dtype, alpha, ft_dtype):
    t, f, b = operands(20_000, 1)
    t, b = t.to(out_dtype), b.to(out_dtype)
    f = f.to(ft_dtype or out_dtype)
    out = torch.empty_like(t)
    ChunkKernel("float64", 20_000).combine(t, f, b, alpha, out)
    assert torch.equal(out, ref(t, f, b, alpha, out_dtype))


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("alpha", [1.0, 0.5, -1.3])
def test_float32_compute_is_within_float32_evaluation_error(out_dtype, alpha):
    t, f, b = (x.to(out_dtype) for x in operands(20_000, 2))
    out = torch.empty_like(t)
    ChunkKernel("float32", 20_000).combine(t, f, b, alpha, out)
    assert bool(within_float32_contract(out, t, f, b, alpha).all())


def test_the_float32_contract_can_fail():
    t = torch.ones(3, dtype=torch.bfloat16)
    f, b = torch.zeros(3, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.bfloat16)
    ok = torch.ones(3, dtype=torch.bfloat16)
    assert bool(within_float32_contract(ok, t, f, b, 1.0).all())
    one_ulp_off = ok + float(ulp(torch.ones(1), torch.bfloat16))
    assert bool(within_float32_contract(one_ulp_off.to(torch.bfloat16), t, f, b, 1.0).all())
    two_ulps_off = (ok.double() + 2 * ulp(torch.ones(1), torch.bfloat16)).to(torch.bfloat16)
    assert not bool(within_float32_contract(two_ulps_off, t, f, b, 1.0).any())


def test_buffers_are_reused_for_shorter_chunks():
    k = ChunkKernel("float32", 100)
    for n in (100, 7, 0, 33):
        t, f, b = (x.to(torch.bfloat16) for x in operands(n, n))
        out = torch.empty_like(t)
        k.combine(t, f, b, 1.0, out)
        assert torch.equal(out, ref(t, f, b, 1.0, torch.bfloat16))


def test_first_nonfinite_finds_nan_and_inf():
    x = torch.zeros(10, dtype=torch.bfloat16)
    assert first_nonfinite(x) is None
    x[7] = float("inf")
    x[4] = float("nan")
    assert first_nonfinite(x) == 4
    fp8 = torch.zeros(4).to(torch.float8_e5m2)
    fp8[2] = float("inf")
    assert first_nonfinite(fp8) == 2


def test_check_finite_names_the_tensor_and_the_global_element_index():
    x = torch.zeros(5)
    x[1] = float("-inf")
    with pytest.raises(NonFiniteError, match=r"'w' in s\.safetensors: -inf at element 101.*allow_nonfinite"):
        check_finite(x, "w", "s.safetensors", 100)
