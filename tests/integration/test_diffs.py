"""Several diffs in one pass: out = target + sum_i alpha_i (finetuned_i - base_i), checked against the
float64 reference, read once where the diffs share a checkpoint, with per-diff rules, donors and a
per-diff transfer report."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import SECOND_FROZEN, load_all, reference, reference_terms, shard_bytes
from graft.engine.errors import PlanError, SpecError
from graft.engine.run.job import prepare_job
from graft.engine.run.local import run_local
from graft.engine.formats.manifest import verify_output
from graft.engine.plan.specfile import spec_from_mapping


def two_diffs(ckpts: dict[str, str], second: dict[str, str], output: str, alphas=(1.0, 0.5), **extra):  # noqa: ANN001, ANN201
    return spec_from_mapping({
        "target": ckpts["target"], "output": output,
        "diffs": [{"finetuned": ckpts["finetuned"], "base": ckpts["base"], "alpha": alphas[0]},
                  {"finetuned": second["finetuned2"], "base": second["base2"], "alpha": alphas[1],
                   **extra.pop("second_rules", {})}],
        **extra})


@pytest.fixture(scope="module")
def inputs(tiny_checkpoints, second_diff):  # noqa: ANN001, ANN201
    names = ("target", "finetuned", "base")
    t, f, b = (load_all(tiny_checkpoints[r]) for r in names)
    return t, f, b, load_all(second_diff["finetuned2"]), load_all(second_diff["base2"])


@pytest.mark.parametrize("alphas", [(1.0, 0.5), (-0.7, 1.3)])
def test_float64_output_is_bit_identical_to_the_float64_reference(tiny_checkpoints, second_diff, inputs,
                                                                  tmp_path, alphas):
    out = str(tmp_path / "out")
    # Diff 1 leaves the LM head alone (a rule of its own); a job-wide rule applies to every diff, so
    # model.norm.weight is the target's.
    run_local(two_diffs(tiny_checkpoints, second_diff, out, alphas, compute_dtype="float64", chunk_size=4096,
                        rules=[{"match": r"^model\.norm\.", "alpha": 0}],
                        second_rules={"rules": [{"match": r"^lm_head\.", "alpha": 0}]}), workers=2)
    t, f, b, f2, b2 = inputs
    got = load_all(out)
    assert set(got) == set(t)
    assert f2["model.embed_tokens.weight"].dtype == torch.float16  # three input dtypes
    for name, tt in t.items():
        a2 = 0.0 if name.startswith("lm_head.") else alphas[1]
        a1 = 0.0 if name.startswith("model.norm.") else alphas[0]
        a2 = 0.0 if name.startswith("model.norm.") else a2
        want = reference_terms(tt, [(f[name], b[name], a1), (f2[name], b2[name], a2)])
        assert got[name].dtype == tt.dtype and torch.equal(got[name], want), name
    # The head took diff 0 alone: exactly the single-diff formula; the norm is the target's bits.
    assert torch.equal(got["lm_head.weight"], reference(t["lm_head.weight"], f["lm_head.weight"],
                                                        b["lm_head.weight"], alphas[0]))
    assert torch.equal(got["model.norm.weight"], t["model.norm.weight"])
    assert verify_output(out).ok
    manifest = json.load(open(os.path.join(out, "graft.manifest.json")))
    assert [d["alpha"] for d in manifest["spec"]["diffs"]] == list(alphas)
    assert set(manifest["inputs"]) == {"target", "diffs[0].finetuned", "diffs[0].base", "diffs[1].finetuned",
                                       "diffs[1].base"}
    assert "sum_i alpha_i" in manifest["formula"]


def test_a_diffs_list_of_one_is_the_single_diff_job_byte_for_byte(tiny_checkpoints, tmp_path):
    single, listed = str(tmp_path / "single"), str(tmp_path / "listed")
    common = {"target": tiny_checkpoints["target"], "rules": [{"match": "lm_head", "alpha": 0.5}]}
    run_local(spec_from_mapping({**common, "finetuned": tiny_checkpoints["finetuned"],
                                 "base": tiny_checkpoints["base"], "alpha": 0.7, "output": single}))
    run_local(spec_from_mapping({**common, "output": listed, "diffs": [
        {"finetuned": tiny_checkpoints["finetuned"], "base": tiny_checkpoints["base"], "alpha": 0.7}]}))
    assert shard_bytes(single) == shard_bytes(listed)
    spec = json.load(open(os.path.join(listed, "graft.manifest.json")))["spec"]
    assert "diffs" not in spec and spec["alpha"] == 0.7 and spec["finetuned"] == tiny_checkpoints["finetuned"]


def test_a_base_two_diffs_share_is_read_once(tiny_checkpoints, second_diff, inputs, tmp_path):
    out = str(tmp_path / "out")
    spec = spec_from_mapping({"target": tiny_checkpoints["target"], "output": out, "compute_dtype": "float64",
                              "diffs": [{"finetuned": tiny_checkpoints["finetuned"], "base": tiny_checkpoints["base"]},
                                        {"finetuned": second_diff["finetuned2"], "base": tiny_checkpoints["base"],
                                         "alpha": 0.25}]})
    job = prepare_job(spec)
    assert job.checkpoints["diffs[0].base"] is job.checkpoints["diffs[1].base"]
    sizes = {r: sum(e.end - e.begin for e in c.tensors.values()) for r, c in job.checkpoints.items()}
    assert job.plan.read_bytes == sizes["target"] + sizes["diffs[0].finetuned"] + sizes["diffs[1].finetuned"] + \
        sizes["diffs[0].base"]  # the shared base once
    result = run_local(spec)
    assert sum(r.bytes_read for r in result.results) == job.plan.read_bytes
    t, f, b, f2, _ = inputs
    got = load_all(out)
    for name, tt in t.items():
        assert torch.equal(got[name], reference_terms(tt, [(f[name], b[name], 1.0), (f2[name], b[name], 0.25)])), name


def test_side_files_are_donated_by_the_diff_named(tiny_checkpoints, second_diff, tmp_path):
    out = str(tmp_path / "out")
    run_local(two_diffs(tiny_checkpoints, second_diff, out,
                        files={"generation_config.json": "diffs[1].finetuned"}))
    donated = json.load(open(os.path.join(out, "generation_config.json")))
    assert donated == json.load(open(os.path.join(second_diff["finetuned2"], "generation_config.json")))
    assert donated["temperature"] == 0.3
    # The defaults name the first diff's fine-tune: its chat template and tokenizer.
    assert open(os.path.join(out, "chat_template.jinja")).read() == \
        open(os.path.join(tiny_checkpoints["finetuned"], "chat_template.jinja")).read()
    manifest = json.load(open(os.path.join(out, "graft.manifest.json")))
    sides = {s["name"]: role for role, i in manifest["inputs"].items() for s in i["files"] if "sha256" in s}
    assert sides["generation_config.json"] == "diffs[1].finetuned"
    assert sides["tokenizer.json"] == "diffs[0].finetuned"
    # transformers reads the output: every weight, the donated generation config
    from transformers import AutoModelForCausalLM, GenerationConfig

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()
    assert GenerationConfig.from_pretrained(out).temperature == 0.3


def test_the_report_measures_each_diff_like_the_float64_reference(tiny_checkpoints, second_diff, inputs, tmp_path):
    out = str(tmp_path / "out")
    run_local(two_diffs(tiny_checkpoints, second_diff, out, report="exact", chunk_size=4096), workers=2)
    report = json.load(open(os.path.join(out, "graft.report.json")))
    t, f, b, f2, b2 = inputs
    got = load_all(out)
    assert report["diffs"] == 2
    by_name = {e["name"]: e for e in report["tensors"]}
    for name, tt in t.items():
        e = by_name[name]
        tv, ov = tt.double().reshape(-1), got[name].double().reshape(-1)
        assert e["target_norm"] == pytest.approx(float(tv.norm()), rel=1e-5)
        assert e["out_delta_norm"] == pytest.approx(float((ov - tv).norm()), rel=1e-4, abs=1e-12)
        change = (f[name].double() - b[name].double()) + 0.5 * (f2[name].double() - b2[name].double())
        assert e["change_norm"] == pytest.approx(float(change.norm()), rel=1e-4)
        for d, (ff, bb, alpha) in zip(e["diffs"], ((f, b, 1.0), (f2, b2, 0.5))):
            delta = (ff[name].double() - bb[name].double()).reshape(-1)
            moved = tv - bb[name].double().reshape(-1)
            assert d["alpha"] == alpha
            assert d["ft_delta_norm"] == pytest.approx(float(delta.norm()), rel=1e-4)
            assert d["base_move_norm"] == pytest.approx(float(moved.norm()), rel=1e-4)
            assert d["touched"] == bool((ff[name].to(bb[name].dtype) != bb[name]).any() or delta.any())
    assert not by_name[SECOND_FROZEN]["diffs"][1]["touched"]
    untouched = [fl for fl in report["flags"] if fl["kind"] == "untouched"]
    assert untouched == [{"kind": "untouched", "tensor": SECOND_FROZEN, "diff": 1, "message": untouched[0]["message"]}]
    layer = report["layers"][0]
    assert [d["diff"] for d in layer["diffs"]] == [0, 1]
    names = [n for n in t if n.startswith("model.layers.0.")]
    want = sum(float(((f2[n].double() - b2[n].double()) ** 2).sum()) for n in names) ** 0.5
    assert layer["diffs"][1]["ft_delta_norm"] == pytest.approx(want, rel=1e-4)


def test_graft_report_prints_each_diff(tiny_checkpoints, second_diff, tmp_path):
    import subprocess
    import sys

    out = str(tmp_path / "out")
    run_local(two_diffs(tiny_checkpoints, second_diff, out))
    png = str(tmp_path / "r.png")
    done = subprocess.run([sys.executable, "-m", "graft.cluster.cli", "report", out, "--png", png],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "diff 0:" in done.stdout and "diff 1:" in done.stdout and "untouched: 1" in done.stdout
    assert os.path.getsize(png) > 1000


def test_spec_errors_name_the_key(tiny_checkpoints, second_diff, tmp_path):
    base = {"target": "t", "output": "o"}
    with pytest.raises(SpecError, match=r"key 'diffs': give either diffs or finetuned/base/alpha"):
        spec_from_mapping({**base, "alpha": 0.5, "diffs": [{"finetuned": "f", "base": "b"}]})
    with pytest.raises(SpecError, match=r"diffs\[1\]: unknown key 'alhpa'; did you mean 'alpha'"):
        spec_from_mapping({**base, "diffs": [{"finetuned": "f", "base": "b"}, {"finetuned": "f", "base": "b",
                                                                                "alhpa": 1}]})
    with pytest.raises(SpecError, match=r"'files.tokenizer.json': 'diffs\[2\].finetuned' names diff 2, but the "
                                        r"job has 2 diff"):
        spec_from_mapping({**base, "files": {"tokenizer.json": "diffs[2].finetuned"},
                           "diffs": [{"finetuned": "f", "base": "b"}, {"finetuned": "g", "base": "b"}]})
    with pytest.raises(SpecError, match="key 'finetuned': field required"):
        spec_from_mapping({**base, "base": "b"})


def test_a_resized_vocabulary_with_several_diffs_is_refused_before_any_data_moves(tiny_checkpoints, second_diff,
                                                                                  tmp_path):
    from safetensors.torch import save_file

    ft2 = str(tmp_path / "ft2")
    os.makedirs(ft2)
    sd = load_all(second_diff["finetuned2"])
    sd["model.embed_tokens.weight"] = torch.cat([sd["model.embed_tokens.weight"], sd["model.embed_tokens.weight"][:8]])
    sd["lm_head.weight"] = torch.cat([sd["lm_head.weight"], sd["lm_head.weight"][:8]])
    save_file(sd, os.path.join(ft2, "model.safetensors"))
    out = str(tmp_path / "out")
    with pytest.raises(PlanError, match=r"resized vocabulary, which graft transfers for one diff only"):
        prepare_job(two_diffs(tiny_checkpoints, {**second_diff, "finetuned2": ft2}, out, vocab="pad"))
    assert not os.path.exists(out)


def test_the_default_donors_of_a_several_diff_job_warn_no_more_than_a_single_diff_job(tiny_checkpoints, second_diff,
                                                                                     tmp_path):
    single = prepare_job(spec_from_mapping({**tiny_checkpoints, "output": str(tmp_path / "a")})).plan.warnings
    several = prepare_job(two_diffs(tiny_checkpoints, second_diff, str(tmp_path / "b"))).plan.warnings
    donated = [w for w in several if "is donated by" in w]
    assert donated == [w for w in single if "is donated by" in w] == []
