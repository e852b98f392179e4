"""S3 output: one file streams into a multipart upload with several parts in flight (``parts.py``).

s3fs's own writer uploads one part at a time from the thread that writes (for a shard, the thread
that also hashes), so a shard wrote at one request's speed. Here a full part is handed to a small
pool and the writer goes on filling the next one; it waits only when ``PARTS_IN_FLIGHT`` parts are
already on the wire (bounded memory: ``PARTS_IN_FLIGHT`` + 1 parts per file being written).

Part size comes from the file's planned size: at least ``MIN_PART`` (or the ``default_block_size``
set in the s3 storage options, if larger than S3's 5 MiB minimum), and large enough that the file
fits in S3's 10,000 parts, so any file up to S3's 5 TB object limit can be written. A file that
fits in one part is one ``PutObject``.

Nothing is visible at the key before ``commit()`` (S3 completes a multipart upload atomically), and
``discard()`` (or any failure) aborts the upload. Each request is retried by botocore alone (the
writers' client, ``S3Storage.write_fs``). ``abort_uploads`` removes what a killed writer left: an
unfinished multipart upload, invisible in listings but stored and billed until aborted.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from . import parts
from .parts import PARTS_IN_FLIGHT, PartWriter

if TYPE_CHECKING:  # the S3 store picks this writer: it imports this module, not the reverse
    from .base import Storage

__all__ = ["MIN_PART", "PARTS_IN_FLIGHT", "MAX_PARTS", "part_size", "S3PartWriter", "abort_uploads",
           "precondition_failed"]

MIN_PART = 64 * 2**20
S3_MIN_PART = 5 * 2**20
MAX_PARTS = 10_000


def part_size(expected: int, floor: int = MIN_PART) -> int:
    """Bytes per part for a file of ``expected`` bytes: at least ``floor`` (and S3's 5 MiB), and
    enough that it takes at most ``MAX_PARTS`` parts; whole MiB."""
    return parts.part_size(expected, floor, MAX_PARTS, S3_MIN_PART)


class S3PartWriter(PartWriter):
    def __init__(self, storage: Storage, name: str, expected: int):
        floor = storage._fs_options.get("default_block_size") or MIN_PART
        super().__init__(storage, name, expected, part_size(expected, int(floor)))
        self._fs = storage.write_fs
        self._bucket, self._key, _ = self._fs.split_path(storage.path(name))
        self._upload_id: str | None = None

    def _call(self, method: str, **kwargs: Any) -> Any:
        return self._fs.call_s3(method, Bucket=self._bucket, Key=self._key, **kwargs)

    def _start(self) -> None:
        self._upload_id = self._call("create_multipart_upload")["UploadId"]

    def _upload(self, number: int, body: bytes | bytearray) -> dict[str, Any]:
        resp = self._call("upload_part", UploadId=self._upload_id, PartNumber=number, Body=body)
        return {"ETag": resp["ETag"], "PartNumber": number}

    def _publish(self, parts: list[Any] | None, whole: bytes) -> None:
        if parts is None:
            self._call("put_object", Body=whole)
        else:
            self._call("complete_multipart_upload", UploadId=self._upload_id, MultipartUpload={"Parts": parts})

    def _abort(self) -> None:
        if self._upload_id is not None:
            self._call("abort_multipart_upload", UploadId=self._upload_id)
            self._upload_id = None


def abort_uploads(storage: Storage, names: Callable[[str], bool]) -> list[str]:
    """Abort the unfinished multipart uploads of files directly in ``storage``'s directory whose
    name ``names`` accepts; returns those names."""
    bucket, _, key = storage.root.partition("/")
    prefix = f"{key}/" if key else ""
    aborted: list[str] = []
    page_args: dict[str, str] = {"Bucket": bucket, "Prefix": prefix}
    while True:
        page = storage._retry("", "list unfinished uploads",
                              lambda: storage.fs.call_s3("list_multipart_uploads", **page_args))
        for upload in page.get("Uploads", []):
            name = upload["Key"][len(prefix):]
            if not upload["Key"].startswith(prefix) or "/" in name or not names(name):
                continue
            storage._retry(name, "abort an unfinished upload", lambda u=upload: storage.fs.call_s3(
                "abort_multipart_upload", Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]))
            aborted.append(name)
        if not page.get("IsTruncated"):
            return aborted
        page_args.update(KeyMarker=page.get("NextKeyMarker", ""),
                         UploadIdMarker=page.get("NextUploadIdMarker", ""))


def precondition_failed(e: BaseException) -> bool:
    """An S3 412 (s3fs raises it as an OSError caused by botocore's ClientError)."""
    for err in (e, e.__cause__):
        response = getattr(err, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") == "PreconditionFailed":
            return True
    return False
