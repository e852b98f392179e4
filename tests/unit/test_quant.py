"""Recognizing how a checkpoint stores its weights, from config.json *and* the tensors: block FP8 and
compressed-tensors FP8 are understood; every other quantization is refused before any data moves,
naming the checkpoint, the method, an example tensor and what to do. Planning matches logical
tensors across formats and keeps config.json's quantization_config true to the output."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from graft.engine.formats.checkpoint import open_checkpoint
from graft.engine.errors import PlanError, QuantizationError
from graft.engine.plan.planner import QUANT_KEY, make_plan
from graft.engine.plan.quant import layout_of, read_scheme
from graft.engine.plan.specfile import spec_from_mapping

ROLES = ("target", "finetuned", "base")
F8 = torch.float8_e4m3fn
BLOCK_FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [16, 16]}


def ct_config(strategy: str = "channel", fmt: str = "float-quantized", kind: str = "float", bits: int = 8,
              block: list | None = None, **extra) -> dict:
    weights = {"num_bits": bits, "type": kind, "strategy": strategy, "symmetric": True, "dynamic": False,
               "block_structure": block}
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "format": fmt}},
            "ignore": ["lm_head"], **extra}


def write(directory, tensors: dict[str, torch.Tensor], qc: dict | None = None) -> str:
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": "llama", **({QUANT_KEY: qc} if qc is not None else {})}
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


def layout(path: str, role: str = "base"):  # noqa: ANN201
    ckpt = open_checkpoint(path)
    config = json.loads((open(os.path.join(path, "config.json")).read()))
    return layout_of(ckpt, read_scheme(config, f"{role} ({ckpt.uri})", ckpt.tensors), role)


def refusal(path: str) -> str:
    with pytest.raises(QuantizationError) as caught:
        layout(path)
    msg = str(caught.value)
    assert "\n" not in msg and f"base ({path})" in msg
    return msg


def norm() -> dict[str, torch.Tensor]:
    return {"model.norm.weight": torch.ones(32, dtype=torch.bfloat16)}


def fp8_weights(rows: int = 40, cols: int = 32, scale_shape: tuple = (3, 2), suffix: str = "_scale_inv",
                scale_dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {"model.layers.0.mlp.up_proj.weight": torch.randn(rows, cols).to(F8),
            "model.layers.0.mlp.up_proj.weight" + suffix: torch.rand(scale_shape).to(scale_dtype),
            **norm()}


# --- what is refused -----------------------------------------------------------------------------

REFUSED = {
    "gptq": ({"quant_method": "gptq", "bits": 4, "group_size": 128},
             {"m.q_proj.qweight": torch.zeros(4, 32, dtype=torch.int32), "m.q_proj.qzeros": torch.zeros(1, 4, dtype=torch.int32),
              "m.q_proj.scales": torch.ones(1, 32, dtype=torch.float16), "m.q_proj.g_idx": torch.zeros(32, dtype=torch.int32)},
             "GPTQ (quant_method 'gptq')", "m.q_proj.qweight"),
    "awq": ({"quant_method": "awq", "bits": 4, "version": "gemm"},
            {"m.q_proj.qweight": torch.zeros(32, 4, dtype=torch.int32), "m.q_proj.scales": torch.ones(1, 32, dtype=torch.float16)},
            "AWQ", "m.q_proj.qweight"),
    "bitsandbytes-4bit": ({"quant_method": "bitsandbytes", "load_in_4bit": True},
                          {"m.q_proj.weight": torch.zeros(512, 1, dtype=torch.uint8),
                           "m.q_proj.weight.absmax": torch.ones(16), "m.q_proj.weight.quant_map": torch.ones(16)},
                          "bitsandbytes", "m.q_proj.weight"),
    "bitsandbytes-8bit": ({"quant_method": "bitsandbytes", "load_in_8bit": True},
                          {"m.q_proj.weight": torch.zeros(32, 32, dtype=torch.int8), "m.q_proj.SCB": torch.ones(32)},
                          "bitsandbytes", "m.q_proj.weight"),
    "hqq": ({"quant_method": "hqq"}, {"m.q_proj.W_q": torch.zeros(16, 32, dtype=torch.uint8)}, "HQQ", "m.q_proj.W_q"),
    "eetq": ({"quant_method": "eetq"}, {"m.q_proj.weight": torch.zeros(32, 32, dtype=torch.int8),
                                        "m.q_proj.weight_scales": torch.ones(32, dtype=torch.float16)},
             "EETQ", "m.q_proj.weight"),
    "mxfp4": ({"quant_method": "mxfp4"}, {"m.experts.gate_up_proj_blocks": torch.zeros(2, 8, 1, 16, dtype=torch.uint8),
                                          "m.experts.gate_up_proj_scales": torch.zeros(2, 8, 1, dtype=torch.uint8)},
              "MXFP4", "m.experts.gate_up_proj_blocks"),
    "nvfp4-modelopt": ({"quant_method": "modelopt", "quant_algo": "NVFP4"},
                       {"m.q_proj.weight": torch.zeros(32, 16, dtype=torch.uint8),
                        "m.q_proj.weight_scale": torch.ones(32, 2).to(F8), "m.q_proj.weight_scale_2": torch.ones(())},
                       "NVIDIA ModelOpt", "m.q_proj.weight"),
    "ct-int8-w8a8": (ct_config("channel", "int-quantized", "int", 8),
                     {"m.q_proj.weight": torch.zeros(32, 32, dtype=torch.int8), "m.q_proj.weight_scale": torch.ones(32, 1)},
                     "int8 W8A8 (compressed-tensors int-quantized)", "m.q_proj.weight"),
    "ct-w4a16-packed": (ct_config("group", "pack-quantized", "int", 4),
                        {"m.q_proj.weight_packed": torch.zeros(32, 4, dtype=torch.int32),
                         "m.q_proj.weight_scale": torch.ones(32, 1, dtype=torch.bfloat16)},
                        "packed integer weights (compressed-tensors pack-quantized", "m.q_proj.weight_packed"),
    "ct-nvfp4": (ct_config("tensor_group", "nvfp4-pack-quantized", "float", 4),
                 {"m.q_proj.weight_packed": torch.zeros(32, 16, dtype=torch.uint8),
                  "m.q_proj.weight_global_scale": torch.ones(1)},
                 "NVFP4 (compressed-tensors", "m.q_proj.weight_packed"),
    "unknown-method": ({"quant_method": "zqlm-9000"}, {"m.q_proj.weight": torch.zeros(32, 32, dtype=torch.bfloat16)},
                       "an unknown method (quant_method 'zqlm-9000')", "m.q_proj.weight"),
    "fp8-ue8m0-scales-as-bytes": ({**BLOCK_FP8, "scale_fmt": "ue8m0"}, fp8_weights(scale_dtype=torch.uint8),
                                  "FP8 with U8 scales", "model.layers.0.mlp.up_proj.weight_scale_inv"),
    "fp8-unknown-scale-format": ({**BLOCK_FP8, "scale_fmt": "e8m0_packed"}, fp8_weights(),
                                 "FP8 with e8m0_packed scales", "model.layers.0.mlp.up_proj.weight"),
    # Found from the tensors alone, without any config.json quantization_config:
    "packed-ints-without-config": (None, {"m.q_proj.qweight": torch.zeros(4, 32, dtype=torch.int32)},
                                   "packed integer weights (GPTQ / AWQ layout)", "m.q_proj.qweight"),
    "int8-weight-without-config": (None, {"m.q_proj.weight": torch.zeros(32, 32, dtype=torch.int8)},
                                   "integer weights (I8", "m.q_proj.weight"),
    "mx-scales-without-config": (None, {"m.q_proj.weight": torch.zeros(32, 32, dtype=torch.bfloat16),
                                        "m.q_proj.weight_scale": torch.zeros(32, 1).to(torch.float8_e8m0fnu)},
                                 "microscaling (MX) block scales (F8_E8M0)", "m.q_proj.weight_scale"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_every_other_quantization_is_refused_naming_method_example_and_the_way_out(tmp_path, case):
    qc, tensors, method, example = REFUSED[case]
    msg = refusal(write(tmp_path / "base", {**tensors, **norm()}, qc))
    assert f"is quantized with {method}" in msg, msg
    assert example in tensors and any(f"e.g. tensor {n!r}" in msg for n in tensors), msg
    assert "use the unquantized release of this model, or dequantize it first" in msg


def test_fp8_codes_with_a_scale_but_no_config_are_never_taken_for_plain_values(tmp_path):
    msg = refusal(write(tmp_path / "base", fp8_weights(), None))
    assert "'model.layers.0.mlp.up_proj.weight' is F8_E4M3 but config.json declares no quantization_config" in msg
    assert "add the checkpoint's config.json" in msg


@pytest.mark.parametrize("tensors,qc,expected", [
    ({"m.w": torch.randn(32, 32).to(F8), **norm()}, BLOCK_FP8, "FP8 tensor 'm.w' has no scale tensor 'm.w_scale_inv'"),
    (fp8_weights(scale_shape=(2, 2)), BLOCK_FP8, "of shape [2, 2] for codes of shape [40, 32] matches none"),
    (fp8_weights(scale_shape=(40, 2)), ct_config("channel"), "no scale tensor"),  # CT names it weight_scale
    (fp8_weights(scale_shape=(3, 2), suffix="_scale"), ct_config("channel"), "matches none of the declared"),
    ({"m.w": torch.randn(32).to(F8), "m.w_scale_inv": torch.ones(1), **norm()}, BLOCK_FP8, "decodes scaled FP8 only for non-empty 2-D"),
    ({"m.weight": torch.randn(8, 8).bfloat16(), "m.weight_scale_inv": torch.ones(1, 1), **fp8_weights()}, BLOCK_FP8,
     "'m.weight_scale_inv' looks like a scale tensor but there is no FP8 tensor 'm.weight'"),
    (norm(), BLOCK_FP8, "declares quant_method fp8 but no tensor is FP8"),
], ids=["no-scale", "wrong-block", "ct-suffix", "wrong-channel", "1-d", "orphan-scale", "nothing-quantized"])
def test_fp8_tensors_that_disagree_with_their_config_are_refused(tmp_path, tensors, qc, expected):
    assert expected in refusal(write(tmp_path / "base", tensors, qc))


# --- what is understood --------------------------------------------------------------------------

def test_block_fp8_weights_are_one_logical_tensor_with_their_clipped_block(tmp_path):
    lay = layout(write(tmp_path / "base", fp8_weights(40, 32, (3, 2)), BLOCK_FP8))
    assert set(lay.tensors) == {"model.layers.0.mlp.up_proj.weight", "model.norm.weight"}
    w = lay.tensors["model.layers.0.mlp.up_proj.weight"]
    assert w.scales.name == "model.layers.0.mlp.up_proj.weight_scale_inv" and w.block == (16, 16)
    assert lay.tensors["model.norm.weight"].scales is None
    assert "F8_E4M3 codes, F32 scales 16x16 block): 1 quantized + 1 plain" in lay.describe()


def test_ue8m0_block_fp8_with_float_scales_is_understood_and_its_output_keeps_power_of_two_scales(tmp_path):
    lay = layout(write(tmp_path / "base", fp8_weights(40, 32, (3, 2)), {**BLOCK_FP8, "scale_fmt": "ue8m0"}))
    assert lay.scheme.pow2 and "F32 scales (powers of two, ue8m0) 16x16 block" in lay.describe()


@pytest.mark.parametrize("strategy,scale_shape,block", [
    ("tensor", (), (40, 32)), ("tensor", (1,), (40, 32)), ("channel", (40, 1), (1, 32)),
    ("block", (2, 1), (32, 32))])
def test_compressed_tensors_scales_per_tensor_channel_and_block(tmp_path, strategy, scale_shape, block):
    qc = ct_config(strategy, block=[32, 64] if strategy == "block" else None)
    tensors = {**fp8_weights(40, 32, scale_shape, "_scale", torch.bfloat16),
               "model.layers.0.mlp.up_proj.input_scale": torch.ones(1, dtype=torch.bfloat16)}
    lay = layout(write(tmp_path / "base", tensors, qc))
    assert lay.tensors["model.layers.0.mlp.up_proj.weight"].block == block
    assert set(lay.activation_scales) == {"model.layers.0.mlp.up_proj.input_scale"}
    assert "model.layers.0.mlp.up_proj.input_scale" not in lay.tensors


# Per-tensor / per-channel FP8 as released on the Hub (tests/quantized.py::save_scaled_fp8 writes
# whole checkpoints in these layouts; the config blocks here are theirs).
AUTOFP8 = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}
MODELOPT = {"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "FP8",
            "exclude_modules": ["lm_head"], "producer": {"name": "modelopt", "version": "0.29.0"}}


def fbgemm_config() -> dict:
    from transformers import FbgemmFp8Config

    return json.loads(json.dumps(FbgemmFp8Config(modules_to_not_convert=["lm_head"]).to_dict()))


def transformers_per_tensor_config() -> dict:
    from transformers import FineGrainedFP8Config

    return json.loads(json.dumps(FineGrainedFP8Config(weight_block_size=None, activation_scheme="static").to_dict()))


UP = "model.layers.0.mlp.up_proj."


@pytest.mark.parametrize("qc,suffix,scale_shape,block,activations", [
    (AUTOFP8, "_scale", (), (40, 32), ["input_scale"]),
    ({**AUTOFP8, "activation_scheme": "dynamic"}, "_scale", (), (40, 32), []),
    (MODELOPT, "_scale", (), (40, 32), ["input_scale", "k_scale"]),
    ({"quant_method": "modelopt", "quantization": {"quant_algo": "FP8"}}, "_scale", (), (40, 32), ["input_scale"]),
    ("fbgemm", "_scale", (40, 1), (1, 32), []),
    ("transformers", "_scale_inv", (), (40, 32), ["activation_scale"]),
], ids=["autofp8-static", "autofp8-dynamic", "modelopt", "modelopt-nested", "fbgemm", "transformers-per-tensor"])
def test_per_tensor_and_per_channel_fp8_releases_are_understood(tmp_path, qc, suffix, scale_shape, block, activations):
    qc = fbgemm_config() if qc == "fbgemm" else transformers_per_tensor_config() if qc == "transformers" else qc
    tensors = {**fp8_weights(40, 32, scale_shape, suffix), **{UP + a: torch.tensor(0.5) for a in activations}}
    lay = layout(write(tmp_path / "base", tensors, qc))
    w = lay.tensors[UP + "weight"]
    assert w.scales.name == UP + "weight" + suffix and w.block == block
    assert set(lay.activation_scales) == {UP + a for a in activations}
    assert set(lay.tensors) == {UP + "weight", "model.norm.weight"}


@pytest.mark.parametrize("tensors,qc,expected", [
    (fp8_weights(40, 32, (), "_scale"), {**MODELOPT, "quant_algo": "W4A8_AWQ"},
     "is quantized with NVIDIA ModelOpt W4A8_AWQ (quant_method 'modelopt', quant_algo 'W4A8_AWQ'; graft reads its quant_algo FP8 only)"),
    (fp8_weights(40, 32, (), "_scale"), "fbgemm", "of shape [] for codes of shape [40, 32] matches none of the declared scale granularities (channel)"),
    (fp8_weights(40, 32, (40, 1), "_scale"), MODELOPT, "matches none of the declared scale granularities (tensor)"),
], ids=["modelopt-other-algo", "fbgemm-per-tensor-scale", "modelopt-per-channel-scale"])
def test_fp8_releases_in_a_layout_other_than_their_method_declares_are_refused(tmp_path, tensors, qc, expected):
    qc = fbgemm_config() if qc == "fbgemm" else qc
    assert expected in refusal(write(tmp_path / "base", tensors, qc))


def test_fp8_declared_only_in_modelopts_hf_quant_config_is_refused_saying_how_to_declare_it(tmp_path):
    path = write(tmp_path / "base", fp8_weights(40, 32, (), "_scale"), None)
    (tmp_path / "base" / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8"}}))
    msg = refusal(path)
    assert "declared only in hf_quant_config.json (an older NVIDIA ModelOpt export)" in msg
    assert "\"quant_method\": \"modelopt\"" in msg


# --- planning across formats ---------------------------------------------------------------------

def trio(tmp_path, target_qc=BLOCK_FP8, finetuned_qc=None) -> dict[str, str]:
    def ckpt(role, qc):  # noqa: ANN001, ANN202
        if qc is None:
            return write(tmp_path / role, {"model.layers.0.mlp.up_proj.weight": torch.randn(40, 32).bfloat16(),
                                           **norm()})
        return write(tmp_path / role, fp8_weights(), qc)
    return {"target": ckpt("target", target_qc), "finetuned": ckpt("finetuned", finetuned_qc),
            "base": ckpt("base", BLOCK_FP8)}


def plan(paths: dict[str, str], **extra):  # noqa: ANN201
    spec = spec_from_mapping({**paths, "output": "/nonexistent/out", **extra})
    checkpoints = {r: open_checkpoint(paths[r]) for r in ROLES}
    return make_plan(spec, checkpoints, {r: checkpoints[r].read_json("config.json") for r in ROLES})


def test_an_fp8_target_and_base_with_a_bf16_finetune_plan_one_task_per_logical_tensor(tmp_path):
    p = plan(trio(tmp_path))
    (shard,) = p.shards
    w = next(t for t in shard.tensors if t.name.endswith("up_proj.weight"))
    assert w.combine and w.transcodes and w.dtype == "F8_E4M3"
    (term,) = w.terms
    assert w.target.scales and term.base.scales and term.finetuned.scales is None and term.finetuned.dtype == "BF16"
    assert w.scales.name == "model.layers.0.mlp.up_proj.weight_scale_inv" and w.scales.block == (16, 16)
    # The scale tensor is written right after its codes and is in the index.
    names = [n for n, _, _ in shard.header_tensors()]
    assert names.index(w.scales.name) == names.index(w.name) + 1
    assert p.weight_map()[w.scales.name] == shard.file
    assert (p.combined, p.copied) == (2, 0)
    assert dict(p.formats)["output"].startswith("FP8 like the target")
    assert not [s for s in p.side_files if s.patch]  # the target's config.json already says so


def test_output_format_bf16_writes_plain_bf16_and_removes_quantization_config(tmp_path):
    p = plan(trio(tmp_path), output_format="bf16")
    tasks = {t.name: t for s in p.shards for t in s.tensors}
    assert all(t.scales is None for t in tasks.values())
    assert tasks["model.layers.0.mlp.up_proj.weight"].dtype == "BF16"
    (config,) = [s for s in p.side_files if s.name == "config.json"]
    assert config.patch == ((QUANT_KEY, None),)


def test_a_config_donated_by_a_bf16_finetune_gets_the_fp8_targets_quantization_config(tmp_path):
    paths = trio(tmp_path)
    p = plan(paths, files={"config.json": "finetuned"})
    (config,) = [s for s in p.side_files if s.name == "config.json"]
    assert config.donor == "finetuned" and json.loads(dict(config.patch)[QUANT_KEY]) == BLOCK_FP8


def test_every_refused_checkpoint_of_a_trio_is_listed(tmp_path):
    paths = trio(tmp_path)
    for role in ("finetuned", "base"):
        write(tmp_path / role, {"m.q_proj.qweight": torch.zeros(4, 32, dtype=torch.int32), **norm()},
              {"quant_method": "gptq"})
    with pytest.raises(QuantizationError) as caught:
        plan(paths)
    assert [p.split(" ", 1)[0] for p in caught.value.problems] == ["finetuned", "base"]
    assert "and 1 more problem" in str(caught.value)


def test_a_donated_hf_quant_config_is_refused_unless_the_output_is_the_modelopt_targets_format(tmp_path):
    paths = {role: write(tmp_path / role, fp8_weights(40, 32, (), "_scale"), MODELOPT) for role in ROLES}
    (tmp_path / "target" / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "FP8"}}))
    files = {"hf_quant_config.json": "target"}
    assert [s.name for s in plan(paths, files=files).side_files] == ["config.json", "hf_quant_config.json"]
    with pytest.raises(PlanError, match=r"hf_quant_config.json is donated by target, but it declares NVIDIA "
                                        r"ModelOpt weights and the output's are plain; leave it out"):
        plan(paths, files=files, output_format="bf16")


def test_the_rows_of_a_resized_fp8_tensor_carry_their_own_scales():
    from graft.engine.plan.tasks import Scales

    per_tensor = Scales("h_scale", "F32", (), (40, 32), file="f", begin=100, end=104)
    assert per_tensor.rows(24, 16, 32) == Scales("h_scale", "F32", (), (16, 32), file="f", begin=100, end=104)
    per_channel = Scales("h_scale", "BF16", (40, 1), (1, 32), file="f", begin=100, end=180)
    assert per_channel.rows(24, 16, 32) == Scales("h_scale", "BF16", (16, 1), (1, 32), file="f", begin=148, end=180)
    blocks = Scales("h_scale_inv", "F32", (3, 2), (16, 16), file="f", begin=100, end=124)
    assert blocks.splits_at(32) and not blocks.splits_at(40)
    assert blocks.rows(32, 8, 32) == Scales("h_scale_inv", "F32", (1, 2), (8, 16), file="f", begin=116, end=124)


def test_a_resized_fp8_vocabulary_split_inside_a_scale_block_is_refused(tmp_path):
    def head(rows: int) -> dict[str, torch.Tensor]:
        return {"lm_head.weight": torch.randn(rows, 32).to(F8), "lm_head.weight_scale_inv": torch.rand(3, 2), **norm()}

    # The fine-tune's new rows start at row 40, inside its 16-row blocks (rows 32..47).
    paths = {role: write(tmp_path / role, head(48 if role == "finetuned" else 40), BLOCK_FP8) for role in ROLES}
    with pytest.raises(PlanError, match=r"tensor 'lm_head.weight': vocab: pad takes rows from row 40 of finetuned "
                                        r"\(.*\), inside one of its 16-row FP8 scale blocks, which graft does not "
                                        r"split; use an unquantized release of finetuned"):
        plan(paths, vocab="pad", output_format="bf16")
