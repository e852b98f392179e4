"""The Google Cloud Storage and Azure Blob emulators the store tests run against, on 127.0.0.1 only.

- GCS: ``gcp-storage-emulator`` (a PyPI package of the dev extras), in this process on a thread,
  in memory, on a port the OS picks. It implements no precondition and no cancel of a resumable
  upload, so ``_with_gcs_preconditions`` adds them as Google documents them (and as the real
  service answers): ``ifGenerationMatch`` (``0``: the object must not exist) on uploads, downloads,
  metadata reads and deletes, 412 when it fails, checked again when a resumable upload is
  finalised; the ``x-goog-generation`` header on downloads; ``DELETE`` on a resumable session
  cancels it (499). Everything else is the emulator's own.
- Azure: Azurite (``tests/emulators``, installed from npm by the Makefile), a child process on a
  port the OS picks (read from its first lines), in memory, telemetry off (without
  ``--disableTelemetry`` it would try to reach a host on the internet).

Each yields the fsspec ``storage_options`` that reach it; ``new_gcs_bucket`` / ``new_container``
make a fresh, empty root. Credentials are the emulators' public dummies, passed explicitly so
nothing from the machine's cloud configuration is used.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from http import HTTPStatus
from types import SimpleNamespace
from typing import Any, Iterator

ROOT = os.path.dirname(os.path.abspath(__file__))
AZURITE = os.path.join(ROOT, "emulators", "node_modules", ".bin", "azurite-blob")
# Azurite's well-known development account (public, documented by Microsoft: not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def _with_gcs_preconditions() -> None:
    """Teach the emulator GCS's generation preconditions (see the module docstring); idempotent."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    if getattr(server, "_graft_preconditions", False):
        return

    def generation(storage: Any, bucket: str, name: str) -> str:
        try:
            return str(storage.get_file_obj(bucket, name)["generation"])
        except NotFound:
            return "0"

    def failed(request: Any, storage: Any, bucket: str, name: str | None) -> bool:
        want = request.query.get("ifGenerationMatch")
        return bool(want) and name is not None and want[0] != generation(storage, bucket, name)

    def refuse(response: Any) -> None:
        response.status = HTTPStatus.PRECONDITION_FAILED
        response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you specified did not hold."}})

    def object_name(request: Any, storage: Any) -> str | None:
        if "upload_id" in request.query:  # a resumable session's chunk: the object it will create
            try:
                return storage.get_resumable_file_obj(request.query["upload_id"][0])["name"]
            except NotFound:
                return None
        if "name" in request.query:
            return request.query["name"][0]
        return request.params.get("object_id")

    def guarded(handler: Any, add_generation: bool = False) -> Any:
        def run(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
            bucket = request.params["bucket_name"]
            name = object_name(request, storage)
            if failed(request, storage, bucket, name):
                return refuse(response)
            if add_generation and name is not None:
                response["x-goog-generation"] = generation(storage, bucket, name)
            return handler(request, response, storage, *args, **kwargs)
        return run

    def cancel(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> None:
        try:
            storage.delete_resumable_file_obj(request.query["upload_id"][0])
        except (NotFound, KeyError):
            response.status = HTTPStatus.NOT_FOUND
            return
        # What GCS answers to a cancelled resumable upload (no name in http.HTTPStatus).
        response.status = SimpleNamespace(value=499, phrase="Client Closed Request")

    wrap = {objects.insert: guarded(objects.insert), objects.upload_partial: guarded(objects.upload_partial),
            objects.download: guarded(objects.download, add_generation=True), objects.get: guarded(objects.get),
            objects.delete: guarded(objects.delete)}
    handlers = []
    for regex, methods in server.HANDLERS:
        ours = {m: wrap.get(h, h) for m, h in methods.items()}
        if objects.upload_partial in methods.values():  # the upload endpoint: sessions live there
            ours["DELETE"] = cancel
        handlers.append((regex, ours))
    server.HANDLERS = tuple(handlers)
    server._graft_preconditions = True


# endpoint URL -> the running GCS emulator (in this process: its state can be read).
_GCS_SERVERS: dict[str, Any] = {}


@contextmanager
def gcs_emulator() -> Iterator[dict[str, Any]]:
    from gcp_storage_emulator.server import create_server

    _with_gcs_preconditions()
    server = create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    httpd = server._api._httpd  # noqa: SLF001 - the emulator exposes no accessor
    host, port = httpd.server_address
    # A client that hangs up first (gcsfs cancels the slower of two lookups) is not an error here.
    handle_error = httpd.handle_error
    httpd.handle_error = lambda request, address: (
        None if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)) else handle_error(request, address))
    try:
        _GCS_SERVERS[f"http://{host}:{port}"] = server
        # Small write blocks, so that test files of a few MiB take several upload requests.
        yield {"gs": {"endpoint_url": f"http://{host}:{port}", "token": "anon", "project": "graft-test",
                      "block_size": 2**20}}
    finally:
        _GCS_SERVERS.pop(f"http://{host}:{port}", None)
        server.stop()


@contextmanager
def azure_emulator() -> Iterator[dict[str, Any]]:
    if not os.path.exists(AZURITE):
        raise RuntimeError(f"{AZURITE} is missing: run make test (it installs Azurite with npm ci)")
    proc = subprocess.Popen(
        [AZURITE, "--blobHost", "127.0.0.1", "--blobPort", "0", "--inMemoryPersistence",
         "--extentMemoryLimit", "2048", "--silent", "--skipApiVersionCheck", "--loose",
         "--disableTelemetry"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        port = None
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            m = re.search(r"listens on http://127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
        if port is None:
            raise RuntimeError("Azurite did not start (no 'listens on' line within 60 s)")
        endpoint = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
        # Blocks of 1 MiB, so that test files of a few MiB are staged in several blocks.
        yield {"az": {"connection_string": (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
                                            f"AccountKey={AZURITE_KEY};BlobEndpoint={endpoint};"),
                      "blocksize": 2**20}}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def store_fs(options: dict[str, Any], protocol: str) -> Any:
    """The test's own client of an emulator (for GCS the JSON-API filesystem graft uses too)."""
    import fsspec

    if protocol == "s3":
        return fsspec.filesystem("s3", **options["s3"])
    if protocol == "gs":
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem(**options["gs"], skip_instance_cache=True)
    return fsspec.filesystem(protocol, **options[protocol], skip_instance_cache=True)


def new_root(options: dict[str, Any]) -> str:
    """A fresh bucket (GCS) or container (Azure) on the emulator ``options`` reach; its root URI."""
    protocol = next(iter(options))
    name = f"graft-{uuid.uuid4().hex[:12]}"
    store_fs(options, protocol).mkdir(name)
    return f"{protocol}://{name}"


def leftovers(options: dict[str, Any], root: str) -> list[str]:
    """What unfinished writes left under ``root``: on Azure the blobs holding only staged blocks,
    on GCS the resumable upload sessions neither finalised nor cancelled."""
    if "az" in options:
        return staged_blobs(options, root)
    bucket, _, prefix = root.removeprefix("gs://").partition("/")
    server = _GCS_SERVERS[options["gs"]["endpoint_url"]]
    sessions = server._storage.resumable  # noqa: SLF001 - upload id -> the object it will create
    return sorted(o["name"] for o in sessions.values() if o["bucket"] == bucket and o["name"].startswith(prefix))


def staged_blobs(options: dict[str, Any], root: str) -> list[str]:
    """Azure: blobs under ``root`` that hold only staged (uncommitted) blocks."""
    from azure.storage.blob import BlobServiceClient

    container, _, prefix = root.removeprefix("az://").partition("/")
    client = BlobServiceClient.from_connection_string(options["az"]["connection_string"])
    with client:
        c = client.get_container_client(container)
        every = {b.name for b in c.list_blobs(name_starts_with=prefix or None, include=["uncommittedblobs"])}
        committed = {b.name for b in c.list_blobs(name_starts_with=prefix or None)}
    return sorted(every - committed)
