"""Checkpoints where users have them: the Hugging Face cache, and local files replaced behind graft's back.

The cache is written by huggingface_hub itself (``snapshot_download`` / ``hf_hub_download`` from the
fake Hub on 127.0.0.1): ``models--org--name/snapshots/<commit>/<file>`` is a relative link to
``../../blobs/<sha256 or git sha1>``, the layout ``hf download`` and ``from_pretrained`` leave.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest
from huggingface_hub import hf_hub_download, snapshot_download

from conftest import shard_bytes, stop_after_first_shard
from graft.engine.errors import IntegrityError
from graft.engine.run.job import prepare_job
from graft.engine.run.local import run_local
from graft.engine.formats.manifest import verify_output
from graft.engine.plan.specfile import spec_from_mapping

ROLES = ("target", "finetuned", "base")


@pytest.fixture
def cached(tiny_checkpoints, hub, hub_online, tmp_path) -> dict[str, str]:
    """The three tiny checkpoints pushed to the fake Hub and downloaded into a cache by huggingface_hub:
    role -> the snapshot directory."""
    cache = tmp_path / "hf-cache"
    out = {}
    for role in ROLES:
        repo = f"org/{role}-{uuid.uuid4().hex[:8]}"
        hub.create_repo(repo)
        hub.commit_dir(repo, tiny_checkpoints[role])
        out[role] = snapshot_download(repo, endpoint=hub.url, cache_dir=str(cache))
    return out


def _spec(ckpts: dict[str, str], output: str, **extra):  # noqa: ANN202
    return spec_from_mapping({**{r: ckpts[r] for r in ROLES}, "output": output, **extra})


def test_the_cache_is_the_layout_users_have(cached):
    """What the tests below run on: every weight file of a snapshot is a relative link into blobs/."""
    for snapshot in cached.values():
        weights = [n for n in os.listdir(snapshot) if n.endswith(".safetensors")]
        assert weights
        for name in weights:
            link = os.readlink(os.path.join(snapshot, name))
            assert link.startswith("../../blobs/"), link


def test_a_job_on_checkpoints_in_the_hf_cache_gives_the_bytes_of_plain_copies(cached, tiny_checkpoints, tmp_path):
    ref = str(tmp_path / "ref")
    run_local(_spec(tiny_checkpoints, ref))
    out = str(tmp_path / "out")
    result = run_local(_spec(cached, out, chunk_size=4096))  # several chunks a shard, each stat'ed
    assert shard_bytes(out) == shard_bytes(ref)
    verify_output(out)
    # The inputs are pinned to the blobs' stats, not the links'.
    blob = os.path.realpath(os.path.join(cached["target"], result.manifest["inputs"]["target"]["files"][0]["name"]))
    version = result.manifest["inputs"]["target"]["files"][0]["version"]
    assert f"size:{os.stat(blob).st_size}," in version
    assert f"mtime:{os.stat(blob).st_mtime_ns}," in version


def test_a_job_on_the_hf_cache_resumes_after_an_interruption(cached, tmp_path):
    """The inputs' versions are the blobs' (the fingerprint of the job is the same on the next run), so
    the same command resumes, keeping the shard committed before the interruption."""
    out = str(tmp_path / "out")
    kept = stop_after_first_shard(_spec(cached, out), out)["shards"]
    assert len(kept) == 1
    again = run_local(_spec(cached, out))
    assert again.manifest["run"]["resumed_shards"] == sorted(kept)
    verify_output(out)


def test_one_linked_safetensors_file_is_an_input_like_any(tiny_checkpoints, hub, hub_online, tmp_path):
    """A single file taken from the cache (``hf_hub_download``), as target, finetuned and base."""
    base = tiny_checkpoints["base"]  # one model.safetensors
    repo = "org/single-file"
    hub.create_repo(repo)
    hub.commit_dir(repo, base)
    path = hf_hub_download(repo, "model.safetensors", endpoint=hub.url, cache_dir=str(tmp_path / "cache"))
    assert os.path.islink(path)
    out = str(tmp_path / "out")
    run_local(spec_from_mapping({"target": path, "finetuned": path, "base": path, "output": out}))
    verify_output(out)
    assert shard_bytes(out)["model.safetensors"] == open(os.path.join(base, "model.safetensors"), "rb").read()


def test_graft_plan_and_run_on_the_cache_from_the_command_line(cached, tmp_path):
    out = str(tmp_path / "out")
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps({**{r: cached[r] for r in ROLES}, "output": out}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "graft.cluster.cli"]
    subprocess.run([*cli, "plan", str(config)], check=True, capture_output=True, env=env, timeout=300)
    done = subprocess.run([*cli, "run", str(config), "--executor", "local", "-q"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    verify_output(out)


@pytest.mark.parametrize("how", ["cp -p", "rsync -a"])
def test_a_local_input_replaced_with_its_mtime_restored_is_refused(copy_checkpoints, tmp_path, how):
    """``cp -p`` and ``rsync -a`` give a replaced file its old modification time: graft must still
    see that it is not the file it planned, whatever its size, and commit nothing read from it."""
    out = str(tmp_path / "out")
    job = prepare_job(_spec(copy_checkpoints, out))
    victim = os.path.join(copy_checkpoints["target"], job.plan.shards[0].file)
    st = os.stat(victim)
    data = bytearray(open(victim, "rb").read())
    if how == "cp -p":  # same inode, other size (a longer file: every planned range is still readable)
        data += b"\0" * 4096
        with open(victim, "r+b") as f:
            f.write(data)
    else:  # a new file renamed over the old one, same size, other bytes
        data[-1] ^= 0xFF
        with open(victim + ".new", "wb") as f:
            f.write(data)
        os.replace(victim + ".new", victim)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(victim).st_mtime_ns == st.st_mtime_ns
    with pytest.raises(IntegrityError, match=r"changed during the run"):
        run_local(job)
    # Shards that read nothing from it may have been committed (and kept for a resume) meanwhile.
    readers = {s.file for s in job.plan.shards
               if any(x.role == "target" and x.file == job.plan.shards[0].file for t in s.tensors for x in t.sources)}
    assert job.plan.shards[0].file in readers
    assert not readers & set(os.listdir(out) if os.path.isdir(out) else ())
    shutil.rmtree(out, ignore_errors=True)


def test_a_cache_repository_folder_means_its_main_snapshot(cached, tmp_path):
    """``models--org--name`` (what users see in ~/.cache/huggingface/hub) is read at ``refs/main``."""
    repos = {r: os.path.dirname(os.path.dirname(cached[r])) for r in ROLES}
    assert all(os.path.basename(p).startswith("models--org--") for p in repos.values())
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    run_local(_spec(cached, ref))
    result = run_local(_spec(repos, out))
    assert shard_bytes(out) == shard_bytes(ref)
    assert result.manifest["inputs"]["target"]["uri"] == cached["target"]


def test_a_cache_folder_with_several_snapshots_and_no_main_is_refused_naming_them(cached, tmp_path):
    from graft.engine.formats.checkpoint import open_checkpoint
    from graft.engine.errors import CheckpointError

    repo = tmp_path / "models--org--two"
    shutil.copytree(os.path.dirname(os.path.dirname(cached["base"])), repo, symlinks=True)
    os.remove(repo / "refs" / "main")
    only = os.listdir(repo / "snapshots")[0]
    assert open_checkpoint(str(repo)).uri == str(repo / "snapshots" / only)  # one snapshot: that one
    shutil.copytree(repo / "snapshots" / only, repo / "snapshots" / ("0" * 40), symlinks=True)
    with pytest.raises(CheckpointError, match=r"2 snapshots and no downloaded main; point graft at the one "
                                              r"you mean: .*/snapshots/<commit>"):
        open_checkpoint(str(repo))
