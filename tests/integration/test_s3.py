"""Whole jobs against a real S3 wire protocol (moto server on 127.0.0.1): S3 inputs and outputs in
any mix with local ones, on both executors, with the same guarantees as on local disk."""
from __future__ import annotations

import json
import os
import shutil

import fsspec
import pytest
import ray

from conftest import comparable, local_ray, new_bucket, shard_bytes, unfinished_uploads
from graft.cluster.driver import RayOptions, run_ray
from graft.engine.errors import NonFiniteError
from graft.engine.run.job import prepare_job
from graft.engine.run.local import run_local
from graft.engine.formats.manifest import MANIFEST_NAME, verify_output
from graft.engine.plan.specfile import spec_from_mapping

ROLES = ("target", "finetuned", "base")


@pytest.fixture(scope="module")
def s3_inputs(s3_server, tiny_checkpoints):  # noqa: ANN201
    """The tiny checkpoints uploaded to a bucket: role -> s3:// URI."""
    bucket = new_bucket(s3_server)
    fs = fsspec.filesystem("s3", **s3_server["s3"])
    for role, path in tiny_checkpoints.items():
        for name in os.listdir(path):
            fs.pipe_file(f"{bucket.removeprefix('s3://')}/{role}/{name}",
                         open(os.path.join(path, name), "rb").read())
    return {role: f"{bucket}/{role}" for role in ROLES}


@pytest.fixture(scope="module")
def reference_output(tiny_checkpoints, tmp_path_factory):  # noqa: ANN201
    out = str(tmp_path_factory.mktemp("ref") / "out")
    run_local(spec_from_mapping({**tiny_checkpoints, "output": out}))
    return shard_bytes(out)


def s3_bytes(options: dict, uri: str) -> dict[str, bytes]:
    fs = fsspec.filesystem("s3", **options["s3"])
    root = uri.removeprefix("s3://")
    return comparable({p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in fs.ls(root, detail=False, refresh=True)})


def job(inputs: dict[str, str], output: str, options: dict, **extra):  # noqa: ANN201
    return prepare_job(spec_from_mapping({**inputs, "output": output, "storage_options": options, **extra}))


def test_s3_in_s3_out_on_the_local_executor(s3_server, s3_inputs, reference_output):
    out = f"{new_bucket(s3_server)}/llama-out"
    result = run_local(job(s3_inputs, out, s3_server), workers=2)
    assert s3_bytes(s3_server, out) == reference_output
    assert verify_output(out, s3_server).ok
    assert unfinished_uploads(s3_server, out) == []
    manifest = result.manifest
    assert manifest["report"]["file"] in {o["name"] for o in manifest["outputs"]}  # measured from S3 too
    assert all(f["version"] for f in manifest["inputs"]["target"]["files"] if f["name"].endswith(".safetensors"))
    assert manifest["spec"]["storage_options"]["s3"]["secret"] == "***"
    assert "testing" not in json.dumps(manifest)


def test_several_diffs_from_s3_with_a_shared_base_into_s3(s3_server, s3_inputs, second_diff, tiny_checkpoints,
                                                          tmp_path):
    bucket = s3_inputs["target"].rsplit("/", 1)[0]
    fs = fsspec.filesystem("s3", **s3_server["s3"])
    for name in os.listdir(second_diff["finetuned2"]):
        fs.pipe_file(f"{bucket.removeprefix('s3://')}/finetuned2/{name}",
                     open(os.path.join(second_diff["finetuned2"], name), "rb").read())
    diffs = [{"finetuned": s3_inputs["finetuned"], "base": s3_inputs["base"]},
             {"finetuned": f"{bucket}/finetuned2", "base": s3_inputs["base"], "alpha": 0.5}]
    local_out, out = str(tmp_path / "local"), f"{new_bucket(s3_server)}/two"
    run_local(spec_from_mapping({"target": tiny_checkpoints["target"], "output": local_out, "diffs": [
        {"finetuned": tiny_checkpoints["finetuned"], "base": tiny_checkpoints["base"]},
        {"finetuned": second_diff["finetuned2"], "base": tiny_checkpoints["base"], "alpha": 0.5}]}))
    planned = prepare_job(spec_from_mapping({"target": s3_inputs["target"], "diffs": diffs, "output": out,
                                             "storage_options": s3_server}))
    result = run_local(planned, workers=2)
    assert s3_bytes(s3_server, out) == shard_bytes(local_out)
    assert sum(r.bytes_read for r in result.results) == planned.plan.read_bytes  # the base once
    assert verify_output(out, s3_server).ok
    assert unfinished_uploads(s3_server, out) == []


def test_graft_diff_from_s3_into_s3_and_a_transfer_reading_it_there(s3_server, s3_inputs, tiny_checkpoints,
                                                                     tmp_path, reference_output):
    from test_diff_artifacts import manifest_of

    delta = f"{new_bucket(s3_server)}/delta"
    made = run_local(prepare_job(spec_from_mapping({"finetuned": s3_inputs["finetuned"], "base": s3_inputs["base"],
                                                    "output": delta, "storage_options": s3_server}, kind="diff")),
                     workers=2)
    local = str(tmp_path / "local-delta")
    run_local(spec_from_mapping({"finetuned": tiny_checkpoints["finetuned"], "base": tiny_checkpoints["base"],
                                 "output": local}, kind="diff"))
    assert s3_bytes(s3_server, delta) == shard_bytes(local)
    assert verify_output(delta, s3_server).ok and unfinished_uploads(s3_server, delta) == []
    digests = {r: [f.get("content_sha256") for f in i["files"]] for r, i in made.manifest["inputs"].items()}
    assert digests == {r: [f.get("content_sha256") for f in i["files"]] for r, i in manifest_of(local)["inputs"].items()}
    out = str(tmp_path / "out")
    run_local(job({"target": s3_inputs["target"], "diff": delta}, out, s3_server))
    assert shard_bytes(out) == reference_output


def test_no_secret_reaches_the_manifest(s3_server, s3_inputs, tiny_checkpoints, tmp_path, reference_output):
    """Auth headers in the storage options and a password in an input's location are redacted in
    the manifest's spec and inputs (uri, files[].uri); the run itself used the real values."""
    import uuid

    from graft.engine.storage import Storage

    # memory:// takes the userinfo as part of its path: a location whose I/O works with it in.
    target = f"memory://reader:hunter2@graft-{uuid.uuid4().hex[:8]}/target"
    store = Storage(target)
    for name in os.listdir(tiny_checkpoints["target"]):
        store.fs.pipe_file(store.path(name), open(os.path.join(tiny_checkpoints["target"], name), "rb").read())
    options = {"s3": {**s3_server["s3"], "token": "hunter2-session"},
               "hf": {"headers": {"Authorization": "Bearer hunter2"}},
               "http": {"client_kwargs": {"headers": {"Cookie": "sid=hunter2", "X-Amz-Security-Token": "hunter2"}}}}
    out = str(tmp_path / "out")
    try:
        manifest = run_local(job({**s3_inputs, "target": target}, out, options)).manifest
    finally:
        store.fs.rm(store.root, recursive=True)
    assert shard_bytes(out) == reference_output
    with open(os.path.join(out, MANIFEST_NAME)) as f:
        text = f.read()
    assert "hunter2" not in text and "testing" not in text
    shown = "memory://reader:***@" + target.split("@", 1)[1]
    assert manifest["spec"]["target"] == manifest["inputs"]["target"]["uri"] == shown
    assert {f["uri"] for f in manifest["inputs"]["target"]["files"]} >= {f"{shown}/config.json"}
    assert manifest["spec"]["storage_options"]["hf"]["headers"]["Authorization"] == "***"


def test_mixed_local_and_s3_inputs_into_a_local_output(s3_server, s3_inputs, tiny_checkpoints, tmp_path,
                                                         reference_output):
    mixed = {"target": s3_inputs["target"], "finetuned": tiny_checkpoints["finetuned"],
             "base": s3_inputs["base"]}
    out = str(tmp_path / "out")
    run_local(job(mixed, out, s3_server))
    assert shard_bytes(out) == reference_output


def test_s3_on_the_ray_executor(s3_server, s3_inputs, reference_output):
    out = f"{new_bucket(s3_server)}/out"
    with local_ray():
        run_ray(job(s3_inputs, out, s3_server), RayOptions(workers=2))
    assert s3_bytes(s3_server, out) == reference_output
    assert unfinished_uploads(s3_server, out) == []


def test_a_failed_run_on_s3_leaves_no_object_and_no_unfinished_upload(s3_server, s3_inputs, tiny_checkpoints,
                                                                      tmp_path):
    from conftest import poisoned_copy

    bad_ft, victim = poisoned_copy(tiny_checkpoints["finetuned"], str(tmp_path / "ft"))
    bucket = new_bucket(s3_server)
    out = f"{bucket}/out"
    with pytest.raises(NonFiniteError, match=victim.replace(".", r"\.")):
        run_local(job(dict(s3_inputs, finetuned=bad_ft), out, s3_server), workers=2)
    fs = fsspec.filesystem("s3", **s3_server["s3"])
    left = [p.rsplit("/", 1)[-1] for p in fs.find(bucket.removeprefix("s3://"), refresh=True)]
    # Only shards committed before the failure (kept for a resume) and the run mark; no manifest.
    assert all(n.endswith(".safetensors") or n == ".graft-run.json" for n in left), left
    assert unfinished_uploads(s3_server, bucket) == []
    if left:
        from graft.engine.run.clean import clean_output

        clean_output(out, s3_server)
        assert fs.find(bucket.removeprefix("s3://"), refresh=True) == []


def test_cli_verifies_and_inspects_on_s3(s3_server, s3_inputs):
    import subprocess
    import sys

    out = f"{new_bucket(s3_server)}/out"
    run_local(job(s3_inputs, out, s3_server))
    s3 = s3_server["s3"]
    env = dict(os.environ, AWS_ACCESS_KEY_ID=s3["key"], AWS_SECRET_ACCESS_KEY=s3["secret"],
               AWS_DEFAULT_REGION="us-east-1")
    opt = ["-o", f"s3.endpoint_url={s3['endpoint_url']}"]
    cli = [sys.executable, "-m", "graft.cluster.cli"]
    v = subprocess.run([*cli, "verify", out, *opt], capture_output=True, text=True, env=env)
    assert v.returncode == 0 and "verified" in v.stdout, v.stderr
    i = subprocess.run([*cli, "inspect", s3_inputs["finetuned"], "--json", *opt], capture_output=True,
                       text=True, env=env)
    assert i.returncode == 0, i.stderr
    assert json.loads(i.stdout)["tensors"]["model.embed_tokens.weight"]["dtype"] == "F32"


def test_an_s3_input_replaced_during_the_run_is_refused(s3_server, tiny_checkpoints, tmp_path):
    from live_runs import Background, shard_in_progress, wait_for

    from graft.engine.errors import IntegrityError

    bucket = new_bucket(s3_server)
    fs = fsspec.filesystem("s3", **s3_server["s3"])
    for role, path in tiny_checkpoints.items():
        for name in os.listdir(path):
            fs.pipe_file(f"{bucket.removeprefix('s3://')}/{role}/{name}", open(os.path.join(path, name), "rb").read())
    inputs = {role: f"{bucket}/{role}" for role in ROLES}
    out = str(tmp_path / "out")
    planned = job(inputs, out, s3_server, chunk_size=2048)  # ~1000 range requests: seconds
    bg = Background(lambda: run_local(planned))
    wait_for(lambda: shard_in_progress(out), "a shard in progress")
    key = f"{bucket.removeprefix('s3://')}/target/{planned.plan.shards[-1].file}"
    data = bytearray(fs.cat_file(key))
    data[-1] ^= 0xFF
    fs.pipe_file(key, bytes(data))  # a new object version under the same key
    with pytest.raises(IntegrityError, match="changed during the run"):
        bg.outcome()
    from test_transfer_local import assert_not_committed

    assert_not_committed(out)


def _start_upload(options: dict, key: str) -> str:
    """Begin a multipart upload and send one part, as a writer killed before its commit leaves it."""
    fs = fsspec.filesystem("s3", **options["s3"])
    bucket, _, name = key.partition("/")
    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=name)["UploadId"]
    fs.call_s3("upload_part", Bucket=bucket, Key=name, UploadId=upload, PartNumber=1, Body=b"x" * 1024)
    return upload


@pytest.mark.parametrize("ending", ["commit", "rollback", "interrupt"])
def test_uploads_left_by_killed_writers_are_aborted_and_no_others(s3_server, s3_inputs, tiny_checkpoints,
                                                                    tmp_path, ending):
    from conftest import poison
    from graft.engine.errors import Interrupted

    inputs = dict(s3_inputs)
    if ending == "rollback":
        inputs["finetuned"] = str(tmp_path / "ft")
        shutil.copytree(tiny_checkpoints["finetuned"], inputs["finetuned"])
        poison(inputs["finetuned"], float("nan"))
    bucket = new_bucket(s3_server).removeprefix("s3://")
    planned = job(inputs, f"s3://{bucket}/out", s3_server)
    shard = planned.plan.shards[-1].file
    foreign = {f"{bucket}/elsewhere/{shard}", f"{bucket}/out/sub/{shard}", f"{bucket}/out/notes.txt"}
    for key in foreign:
        _start_upload(s3_server, key)
    _start_upload(s3_server, f"{bucket}/out/{shard}")  # a crashed earlier run's: aborted at the start
    planted: list[str] = []

    def on_shard(event: str) -> None:
        # The run's own killed writer, mid-run: after the start, before the run's end.
        if not planted:
            planted.append(_start_upload(s3_server, f"{bucket}/out/{shard}"))
        if ending == "interrupt":
            raise KeyboardInterrupt  # on the main thread, where SIGINT's KeyboardInterrupt lands

    expected = {"commit": None, "rollback": NonFiniteError, "interrupt": Interrupted}[ending]
    if expected is None:
        run_local(planned, on_shard=on_shard)
    else:
        with pytest.raises(expected):
            run_local(planned, on_shard=on_shard)
    assert planted
    left = {f"{bucket}/{u['Key']}" for u in unfinished_uploads(s3_server, f"s3://{bucket}")}
    assert left == foreign  # only other people's uploads remain


def test_a_ray_worker_killed_mid_upload_leaves_no_unfinished_upload(s3_server, tmp_path):
    import faulty_fs
    import torch
    from faulty_fs import faulty_options, faulty_uri, rule
    from live_runs import Background, kill_one_worker, wait_for
    from safetensors.torch import save_file

    # One 16 MiB tensor per checkpoint and 5 MiB upload parts: the output's multipart upload begins a
    # third of the way through the shard. Reads of the base past 8 MiB are slowed down (faulty://,
    # 32 reads of 50 ms), so the worker can be killed while its upload is begun and not completed.
    ckpts = {}
    for i, role in enumerate(ROLES):
        ckpts[role] = str(tmp_path / role)
        os.makedirs(ckpts[role])
        g = torch.Generator().manual_seed(i)
        save_file({"w": torch.randn(4 * 2**20, generator=g)}, os.path.join(ckpts[role], "model.safetensors"))
    ref = str(tmp_path / "ref")
    run_local(spec_from_mapping({**ckpts, "output": ref}))
    slow = rule("slow", match="model.safetensors", after=8 * 2**20, times=None, seconds=0.05)
    options = {"s3": {**s3_server["s3"], "default_block_size": 5 * 2**20},
               **faulty_options(str(tmp_path / "journal"), slow)}
    bucket = new_bucket(s3_server)
    out = f"{bucket}/out"
    planned = job(dict(ckpts, base=faulty_uri(ckpts["base"])), out, options, chunk_size="256KiB")
    tests_dir = os.path.dirname(os.path.abspath(faulty_fs.__file__))
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 * 2**20,
             log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": tests_dir}, "worker_process_setup_hook": "faulty_fs.register"})

    def shard_upload() -> list[str]:  # (the run mark is rewritten through short uploads too)
        return [u["UploadId"] for u in unfinished_uploads(s3_server, bucket) if u["Key"] == "out/model.safetensors"]

    try:
        events: list[str] = []
        bg = Background(lambda: run_ray(planned, RayOptions(workers=1), on_shard=events.append))
        wait_for(lambda: bool(shard_upload()), "the shard's upload in progress")
        begun = shard_upload()[0]
        kill_one_worker()
        # The kill landed mid-upload: the killed worker's upload is left behind, unfinished.
        assert begun in shard_upload()
        bg.outcome()
    finally:
        ray.shutdown()
    assert events == ["retried", "done"]
    assert s3_bytes(s3_server, out) == shard_bytes(ref)
    assert unfinished_uploads(s3_server, bucket) == []
