"""Whole jobs on Google Cloud Storage and Azure Blob, through their emulators on 127.0.0.1
(``cloud_servers``): inputs and output on the store, on both executors, byte for byte a local run;
failures that leave nothing at a final name and nothing staged; inputs pinned to the version
planned; the output lock on each store's own preconditions."""
from __future__ import annotations

import json
import os

import pytest

from cloud_servers import AZURITE_KEY, leftovers, new_root, staged_blobs, store_fs
from conftest import comparable, local_ray, poisoned_copy, shard_bytes
from graft.cluster.driver import RayOptions, run_ray
from graft.engine.errors import IntegrityError, NonFiniteError
from graft.engine.run.job import prepare_job
from graft.engine.run.local import run_local
from graft.engine.formats.manifest import MANIFEST_NAME, verify_output
from graft.engine.run.runmark import RUN_MARK
from graft.engine.plan.specfile import spec_from_mapping
from graft.engine.storage import TEMP_MARK, AzureStorage, GCSStorage, Storage

ROLES = ("target", "finetuned", "base")
PROTOCOL = {"gcs": "gs", "azure": "az"}


@pytest.fixture(scope="module", params=["gcs", "azure"])
def cloud(request):  # noqa: ANN001, ANN201
    """(store name, its storage options)."""
    return request.param, request.getfixturevalue(f"{request.param}_server")


def upload(options: dict, root: str, checkpoints: dict[str, str]) -> dict[str, str]:
    fs = store_fs(options, root.split("://")[0])
    for role, path in checkpoints.items():
        for name in os.listdir(path):
            fs.pipe_file(f"{root.split('://')[1]}/{role}/{name}", open(os.path.join(path, name), "rb").read())
    return {role: f"{root}/{role}" for role in checkpoints}


@pytest.fixture(scope="module")
def inputs(cloud, tiny_checkpoints):  # noqa: ANN001, ANN201
    """The tiny checkpoints uploaded to the store: role -> URI."""
    _, options = cloud
    return upload(options, new_root(options), tiny_checkpoints)


@pytest.fixture(scope="module")
def reference_output(tiny_checkpoints, tmp_path_factory):  # noqa: ANN001, ANN201
    out = str(tmp_path_factory.mktemp("ref") / "out")
    run_local(spec_from_mapping({**tiny_checkpoints, "output": out}))
    return shard_bytes(out)


def files(options: dict, uri: str) -> dict[str, bytes]:
    """Every object directly under ``uri``, by name (fresh listing)."""
    fs = store_fs(options, uri.split("://")[0])
    root = uri.split("://")[1]
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in fs.ls(root, detail=False)}


def nothing_staged(options: dict, root: str) -> bool:
    """No staged block (Azure) and no open upload session (GCS) under ``root``."""
    return leftovers(options, root) == []


def job(inputs: dict[str, str], output: str, options: dict, **extra):  # noqa: ANN001, ANN201
    return prepare_job(spec_from_mapping({**inputs, "output": output, "storage_options": options, **extra}))


def test_a_job_on_the_store_is_the_local_run_byte_for_byte(cloud, inputs, reference_output):
    name, options = cloud
    root = new_root(options)
    out = f"{root}/out"
    result = run_local(job(inputs, out, options), workers=2)
    assert comparable(files(options, out)) == reference_output
    assert verify_output(out, options).ok
    assert nothing_staged(options, root)
    versions = [f.get("version") for f in result.manifest["inputs"]["target"]["files"]
                if f["name"].endswith(".safetensors")]
    assert versions and all(versions), versions  # generation (GCS) / ETag (Azure) of every input file
    assert type(Storage(out, options)) is {"gcs": GCSStorage, "azure": AzureStorage}[name]
    assert AZURITE_KEY not in json.dumps(result.manifest)  # the connection string is redacted


def test_a_job_on_the_store_on_the_ray_executor(cloud, inputs, reference_output):
    _, options = cloud
    root = new_root(options)
    out = f"{root}/out"
    with local_ray():
        run_ray(job(inputs, out, options), RayOptions(workers=2))
    assert comparable(files(options, out)) == reference_output
    assert nothing_staged(options, root)


def test_a_failed_run_leaves_no_object_at_a_final_name_and_nothing_staged(cloud, inputs, tiny_checkpoints,
                                                                           tmp_path):
    from graft.engine.run.clean import clean_output

    _, options = cloud
    bad_ft, victim = poisoned_copy(tiny_checkpoints["finetuned"], str(tmp_path / "ft"))
    root = new_root(options)
    out = f"{root}/out"
    with pytest.raises(NonFiniteError, match=victim.replace(".", r"\.")):
        run_local(job({**inputs, "finetuned": bad_ft}, out, options), workers=2)
    left = files(options, out) if Storage(out, options).list() else {}
    # Only shards committed before the failure (kept for a resume) and the run mark; no manifest.
    assert MANIFEST_NAME not in left
    assert all(n.endswith(".safetensors") or n == RUN_MARK for n in left), sorted(left)
    assert nothing_staged(options, root)
    if left:
        clean_output(out, options)
        assert Storage(out, options).list() == []


def test_a_writer_that_fails_mid_file_publishes_nothing_and_leaves_nothing_staged(cloud):
    """Several blocks or chunks sent, then the shard fails: no object, no staged block, and a
    writer dropped without a commit never publishes later (adlfs's own writer would, on close)."""
    import gc

    _, options = cloud
    root = new_root(options)
    store = Storage(f"{root}/d", options)
    w = store.writer("shard.safetensors", 3 * 2**20)
    w.write(os.urandom(3 * 2**20 + 5))  # past the 1 MiB blocks of the test options: parts sent
    w.discard()
    dropped = store.writer("other.safetensors", 3 * 2**20)
    dropped.write(os.urandom(3 * 2**20))
    del dropped
    gc.collect()
    assert store.list() == []
    if "az" in options:  # the dropped writer's blocks are there, staged: the cleanup finds them
        assert staged_blobs(options, root) == ["d/other.safetensors"]
        assert store.abort_uploads(lambda n: n.endswith(".safetensors")) == ["other.safetensors"]
    else:  # GCS: the dropped writer's session stays open (GCS deletes it after a week); never listed
        assert leftovers(options, root) == ["d/other.safetensors"]
        assert store.abort_uploads(lambda n: True) == []
    assert store.list() == []


@pytest.fixture(params=["s3", "gcs", "azure"])
def versioned(request):  # noqa: ANN001, ANN201
    """(a fresh root, its storage options, the test's own client) on a store whose reads are pinned."""
    from conftest import new_bucket

    options = request.getfixturevalue(f"{request.param}_server")
    root = new_bucket(options) if request.param == "s3" else new_root(options)
    return root, options, store_fs(options, root.split("://")[0])


def test_every_read_is_pinned_to_the_version_planned(versioned):
    root, options, fs = versioned
    key = f"{root.split('://')[1]}/d/a.bin"
    fs.pipe_file(key, bytes(range(256)) * 16)
    storage = Storage(f"{root}/d", options)
    assert storage.pins_reads
    planned = storage.stat("a.bin")
    assert storage.list_stats() == {"a.bin": planned}  # the listing gives the same version as a stat
    assert storage.read("a.bin", 16, 32, version=planned.version) == bytes(range(16, 32))
    fs.pipe_file(key, bytes(255 - b for b in range(256)) * 16)  # new content under the same name
    with pytest.raises(IntegrityError, match=r"a\.bin: changed during the run \(its (ETag|generation) is no longer"):
        storage.read("a.bin", 16, 32, version=planned.version)
    buf = bytearray(20 << 20)  # several parts in flight: every one of them is pinned
    fs.pipe_file(key, bytes(len(buf)))
    with storage.reader("a.bin", 4, planned.version) as r, pytest.raises(IntegrityError, match="a.bin"):
        r.read_into(0, memoryview(buf))
    assert storage.read("a.bin", 16, 32) == bytes(16)  # unpinned reads see the new content


def test_an_input_rewritten_after_planning_is_refused_at_its_first_read(versioned, tiny_checkpoints, tmp_path):
    root, options, fs = versioned
    mine = upload(options, root, tiny_checkpoints)
    out = str(tmp_path / "out")
    planned = job(mine, out, options)
    shard = planned.plan.shards[0].tensors[0].terms[0].base.file
    key = f"{root.split('://')[1]}/base/{shard}"
    data = bytearray(fs.cat_file(key))
    data[-1] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    with pytest.raises(IntegrityError, match=rf"{shard}: changed during the run"):
        run_local(planned)
    assert not os.path.exists(out) or os.listdir(out) == []


def test_two_runs_on_one_output_exactly_one_takes_it(cloud, inputs):
    from graft.engine.errors import OutputError
    from graft.engine.run.runmark import RunMark, read_mark
    from graft.engine.storage import cas

    _, options = cloud
    out = Storage(f"{new_root(options)}/out", options)
    assert cas.supported(out)
    first, second = RunMark(out, "fp", {}), RunMark(out, "fp", {})
    first.acquire(None)
    with pytest.raises(OutputError, match="being written by another graft run"):
        second.acquire(None)  # it too saw no mark: the store refuses the second create
    assert read_mark(out)["token"] == first.token
    data, version = cas.read(out, RUN_MARK)
    assert cas.replace(out, RUN_MARK, data, "1" if version != "1" else "2") is None  # a stale version
    first.release()


def _stage(options: dict, blob_path: str) -> None:
    """Stage one block of ``container/name`` and commit nothing, as a writer killed mid-file leaves it."""
    from azure.storage.blob import BlobServiceClient

    container, _, name = blob_path.partition("/")
    with BlobServiceClient.from_connection_string(options["az"]["connection_string"]) as client:
        client.get_blob_client(container, name).stage_block("killed-000001", b"x" * 1024)


def test_blocks_killed_writers_staged_are_deleted_by_the_run_and_no_others(azure_server, tiny_checkpoints):
    """Azure's analogue of S3's unfinished multipart uploads: a crashed earlier run's writer (and one
    killed during this run) leave staged blocks under the output's file names; the run deletes
    those, and leaves other names' and other directories' staged blocks alone."""
    options = azure_server
    root = new_root(options)
    container = root.removeprefix("az://")
    inputs = upload(options, root, tiny_checkpoints)
    planned = job(inputs, f"{root}/out", options)
    shard = planned.plan.shards[-1].file
    foreign = {f"elsewhere/{shard}", f"out/sub/{shard}", "out/notes.txt"}
    # A temporary-marked name: no commit of this run would drop its blocks, only the cleanup.
    crashed = f"out/.{planned.plan.shards[0].file}{TEMP_MARK}0123456789ab"
    for name in foreign | {f"out/{shard}", crashed}:
        _stage(options, f"{container}/{name}")
    planted: list[str] = []

    def on_shard(event: str) -> None:  # mid-run: a writer of this run killed before its commit
        if not planted:
            planted.append(f"out/.{shard}{TEMP_MARK}fedcba987654")
            _stage(options, f"{container}/{planted[0]}")

    run_local(planned, on_shard=on_shard)
    assert planted
    assert set(staged_blobs(options, root)) == foreign  # only other names' staged blocks remain
