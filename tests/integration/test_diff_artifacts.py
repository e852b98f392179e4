"""Diffs as artifacts: ``graft diff`` writes finetuned - base with a manifest bound to its inputs; a
transfer reads it (``diff:``) with the bits of the three-checkpoint run; provenance chains."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import load_all, reference, shard_bytes, stop_after_first_shard
from graft.engine.formats.checkpoint import open_checkpoint
from graft.engine.errors import IntegrityError, PlanError, SpecError
from graft.engine.run.job import prepare_job
from graft.engine.run.local import run_local
from graft.engine.formats.manifest import MANIFEST_NAME, verify_output
from graft.engine.run.provenance import file_content_sha256
from graft.engine.plan.specfile import spec_from_mapping


def diff_spec(finetuned: str, base: str, output: str, **extra):  # noqa: ANN201
    return spec_from_mapping({"finetuned": finetuned, "base": base, "output": output, **extra}, kind="diff")


def manifest_of(out: str) -> dict:
    return json.load(open(os.path.join(out, MANIFEST_NAME)))


@pytest.fixture(scope="module")
def diff32(tiny_checkpoints, tmp_path_factory):  # noqa: ANN001, ANN201
    out = str(tmp_path_factory.mktemp("diff") / "delta")
    run_local(diff_spec(tiny_checkpoints["finetuned"], tiny_checkpoints["base"], out, chunk_size=4096), workers=2)
    return out


def test_the_diff_is_the_float32_difference_in_the_fine_tunes_layout(tiny_checkpoints, diff32):
    f, b = load_all(tiny_checkpoints["finetuned"]), load_all(tiny_checkpoints["base"])
    got = load_all(diff32)  # safetensors' own reader
    assert set(got) == set(f)
    for name, d in got.items():
        assert d.dtype == torch.float32 and torch.equal(d, f[name].float() - b[name].float()), name
    shards = sorted(n for n in os.listdir(diff32) if n.endswith(".safetensors"))
    assert shards == sorted(n for n in os.listdir(tiny_checkpoints["finetuned"]) if n.endswith(".safetensors"))
    # The fine-tune's side files come along: a transfer from the diff takes its tokenizer from them.
    for name in ("tokenizer.json", "chat_template.jinja", "config.json"):
        assert open(os.path.join(diff32, name), "rb").read() == \
            open(os.path.join(tiny_checkpoints["finetuned"], name), "rb").read()
    assert verify_output(diff32).ok
    # A diff is a checkpoint transformers reads (the fine-tune's config, float32 weights).
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(diff32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.equal(model.state_dict()["model.norm.weight"], got["model.norm.weight"])
    manifest = manifest_of(diff32)
    assert manifest["kind"] == "diff" and manifest["spec"]["diff_dtype"] == "float32"
    assert "target" not in manifest["spec"] and set(manifest["inputs"]) == {"finetuned", "base"}
    assert manifest["diff"]["tensors"] == len(f) and manifest["diff"]["unmeasured"] == []
    norm = sum(float(((f[n].double() - b[n].double()) ** 2).sum()) for n in f) ** 0.5
    assert manifest["diff"]["norm"] == pytest.approx(norm, rel=1e-5)


def test_the_manifest_binds_the_diff_to_the_content_of_every_input_file(tiny_checkpoints, diff32):
    manifest = manifest_of(diff32)
    for role in ("finetuned", "base"):
        ckpt = open_checkpoint(tiny_checkpoints[role])
        files = manifest["inputs"][role]["files"]
        shards = [e for e in files if e["name"].endswith(".safetensors")]
        assert len(shards) == len(ckpt.files)
        for entry in shards:  # recomputed from the file alone, reading every byte again
            assert entry["content_sha256"] == file_content_sha256(ckpt, entry["name"]), entry["name"]


def test_a_tied_base_is_bound_by_the_content_sha256_of_its_file(tiny_checkpoints, tmp_path):
    """A base that ties its head to its embeddings (no lm_head stored) under a fine-tune that has its
    own head, both in one file: the diff's lm_head reads the base's embedding bytes a second time in
    the same output shard; they are hashed once, as the file holds them."""
    base, ft = tmp_path / "base", tmp_path / "ft"
    for src, dest in ((tiny_checkpoints["base"], base), (tiny_checkpoints["finetuned"], ft)):
        dest.mkdir()
        for name in os.listdir(src):
            if name.endswith(("config.json", ".jinja")) or name.startswith("tokenizer"):
                shutil.copy(os.path.join(src, name), dest)
    tensors = load_all(tiny_checkpoints["base"])
    del tensors["lm_head.weight"]
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    config = json.load(open(base / "config.json"))
    json.dump({**config, "tie_word_embeddings": True}, open(base / "config.json", "w"))
    save_file(load_all(tiny_checkpoints["finetuned"]), str(ft / "model.safetensors"), metadata={"format": "pt"})
    out = str(tmp_path / "delta")
    run_local(diff_spec(str(ft), str(base), out, chunk_size=4096), workers=1)
    d = load_file(os.path.join(out, "model.safetensors"))
    want = load_all(str(ft))["lm_head.weight"] - tensors["model.embed_tokens.weight"].float()
    assert torch.equal(d["lm_head.weight"], want)
    (entry,) = [e for e in manifest_of(out)["inputs"]["base"]["files"] if e["name"] == "model.safetensors"]
    assert entry["content_sha256"] == file_content_sha256(open_checkpoint(str(base)), "model.safetensors")


def test_a_transfer_from_a_float32_diff_is_the_three_checkpoint_float32_run_byte_for_byte(
        tiny_checkpoints, diff32, tmp_path):
    three, two = str(tmp_path / "three"), str(tmp_path / "two")
    common = {"target": tiny_checkpoints["target"], "alpha": 0.7, "chunk_size": 4096,
              "rules": [{"match": "lm_head", "alpha": -1.3}]}
    run_local(spec_from_mapping({**common, "finetuned": tiny_checkpoints["finetuned"],
                                 "base": tiny_checkpoints["base"], "output": three}))
    job = prepare_job(spec_from_mapping({**common, "diff": diff32, "output": two}))
    sizes = {r: sum(e.end - e.begin for e in c.tensors.values()) for r, c in job.checkpoints.items()}
    assert set(sizes) == {"target", "diff"} and job.plan.read_bytes == sizes["target"] + sizes["diff"]
    result = run_local(job, workers=2)
    assert shard_bytes(two) == shard_bytes(three)
    # Provenance chains: the output names the diff's manifest by its digest.
    entry = result.manifest["inputs"]["diff"]
    want = hashlib.sha256(open(os.path.join(diff32, MANIFEST_NAME), "rb").read()).hexdigest()
    assert entry["manifest_sha256"] == want and entry["dtype"] == "float32"
    assert entry["from"] == {"finetuned": tiny_checkpoints["finetuned"], "base": tiny_checkpoints["base"]}
    assert result.manifest["spec"]["diff"] == diff32 and "finetuned" not in result.manifest["spec"]
    # The report has no base to measure the new base's move from.
    report = json.load(open(os.path.join(two, "graft.report.json")))
    assert report["model"]["base_move_norm"] is None and report["model"]["ft_delta_norm"] > 0
    assert not [f for f in report["flags"] if f["kind"] == "base_moved_more"]
    assert verify_output(two).ok


def _tensor_bytes(path: str) -> dict[str, bytes]:
    """Each tensor's bytes in a safetensors file, read by its header (8-byte length, JSON)."""
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    return {k: data[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]]
            for k, v in header.items() if k != "__metadata__"}


def test_a_damaged_diff_fails_the_transfer_before_its_shard_is_committed(tiny_checkpoints, diff32, tmp_path):
    """graft diff lists each difference's sha256; a transfer hashes the diff's bytes as they stream
    and commits no shard computed from bytes that are not those."""
    for entry in manifest_of(diff32)["outputs"]:
        if entry["name"].endswith(".safetensors"):
            assert entry["tensors"] == {k: hashlib.sha256(v).hexdigest()
                                        for k, v in _tensor_bytes(os.path.join(diff32, entry["name"])).items()}
    damaged = str(tmp_path / "damaged")
    shutil.copytree(diff32, damaged)
    name = "model.embed_tokens.weight"
    ref = open_checkpoint(damaged).tensors[name]
    path = os.path.join(damaged, ref.file)
    with open(path, "r+b") as fh:  # one byte of its data, the size kept
        fh.seek(ref.begin + 1001)
        byte = fh.read(1)
        fh.seek(ref.begin + 1001)
        fh.write(bytes([byte[0] ^ 0x10]))
    out = str(tmp_path / "out")
    spec = spec_from_mapping({"target": tiny_checkpoints["target"], "diff": damaged, "output": out})
    shard = next(s.file for s in prepare_job(spec).plan.shards if any(t.name == name for t in s.tensors))
    with pytest.raises(IntegrityError, match=rf"^{re.escape(path)}: the bytes of tensor '{re.escape(name)}' are not "
                                             rf"those its diff's manifest records \(sha256\): the diff is damaged; "
                                             rf"re-create it with graft diff or download it again$"):
        run_local(spec, workers=1)
    assert shard not in os.listdir(out) and MANIFEST_NAME not in os.listdir(out)
    # A side file it donates (the chat template) is checked too, when it is copied: no manifest.
    shutil.copy(os.path.join(diff32, ref.file), path)
    with open(os.path.join(damaged, "chat_template.jinja"), "a") as fh:
        fh.write(" ")
    with pytest.raises(IntegrityError, match=rf"^{re.escape(os.path.join(damaged, 'chat_template.jinja'))}: not the "
                                             rf"file its diff's manifest records \(sha256\): the diff is damaged"):
        run_local(spec, workers=1)
    assert MANIFEST_NAME not in os.listdir(out) and "chat_template.jinja" not in os.listdir(out)
    # A diff written before graft diff listed them is refused before any data moves.
    manifest = manifest_of(diff32)
    for entry in manifest["outputs"]:
        entry.pop("tensors", None)
    old = str(tmp_path / "old")
    shutil.copytree(diff32, old)
    json.dump(manifest, open(os.path.join(old, MANIFEST_NAME), "w"))
    with pytest.raises(PlanError, match=r"^diff \(.*\): its graft.manifest.json records no sha256 of the tensors "
                                        r"of .* \(a diff written by an older graft\), so what a transfer reads of "
                                        r"it cannot be checked: re-create it with graft diff$"):
        prepare_job(spec_from_mapping({"target": tiny_checkpoints["target"], "diff": old,
                                       "output": str(tmp_path / "out2")}))


def test_float64_from_a_diff_matches_the_three_checkpoint_run_exactly_where_the_manifest_says(tmp_path):
    """f - b is exact in float32 unless the two are far apart in exponent: graft diff counts the
    elements where it is not, and there (only) a float64 transfer from the diff may differ."""
    torch.manual_seed(5)
    t = {"a.weight": torch.randn(64, 32).to(torch.bfloat16), "b.weight": torch.randn(64, 32).to(torch.bfloat16)}
    b = {n: x.clone() for n, x in t.items()}
    f = {n: (x.double() + 0.01 * torch.randn(x.shape, dtype=torch.float64)).to(torch.bfloat16) for n, x in b.items()}
    f["b.weight"] = f["b.weight"].float()
    f["b.weight"][:4] += 3e-9  # float32 fine-tune values whose difference needs more than 24 bits
    f["b.weight"][4:8, :2] = 1e6
    paths = {}
    for role, sd in (("target", t), ("finetuned", f), ("base", b)):
        os.makedirs(tmp_path / role)
        save_file(sd, str(tmp_path / role / "model.safetensors"))
        paths[role] = str(tmp_path / role)
    delta = str(tmp_path / "delta")
    manifest = run_local(diff_spec(paths["finetuned"], paths["base"], delta)).manifest["diff"]
    exact = {n: f[n].double() - b[n].double() for n in f}
    stored = load_all(delta)
    inexact = {n: int((stored[n].double() != exact[n]).sum()) for n in f}
    assert inexact["a.weight"] == 0 and inexact["b.weight"] > 0
    assert manifest["inexact_tensors"] == {"b.weight": inexact["b.weight"]} and not manifest["float64_exact"]
    out3, out2 = str(tmp_path / "out3"), str(tmp_path / "out2")
    run_local(spec_from_mapping({**paths, "output": out3, "compute_dtype": "float64"}))
    run_local(spec_from_mapping({"target": paths["target"], "diff": delta, "output": out2, "compute_dtype": "float64"}))
    three, two = load_all(out3), load_all(out2)
    assert torch.equal(two["a.weight"], three["a.weight"])
    assert torch.equal(three["b.weight"], reference(t["b.weight"], f["b.weight"], b["b.weight"]))
    same = two["b.weight"] == three["b.weight"]
    flagged = stored["b.weight"].double() != exact["b.weight"]
    assert bool(same[~flagged].all())  # every element the manifest does not flag is the same


def test_a_bf16_diff_on_request(tiny_checkpoints, tmp_path):
    out = str(tmp_path / "d16")
    run_local(diff_spec(tiny_checkpoints["finetuned"], tiny_checkpoints["base"], out, diff_dtype="bf16"))
    f, b, got = load_all(tiny_checkpoints["finetuned"]), load_all(tiny_checkpoints["base"]), load_all(out)
    for name, d in got.items():
        assert d.dtype == torch.bfloat16 and torch.equal(d, (f[name].float() - b[name].float()).bfloat16()), name
    assert manifest_of(out)["diff"]["dtype"] == "bf16"
    assert manifest_of(out)["diff"]["inexact_elements"] > 0  # bf16 cannot hold most differences


def test_a_stored_diff_among_several(tiny_checkpoints, second_diff, diff32, tmp_path):
    listed, stored = str(tmp_path / "listed"), str(tmp_path / "stored")
    second = {"finetuned": second_diff["finetuned2"], "base": second_diff["base2"], "alpha": 0.5}
    run_local(spec_from_mapping({"target": tiny_checkpoints["target"], "output": listed, "diffs": [
        {"finetuned": tiny_checkpoints["finetuned"], "base": tiny_checkpoints["base"]}, second]}))
    run_local(spec_from_mapping({"target": tiny_checkpoints["target"], "output": stored,
                                 "diffs": [{"diff": diff32}, second],
                                 "files": {"tokenizer.json": "diffs[0].finetuned"}}))
    assert shard_bytes(stored) == shard_bytes(listed)
    manifest = manifest_of(stored)
    assert set(manifest["inputs"]) == {"target", "diffs[0].diff", "diffs[1].finetuned", "diffs[1].base"}
    assert manifest["plan"]["side_files"]["tokenizer.json"] == "diffs[0].diff"


def test_a_resumed_diff_binds_the_same_content_digests(tiny_checkpoints, diff32, tmp_path):
    out = str(tmp_path / "delta")
    spec = diff_spec(tiny_checkpoints["finetuned"], tiny_checkpoints["base"], out, chunk_size=4096)
    mark = stop_after_first_shard(spec, out)
    assert mark["shards"] and all(e["digests"] and e["report"] for e in mark["shards"].values())
    result = run_local(spec, workers=1)
    assert result.manifest["run"]["resumed_shards"] == sorted(mark["shards"])
    # The same inputs: the same versions and content digests (the kept shard's from its journal).
    assert result.manifest["inputs"] == manifest_of(diff32)["inputs"]
    assert result.manifest["diff"] == manifest_of(diff32)["diff"]


def test_what_is_not_a_diff_is_refused_before_any_data_moves(tiny_checkpoints, tmp_path, diff32):
    out = str(tmp_path / "out")
    with pytest.raises(PlanError, match=r"diff \(.*finetuned\) is not a graft diff \(no graft.manifest.json\)"):
        prepare_job(spec_from_mapping({"target": tiny_checkpoints["target"], "diff": tiny_checkpoints["finetuned"],
                                       "output": out}))
    run_local(spec_from_mapping({"target": tiny_checkpoints["target"], "finetuned": tiny_checkpoints["finetuned"],
                                 "base": tiny_checkpoints["base"], "output": str(tmp_path / "transfer")}))
    with pytest.raises(PlanError, match="is a graft output but not a diff"):
        prepare_job(spec_from_mapping({"target": tiny_checkpoints["target"], "diff": str(tmp_path / "transfer"),
                                       "output": out}))
    assert not os.path.exists(out)
    with pytest.raises(SpecError, match=r"\(graft diff\): unknown key 'target'"):
        diff_spec(tiny_checkpoints["finetuned"], tiny_checkpoints["base"], out, target=tiny_checkpoints["target"])
    with pytest.raises(SpecError, match=r"key 'diff': give either diff"):
        spec_from_mapping({"target": "t", "diff": diff32, "finetuned": "f", "output": out})
    with pytest.raises(SpecError, match="that diff is a stored difference, which has no base"):
        spec_from_mapping({"target": "t", "diff": diff32, "output": out, "files": {"tokenizer.json": "base"}})


def test_a_diff_given_as_weights_is_refused_at_plan_time_naming_the_role(tiny_checkpoints, diff32, tmp_path):
    """A graft diff as target, fine-tune or base would be taken as whole weights (target + (diff -
    base) with only a dtype warning): its manifest says what it is."""
    t, f, b = (tiny_checkpoints[r] for r in ("target", "finetuned", "base"))
    out = str(tmp_path / "out")
    cases = [("finetuned", {"target": t, "finetuned": diff32, "base": b}, "diff"),
             ("target", {"target": diff32, "finetuned": f, "base": b}, "diff"),
             ("base", {"target": t, "finetuned": f, "base": diff32}, "diff"),
             ("diffs[1].finetuned", {"target": t, "diffs": [{"diff": diff32}, {"finetuned": diff32, "base": b}]},
              "diffs[1].diff")]
    for role, spec, use in cases:
        with pytest.raises(PlanError, match=rf"^{re.escape(role)} \({re.escape(diff32)}\) is a graft diff \(its "
                                            rf"graft.manifest.json says kind: diff\), not a checkpoint of weights: "
                                            rf"give it as {re.escape(use)} instead, without a base$"):
            prepare_job(spec_from_mapping({**spec, "output": out}))
    with pytest.raises(PlanError, match=r"^base \(.*\) is a graft diff"):
        prepare_job(diff_spec(f, diff32, out))
    assert not os.path.exists(out)


def test_a_resized_vocabulary_is_refused_by_graft_diff(tiny_checkpoints, tmp_path):
    ft = str(tmp_path / "ft")
    os.makedirs(ft)
    sd = load_all(tiny_checkpoints["finetuned"])
    sd["model.embed_tokens.weight"] = torch.cat([sd["model.embed_tokens.weight"], sd["model.embed_tokens.weight"][:8]])
    save_file(sd, os.path.join(ft, "model.safetensors"))
    with pytest.raises(PlanError, match=r"'model.embed_tokens.weight' has shape \[520, 64\] in finetuned .* but "
                                        r"\[512, 64\] in base .*graft diff needs equal shapes \(a resized vocabulary"):
        prepare_job(diff_spec(ft, tiny_checkpoints["base"], str(tmp_path / "out")))


def test_cli_diff_then_run_from_it_then_verify(tiny_checkpoints, tmp_path):
    import yaml

    delta, out = str(tmp_path / "delta"), str(tmp_path / "out")
    (tmp_path / "diff.yaml").write_text(yaml.safe_dump({"finetuned": tiny_checkpoints["finetuned"],
                                                        "base": tiny_checkpoints["base"], "output": delta}))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"target": tiny_checkpoints["target"], "diff": delta,
                                                       "output": out}))

    def graft(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "graft.cluster.cli", *args], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)

    plan = graft("plan", "--diff", "diff.yaml")
    assert plan.returncode == 0 and "plain (F32): finetuned - base" in plan.stdout, plan.stderr
    for args in (("diff", "diff.yaml", "--executor", "local", "-q"), ("run", "job.yaml", "--executor", "local", "-q"),
                 ("verify", delta), ("verify", out)):
        done = graft(*args)
        assert done.returncode == 0, (args, done.stderr)
    assert load_file(os.path.join(out, "model-00001-of-00004.safetensors"))  # a real reader
