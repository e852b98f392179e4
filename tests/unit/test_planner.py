"""Planning as a specification: a pure, deterministic function from the spec and three checkpoints'
headers to output shards (mirroring the target unless max_shard_size asks otherwise), copies vs
combined tensors, and a ``PlanError`` naming every tensor that cannot be combined.
"""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import save_file

from graft.engine.formats.checkpoint import INDEX_NAME, open_checkpoint
from graft.engine.errors import PlanError
from graft.engine.plan.planner import SideFile, make_plan
from graft.engine.formats.safetensors import build_header
from graft.engine.plan.specfile import spec_from_mapping

ROLES = ("target", "finetuned", "base")


def _weights(dtype=torch.bfloat16, seed=0, **extra) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    sd = {
        "model.embed_tokens.weight": torch.randn(32, 8),
        "model.layers.0.attn.weight": torch.randn(8, 8),
        "model.layers.0.mlp.weight": torch.randn(16, 8),
        "model.layers.1.attn.weight": torch.randn(8, 8),
        "model.layers.1.mlp.weight": torch.randn(16, 8),
        "model.norm.weight": torch.randn(8),
        "lm_head.weight": torch.randn(32, 8),
    }
    sd = {k: v.to(dtype) for k, v in sd.items()}
    sd.update(extra)
    return sd


def _single(directory, sd, name="model.safetensors", side=None) -> str:
    os.makedirs(directory, exist_ok=True)
    save_file(sd, str(directory / name), metadata={"format": "pt"})
    for fname, text in (side or {}).items():
        (directory / fname).write_text(text)
    return str(directory)


def _hub_sharded(directory, sd, max_shard_size=1200, side=None) -> str:
    os.makedirs(directory, exist_ok=True)
    save_torch_state_dict(sd, str(directory), max_shard_size=max_shard_size)
    for fname, text in (side or {}).items():
        (directory / fname).write_text(text)
    return str(directory)


def _open(paths: dict[str, str]):
    return {role: open_checkpoint(paths[role]) for role in ROLES}


def _spec(paths: dict[str, str], **extra):
    return spec_from_mapping({**paths, "output": "/nonexistent/graft-out", **extra})


def _plan(paths, configs=None, **extra):
    return make_plan(_spec(paths, **extra), _open(paths), configs)


@pytest.fixture
def ckpts(tmp_path) -> dict[str, str]:
    """target bf16 hub-sharded, finetuned float32 one file, base bf16 in other shards; all with
    one integer buffer."""
    ids = {"model.position_ids": torch.arange(8)}
    base = _weights(seed=1, **ids)
    half = len(base) // 2
    names = list(base)
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    save_file({k: base[k] for k in names[:half]}, str(base_dir / "part-1.safetensors"))
    save_file({k: base[k] for k in names[half:]}, str(base_dir / "part-2.safetensors"))
    (base_dir / INDEX_NAME).write_text(json.dumps(
        {"weight_map": {k: ("part-1.safetensors" if i < half else "part-2.safetensors")
                        for i, k in enumerate(names)}}))
    return {
        "target": _hub_sharded(tmp_path / "target", _weights(seed=0, **ids),
                               side={"config.json": '{"vocab_size": 32}'}),
        "finetuned": _single(tmp_path / "finetuned", _weights(torch.float32, seed=2, **ids),
                             side={"tokenizer.json": "{}", "config.json": '{"vocab_size": 32}'}),
        "base": str(base_dir),
    }


# --- layout --------------------------------------------------------------------------------------


def test_default_layout_mirrors_the_target_shards_order_and_sizes(ckpts):
    plan = _plan(ckpts)
    target = open_checkpoint(ckpts["target"])
    assert len(target.files) > 1

    assert [s.file for s in plan.shards] == [f.name for f in target.files]
    assert [s.index for s in plan.shards] == list(range(len(plan.shards)))
    for shard, f in zip(plan.shards, target.files):
        assert [t.name for t in shard.tensors] == [e.name for e in target.headers[f.name].tensors]
        assert [(t.dtype, t.shape) for t in shard.tensors] == [
            (e.dtype, e.shape) for e in target.headers[f.name].tensors]
        assert shard.size == f.size  # a drop-in replacement, byte count for byte count
        # The planned header is the target's header byte for byte.
        prefix, _ = build_header(shard.header_tensors(), dict(shard.metadata))
        raw = open(os.path.join(ckpts["target"], f.name), "rb").read()
        (n,) = struct.unpack("<Q", raw[:8])
        assert prefix == raw[:8 + n]
    assert plan.write_index
    assert plan.write_bytes == target.total_bytes


def test_a_single_file_target_gives_a_single_file_without_an_index(tmp_path):
    paths = {
        "target": _single(tmp_path / "t", _weights()),
        "finetuned": _single(tmp_path / "f", _weights(seed=1)),
        "base": _single(tmp_path / "b", _weights(seed=2)),
    }
    plan = _plan(paths)
    assert [s.file for s in plan.shards] == ["model.safetensors"]
    assert plan.shards[0].size == os.path.getsize(tmp_path / "t" / "model.safetensors")
    assert not plan.write_index


def test_sources_point_at_each_checkpoints_own_bytes(ckpts):
    plan = _plan(ckpts)
    opened = _open(ckpts)
    for shard in plan.shards:
        for task in shard.tensors:
            term = task.terms[0] if task.terms else None
            for role in ROLES:
                src = task.target if role == "target" else getattr(term, role, None)
                if src is None:
                    continue
                ref = opened[role].tensors[task.name]
                assert (src.role, src.file, src.dtype, src.begin, src.end) == (
                    role, ref.file, ref.dtype, ref.begin, ref.end)


@pytest.mark.parametrize("max_shard_size", [600, 1000, 2500])
def test_max_shard_size_relayout_never_exceeds_the_size_but_for_a_lone_oversize_tensor(
        tmp_path, max_shard_size):
    sd = _weights(**{"big.weight": torch.zeros(40, 40, dtype=torch.bfloat16)})  # 3200 bytes
    paths = {"target": _single(tmp_path / "t", sd),
             "finetuned": _single(tmp_path / "f", sd),
             "base": _single(tmp_path / "b", sd)}
    plan = _plan(paths, max_shard_size=max_shard_size)
    target = open_checkpoint(paths["target"])

    n = len(plan.shards)
    assert n > 1
    assert [s.file for s in plan.shards] == [f"model-{i:05d}-of-{n:05d}.safetensors"
                                             for i in range(1, n + 1)]
    for shard in plan.shards:
        data = sum(t.nbytes for t in shard.tensors)
        assert data <= max_shard_size or len(shard.tensors) == 1, (shard.file, data)
        prefix, offsets = build_header(shard.header_tensors(), dict(shard.metadata))
        assert shard.size == len(prefix) + offsets[-1][1]
    assert any(t.name == "big.weight" for s in plan.shards for t in s.tensors if len(s.tensors) == 1)
    # Every tensor exactly once, in the target's order.
    assert [t.name for s in plan.shards for t in s.tensors] == list(target.tensors)
    assert plan.write_index


def test_max_shard_size_larger_than_the_model_gives_one_model_safetensors(ckpts):
    plan = _plan(ckpts, max_shard_size="1GB")
    assert [s.file for s in plan.shards] == ["model.safetensors"]
    assert not plan.write_index
    assert plan.shards[0].metadata == (("format", "pt"),)


# --- copies and combined tensors -----------------------------------------------------------------


def test_alpha_zero_rules_and_integer_tensors_become_copies(ckpts):
    plan = _plan(ckpts, rules=[{"match": r"^(model\.embed_tokens|lm_head)\.", "alpha": 0}], alpha=0.5)
    tasks = {t.name: t for s in plan.shards for t in s.tensors}
    copies = {"model.embed_tokens.weight", "lm_head.weight", "model.position_ids"}
    for name, task in tasks.items():
        if name in copies:
            assert not task.combine and task.terms == (), name
            assert task.target.role == "target"
        else:
            (term,) = task.terms
            assert task.combine and term.alpha == 0.5, name
            assert task.dtype == "BF16"  # written in the target's dtype
            assert term.finetuned.dtype == "F32" and term.base.dtype == "BF16"
    assert (plan.combined, plan.copied) == (len(tasks) - 3, 3)
    assert plan.tensor_count == len(tasks)


def test_global_alpha_zero_copies_everything(ckpts):
    plan = _plan(ckpts, alpha=0)
    assert plan.combined == 0
    assert not any(t.combine for s in plan.shards for t in s.tensors)


def test_a_copied_tensor_reads_only_the_target(ckpts):
    everything = _plan(ckpts)
    copied = _plan(ckpts, alpha=0)
    assert copied.read_bytes == sum(t.nbytes for s in copied.shards for t in s.tensors)
    assert everything.read_bytes > copied.read_bytes


# --- problems ------------------------------------------------------------------------------------


def test_missing_tensor_is_a_plan_error_naming_it_and_suggesting_carry_target(tmp_path):
    full = _weights()
    partial = {k: v for k, v in full.items() if k != "model.layers.1.mlp.weight"}
    paths = {"target": _single(tmp_path / "t", full),
             "finetuned": _single(tmp_path / "f", partial),
             "base": _single(tmp_path / "b", full)}
    with pytest.raises(PlanError) as caught:
        _plan(paths)
    msg = str(caught.value)
    assert "'model.layers.1.mlp.weight'" in msg
    assert "finetuned" in msg and paths["finetuned"] in msg
    assert "on_missing: carry_target" in msg


def test_carry_target_carries_missing_tensors_and_leaves_out_extras(tmp_path):
    full = _weights()
    partial = {k: v for k, v in full.items() if k != "model.norm.weight"}
    paths = {"target": _single(tmp_path / "t", full),
             "finetuned": _single(tmp_path / "f", {**partial, "extra.lora_A": torch.zeros(2)}),
             "base": _single(tmp_path / "b", {**full, "extra.base_only": torch.zeros(2)})}
    plan = _plan(paths, on_missing="carry_target")
    tasks = {t.name: t for s in plan.shards for t in s.tensors}
    assert set(tasks) == set(full)
    assert not tasks["model.norm.weight"].combine
    assert tasks["model.norm.weight"].target.role == "target"
    assert plan.left_out == ("extra.base_only", "extra.lora_A")
    assert any("carried from the target" in w and "model.norm.weight" in w for w in plan.warnings)
    assert any("left out" in w and "extra.lora_A" in w for w in plan.warnings)


def test_tensors_only_in_finetuned_are_a_plan_error_by_default(tmp_path):
    full = _weights()
    paths = {"target": _single(tmp_path / "t", full),
             "finetuned": _single(tmp_path / "f", {**full, "extra.lora_A": torch.zeros(2)}),
             "base": _single(tmp_path / "b", full)}
    with pytest.raises(PlanError, match=r"'extra\.lora_A'.*on_missing: carry_target"):
        _plan(paths)


def test_shape_mismatch_is_a_plan_error_naming_tensor_shapes_and_checkpoints(tmp_path):
    full = _weights()
    wider = {**full, "model.embed_tokens.weight": torch.zeros(40, 8, dtype=torch.bfloat16)}
    paths = {"target": _single(tmp_path / "t", full),
             "finetuned": _single(tmp_path / "f", wider),
             "base": _single(tmp_path / "b", full)}
    with pytest.raises(PlanError) as caught:
        _plan(paths)
    msg = str(caught.value)
    assert "'model.embed_tokens.weight'" in msg
    assert "[32, 8] in target" in msg and "[40, 8] in finetuned" in msg and "[32, 8] in base" in msg
    for role in ROLES:
        assert paths[role] in msg


def test_shape_mismatch_excluded_by_an_alpha_zero_rule_is_carried(tmp_path):
    full = _weights()
    wider = {**full, "model.embed_tokens.weight": torch.zeros(40, 8, dtype=torch.bfloat16)}
    paths = {"target": _single(tmp_path / "t", full),
             "finetuned": _single(tmp_path / "f", wider),
             "base": _single(tmp_path / "b", full)}
    plan = _plan(paths, rules=[{"match": "embed_tokens", "alpha": 0}])
    assert plan.copied == 1


def test_integer_tensor_in_finetuned_where_the_target_has_float_is_a_plan_error(tmp_path):
    full = _weights()
    ints = {**full, "model.norm.weight": torch.zeros(8, dtype=torch.int64)}
    paths = {"target": _single(tmp_path / "t", full),
             "finetuned": _single(tmp_path / "f", ints),
             "base": _single(tmp_path / "b", full)}
    with pytest.raises(PlanError) as caught:
        _plan(paths)
    msg = str(caught.value)
    assert "'model.norm.weight'" in msg and "I64 in finetuned" in msg and "BF16 in target" in msg
    assert paths["finetuned"] in msg


def test_every_problem_is_listed_not_just_the_first(tmp_path):
    full = _weights()
    bad = {**full, "model.norm.weight": torch.zeros(8, dtype=torch.int64),
           "lm_head.weight": torch.zeros(31, 8, dtype=torch.bfloat16)}
    paths = {"target": _single(tmp_path / "t", full),
             "finetuned": _single(tmp_path / "f", bad),
             "base": _single(tmp_path / "b", full)}
    with pytest.raises(PlanError) as caught:
        _plan(paths)
    problems = caught.value.problems
    assert len(problems) == 2
    assert any("'lm_head.weight'" in p for p in problems)
    assert any("'model.norm.weight'" in p for p in problems)
    assert "1 more problem" in str(caught.value)


# --- warnings and side files ---------------------------------------------------------------------


def test_config_json_difference_in_vocab_size_is_a_warning(ckpts):
    configs = {"target": {"vocab_size": 128256, "architectures": ["LlamaForCausalLM"]},
               "finetuned": {"vocab_size": 128000, "architectures": ["LlamaForCausalLM"]},
               "base": {"vocab_size": 128000}}
    plan = _plan(ckpts, configs)
    config_warnings = [w for w in plan.warnings if "config.json differs" in w]
    assert len(config_warnings) == 1
    assert "vocab_size: target 128256 vs finetuned 128000" in config_warnings[0]
    assert "architectures" not in config_warnings[0]


def test_equal_configs_give_no_config_warning(ckpts):
    same = {"vocab_size": 32}
    plan = _plan(ckpts, {"target": same, "finetuned": dict(same), "base": dict(same)})
    assert not any("config.json" in w and "differs" in w for w in plan.warnings)


def test_mixed_input_dtypes_are_a_warning(ckpts):
    plan = _plan(ckpts)
    assert any("input dtypes differ" in w and "finetuned F32" in w for w in plan.warnings)


def test_side_files_come_from_their_default_donors(ckpts):
    plan = _plan(ckpts)
    assert plan.side_files == (SideFile("config.json", "target"), SideFile("tokenizer.json", "finetuned"))


# --- determinism and the index -------------------------------------------------------------------


def test_plans_are_deterministic_and_comparable(ckpts):
    spec = _spec(ckpts, rules=[{"match": "norm", "alpha": 0}])
    first = make_plan(spec, _open(ckpts), None)
    again = make_plan(spec, _open(ckpts), None)  # freshly re-opened checkpoints
    assert first == again
    assert hash(first) == hash(again)
    assert first != make_plan(_spec(ckpts, alpha=0.5), _open(ckpts), None)


def test_index_json_total_size_is_the_sum_of_tensor_bytes(ckpts):
    plan = _plan(ckpts)
    index = plan.index_json()
    tensors = [t for s in plan.shards for t in s.tensors]
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors)
    assert index["metadata"]["total_size"] == sum(
        t.numel * {"BF16": 2, "I64": 8}[t.dtype] for t in tensors)
    assert index["weight_map"] == {t.name: s.file for s in plan.shards for t in s.tensors}
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    json.dumps(index)  # plain JSON


def test_a_donor_without_the_file_is_a_warning_not_a_silent_omission(tmp_path):
    sd = _weights()
    paths = {"target": _single(tmp_path / "target", sd, side={"config.json": "{}", "tokenizer.json": "t"}),
             "finetuned": _single(tmp_path / "finetuned", sd, side={"config.json": "{}"}),
             "base": _single(tmp_path / "base", sd)}
    plan = _plan(paths, files={"README.md": "base"})
    assert SideFile("tokenizer.json", "finetuned") not in plan.side_files
    assert any("tokenizer.json is donated by finetuned but finetuned has none" in w for w in plan.warnings)
    assert any("README.md is donated by base but no checkpoint has it" in w for w in plan.warnings)


def test_a_donated_file_whose_name_would_break_the_output_is_refused(tmp_path):
    full = _weights()
    paths = {"target": _single(tmp_path / "t", full),
             "finetuned": _single(tmp_path / "f", full, side={"chat_template.\njinja": "x"}),
             "base": _single(tmp_path / "b", full)}
    with pytest.raises(PlanError, match=r"file name 'chat_template.\\njinja' holds a control character"):
        _plan(paths)
    assert _plan(paths, files={"chat_template.*": "none"}).side_files == ()


# --- side-file size cap ----------------------------------------------------------------------------


def _count_io(monkeypatch) -> list[tuple[str, str]]:
    """Every ``Storage.read`` / ``Storage.stat`` from now on, as (call, file name)."""
    from graft.engine.storage import Storage

    calls: list[tuple[str, str]] = []
    read, stat = Storage.read, Storage.stat
    monkeypatch.setattr(Storage, "read",
                        lambda self, name, *a, **k: calls.append(("read", name)) or read(self, name, *a, **k))
    monkeypatch.setattr(Storage, "stat", lambda self, name: calls.append(("stat", name)) or stat(self, name))
    return calls


def test_a_side_file_over_the_cap_is_refused_at_plan_time_from_its_listed_size(tmp_path, monkeypatch):
    sd = _weights()
    paths = {"target": _single(tmp_path / "t", sd, side={"config.json": "{}"}),
             "finetuned": _single(tmp_path / "f", sd, side={"tokenizer.json": "{}"}),
             "base": _single(tmp_path / "b", sd)}
    # A glob meant for small files picks up 600 MiB of pickled weights (sparse: no disk used).
    with open(tmp_path / "f" / "pytorch_model.bin", "wb") as f:
        f.truncate(600 * 2**20)
    checkpoints = _open(paths)
    calls = _count_io(monkeypatch)
    with pytest.raises(PlanError) as refused:
        make_plan(_spec(paths, files={"*.bin": "finetuned"}), checkpoints)
    msg = str(refused.value)
    assert "\n" not in msg
    assert msg.startswith(f"{tmp_path}/f/pytorch_model.bin: side file of {600 * 2**20} bytes (600.0 MiB), over "
                          f"the {512 * 2**20}-byte cap (max_side_file_size)"), msg
    assert "files: {pytorch_model.bin: none}" in msg
    assert calls == []  # the size came from the listing: nothing read, nothing stat'ed
    assert make_plan(_spec(paths, files={"*.bin": "finetuned"}, max_side_file_size="1GiB"),
                     checkpoints).side_files[1] == SideFile("pytorch_model.bin", "finetuned")
    small = make_plan(_spec(paths, max_side_file_size=2), checkpoints)  # "{}": 2 bytes, at the cap
    assert [s.name for s in small.side_files] == ["config.json", "tokenizer.json"]
    with pytest.raises(PlanError, match=r"tokenizer\.json: side file of 2 bytes .* over the 1-byte cap"):
        make_plan(_spec(paths, files={"config.json": "none"}, max_side_file_size=1), checkpoints)


def test_the_side_file_cap_holds_where_a_listing_carries_no_sizes(monkeypatch):
    import uuid

    import fsspec
    from safetensors.torch import save

    root = f"memory://graft-side-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    data = save(_weights(), metadata={"format": "pt"})
    for role in ROLES:
        fs.pipe_file(f"{root}/{role}/model.safetensors", data)
    fs.pipe_file(f"{root}/finetuned/tokenizer.json", b"x" * 4096)
    paths = {role: f"{root}/{role}" for role in ROLES}
    try:
        checkpoints = _open(paths)
        calls = _count_io(monkeypatch)
        with pytest.raises(PlanError, match=r"tokenizer\.json: side file of 4096 bytes .* over the 1024-byte cap"):
            make_plan(_spec(paths, max_side_file_size="1KiB"), checkpoints)
        assert calls == [("stat", "tokenizer.json")]  # one stat, no read
    finally:
        fs.rm(root, recursive=True)


def _tied(tmp_path) -> dict[str, str]:  # noqa: ANN001
    """Three checkpoints that store no LM head (tied to the embeddings)."""
    sd = {k: v for k, v in _weights().items() if k != "lm_head.weight"}
    return {r: _single(tmp_path / r, sd, side={"config.json": "{}"}) for r in ROLES}


@pytest.mark.parametrize("target,finetuned,patch", [
    ({"tie_word_embeddings": True}, {"tie_word_embeddings": False}, (("tie_word_embeddings", "true"),)),
    # a donated config that does not say has its class default, which need not be the output's
    ({"tie_word_embeddings": True}, {}, (("tie_word_embeddings", "true"),)),
    ({"text_config": {"tie_word_embeddings": True}}, {"text_config": {"vocab_size": 32}},
     (("text_config.tie_word_embeddings", "true"),)),
    ({"vocab_size": 32, "text_config": {"vocab_size": 32}}, {"vocab_size": 30, "text_config": {"vocab_size": 30}},
     (("vocab_size", "32"), ("text_config.vocab_size", "32"))),
    ({"tie_word_embeddings": True, "vocab_size": 32}, {"tie_word_embeddings": True, "vocab_size": 32}, ()),
])
def test_a_donated_config_json_is_patched_to_describe_the_outputs_weights(tmp_path, target, finetuned, patch):
    paths = _tied(tmp_path)
    plan = _plan(paths, {"target": target, "finetuned": finetuned, "base": target},
                 files={"config.json": "finetuned"})
    (config,) = [s for s in plan.side_files if s.name == "config.json"]
    assert config.donor == "finetuned" and config.patch == patch


def test_apply_patch_sets_and_removes_nested_keys():
    from graft.engine.plan.output_files import apply_patch

    config = {"vocab_size": 1, "text_config": {"vocab_size": 1, "x": 2}, "quantization_config": {}}
    patch = (("text_config.vocab_size", "36"), ("quantization_config", None), ("tie_word_embeddings", "true"))
    assert apply_patch(config, patch) == {"vocab_size": 1, "text_config": {"vocab_size": 36, "x": 2},
                                          "tie_word_embeddings": True}


def test_config_warnings_compare_text_configs_and_name_the_donor(ckpts):
    configs = {"target": {"text_config": {"vocab_size": 32}}, "finetuned": {"text_config": {"vocab_size": 36}},
               "base": {}}
    (warning,) = [w for w in _plan(ckpts, configs, files={"config.json": "finetuned"}).warnings
                  if "config.json differs" in w]
    assert "text_config.vocab_size: target 32 vs finetuned 36" in warning
    assert "the output takes finetuned's config.json, its vocab_size, tie_word_embeddings" in warning


def test_a_head_tied_in_text_config_is_tied_like_a_top_level_one(tmp_path):
    """Gemma 3 style: tie_word_embeddings in text_config. The untied fine-tune's own head is left
    out (the output ties, like the target), and its config.json is made to say so."""
    paths = _tied(tmp_path)
    paths["finetuned"] = _single(tmp_path / "untied", _weights(seed=2), side={"config.json": "{}"})
    tied, untied = ({"text_config": {"tie_word_embeddings": v}} for v in (True, False))
    plan = _plan(paths, {"target": tied, "finetuned": untied, "base": tied}, files={"config.json": "finetuned"})
    assert "lm_head.weight" not in plan.weight_map()
    assert any("finetuned's lm_head.weight is left out" in w for w in plan.warnings)
    (config,) = [s for s in plan.side_files if s.name == "config.json"]
    assert config.patch == (("text_config.tie_word_embeddings", "true"),)
