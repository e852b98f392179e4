"""Whole jobs on the local executor, checked against the float64 reference and real readers."""
from __future__ import annotations

import hashlib
import json
import os
import uuid

import fsspec
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import load_all, poison, reference, within_float32_contract
from graft.engine.errors import NonFiniteError, OutputError, PlanError
from graft.engine.run.execute import iter_chunks
from graft.engine.run.clean import clean_output
from graft.engine.run.job import prepare_job
from graft.engine.run.runmark import RUN_MARK
from graft.engine.run.local import run_local
from graft.engine.formats.manifest import MANIFEST_NAME, verify_output
from graft.engine.plan.specfile import spec_from_mapping
from graft.engine.storage import TEMP_MARK


def make_spec(ckpts: dict[str, str], output: str, **extra):  # noqa: ANN201
    return spec_from_mapping({"target": ckpts["target"], "finetuned": ckpts["finetuned"],
                              "base": ckpts["base"], "output": output, **extra})


def assert_not_committed(output: str) -> list[str]:
    """A failed run: no manifest, no temporary, and nothing but the shards it journaled as committed
    (kept, with its run mark flagged as stopped, for the next run to resume); returns those."""
    names = os.listdir(output) if os.path.isdir(output) else []
    assert MANIFEST_NAME not in names
    assert not [n for n in names if TEMP_MARK in n], names
    if RUN_MARK not in names:
        assert names == []
        return []
    mark = json.load(open(os.path.join(output, RUN_MARK)))
    kept = sorted(n for n in names if n != RUN_MARK)
    assert mark["interrupted"] is True and kept and set(kept) == set(mark["shards"]), (kept, mark["shards"])
    for name in kept:
        assert os.path.getsize(os.path.join(output, name)) == mark["shards"][name]["size"]
    return kept


@pytest.mark.parametrize("alpha", [1.0, 0.7, -1.3])
def test_float64_output_is_bit_identical_to_the_float64_reference(tiny_checkpoints, tmp_path, alpha):
    out = str(tmp_path / "out")
    # A small chunk size forces every tensor through several chunks.
    run_local(make_spec(tiny_checkpoints, out, compute_dtype="float64", chunk_size=4096, alpha=alpha),
              workers=2)
    t, f, b = (load_all(tiny_checkpoints[r]) for r in ("target", "finetuned", "base"))
    got = load_all(out)
    assert set(got) == set(t)
    assert f["model.embed_tokens.weight"].dtype == torch.float32  # mixed input dtypes
    for name, tt in t.items():
        want = reference(tt, f[name], b[name], alpha)
        assert got[name].dtype == tt.dtype and got[name].shape == tt.shape
        assert torch.equal(got[name], want), name


def test_float32_output_is_within_float32_evaluation_error_of_the_reference(tiny_checkpoints, tmp_path):
    out = str(tmp_path / "out")
    run_local(make_spec(tiny_checkpoints, out, alpha=0.7, chunk_size=8192))
    t, f, b = (load_all(tiny_checkpoints[r]) for r in ("target", "finetuned", "base"))
    got = load_all(out)
    exact = 0
    for name, tt in t.items():
        want = reference(tt, f[name], b[name], 0.7)
        assert bool(within_float32_contract(got[name], tt, f[name], b[name], 0.7).all()), name
        exact += int((got[name] == want).sum())
    assert exact > 0.99 * sum(x.numel() for x in t.values())


def test_output_mirrors_the_target_layout_and_loads_in_safe_open_and_transformers(tiny_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path / "out")
    run_local(make_spec(tiny_checkpoints, out))
    target_shards = sorted(n for n in os.listdir(tiny_checkpoints["target"]) if n.endswith(".safetensors"))
    out_shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert out_shards == target_shards and len(out_shards) > 1
    for shard in out_shards:
        with safe_open(os.path.join(tiny_checkpoints["target"], shard), "pt") as a, \
                safe_open(os.path.join(out, shard), "pt") as b:
            assert list(a.keys()) == list(b.keys())
            assert b.metadata().get("format") == "pt"
        assert os.path.getsize(os.path.join(out, shard)) == \
            os.path.getsize(os.path.join(tiny_checkpoints["target"], shard))
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    logits = model(torch.tensor([[1, 5, 9, 13]])).logits
    assert torch.isfinite(logits).all()
    # config from the target (long context), tokenizer + chat template from the fine-tune.
    assert json.load(open(os.path.join(out, "config.json")))["max_position_embeddings"] == 131072
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "assistant" in tok.chat_template


def test_output_holds_exactly_the_checksummed_files_plus_sums_and_manifest(tiny_checkpoints, tmp_path):
    out = str(tmp_path / "out")
    result = run_local(make_spec(tiny_checkpoints, out))
    sums = [line.split("  ", 1)[1] for line in open(os.path.join(out, "SHA256SUMS")).read().splitlines()]
    assert sorted(os.listdir(out)) == sorted(sums + ["SHA256SUMS", MANIFEST_NAME])
    manifest = json.load(open(os.path.join(out, MANIFEST_NAME)))
    assert manifest == result.manifest
    assert {o["name"] for o in manifest["outputs"]} == set(sums) | {"SHA256SUMS"}
    assert manifest["spec"]["alpha"] == 1.0 and manifest["graft_version"]
    for role in ("target", "finetuned", "base"):
        files = manifest["inputs"][role]["files"]
        assert files and all(f["size"] > 0 and f["uri"].startswith(tiny_checkpoints[role]) for f in files)
    donated = {f["name"]: f for f in manifest["inputs"]["finetuned"]["files"] if "sha256" in f}
    with open(os.path.join(tiny_checkpoints["finetuned"], "tokenizer.json"), "rb") as fh:
        assert donated["tokenizer.json"]["sha256"] == hashlib.sha256(fh.read()).hexdigest()
    assert manifest["run"]["seconds"] >= 0 and manifest["run"]["bytes_read"] > 0
    assert verify_output(out).ok


def test_each_input_byte_is_read_once(tiny_checkpoints, tmp_path):
    job = prepare_job(make_spec(tiny_checkpoints, str(tmp_path / "out"), chunk_size=4096))
    tensor_bytes = sum(t.nbytes for c in job.checkpoints.values() for t in c.tensors.values())
    result = run_local(job)
    assert sum(r.bytes_read for r in result.results) == job.plan.read_bytes == tensor_bytes


def test_chunks_never_exceed_the_chunk_size(tiny_checkpoints, tmp_path):
    job = prepare_job(make_spec(tiny_checkpoints, str(tmp_path / "o"), chunk_size=4096))
    biggest = max(t.nbytes for s in job.plan.shards for t in s.tensors)
    assert biggest > 4 * 4096  # so the tensors really are split
    for shard in job.plan.shards:
        for c in iter_chunks(shard):
            assert c.count * 4 <= 4096


def test_rules_first_match_wins_and_alpha_zero_carries_target_bytes(tiny_checkpoints, tmp_path):
    out = str(tmp_path / "out")
    rules = [{"match": r"^model\.embed_tokens\.", "alpha": 0.0},
             {"match": r"mlp", "alpha": 0.5},
             {"match": r"mlp\.up_proj", "alpha": 3.0}]  # shadowed by the rule before it
    result = run_local(make_spec(tiny_checkpoints, out, rules=rules, compute_dtype="float64"))
    t, f, b = (load_all(tiny_checkpoints[r]) for r in ("target", "finetuned", "base"))
    got = load_all(out)
    assert torch.equal(got["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    up = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(got[up], reference(t[up], f[up], b[up], 0.5))
    q = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(got[q], reference(t[q], f[q], b[q], 1.0))
    assert result.manifest["plan"]["copied"] == 1


def test_max_shard_size_relayout_loads_in_transformers(tiny_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "out")
    run_local(make_spec(tiny_checkpoints, out, max_shard_size="60KB"))
    shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert len(shards) > 3 and shards[0].startswith("model-00001-of-")
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"].values()) == set(shards)
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


EDGE_TENSORS = {
    "scalar": ((), torch.bfloat16),
    "empty": ((0, 7), torch.bfloat16),
    "half": ((33, 17), torch.float16),
    "single": ((129,), torch.float32),
    "double": ((10,), torch.float64),
    "big": ((5000,), torch.bfloat16),  # larger than a chunk
    "steps": ((3,), torch.int64),
    "mask": ((4,), torch.bool),
}


def _edge_checkpoint(path: str, seed: int, ft_dtype: torch.dtype | None = None) -> None:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (shape, dtype) in EDGE_TENSORS.items():
        if dtype.is_floating_point:
            sd[name] = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(ft_dtype or dtype)
        elif dtype == torch.bool:
            sd[name] = torch.rand(shape, generator=g) > 0.5
        else:
            sd[name] = torch.randint(0, 100, shape, generator=g)
    os.makedirs(path)
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("compute_dtype", ["float64", "float32"])
def test_edge_case_tensors_zero_dim_zero_size_integer_and_oversized(tmp_path, compute_dtype):
    paths = {r: str(tmp_path / r) for r in ("target", "finetuned", "base")}
    _edge_checkpoint(paths["target"], 1)
    _edge_checkpoint(paths["finetuned"], 2, ft_dtype=torch.float32)
    _edge_checkpoint(paths["base"], 3)
    out = str(tmp_path / "out")
    # alpha 0.7: a fused multiply-add would differ from the reference in float32/float64 outputs.
    run_local(make_spec(paths, out, compute_dtype=compute_dtype, chunk_size=1024, alpha=0.7))
    t, f, b = (load_all(paths[r]) for r in ("target", "finetuned", "base"))
    got = load_all(out)
    for name, (shape, dtype) in EDGE_TENSORS.items():
        assert got[name].shape == torch.Size(shape) and got[name].dtype == dtype
        if not dtype.is_floating_point:
            assert torch.equal(got[name], t[name]), name  # carried from the target
        elif compute_dtype == "float64" or dtype != torch.float64:
            want = reference(t[name], f[name], b[name], 0.7)
            if compute_dtype == "float64":
                assert torch.equal(got[name], want), name
            else:
                assert bool(within_float32_contract(got[name], t[name], f[name], b[name], 0.7).all()), name


def test_nonfinite_output_fails_naming_the_tensor_and_commits_nothing(copy_checkpoints, tmp_path):
    victim = poison(copy_checkpoints["finetuned"], float("inf"), index=3)
    out = str(tmp_path / "out")
    with pytest.raises(NonFiniteError, match=victim.replace(".", r"\.")):
        run_local(make_spec(copy_checkpoints, out), workers=2)
    assert_not_committed(out)
    run_local(make_spec(copy_checkpoints, out, allow_nonfinite=True))
    assert torch.isinf(load_all(out)[victim]).any()


def test_a_failure_keeps_the_shards_already_committed_and_graft_clean_removes_them(copy_checkpoints, tmp_path):
    victim = poison(copy_checkpoints["target"], float("nan"))  # in the target's last shard
    out = str(tmp_path / "out")
    job = prepare_job(make_spec(copy_checkpoints, out))
    with pytest.raises(NonFiniteError, match=victim.replace(".", r"\.")) as failure:
        run_local(job, workers=1)  # earlier shards commit first
    kept = assert_not_committed(out)
    total = len(job.plan.shards)
    assert kept == sorted(s.file for s in job.plan.shards[:total - 1])  # hours of work on a large job
    assert failure.value.__notes__ == [f"{total - 1} of {total} shard(s) are committed and kept in {out}: fix "
                                       f"the cause and run the same command to resume (or remove them: graft "
                                       f"clean {out})"]
    assert sorted(clean_output(out)) == sorted([*kept, RUN_MARK])
    assert os.listdir(out) == []
    with pytest.raises(OutputError, match="no unfinished graft run here"):
        clean_output(out)


def test_a_clean_that_fails_half_way_leaves_a_mark_the_next_clean_takes_over_at_once(copy_checkpoints, tmp_path,
                                                                                        monkeypatch):
    from graft.engine.run import runmark
    from graft.engine.errors import StorageError
    from graft.engine.storage import Storage

    poison(copy_checkpoints["target"], float("nan"))
    out = str(tmp_path / "out")
    with pytest.raises(NonFiniteError):
        run_local(prepare_job(make_spec(copy_checkpoints, out)), workers=1)
    kept = assert_not_committed(out)
    real_remove, calls = Storage.remove, []

    def fails_once(self, name):  # noqa: ANN001, ANN202
        calls.append(name)
        if len(calls) == 2:
            raise StorageError(f"{self.url(name)}: cannot remove: access denied")
        return real_remove(self, name)

    monkeypatch.setattr(Storage, "remove", fails_once)
    with pytest.raises(StorageError, match="access denied"):
        clean_output(out)
    monkeypatch.setattr(Storage, "remove", real_remove)
    monkeypatch.setattr(runmark, "STALE_AFTER_SECONDS", 600.0)  # no waiting: the mark says it stopped
    logs: list[str] = []
    assert set(clean_output(out, log=logs.append)) <= {*kept, RUN_MARK}
    assert os.listdir(out) == [] and not any("watching" in line for line in logs)


def test_an_interrupt_after_the_manifest_is_written_leaves_the_output_complete(tiny_checkpoints, tmp_path,
                                                                              monkeypatch):
    """A signal while the committed run removes its mark (a few seconds at most) must not take the
    output apart: once the manifest is written, nothing is removed."""
    from graft.engine.errors import Interrupted
    from graft.engine.run.runmark import RunMark

    real_release = RunMark.release
    calls: list[bool] = []

    def interrupted_once(self) -> None:  # noqa: ANN001
        calls.append(True)
        if len(calls) == 1:
            raise KeyboardInterrupt  # as the CLI's handler raises it in the main thread
        real_release(self)

    monkeypatch.setattr(RunMark, "release", interrupted_once)
    out = str(tmp_path / "out")
    with pytest.raises(Interrupted) as stopped:
        run_local(make_spec(tiny_checkpoints, out))
    assert stopped.value.committed and stopped.value.kept == stopped.value.total
    assert verify_output(out).ok and RUN_MARK not in os.listdir(out)
    with pytest.raises(OutputError, match="already holds a committed graft output"):
        run_local(make_spec(tiny_checkpoints, out))


def test_a_mark_left_in_a_committed_output_is_not_output_and_graft_clean_refuses_it(tiny_checkpoints, tmp_path):
    out = str(tmp_path / "out")
    run_local(make_spec(tiny_checkpoints, out))
    with open(os.path.join(out, RUN_MARK), "w") as f:  # killed between the manifest and the mark's removal
        f.write('{"heartbeat": 0}')
    assert verify_output(out).ok
    with pytest.raises(OutputError, match="holds a committed graft output"):
        clean_output(out)
    assert RUN_MARK in os.listdir(out) and verify_output(out).ok


def test_graft_clean_refuses_a_run_that_is_still_going(tiny_checkpoints, tmp_path):
    from graft.engine.run.runmark import RunMark
    from graft.engine.storage import Storage

    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00004.safetensors").write_bytes(b"partial work of a live run")
    mark = RunMark(Storage(str(out)), "fp", {}, files=["model-00001-of-00004.safetensors"])
    mark.acquire(None)
    try:
        with pytest.raises(OutputError, match="still going"):
            clean_output(str(out))
        # (the live run's heartbeat may be mid-write: its temporary is not the point here)
        left = sorted(n for n in os.listdir(out) if TEMP_MARK not in n)
        assert left == [RUN_MARK, "model-00001-of-00004.safetensors"]
    finally:
        mark.release()


def test_output_that_is_already_committed_or_foreign_is_refused(tiny_checkpoints, tmp_path):
    out = str(tmp_path / "out")
    run_local(make_spec(tiny_checkpoints, out))
    before = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)}
    with pytest.raises(OutputError, match="already holds a committed graft output"):
        run_local(make_spec(tiny_checkpoints, out))
    assert {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)} == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        run_local(make_spec(tiny_checkpoints, str(foreign)))
    assert sorted(os.listdir(foreign)) == ["notes.txt"]
    # Folders are somebody's data too: the parent of the inputs is no empty output.
    parent = tmp_path / "parent"
    (parent / "models").mkdir(parents=True)
    with pytest.raises(OutputError, match=r"not empty \(it holds the folder\(s\) models/\)"):
        run_local(make_spec(tiny_checkpoints, str(parent)))
    assert sorted(os.listdir(parent)) == ["models"]


def test_missing_tensor_is_an_error_unless_carry_target(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file

    base = tmp_path / "base"
    base.mkdir()
    sd = load_all(tiny_checkpoints["base"])
    gone = "model.layers.1.mlp.down_proj.weight"
    del sd[gone]
    sd["value_head.weight"] = torch.zeros(3)
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    ckpts = dict(tiny_checkpoints, base=str(base))
    out = str(tmp_path / "out")
    with pytest.raises(PlanError, match="carry_target") as e:
        run_local(make_spec(ckpts, out))
    assert gone in str(e.value)
    assert not os.path.exists(out)
    result = run_local(make_spec(ckpts, out, on_missing="carry_target"))
    assert torch.equal(load_all(out)[gone], load_file(
        os.path.join(tiny_checkpoints["target"], json.load(open(os.path.join(
            tiny_checkpoints["target"], "model.safetensors.index.json")))["weight_map"][gone]))[gone])
    assert result.manifest["plan"]["left_out"] == ["value_head.weight"]
    assert any("left out" in w for w in result.manifest["plan"]["warnings"])


def test_memory_filesystem_runs_the_same_code_path_with_the_same_bytes(tiny_checkpoints, tmp_path):
    root = f"memory://graft-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    for role, path in tiny_checkpoints.items():
        for name in os.listdir(path):
            fs.pipe_file(f"{root}/{role}/{name}", open(os.path.join(path, name), "rb").read())
    remote = {r: f"{root}/{r}" for r in tiny_checkpoints}
    try:
        run_local(make_spec(remote, f"{root}/out"), workers=2)
        local_out = str(tmp_path / "out")
        run_local(make_spec(tiny_checkpoints, local_out))
        assert verify_output(f"{root}/out").ok
        for name in os.listdir(local_out):
            # The report's float32 sums follow torch's thread count (workers differ): test_report.py.
            if name not in (MANIFEST_NAME, "graft.report.json", "SHA256SUMS"):
                assert fs.cat_file(f"{root}/out/{name}") == open(os.path.join(local_out, name), "rb").read(), name
        assert not [p for p in fs.ls(f"{root}/out", detail=False) if TEMP_MARK in p or RUN_MARK in p]
    finally:
        fs.rm(root, recursive=True)


def test_the_same_job_gives_bit_identical_output_with_any_worker_or_thread_count(tiny_checkpoints, tmp_path):
    digests = []
    for workers, threads in ((1, 1), (3, 1), (1, 4)):
        out = str(tmp_path / f"out{workers}-{threads}")
        result = run_local(make_spec(tiny_checkpoints, out, chunk_size=8192 * workers), workers=workers,
                           threads=threads)
        assert (result.manifest["run"]["workers"], result.manifest["run"]["threads"]) == (workers, threads)
        digests.append(sorted((r.file, r.sha256) for r in result.results))
    assert digests[0] == digests[1] == digests[2]


def test_an_input_rewritten_during_the_run_is_refused_and_nothing_is_committed(copy_checkpoints, tmp_path):
    from live_runs import Background, shard_in_progress, wait_for

    from graft.engine.errors import IntegrityError

    out = str(tmp_path / "out")
    job = prepare_job(make_spec(copy_checkpoints, out, chunk_size=32, report="off"))  # slow: seconds a shard
    bg = Background(lambda: run_local(job))
    wait_for(lambda: shard_in_progress(out), "a shard in progress")
    victim = os.path.join(copy_checkpoints["target"], job.plan.shards[-1].file)
    data = bytearray(open(victim, "rb").read())
    data[-1] ^= 0xFF  # same size, other bytes: a new upload of the "same" file
    with open(victim + ".new", "wb") as f:
        f.write(data)
    os.utime(victim + ".new", ns=(os.stat(victim).st_atime_ns, os.stat(victim).st_mtime_ns + 10**9))
    os.replace(victim + ".new", victim)
    with pytest.raises(IntegrityError, match=r"changed during the run.*run the job again"):
        bg.outcome()
    assert_not_committed(out)
