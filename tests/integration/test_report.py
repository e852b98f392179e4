"""The transfer report: measured while the job streams, checked against float64 norms of the real
tensors, read back by a JSON reader and drawn by matplotlib (whose PNG reader reads it back)."""
from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import matplotlib.image
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import load_all, stop_after_first_shard
from graft.cluster.report_view import load_report
from graft.engine.errors import OutputError
from graft.engine.run.local import run_local
from graft.engine.formats.manifest import verify_output
from graft.engine.compute.report import REPORT_NAME, layer_of
from graft.engine.plan.specfile import spec_from_mapping

FROZEN = "model.layers.0.self_attn.k_proj.weight"


def make_spec(ckpts: dict[str, str], output: str, **extra):  # noqa: ANN201
    return spec_from_mapping({"target": ckpts["target"], "finetuned": ckpts["finetuned"],
                              "base": ckpts["base"], "output": output, **extra})


def expected(t: torch.Tensor, f: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """The report's measures of one tensor, in float64 from the tensors themselves."""
    t, f, b, o = (x.double().reshape(-1) for x in (t, f, b, out))
    d, m = f - b, t - b
    return {"ft_delta_norm": float(d.norm()), "base_move_norm": float(m.norm()),
            "cosine": float(d @ m / (d.norm() * m.norm())), "unchanged_fraction": float((d == 0).double().mean()),
            "out_delta_norm": float((o - t).norm()), "target_norm": float(t.norm())}


def rewrite(checkpoint: str, change) -> None:  # noqa: ANN001
    """Apply ``change(name, tensor) -> tensor`` to every tensor of a checkpoint, file by file."""
    for path in glob.glob(os.path.join(checkpoint, "*.safetensors")):
        with safe_open(path, "pt") as fh:
            tensors = {n: change(n, fh.get_tensor(n)) for n in fh.keys()}
            meta = fh.metadata()
        save_file(tensors, path, metadata=meta)


@pytest.fixture(scope="module")
def exact_run(tiny_checkpoints, tmp_path_factory):  # noqa: ANN001, ANN201
    out = str(tmp_path_factory.mktemp("report") / "out")
    run_local(make_spec(tiny_checkpoints, out, report="exact", chunk_size=4096), workers=2)
    return out


def test_every_combined_tensor_is_measured_like_the_float64_reference(tiny_checkpoints, exact_run):
    report = json.load(open(os.path.join(exact_run, REPORT_NAME)))
    t, f, b = (load_all(tiny_checkpoints[r]) for r in ("target", "finetuned", "base"))
    out = load_all(exact_run)
    entries = {e["name"]: e for e in report["tensors"]}
    assert set(entries) == set(t)  # every tensor of the demo model is combined
    for name, entry in entries.items():
        assert entry["measured"] == entry["elements"] == t[name].numel()
        assert entry["touched"] is True and entry["layer"] == layer_of(name)
        want = expected(t[name], f[name], b[name], out[name])
        for key, value in want.items():
            # float32 dot products over chunks of 1024 elements, summed in float64
            assert entry[key] == pytest.approx(value, rel=1e-4, abs=1e-9), (name, key)
    assert report["mode"] == "exact" and report["layers"]
    # A layer's norm is the root of its tensors' squared norms.
    layer0 = [e for e in report["tensors"] if e["layer"] == 0]
    assert report["layers"][0]["ft_delta_norm"] == pytest.approx(
        math.sqrt(sum(e["ft_delta_norm"] ** 2 for e in layer0)), rel=1e-9)


def test_the_report_is_a_listed_output_file_and_named_by_the_manifest(exact_run):
    assert verify_output(exact_run).ok
    manifest = json.load(open(os.path.join(exact_run, "graft.manifest.json")))
    assert REPORT_NAME in {o["name"] for o in manifest["outputs"]}
    assert REPORT_NAME in open(os.path.join(exact_run, "SHA256SUMS")).read()
    assert manifest["report"]["file"] == REPORT_NAME and manifest["report"]["unmeasured"] == 0


def test_a_frozen_tensor_and_a_base_that_moved_more_are_flagged(copy_checkpoints, tmp_path):
    base, ft = load_all(copy_checkpoints["base"]), load_all(copy_checkpoints["finetuned"])
    # The fine-tune froze one tensor (bit-identical to its base, stored as float32 like the rest) ...
    rewrite(copy_checkpoints["finetuned"], lambda n, x: base[n].to(x.dtype) if n == FROZEN else x)
    # ... and the new base is the old one but in layer 1, where it moved 3x the fine-tune's change.
    rewrite(copy_checkpoints["target"], lambda n, x: (base[n].double() + 3 * (ft[n].double() - base[n].double())
                                                      if layer_of(n) == 1 else base[n]).to(x.dtype))
    out = str(tmp_path / "out")
    run_local(make_spec(copy_checkpoints, out), workers=1)
    report = load_report(out)
    kinds = {(f["kind"], f.get("tensor", f.get("layer"))) for f in report["flags"]}
    assert ("untouched", FROZEN) in kinds
    assert ("base_moved_more", 1) in kinds and ("base_moved_more", 0) not in kinds
    frozen = next(e for e in report["tensors"] if e["name"] == FROZEN)
    assert frozen["touched"] is False and frozen["unchanged_fraction"] == 1.0
    assert frozen["ft_delta_norm"] == 0.0 and frozen["out_delta_norm"] == 0.0
    # The output really is the target there.
    assert torch.equal(load_all(out)[FROZEN], load_all(copy_checkpoints["target"])[FROZEN])


def test_a_difference_below_the_outputs_precision_is_flagged_as_lost_in_rounding(copy_checkpoints, tmp_path):
    base = load_all(copy_checkpoints["base"])
    # A change 1e-4 of each weight: below bf16's half ulp (2^-9 relative), so rounding drops it.
    rewrite(copy_checkpoints["finetuned"], lambda n, x: (base[n].double() * (1 + 1e-4)).to(x.dtype))
    rewrite(copy_checkpoints["target"], lambda n, x: base[n].clone())
    out = str(tmp_path / "out")
    run_local(make_spec(copy_checkpoints, out), workers=1)
    flags = load_report(out)["flags"]
    lost = [f for f in flags if f["kind"] == "lost_in_rounding"]
    assert len(lost) >= len(base) - 3, [f["kind"] for f in flags]  # all but tensors of tiny values


def test_sampled_runs_measure_small_tensors_whole(tiny_checkpoints, exact_run, tmp_path):
    """Sampling takes every 32nd block of 256Ki elements (tests/unit/test_kernel.py), the first
    always: the demo's tensors all fit one block, so a sampled run measures them whole, like exact."""
    out = str(tmp_path / "out")
    run_local(make_spec(tiny_checkpoints, out, chunk_size="64KiB"), workers=2)
    sampled = {e["name"]: e for e in load_report(out)["tensors"]}
    exact = {e["name"]: e for e in load_report(exact_run)["tensors"]}
    for name, entry in sampled.items():
        assert entry["measured"] == entry["elements"]
        for key in ("ft_delta_norm", "base_move_norm", "target_norm", "out_delta_norm", "cosine"):
            assert entry[key] == pytest.approx(exact[name][key], rel=1e-4), (name, key)


def test_report_off_writes_none_and_graft_report_says_so(tiny_checkpoints, tmp_path):
    out = str(tmp_path / "out")
    run_local(make_spec(tiny_checkpoints, out, report="off"), workers=1)
    assert REPORT_NAME not in os.listdir(out)
    with pytest.raises(OutputError, match="report: off"):
        load_report(out)


def test_graft_report_prints_the_flags_and_draws_a_png(tmp_path, copy_checkpoints):
    base = load_all(copy_checkpoints["base"])
    rewrite(copy_checkpoints["finetuned"], lambda n, x: base[n].to(x.dtype) if n == FROZEN else x)
    out = str(tmp_path / "out")
    run_local(make_spec(copy_checkpoints, out), workers=1)
    png = str(tmp_path / "report.png")
    cli = [sys.executable, "-m", "graft.cluster.cli", "report", out, "--png", png]
    r = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "untouched: 1" in r.stdout and FROZEN in r.stdout and f"wrote {png}" in r.stdout
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas
    r = subprocess.run([*cli[:-2], "--png", "", "--json"], capture_output=True, text=True, timeout=120)
    assert json.loads(r.stdout)["format"] == "graft.report/1"


def test_a_resumed_run_reports_the_kept_shards_from_their_journal(tiny_checkpoints, exact_run, tmp_path):
    """The shards a resume keeps are not read again: their measures come from the run mark's journal,
    and the report equals the one of a run that never stopped."""
    out = str(tmp_path / "out")
    spec = make_spec(tiny_checkpoints, out, report="exact", chunk_size=4096)
    mark = stop_after_first_shard(spec, out)
    assert mark["shards"] and all(e["report"] for e in mark["shards"].values())
    result = run_local(spec, workers=1)
    assert result.manifest["run"]["resumed_shards"] == sorted(mark["shards"])
    assert load_report(out)["tensors"] == load_report(exact_run)["tensors"]


def _files(out: str, *names: str) -> dict[str, bytes]:
    return {n: open(os.path.join(out, n), "rb").read() for n in names}


@pytest.mark.parametrize("report", ["exact", "sampled"])
def test_the_same_job_writes_the_same_report_whatever_the_threads_chunks_workers_or_resume(
        tiny_checkpoints, tmp_path, report):
    """Byte-identical graft.report.json and SHA256SUMS from runs that differ in the compute threads
    per shard (chunks of one tensor computed at once), the chunk size, the workers and a resume (a
    float32 dot product per chunk, summed per chunk, follows all of those in its last bits)."""
    def run(name: str, threads: int, chunk_size: int | str, workers: int, resume: bool = False) -> dict:
        out = str(tmp_path / name)
        if resume:  # a first run stopped after one shard, with another chunk size
            stop_after_first_shard(make_spec(tiny_checkpoints, out, report=report, chunk_size=8192), out)
        result = run_local(make_spec(tiny_checkpoints, out, report=report, chunk_size=chunk_size), workers=workers,
                           threads=threads)
        assert bool(result.manifest["run"]["resumed_shards"]) is resume
        return _files(out, REPORT_NAME, "SHA256SUMS")

    first = run("a", 2, 4096, 2)
    assert run("b", 1, "1MiB", 1) == first
    assert run("c", 1, 640, 3, resume=True) == first
    assert run("d", 5, 640, 1) == first
    assert json.loads(first[REPORT_NAME])["tensors"]


def test_fp8_tensors_give_the_same_report_whatever_the_threads_and_chunks(fp8_trio, tmp_path):
    """The codec path's sums too (rows of 96 columns: its chunks of 32-row blocks start on a row
    of the report's sums)."""
    def run(name: str, threads: int, chunk_size: int, workers: int) -> dict:
        out = str(tmp_path / name)
        run_local(make_spec(fp8_trio, out, report="exact", chunk_size=chunk_size), workers=workers, threads=threads)
        return _files(out, REPORT_NAME, "SHA256SUMS")

    first = run("a", 2, 96 * 8 * 40, 2)
    assert run("b", 1, 96 * 8 * 10, 1) == first
    assert run("c", 4, 96 * 8 * 10, 1) == first


def test_fp8_tensors_are_measured_on_their_real_values_every_element(fp8_trio, tmp_path):
    from quantized import read_tensors, real_values

    out = str(tmp_path / "out")
    run_local(make_spec(fp8_trio, out, compute_dtype="float64"), workers=1)  # sampled: these tensors fit one block, measured whole
    t, f, b = (real_values(fp8_trio[r]) for r in ("target", "finetuned", "base"))
    codes = {n for n, x in read_tensors(out).items() if x.dtype == torch.float8_e4m3fn}
    entries = {e["name"]: e for e in load_report(out)["tensors"]}
    assert codes and codes <= set(entries)
    for name in codes:
        entry = entries[name]
        assert entry["measured"] == entry["elements"] == t[name].numel()
        # out - t is measured on what was written: the output's codes decoded with their scales.
        want = expected(t[name], f[name], b[name], real_values(out)[name])
        for key in ("ft_delta_norm", "base_move_norm", "cosine", "target_norm", "out_delta_norm"):
            assert entry[key] == pytest.approx(want[key], rel=1e-4, abs=1e-9), (name, key)


def test_an_fp8_output_that_kept_every_code_of_the_target_reports_no_change_and_lost_in_rounding(tmp_path):
    """A fine-tune that shrinks each weight of its base by about 1e-7 (plain F32, a float32 ulp or
    two), far below the FP8 step (1/16 of a value at best), onto a target with power-of-two scales
    (ue8m0; a block's amax only shrinks, so its scale stays): every code and scale of the output has
    the target's value (checked). The report measures what was written: out_delta_norm 0, and
    lost_in_rounding (before, it measured the values before encoding: out_delta_norm = ft_delta_norm)."""
    from quantized import llama_weights, read_tensors, save_block_fp8, save_plain

    base = llama_weights(0)
    paths = {"target": save_block_fp8(base, str(tmp_path / "t"), pow2=True),
             "finetuned": save_plain({n: x * (1 - 1e-7) for n, x in base.items()}, str(tmp_path / "f"), torch.float32),
             "base": save_plain(base, str(tmp_path / "b"), torch.float32)}
    out = str(tmp_path / "out")
    run_local(make_spec(paths, out, report="exact", compute_dtype="float64"), workers=1)
    got, target = read_tensors(out), read_tensors(paths["target"])
    codes = [n for n, x in got.items() if x.dtype == torch.float8_e4m3fn]
    assert len(codes) == 14 and all(torch.equal(got[n].float(), target[n].float())  # (a code of 0 may be -0)
                                    and torch.equal(got[n + "_scale_inv"], target[n + "_scale_inv"]) for n in codes)
    entries = {e["name"]: e for e in load_report(out)["tensors"]}
    lost = {f["tensor"] for f in load_report(out)["flags"] if f["kind"] == "lost_in_rounding"}
    for name in codes:
        assert entries[name]["out_delta_norm"] == 0.0 and entries[name]["ft_delta_norm"] > 0, name
        assert name in lost, name


def test_shards_kept_from_a_run_without_the_report_are_listed_as_unmeasured(tiny_checkpoints, tmp_path):
    out = str(tmp_path / "out")
    kept = stop_after_first_shard(make_spec(tiny_checkpoints, out, report="off"), out)["shards"]
    result = run_local(make_spec(tiny_checkpoints, out), workers=1)  # report: sampled now
    assert result.manifest["run"]["resumed_shards"] == sorted(kept)
    report = load_report(out)
    assert report["unmeasured"] and result.manifest["report"]["unmeasured"] == len(report["unmeasured"])
    assert not set(report["unmeasured"]) & {e["name"] for e in report["tensors"]}
    assert len(report["unmeasured"]) + len(report["tensors"]) == result.manifest["plan"]["combined"]
