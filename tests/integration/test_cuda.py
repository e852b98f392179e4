"""The CUDA path: runs wherever CUDA is present, skipped elsewhere. float64 on the GPU is
bit-identical to the CPU (and so to the float64 reference); float32 keeps the float32 contract."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from conftest import load_all, reference, within_float32_contract
from graft.engine.compute.kernel import ChunkKernel
from graft.engine.run.local import run_local
from graft.engine.plan.specfile import spec_from_mapping

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def spec(paths: dict[str, str], out: str, **extra):  # noqa: ANN201
    return spec_from_mapping({**paths, "output": out, **extra})


def shards(out: str) -> dict[str, bytes]:
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out)) if n.endswith(".safetensors")}


@pytest.mark.parametrize("compute_dtype", ["float64", "float32"])
def test_gpu_job_matches_cpu_job_byte_for_byte_in_float64(tiny_checkpoints, tmp_path, compute_dtype):
    cpu, gpu = str(tmp_path / "cpu"), str(tmp_path / "gpu")
    common = dict(compute_dtype=compute_dtype, alpha=0.7, chunk_size=4096)
    run_local(spec(tiny_checkpoints, cpu, **common))
    run_local(spec(tiny_checkpoints, gpu, **common), device="cuda", workers=2)
    t, f, b = (load_all(tiny_checkpoints[r]) for r in ("target", "finetuned", "base"))
    got = load_all(gpu)
    for name in t:
        if compute_dtype == "float64":
            assert torch.equal(got[name], reference(t[name], f[name], b[name], 0.7)), name
        else:
            assert bool(within_float32_contract(got[name], t[name], f[name], b[name], 0.7).all()), name
    if compute_dtype == "float64":
        assert shards(gpu) == shards(cpu)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_gpu_kernel_float64_equals_cpu_kernel_including_rounding_ties(out_dtype):
    g = torch.Generator().manual_seed(0)
    n = 1 << 20
    t = (torch.randn(n, generator=g, dtype=torch.float64) * 10).to(out_dtype)
    b = torch.randn(n, generator=g, dtype=torch.float64).to(torch.float32)
    f = b.double() + torch.randn(n, generator=g, dtype=torch.float64) * 1e-3
    # Values right next to rounding midpoints of the output dtype: where a cast that rounds once
    # and torch's float64 -> float32 -> narrow cast disagree.
    eps = torch.finfo(out_dtype).eps
    f[:4096] = b[:4096].double() + eps / 2 + 2.0**-40
    outs = {}
    for device in ("cpu", "cuda"):
        out = torch.empty(n, dtype=out_dtype, device=device)
        ChunkKernel("float64", n, device).combine(t.to(device), f.to(device), b.to(device), 0.7, out)
        outs[device] = out.cpu()
    assert torch.equal(outs["cuda"], outs["cpu"])
    assert torch.equal(outs["cpu"], reference(t, f, b, 0.7))


def test_gpu_run_of_a_tensor_much_larger_than_a_chunk(tmp_path):
    paths = {}
    for role, seed in (("target", 1), ("finetuned", 2), ("base", 3)):
        g = torch.Generator().manual_seed(seed)
        d = tmp_path / role
        d.mkdir()
        save_file({"w": torch.randn(3_000_001, generator=g).to(torch.bfloat16)}, str(d / "model.safetensors"))
        paths[role] = str(d)
    cpu, gpu = str(tmp_path / "cpu"), str(tmp_path / "gpu")
    run_local(spec(paths, cpu, compute_dtype="float64", chunk_size="1MiB"))
    run_local(spec(paths, gpu, compute_dtype="float64", chunk_size="1MiB"), device="cuda")
    assert shards(gpu) == shards(cpu)


@pytest.mark.parametrize("output_format", ["target", "bf16"])
def test_fp8_trios_on_the_gpu_are_the_cpus_bytes_in_float64(fp8_trio, ct_trio, tmp_path, output_format):
    """FP8 decode, combine and re-encode on the GPU give the CPU's codes and scales (the rule's), and
    a float32 run on the GPU commits a verified output."""
    from graft.engine.formats.manifest import verify_output

    for name, paths in (("block", fp8_trio), ("per-tensor", ct_trio("FP8")), ("channel", ct_trio("FP8_DYNAMIC"))):
        cpu, gpu, gpu32 = (str(tmp_path / f"{name}-{kind}") for kind in ("cpu", "gpu", "gpu32"))
        common = dict(alpha=0.7, chunk_size=96 * 8 * 10, output_format=output_format)
        run_local(spec(paths, cpu, compute_dtype="float64", **common))
        run_local(spec(paths, gpu, compute_dtype="float64", **common), device="cuda", workers=2)
        assert shards(gpu) == shards(cpu), name
        run_local(spec(paths, gpu32, **common), device="cuda")
        assert verify_output(gpu32).ok


def _handmade_lora(tmp_path) -> tuple[str, str]:  # noqa: ANN001
    """A target of three 2-D float32 weights and a LoRA adapter of two of them in PEFT's layout
    (written here: the GPU machine need not have peft), fan-in-fan-out (the change is (B.A)^T)."""
    import json

    g = torch.Generator().manual_seed(0)
    target, adapter = tmp_path / "target", tmp_path / "adapter"
    target.mkdir()
    adapter.mkdir()
    save_file({f"m{i}.weight": torch.randn(300, 200, generator=g) for i in range(3)}, str(target / "model.safetensors"))
    factors = {}
    for i, r in ((0, 8), (1, 5)):
        a, b = torch.randn(r, 300, generator=g), torch.randn(200, r, generator=g)
        factors[f"base_model.model.m{i}.lora_A.weight"], factors[f"base_model.model.m{i}.lora_B.weight"] = a, b
    save_file(factors, str(adapter / "adapter_model.safetensors"))
    json.dump({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "rank_pattern": {"m1": 5},
               "alpha_pattern": {}, "fan_in_fan_out": True}, open(adapter / "adapter_config.json", "w"))
    return str(target), str(adapter)


@pytest.mark.parametrize("compute_dtype", ["float64", "float32"])
def test_a_lora_adapter_on_the_gpu_writes_the_cpus_bytes(tmp_path, compute_dtype):
    target, adapter = _handmade_lora(tmp_path)
    cpu, gpu = str(tmp_path / "cpu"), str(tmp_path / "gpu")
    common = dict(target=target, diff=adapter, compute_dtype=compute_dtype, chunk_size=4000)
    run_local(spec_from_mapping({**common, "output": cpu}))
    run_local(spec_from_mapping({**common, "output": gpu}), device="cuda")
    if compute_dtype == "float64":
        assert shards(gpu) == shards(cpu)
    else:
        got, ref = load_all(gpu), load_all(cpu)
        for name in ref:
            assert torch.allclose(got[name], ref[name], rtol=1e-6, atol=1e-6), name
