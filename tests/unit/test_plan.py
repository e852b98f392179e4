"""Planning is a pure function of the spec and the headers."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from graft.engine.checkpoint import open_checkpoint
from graft.engine.errors import PlanError
from graft.engine.planner import make_plan
from graft.engine.spec import spec_from_mapping

ROLES = ("target", "finetuned", "base")


def write(root, role: str, shards: list[dict[str, torch.Tensor]], side: dict[str, str] | None = None) -> str:  # noqa: ANN001
    d = root / role
    d.mkdir()
    if len(shards) == 1:
        save_file(shards[0], str(d / "model.safetensors"), metadata={"format": "pt"})
    else:
        import json
        wm = {}
        for i, sd in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(sd, str(d / name), metadata={"format": "pt"})
            wm.update({k: name for k in sd})
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    for name, text in (side or {}).items():
        (d / name).write_text(text)
    return str(d)


def sd(**shapes: tuple[int, ...]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(v, dtype=torch.bfloat16) for k, v in shapes.items()}


def plan(paths: dict[str, str], configs=None, **extra):  # noqa: ANN001, ANN201
    spec = spec_from_mapping({**paths, "output": "/nonexistent/out", **extra})
    ckpts = {r: open_checkpoint(paths[r]) for r in ROLES}
    return make_plan(spec, ckpts, configs)


@pytest.fixture
def three(tmp_path):  # noqa: ANN201
    return {
        "target": write(tmp_path, "target", [sd(a=(4, 4), b=(8,)), sd(c=(2, 3), d=(5,))]),
        "finetuned": write(tmp_path, "finetuned", [sd(d=(5,), c=(2, 3), b=(8,), a=(4, 4))]),
        "base": write(tmp_path, "base", [sd(a=(4, 4)), sd(b=(8,), c=(2, 3)), sd(d=(5,))]),
    }


def test_default_layout_mirrors_the_target(three):
    p = plan(three)
    tgt = open_checkpoint(three["target"])
    assert [s.file for s in p.shards] == [f.name for f in tgt.files]
    assert [[t.name for t in s.tensors] for s in p.shards] == [
        [e.name for e in tgt.headers[f.name].tensors] for f in tgt.files]
    assert [s.size for s in p.shards] == [os.path.getsize(os.path.join(three["target"], f.name)) for f in tgt.files]
    assert p.write_index and p.combined == 4 and p.copied == 0
    assert p.index_json()["metadata"]["total_size"] == (16 + 8 + 6 + 5) * 2


def test_plans_are_deterministic_values(three):
    assert plan(three) == plan(three)
    assert plan(three) != plan(three, alpha=0.5)


def test_max_shard_size_packs_in_order_and_isolates_an_oversized_tensor(tmp_path):
    big = sd(a=(10,), b=(10,), c_huge=(100,), d=(10,))  # the reference writer stores them by name
    paths = {r: write(tmp_path, r, [big]) for r in ROLES}
    p = plan(paths, max_shard_size=45)
    assert [s.file for s in p.shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [[t.name for t in s.tensors] for s in p.shards] == [["a", "b"], ["c_huge"], ["d"]]
    one = plan(paths, max_shard_size="1GB")
    assert [s.file for s in one.shards] == ["model.safetensors"] and not one.write_index


def test_alpha_zero_rules_and_integer_tensors_become_copies(tmp_path):
    tensors = {"w": torch.zeros(3), "embed": torch.zeros(3), "steps": torch.zeros(2, dtype=torch.int64)}
    paths = {r: write(tmp_path, r, [tensors]) for r in ROLES}
    p = plan(paths, rules=[{"match": "^embed", "alpha": 0}])
    kinds = {t.name: t.combine for t in p.shards[0].tensors}
    assert kinds == {"w": True, "embed": False, "steps": False}
    assert p.copied == 2 and p.combined == 1


def test_missing_tensor_is_an_error_or_carried(tmp_path):
    paths = {"target": write(tmp_path, "target", [sd(a=(2,), b=(2,))]),
             "finetuned": write(tmp_path, "finetuned", [sd(a=(2,), extra=(3,))]),
             "base": write(tmp_path, "base", [sd(a=(2,), b=(2,))])}
    with pytest.raises(PlanError) as e:
        plan(paths)
    assert "'b'" in str(e.value) and "carry_target" in str(e.value)
    assert any("'extra'" in p for p in e.value.problems)
    p = plan(paths, on_missing="carry_target")
    assert {t.name: t.combine for t in p.shards[0].tensors} == {"a": True, "b": False}
    assert p.left_out == ("extra",)


def test_shape_mismatch_names_tensor_shapes_and_checkpoints(tmp_path):
    paths = {"target": write(tmp_path, "target", [sd(a=(2, 3))]),
             "finetuned": write(tmp_path, "finetuned", [sd(a=(3, 2))]),
             "base": write(tmp_path, "base", [sd(a=(2, 3))])}
    with pytest.raises(PlanError, match=r"'a' has shape \[2, 3\] in target .*\[3, 2\] in finetuned") as e:
        plan(paths)
    assert paths["finetuned"] in str(e.value)


def test_integer_finetuned_against_float_target_is_refused(tmp_path):
    paths = {"target": write(tmp_path, "target", [sd(a=(2,))]),
             "finetuned": write(tmp_path, "finetuned", [{"a": torch.zeros(2, dtype=torch.int16)}]),
             "base": write(tmp_path, "base", [sd(a=(2,))])}
    with pytest.raises(PlanError, match="I16 in finetuned"):
        plan(paths)


def test_config_differences_and_side_files(tmp_path):
    tensors = [sd(a=(2,))]
    paths = {"target": write(tmp_path, "target", tensors, {"config.json": "{}", "tokenizer.json": "t"}),
             "finetuned": write(tmp_path, "finetuned", tensors, {"config.json": "{}", "chat_template.jinja": "c"}),
             "base": write(tmp_path, "base", tensors, {"README.md": "r"})}
    p = plan(paths, {"target": {"vocab_size": 128256}, "finetuned": {"vocab_size": 128000}})
    assert any("vocab_size: target 128256 vs finetuned 128000" in w for w in p.warnings)
    assert {(s.name, s.donor) for s in p.side_files} == {("config.json", "target"),
                                                         ("chat_template.jinja", "finetuned")}
    assert any("tokenizer.json is donated by finetuned but finetuned has none" in w for w in p.warnings)
