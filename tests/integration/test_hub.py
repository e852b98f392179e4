"""Whole jobs with Hugging Face Hub inputs and ``graft push``, against the fake Hub (tests/fake_hub.py,
an HTTP server on 127.0.0.1) driven by the real huggingface_hub client.

In-process tests reach it through ``storage_options.hf.endpoint``; the CLI test through ``HF_ENDPOINT``,
as a user would, on the Ray executor.
"""
from __future__ import annotations

import json
import hashlib
import os
import subprocess
import sys
import uuid

import fsspec
import pytest
import yaml
from huggingface_hub import constants

from conftest import comparable, new_bucket, shard_bytes
from fake_hub import FakeHub
from graft.engine.errors import IntegrityError, OutputError, StorageError
from graft.engine.run.publish import push_output
from graft.engine.run.job import prepare_job
from graft.engine.run.local import run_local
from graft.engine.formats.manifest import MANIFEST_NAME, SUMS_NAME
from graft.engine.formats.safetensors import HEADER_PROBE
from graft.engine.plan.specfile import spec_from_mapping

ROLES = ("target", "finetuned", "base")
TOKEN = "hf_fake_token"


pytestmark = pytest.mark.usefixtures("hub_online")


def publish(hub: FakeHub, checkpoints: dict[str, str]) -> dict[str, str]:
    """The checkpoints as three fresh Hub repositories; role -> repo id."""
    tag = uuid.uuid4().hex[:8]
    repos = {}
    for role in ROLES:
        repos[role] = f"org/{role}-{tag}"
        hub.create_repo(repos[role])
        hub.commit_dir(repos[role], checkpoints[role])
    return repos


@pytest.fixture(scope="module")
def repos(hub: FakeHub, tiny_checkpoints: dict[str, str]) -> dict[str, str]:
    return publish(hub, tiny_checkpoints)


@pytest.fixture(scope="module")
def reference_output(tiny_checkpoints, tmp_path_factory):  # noqa: ANN001, ANN201
    out = str(tmp_path_factory.mktemp("ref") / "out")
    run_local(spec_from_mapping({**tiny_checkpoints, "output": out}))
    return shard_bytes(out)


def hub_options(hub: FakeHub, token: str | None = None) -> dict:
    return {"hf": {"endpoint": hub.url, **({"token": token} if token else {})}}


def hub_job(hub: FakeHub, inputs: dict[str, str], output: str, **extra):  # noqa: ANN201
    options = {**hub_options(hub), **extra.pop("storage_options", {})}
    return prepare_job(spec_from_mapping({**inputs, "output": output, "storage_options": options, **extra}))


def hf(repos: dict[str, str], revision: str = "main") -> dict[str, str]:
    return {role: f"hf://{repo}@{revision}" for role, repo in repos.items()}


def test_hub_inputs_give_the_same_bytes_as_local_files(hub, repos, reference_output, tmp_path):
    out = str(tmp_path / "out")
    result = run_local(hub_job(hub, hf(repos), out), workers=2)
    assert shard_bytes(out) == reference_output
    for role in ROLES:
        entry = result.manifest["inputs"][role]
        sha = hub.head(repos[role])
        assert entry["uri"] == f"hf://{repos[role]}@main"
        assert entry["commit"] == sha
        assert all(f"@{sha}/" in f["uri"] for f in entry["files"])
        weights = [f for f in entry["files"] if f["name"].endswith(".safetensors")]
        assert weights and all(f["version"].startswith("sha256:") for f in weights)


def test_a_diff_of_hub_inputs_is_bound_by_the_commit_and_the_hubs_own_sha256(hub, repos, tiny_checkpoints,
                                                                            tmp_path):
    """The Hub vouches for each file's sha256 (its LFS id): graft diff records it and the commit,
    and streams the inputs without hashing them again."""
    out, local = str(tmp_path / "delta"), str(tmp_path / "local")
    inputs = {r: u for r, u in hf(repos).items() if r != "target"}
    planned = prepare_job(spec_from_mapping({**inputs, "output": out, "storage_options": hub_options(hub)},
                                            kind="diff"))
    assert planned.plan.shards[0].settings.hash_roles == ()
    result = run_local(planned, workers=2)
    run_local(spec_from_mapping({"finetuned": tiny_checkpoints["finetuned"], "base": tiny_checkpoints["base"],
                                 "output": local}, kind="diff"))
    assert shard_bytes(out) == shard_bytes(local)
    for role, entry in result.manifest["inputs"].items():
        assert entry["commit"] == hub.head(repos[role])
        weights = [f for f in entry["files"] if f["name"].endswith(".safetensors")]
        for f in weights:
            assert "content_sha256" not in f
            data = open(os.path.join(tiny_checkpoints[role], f["name"]), "rb").read()
            assert f["version"] == "sha256:" + hashlib.sha256(data).hexdigest()


def test_shards_are_read_by_exact_byte_ranges_and_never_whole(hub, repos, tmp_path):
    run_local(hub_job(hub, hf(repos), str(tmp_path / "out")))
    reads = [r for r in hub.requests if "/resolve/" in r.path and r.method == "GET"]
    shard_reads = [r for r in reads if r.path.endswith(".safetensors")]
    assert shard_reads and all(r.range is not None and r.status == 206 for r in shard_reads)
    # Every byte fetched was asked for: the ranges add up to at most the shards' sizes, plus what each
    # header's one-round-trip probe fetched past the header (read again later as tensor data).
    fetched = sum(int(b) - int(a) + 1 for a, b in (r.range.removeprefix("bytes=").split("-") for r in shard_reads))
    shards = {(role, name): len(data) for role in ROLES for name, data in hub.files_at(repos[role], "main").items()
              if name.endswith(".safetensors")}
    assert fetched <= sum(shards.values()) + HEADER_PROBE * len(shards)
    # One header read per shard: the 8-byte length and the header came in a single round trip.
    assert len([r for r in shard_reads if r.range.startswith("bytes=0-")]) == len(shards)


def test_a_throttled_hub_range_is_retried_by_one_layer_only(hub, repos):
    """The Hub client retries a range itself (6 attempts); graft must not multiply that by its own
    5: a range the Hub keeps refusing costs 6 requests, then one line naming the file."""
    from graft.engine.storage import Storage

    store = Storage(f"hf://{repos['target']}@{hub.head(repos['target'])}", hub_options(hub))
    name = sorted(n for n in hub.files_at(repos["target"], "main") if n.endswith(".safetensors"))[0]
    hub.clear_requests()
    hub.throttle_ranges = 99
    try:
        with pytest.raises(StorageError, match=rf"{name}: cannot read bytes 0\.\.8: .*503"):
            store.read(name, 0, 8)
    finally:
        hub.throttle_ranges = 0
    ranged = [r for r in hub.requests if r.range is not None]
    assert len(ranged) == 6, [(r.range, r.status) for r in ranged]
    hub.throttle_ranges = 2  # a brief throttle costs nothing
    assert len(store.read(name, 0, 8)) == 8


def test_the_revision_is_pinned_when_the_job_is_planned(hub, tiny_checkpoints, reference_output, tmp_path):
    repos = publish(hub, tiny_checkpoints)
    planned = hub.head(repos["target"])
    hub.create_tag(repos["target"], "v1", planned)
    job = hub_job(hub, hf(repos), str(tmp_path / "out"))
    # The branch moves after planning: the target repo now holds the base model's files.
    base_files = {n: open(os.path.join(tiny_checkpoints["base"], n), "rb").read()
                  for n in os.listdir(tiny_checkpoints["base"])}
    moved = hub.commit(repos["target"], base_files, parent_files=False)
    assert moved != planned
    run_local(job)
    assert shard_bytes(str(tmp_path / "out")) == reference_output
    # A tag and a commit sha name the old commit; the branch is the new one.
    for revision in ("v1", planned):
        out = str(tmp_path / f"out-{revision[:8]}")
        inputs = {**hf(repos), "target": f"hf://{repos['target']}@{revision}"}
        result = run_local(hub_job(hub, inputs, out))
        assert shard_bytes(out) == reference_output
        assert result.manifest["inputs"]["target"]["commit"] == planned
    assert hub_job(hub, hf(repos), str(tmp_path / "x")).checkpoints["target"].storage.commit == moved


def test_a_whole_file_that_does_not_match_its_hub_digest_fails_the_run(hub, tiny_checkpoints, tmp_path):
    repos = publish(hub, tiny_checkpoints)
    config = hub.files_at(repos["target"], "main")["config.json"]
    hub.tamper(repos["target"], "main", "config.json", config.replace(b"}", b', "x": 1}', 1))
    out = tmp_path / "out"
    with pytest.raises(IntegrityError, match=r"config\.json: content does not match its recorded git-sha1"):
        run_local(hub_job(hub, hf(repos), str(out)))
    assert not out.exists() or os.listdir(out) == []


def test_missing_repository_and_revision_are_one_line_errors(hub, repos, tmp_path):
    for inputs, what in [({**hf(repos), "base": "hf://org/no-such-model"}, "hf://org/no-such-model"),
                         ({**hf(repos), "base": f"hf://{repos['base']}@no-such-branch"}, "no-such-branch")]:
        with pytest.raises(StorageError) as caught:
            hub_job(hub, inputs, str(tmp_path / "out"))
        message = str(caught.value)
        assert what in message and "\n" not in message and "no such Hub repository or revision" in message


def test_hub_s3_and_local_inputs_mix_into_an_s3_output(hub, repos, s3_server, tiny_checkpoints, reference_output):
    bucket = new_bucket(s3_server)
    s3 = fsspec.filesystem("s3", **s3_server["s3"])
    for name in os.listdir(tiny_checkpoints["finetuned"]):
        s3.pipe_file(f"{bucket.removeprefix('s3://')}/ft/{name}",
                     open(os.path.join(tiny_checkpoints["finetuned"], name), "rb").read())
    inputs = {"target": f"hf://{repos['target']}", "finetuned": f"{bucket}/ft", "base": tiny_checkpoints["base"]}
    out = f"{bucket}/out"
    run_local(hub_job(hub, inputs, out, storage_options=s3_server), workers=2)
    got = {p.rsplit("/", 1)[-1]: s3.cat_file(p) for p in s3.ls(out.removeprefix("s3://"), refresh=True)}
    assert comparable(got) == reference_output


def front_matter(readme: bytes) -> dict:
    text = readme.decode()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


@pytest.fixture(scope="module")
def finished_output(hub, repos, tmp_path_factory) -> str:  # noqa: ANN001
    out = str(tmp_path_factory.mktemp("pushme") / "out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        run_local(hub_job(hub, hf(repos), out, rules=[{"match": r"^lm_head\.", "alpha": 0.0}], alpha=0.5))
    return out


def test_push_publishes_every_output_file_and_a_model_card_in_one_commit(hub, repos, finished_output):
    dest = f"org/pushed-{uuid.uuid4().hex[:8]}"
    url = push_output(finished_output, f"hf://{dest}", hub_options(hub, TOKEN))
    files = hub.files_at(dest, "main")
    local = {n: open(os.path.join(finished_output, n), "rb").read() for n in os.listdir(finished_output)}
    assert {n: files[n] for n in local} == local
    assert set(files) == set(local) | {"README.md", ".gitattributes"}
    assert hub.head(dest) in url
    commits = [r for r in hub.requests if r.method == "POST" and "/commit/" in r.path]
    assert len(commits) == 1  # one atomic commit with every file
    meta = front_matter(files["README.md"])
    assert meta["base_model"] == [repos["target"], repos["finetuned"], repos["base"]]
    assert meta["base_model_relation"] == "merge"
    assert meta["library_name"] == "transformers"
    assert "graft" in meta["tags"] and "fine-tuning-transfer" in meta["tags"]
    assert meta["graft"]["alpha"] == 0.5
    assert meta["graft"]["rules"] == [{"match": r"^lm_head\.", "alpha": 0.0}]
    assert meta["graft"]["target"]["commit"] == hub.head(repos["target"])


def test_push_to_a_branch_leaves_main_alone(hub, finished_output):
    dest = f"org/branched-{uuid.uuid4().hex[:8]}"
    push_output(finished_output, f"hf://{dest}@candidate", hub_options(hub, TOKEN))
    assert set(hub.files_at(dest, "main")) == {".gitattributes"}
    assert SUMS_NAME in hub.files_at(dest, "candidate")


def test_push_streams_an_output_that_lives_on_s3(hub, repos, s3_server, finished_output):
    out = f"{new_bucket(s3_server)}/out"
    s3 = fsspec.filesystem("s3", **s3_server["s3"])
    for name in os.listdir(finished_output):
        s3.pipe_file(f"{out.removeprefix('s3://')}/{name}", open(os.path.join(finished_output, name), "rb").read())
    dest = f"org/from-s3-{uuid.uuid4().hex[:8]}"
    push_output(out, f"hf://{dest}", {**s3_server, **hub_options(hub, TOKEN)})
    files = hub.files_at(dest, "main")
    for name in os.listdir(finished_output):
        assert files[name] == open(os.path.join(finished_output, name), "rb").read()


def test_push_refuses_unfinished_or_corrupted_outputs_and_touches_nothing(hub, finished_output, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "model.safetensors").write_bytes(b"partial")
    corrupted = tmp_path / "corrupted"
    corrupted.mkdir()
    for name in os.listdir(finished_output):
        data = open(os.path.join(finished_output, name), "rb").read()
        if name == "config.json":
            data = data.replace(b"{", b"[", 1)  # same size, other bytes
        (corrupted / name).write_bytes(data)
    dest = f"org/refused-{uuid.uuid4().hex[:8]}"
    # push verifies first: what `graft verify` fails, push refuses the same way (exit 5).
    with pytest.raises(IntegrityError, match=r"graft\.manifest\.json: missing"):
        push_output(str(unfinished), f"hf://{dest}", hub_options(hub, TOKEN))
    with pytest.raises(IntegrityError, match=r"config\.json: sha256 .* does not match"):
        push_output(str(corrupted), f"hf://{dest}", hub_options(hub, TOKEN))
    assert [r for r in hub.requests if r.method in ("POST", "PUT")] == []
    with pytest.raises(OutputError, match="not a Hub model repository"):
        push_output(finished_output, "hf://just-a-name", hub_options(hub, TOKEN))


@pytest.mark.parametrize("bad", ["../outside.txt", "x\ny", ".hidden"], ids=["path", "newline", "hidden"])
def test_push_refuses_a_manifest_naming_files_graft_never_writes(hub, finished_output, tmp_path, bad):
    import json
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished_output, out)
    manifest = json.loads((out / "graft.manifest.json").read_text())
    manifest["outputs"].append({"name": bad, "size": 1, "sha256": "0" * 64})
    (out / "graft.manifest.json").write_text(json.dumps(manifest))
    hub.clear_requests()
    with pytest.raises(OutputError, match="lists an output file .* not pushed"):
        push_output(str(out), f"hf://org/forged-{uuid.uuid4().hex[:8]}", hub_options(hub, TOKEN), verify=False)
    assert [r for r in hub.requests if r.method in ("POST", "PUT")] == []


def test_push_without_a_token_is_a_one_line_error(hub, finished_output, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent/token")
    with pytest.raises(OutputError, match=r"push failed: .*HF_TOKEN") as caught:
        push_output(finished_output, "hf://org/anonymous", hub_options(hub))
    assert "\n" not in str(caught.value)


def test_cli_ray_run_on_hub_inputs_then_push_via_hf_endpoint(hub, repos, reference_output, tmp_path):
    """The user's path: HF_ENDPOINT in the environment, Ray workers reading the pinned commit."""
    out = str(tmp_path / "out")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({**hf(repos), "output": out}))
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1",
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    cli = [sys.executable, "-m", "graft.cluster.cli"]
    run = subprocess.run([*cli, "run", str(cfg), "-q", "--executor", "ray", "--workers", "2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert shard_bytes(out) == reference_output
    manifest = json.loads(open(os.path.join(out, MANIFEST_NAME)).read())
    assert manifest["inputs"]["target"]["commit"] == hub.head(repos["target"])
    dest = f"org/cli-{uuid.uuid4().hex[:8]}"
    push = subprocess.run([*cli, "push", out, f"hf://{dest}"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert push.returncode == 0, push.stderr
    assert f"pushed {out}" in push.stdout
    assert hub.files_at(dest, "main")[SUMS_NAME] == open(os.path.join(out, SUMS_NAME), "rb").read()
