"""Quantized checkpoints end to end: FP8 trios (block FP8, compressed-tensors per-tensor / per-channel /
block, mixed with BF16) transfer on real values into the target's format, bit-identical to the
rule of docs/quantized.md in float64; transformers (and compressed-tensors) load the output; every other
quantization is refused by ``graft plan`` and ``graft run`` before anything is written."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from quantized import (SCALED_FP8, TORCH, block_of, dequantize, llama_weights, quant_config, quantize_blocks,
                       read_tensors, real_values, save_block_fp8, save_compressed_tensors, save_plain,
                       save_scaled_fp8, scale_suffix)
from graft.engine.errors import PlanError, QuantizationError
from graft.engine.run.job import prepare_job
from graft.engine.run.local import run_local
from graft.engine.formats.manifest import MANIFEST_NAME, verify_output
from graft.engine.plan.specfile import spec_from_mapping

ROLES = ("target", "finetuned", "base")


def spec(paths: dict[str, str], out: str, **extra):  # noqa: ANN201
    return spec_from_mapping({**paths, "output": out, **extra})


def expected(paths: dict[str, str], alpha: float) -> dict[str, torch.Tensor]:
    """W = t + alpha (f - b) per logical tensor, in float64, from each input's real values."""
    t, f, b = (real_values(paths[r]) for r in ROLES)
    return {name: tt + alpha * (f[name] - b[name]) for name, tt in t.items()}


def assert_follows_the_rule(paths: dict[str, str], out: str, alpha: float,
                            want: dict[str, torch.Tensor] | None = None) -> int:
    """float64 contract: FP8 outputs are the reference rule's codes and scales bit for bit, plain
    outputs the reference cast (of ``want``, else of ``expected``). Returns how many tensors were FP8."""
    got = read_tensors(out)
    qc, suffix = quant_config(out), scale_suffix(out)
    quantized = 0
    for name, w in (want if want is not None else expected(paths, alpha)).items():
        if qc and name + suffix in got:
            scales = got[name + suffix]
            codes, want = quantize_blocks(w, block_of(got[name], scales, qc), got[name].dtype, scales.dtype)
            assert torch.equal(got[name].view(torch.uint8), codes.view(torch.uint8)), name
            assert torch.equal(scales, want.reshape(scales.shape)), name
            quantized += 1
        else:
            assert torch.equal(got[name], w.to(got[name].dtype)), name
    return quantized


def test_block_fp8_target_and_base_with_a_bf16_finetune_is_bit_identical_to_the_rule(fp8_trio, tmp_path):
    out = str(tmp_path / "out")
    job = prepare_job(spec(fp8_trio, out, compute_dtype="float64", alpha=0.7, chunk_size=96 * 8 * 40))
    result = run_local(job, workers=2)
    assert assert_follows_the_rule(fp8_trio, out, 0.7) == 14
    assert verify_output(out).ok
    # Streaming: the 160-row weights went through in several chunks of whole 32-row block rows, and
    # every input byte (codes and scales) was read once.
    inputs = sum(t.nbytes for c in job.checkpoints.values() for t in c.tensors.values())
    assert sum(r.bytes_read for r in result.results) == job.plan.read_bytes == inputs
    # The output has the target's format: its config, its scale tensors, each right after its codes.
    assert quant_config(out) == quant_config(fp8_trio["target"])
    assert set(read_tensors(out)) == set(read_tensors(fp8_trio["target"]))
    manifest = json.load(open(os.path.join(out, MANIFEST_NAME)))
    formats = manifest["plan"]["formats"]
    assert "F8_E4M3 codes, F32 scales 32x32 block" in formats["target"] and formats["finetuned"].startswith("plain")


def test_two_diffs_over_fp8_checkpoints_follow_the_rule_and_read_each_input_once(fp8_trio, tmp_path):
    # The second diff swaps the first's checkpoints: FP8 codes as its fine-tune, bf16 as its base.
    out = str(tmp_path / "out")
    diffs = [{"finetuned": fp8_trio["finetuned"], "base": fp8_trio["base"], "alpha": 0.7},
             {"finetuned": fp8_trio["base"], "base": fp8_trio["finetuned"], "alpha": 0.25}]
    job = prepare_job(spec_from_mapping({"target": fp8_trio["target"], "diffs": diffs, "output": out,
                                         "compute_dtype": "float64", "chunk_size": 96 * 8 * 40}))
    result = run_local(job, workers=2)
    t, f, b = (real_values(fp8_trio[r]) for r in ROLES)
    want = {n: (0.7 * (f[n] - b[n]) + 0.25 * (b[n] - f[n])) + tt for n, tt in t.items()}
    assert assert_follows_the_rule(fp8_trio, out, 0.0, want) == 14
    inputs = sum(t.nbytes for c in {id(c): c for c in job.checkpoints.values()}.values() for t in c.tensors.values())
    assert sum(r.bytes_read for r in result.results) == job.plan.read_bytes == inputs
    assert verify_output(out).ok


def test_a_diff_of_fp8_checkpoints_gives_the_three_checkpoint_bits_on_an_fp8_target(fp8_trio, tmp_path):
    from conftest import shard_bytes

    delta, three, two = (str(tmp_path / n) for n in ("delta", "three", "two"))
    made = run_local(spec_from_mapping({"finetuned": fp8_trio["finetuned"], "base": fp8_trio["base"],
                                        "output": delta, "chunk_size": 96 * 8 * 40}, kind="diff"), workers=2)
    f, b = (real_values(fp8_trio[r]) for r in ("finetuned", "base"))
    stored = read_tensors(delta)
    for name, d in stored.items():  # the float32 difference of the real (dequantized) values
        assert d.dtype == torch.float32 and torch.equal(d, f[name].float() - b[name].float()), name
    assert quant_config(delta) is None  # its config.json no longer describes FP8 weights
    assert made.manifest["diff"]["unmeasured"] and not made.manifest["diff"]["float64_exact"]
    run_local(spec(fp8_trio, three, alpha=0.7))
    run_local(spec_from_mapping({"target": fp8_trio["target"], "diff": delta, "alpha": 0.7, "output": two}))
    assert shard_bytes(two) == shard_bytes(three)


def test_a_ue8m0_target_gets_power_of_two_scales_by_the_rule(fp8_trio, tmp_path):
    """DeepSeek-V3.1-style targets (scale_fmt ue8m0): power-of-two scales, bit-identical to the rule."""
    target = save_block_fp8(llama_weights(4, llama_weights(0)), str(tmp_path / "target"), pow2=True)
    paths = dict(fp8_trio, target=target)
    out = str(tmp_path / "out")
    run_local(spec(paths, out, compute_dtype="float64", alpha=0.7, chunk_size=96 * 8 * 40))
    got, qc = read_tensors(out), quant_config(out)
    assert qc["scale_fmt"] == "ue8m0"
    for name, w in expected(paths, 0.7).items():
        if name + "_scale_inv" in got:
            codes, scales = quantize_blocks(w, block_of(got[name], got[name + "_scale_inv"], qc), pow2=True)
            assert torch.equal(got[name].view(torch.uint8), codes.view(torch.uint8)), name
            assert torch.equal(got[name + "_scale_inv"], scales), name
            assert bool((torch.frexp(scales)[0] == 0.5).all()), name


def test_float32_arithmetic_is_within_one_e4m3_rounding_of_the_float64_result(fp8_trio, tmp_path):
    out = str(tmp_path / "out")
    run_local(spec(fp8_trio, out, alpha=0.7, chunk_size=96 * 4 * 40))
    got, qc = read_tensors(out), quant_config(out)
    t, f, b = (real_values(fp8_trio[r]) for r in ROLES)
    for name, w in expected(fp8_trio, 0.7).items():
        if name + "_scale_inv" not in got:
            continue
        scales = got[name + "_scale_inv"]
        block = block_of(got[name], scales, qc)
        real = dequantize(got[name], scales, block)
        s = scales.double().repeat_interleave(block[0], 0)[:w.shape[0]].repeat_interleave(block[1], 1)[:, :w.shape[1]]
        step = torch.exp2(torch.floor(torch.log2((w.abs() / s).clamp(min=2**-6))) - 3)  # one E4M3 spacing
        slack = 2.0**-22 * (t[name].abs() + 0.7 * (f[name].abs() + b[name].abs()))  # float32 evaluation
        assert bool(((real - w).abs() <= step * s + slack).all()), name


def test_transformers_loads_the_fp8_output_with_the_weights_graft_wrote(fp8_trio, tmp_path):
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "out")
    run_local(spec(fp8_trio, out))
    model = AutoModelForCausalLM.from_pretrained(out)  # no GPU: transformers dequantizes to bf16
    got = read_tensors(out)
    w = "model.layers.1.mlp.down_proj.weight"
    real = dequantize(got[w], got[w + "_scale_inv"], (32, 32))
    assert torch.equal(model.get_parameter(w).detach(), real.to(torch.bfloat16))
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()


@pytest.mark.parametrize("preset", ["FP8_DYNAMIC", "FP8", "FP8_BLOCK"])
def test_compressed_tensors_trios_from_the_real_writer_transfer_bit_identically(ct_trio, tmp_path, preset):
    from transformers import AutoModelForCausalLM

    paths = ct_trio(preset)
    out = str(tmp_path / "out")
    # 10 rows a chunk: a per-tensor scale (FP8) needs its first pass over several chunks; computed
    # 4 at once, its chunks must all wait for that pass.
    job = prepare_job(spec(paths, out, compute_dtype="float64", alpha=0.7, chunk_size=96 * 8 * 10))
    result = run_local(job, threads=4)
    assert assert_follows_the_rule(paths, out, 0.7) == 14
    assert sum(r.bytes_read for r in result.results) == job.plan.read_bytes
    target, got = read_tensors(paths["target"]), read_tensors(out)
    carried = [n for n in got if n.endswith("input_scale")]
    assert bool(carried) == (preset == "FP8")  # static activation scales: the target's, unchanged
    assert all(torch.equal(got[n], target[n]) for n in carried)
    assert any("activation scale" in w for w in job.plan.warnings) == (preset == "FP8")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits.float()).all()


@pytest.fixture(scope="module")
def scaled_fp8_trio(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """``scaled_fp8_trio(layout)``: an FP8 target and base in one of ``quantized.SCALED_FP8`` (AutoFP8
    static / dynamic, ModelOpt FP8, FBGEMM FP8) with a bf16 fine-tune, built once per layout."""
    made: dict[str, dict[str, str]] = {}
    base = llama_weights(0)

    def make(layout: str) -> dict[str, str]:
        if layout not in made:
            root = tmp_path_factory.mktemp(layout)
            made[layout] = {"target": save_scaled_fp8(llama_weights(2, base), str(root / "target"), layout, 0.125),
                            "finetuned": save_plain(llama_weights(1, base), str(root / "finetuned")),
                            "base": save_scaled_fp8(base, str(root / "base"), layout)}
        return made[layout]
    return make


@pytest.mark.parametrize("layout", SCALED_FP8)
def test_autofp8_modelopt_and_fbgemm_trios_transfer_into_the_targets_layout_by_the_rule(scaled_fp8_trio, tmp_path,
                                                                                        layout):
    paths = scaled_fp8_trio(layout)
    out = str(tmp_path / "out")
    # 10 rows a chunk: the per-tensor scales need their first pass over several chunks (4 at once).
    job = prepare_job(spec(paths, out, compute_dtype="float64", alpha=0.7, chunk_size=96 * 8 * 10))
    run_local(job, threads=4)
    assert assert_follows_the_rule(paths, out, 0.7) == 14
    target, got = read_tensors(paths["target"]), read_tensors(out)
    assert {n: (t.dtype, t.shape) for n, t in got.items()} == {n: (t.dtype, t.shape) for n, t in target.items()}
    w = "model.layers.1.mlp.down_proj.weight"
    assert got[w + "_scale"].shape == ((96, 1) if layout == "fbgemm" else ())  # the target's granularity
    # Static activation (and ModelOpt's KV-cache) scales: the target's, unchanged, with the warning.
    carried = [n for n in got if n.endswith(("input_scale", "k_scale", "v_scale"))]
    assert bool(carried) == (layout in ("autofp8-static", "modelopt"))
    assert all(torch.equal(got[n], target[n]) for n in carried)
    assert any("activation scale" in m for m in job.plan.warnings) == bool(carried)
    assert quant_config(out) == quant_config(paths["target"])
    assert verify_output(out).ok


def test_a_modelopt_target_written_as_bf16_drops_its_scales_and_quantization_config(scaled_fp8_trio, tmp_path):
    paths = scaled_fp8_trio("modelopt")
    out = str(tmp_path / "out")
    run_local(spec(paths, out, compute_dtype="float64", alpha=0.7, output_format="bf16"))
    got = read_tensors(out)
    assert {t.dtype for t in got.values()} == {torch.bfloat16} and not [n for n in got if n.endswith("_scale")]
    for name, w in expected(paths, 0.7).items():
        assert torch.equal(got[name], w.to(torch.bfloat16)), name
    assert quant_config(out) is None and not os.path.exists(os.path.join(out, "hf_quant_config.json"))


def test_output_format_bf16_dequantizes_and_drops_quantization_config(ct_trio, tmp_path):
    from transformers import AutoModelForCausalLM

    paths = ct_trio("FP8")
    out = str(tmp_path / "out")
    result = run_local(spec(paths, out, compute_dtype="float64", output_format="bf16"))
    got = read_tensors(out)
    assert not [n for n in got if n.endswith(("_scale", "input_scale"))]
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    for name, w in expected(paths, 1.0).items():
        assert torch.equal(got[name], w.to(torch.bfloat16)), name
    assert quant_config(out) is None
    (config,) = [f for f in result.manifest["inputs"]["target"]["files"] if f["name"] == "config.json"]
    assert config["patched"] == {"quantization_config": None} and config["sha256_donated"] != config["sha256"]
    assert result.manifest["spec"]["output_format"] == "bf16"
    assert set(result.manifest["plan"]["left_out"]) >= {n for n in read_tensors(paths["target"]) if n.endswith("input_scale")}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.quantization_config is None if hasattr(model.config, "quantization_config") else True
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits.float()).all()


def test_a_bf16_target_with_fp8_inputs_of_other_formats_gets_plain_bf16(tmp_path):
    base = llama_weights(0)
    paths = {"target": save_plain(llama_weights(2, base), str(tmp_path / "t")),
             "finetuned": save_block_fp8(llama_weights(1, base), str(tmp_path / "f"), code=torch.float8_e5m2,
                                         scale_dtype=torch.bfloat16),
             "base": save_compressed_tensors(base, str(tmp_path / "b"), "FP8_DYNAMIC")}
    out = str(tmp_path / "out")
    run_local(spec(paths, out, compute_dtype="float64", chunk_size=96 * 8 * 7))
    assert assert_follows_the_rule(paths, out, 1.0) == 0
    assert quant_config(out) is None and not os.path.exists(os.path.join(out, "recipe.yaml"))


def test_an_fp8_target_with_a_config_donated_by_a_bf16_finetune_keeps_its_quantization_config(fp8_trio, tmp_path):
    out = str(tmp_path / "out")
    run_local(spec(fp8_trio, out, files={"config.json": "finetuned"}))
    assert quant_config(out) == quant_config(fp8_trio["target"])
    assert verify_output(out).ok


def test_a_resized_fp8_lm_head_is_refused_for_an_fp8_output_and_transfers_with_output_format_bf16(tmp_path):
    """The fine-tune added 8 tokens: its embeddings and LM head have 136 rows, FP8 like its base's
    and target's 128 (32x32 blocks). vocab: pad with an FP8 output is refused saying to write BF16;
    that hint works: the shared rows are decoded and transferred, the new rows are alpha * f."""
    base = llama_weights(0)
    grown = llama_weights(1, base)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        grown[name] = torch.cat([grown[name], 0.02 * torch.randn(8, 96, generator=torch.Generator().manual_seed(5))])
    paths = {"target": save_block_fp8(llama_weights(2, base), str(tmp_path / "t"), fp8_head=True),
             "finetuned": save_block_fp8(grown, str(tmp_path / "f"), fp8_head=True, vocab_size=136),
             "base": save_block_fp8(base, str(tmp_path / "b"), fp8_head=True)}
    out = str(tmp_path / "out")
    with pytest.raises(PlanError, match=r"tensor 'lm_head.weight': vocab: pad writes its rows in pieces, but the "
                                        r"target stores it as FP8.*use output_format: bf16"):
        prepare_job(spec(paths, out, vocab="pad", alpha=0.7))
    job = prepare_job(spec(paths, out, vocab="pad", alpha=0.7, compute_dtype="float64", output_format="bf16",
                           chunk_size=96 * 8 * 40))
    result = run_local(job)
    assert sum(r.bytes_read for r in result.results) == job.plan.read_bytes  # each piece reads its scale rows
    t, f, b = (real_values(paths[r]) for r in ROLES)
    got = read_tensors(out)
    assert {g.dtype for g in got.values()} == {torch.bfloat16} and quant_config(out) is None
    for name, ft in f.items():
        tt, bb = t[name], b[name]
        if ft.shape[0] > tt.shape[0]:  # the new rows count as zeros in the target and the base
            tt, bb = (torch.cat([x, x.new_zeros(ft.shape[0] - x.shape[0], x.shape[1])]) for x in (tt, bb))
        assert torch.equal(got[name], (tt + 0.7 * (ft - bb)).to(torch.bfloat16)), name
    assert got["lm_head.weight"].shape == (136, 96)
    assert json.load(open(os.path.join(out, "config.json")))["vocab_size"] == 136


# --- refused before anything moves ---------------------------------------------------------------

def _cli(*args: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graft.cluster.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_a_gptq_trio_is_refused_by_plan_and_run_with_one_line_and_nothing_written(tmp_path):
    from safetensors.torch import save_file

    paths = {}
    for role in ROLES:
        d = tmp_path / role
        d.mkdir()
        save_file({"model.layers.0.self_attn.q_proj.qweight": torch.zeros(12, 96, dtype=torch.int32),
                   "model.layers.0.self_attn.q_proj.qzeros": torch.zeros(1, 12, dtype=torch.int32),
                   "model.layers.0.self_attn.q_proj.scales": torch.ones(1, 96, dtype=torch.float16),
                   "model.layers.0.self_attn.q_proj.g_idx": torch.zeros(96, dtype=torch.int32),
                   "model.norm.weight": torch.ones(96, dtype=torch.float16)}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
            "quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}}))
        paths[role] = str(d)
    out = tmp_path / "out"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({**paths, "output": str(out)}))
    for command in (["plan", "job.yaml"], ["run", "job.yaml", "--executor", "local"]):
        proc = _cli(*command, cwd=str(tmp_path))
        assert proc.returncode == 3, proc.stderr  # refused
        lines = [line for line in proc.stderr.splitlines() if line.startswith("graft: error:")]
        assert lines and "is quantized with GPTQ (quant_method 'gptq'), e.g. tensor" in lines[0]
        assert "unquantized release" in lines[0]
        assert not out.exists()
    inspected = _cli("inspect", paths["base"], cwd=str(tmp_path))
    assert inspected.returncode == 0 and "stored as not transferable by graft:" in inspected.stdout
    assert "GPTQ" in inspected.stdout


def test_inspect_and_plan_say_how_each_checkpoint_stores_its_weights(fp8_trio, tmp_path):
    inspected = _cli("inspect", fp8_trio["target"], cwd=str(tmp_path))
    assert "stored as FP8 (quant_method fp8: F8_E4M3 codes, F32 scales 32x32 block): 14 quantized" in inspected.stdout
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({**fp8_trio, "output": str(tmp_path / "out"),
                                                       "output_format": "bf16"}))
    planned = _cli("plan", "job.yaml", "--json", cwd=str(tmp_path))
    assert planned.returncode == 0, planned.stderr
    summary = json.loads(planned.stdout)
    assert summary["formats"]["finetuned"] == "plain (21 tensors)"
    assert summary["formats"]["output"] == "plain (BF16)"
    assert summary["config_changes"] == {"config.json": {"quantization_config": None}}


@pytest.mark.parametrize("preset,what", [("W8A8", "int8 W8A8"), ("W4A16", "packed integer weights")])
def test_integer_compressed_tensors_checkpoints_from_the_real_writer_are_refused(tmp_path, preset, what):
    base = llama_weights(0)
    paths = {"target": save_plain(llama_weights(2, base), str(tmp_path / "t")),
             "finetuned": save_plain(llama_weights(1, base), str(tmp_path / "f")),
             "base": save_compressed_tensors(base, str(tmp_path / "b"), preset)}
    with pytest.raises(QuantizationError, match=what) as caught:
        prepare_job(spec(paths, str(tmp_path / "out")))
    assert str(caught.value).startswith(f"base ({paths['base']}) is quantized with")
    assert not os.path.exists(tmp_path / "out")


def test_scale_dtypes_the_codec_writes_are_the_ones_torch_knows():
    assert {TORCH[d] for d in ("F32", "BF16", "F16")} == {torch.float32, torch.bfloat16, torch.float16}
