"""The retry policy of every store: which failures are worth trying again, and how long to wait.

``is_transient`` classifies an error (and what caused it) as a flaky network or an overloaded
server (retry) or anything else (fail now, naming the file); ``backoff`` is the jittered,
doubling pause; ``describe`` the one-line account of a failure that ``StorageError`` messages
carry. ``Storage`` applies it to reads, stats, listings and removals (``Storage._retry``).
"""
from __future__ import annotations

import asyncio
import errno
import random
import re

from ..errors import GraftError
from ..redaction import redact_text

__all__ = ["RETRY_ATTEMPTS", "RETRY_BASE_SECONDS", "RETRY_MAX_SECONDS", "ShortRead", "is_transient",
           "is_full", "backoff", "describe"]

# Remote stores drop connections, time out and throttle now and then. A read, stat or listing that
# failed that way is tried again, up to RETRY_ATTEMPTS times in all, after a pause that doubles from
# RETRY_BASE_SECONDS up to RETRY_MAX_SECONDS. Module-level so tests can make the pauses short.
RETRY_ATTEMPTS = 5
RETRY_BASE_SECONDS = 0.25
RETRY_MAX_SECONDS = 8.0

# errno values of a dropped or stalled connection; retrying can help.
_TRANSIENT_ERRNOS = frozenset({errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
                               errno.EAGAIN})
# errno values of a full disk, bucket or quota; retrying cannot help.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# HTTP statuses of an overloaded or briefly failing server.
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# S3-style error codes of throttling and server-side failures (s3fs raises them as an OSError caused
# by botocore's ClientError).
_TRANSIENT_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                              "TooManyRequestsException", "ServiceUnavailable", "InternalError",
                              "RequestTimeout", "500", "503"})
# Connection and timeout errors of client libraries graft does not import, matched by module and by
# the name of a class in the error's MRO (so a subclass matches too).
_TRANSIENT_CLASSES = {
    "aiohttp": {"ClientConnectionError", "ClientPayloadError"},
    # ResponseParserError: a throttling reply whose XML is cut or malformed (s3fs retried these).
    "botocore": {"HTTPClientError", "ConnectionError", "ReadTimeoutError", "ConnectTimeoutError",
                 "ResponseStreamingError", "IncompleteReadError", "ResponseParserError"},
    "urllib3": {"ProtocolError", "TimeoutError", "NewConnectionError"},
    "requests": {"ConnectionError", "Timeout", "ChunkedEncodingError"},
    "httpx": {"TimeoutException", "NetworkError", "RemoteProtocolError"},
    "http": {"IncompleteRead"},
}
# A failed TLS handshake or certificate check is a configuration problem, not a flaky network.
_NEVER_TRANSIENT = re.compile(r"SSL|Certificate|Fingerprint")


class ShortRead(Exception):
    """A remote store returned fewer bytes than asked although the file is long enough."""


def chain(e: BaseException) -> list[BaseException]:
    """``e`` and what caused it (libraries wrap the network error they hit)."""
    seen: list[BaseException] = []
    err: BaseException | None = e
    while err is not None and len(seen) < 4 and not any(err is s for s in seen):
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def http_status(err: BaseException) -> int | None:
    for attr in ("status", "status_code", "code"):
        value = getattr(err, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
            return value
    response = getattr(err, "response", None)
    if isinstance(response, dict):  # botocore's ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    else:  # requests / httpx responses
        status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def marked_transient(err: BaseException) -> bool:
    if isinstance(err, (ShortRead, ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
        return True
    response = getattr(err, "response", None)
    if isinstance(response, dict) and response.get("Error", {}).get("Code") in _TRANSIENT_CODES:
        return True
    if http_status(err) in _TRANSIENT_STATUS:
        return True
    names = _TRANSIENT_CLASSES.get(type(err).__module__.split(".", 1)[0])
    return bool(names) and any(c.__name__ in names for c in type(err).__mro__)


def is_transient(e: BaseException) -> bool:
    """Whether trying the same storage call again may succeed: a dropped connection, a timeout, a
    throttled or failing server (HTTP 5xx, S3 SlowDown), a short read. A missing file, a refused
    permission, a full disk or bucket, graft's own errors and anything unknown are permanent."""
    if isinstance(e, (GraftError, FileNotFoundError, PermissionError, IsADirectoryError,
                      NotADirectoryError)):
        return False
    causes = chain(e)
    if any(is_full(err) or _NEVER_TRANSIENT.search(type(err).__name__) for err in causes):
        return False
    return any(marked_transient(err) for err in causes)


def is_full(err: BaseException) -> bool:
    """A full disk, bucket or quota: retrying cannot help."""
    return isinstance(err, OSError) and err.errno in _FULL_ERRNOS


def backoff(attempt: int) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based): doubling from the base, capped,
    times a random factor in [0.5, 1] so parallel readers that failed together do not retry in step."""
    return min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message, URIs redacted (backends quote the signed URL they fetched)."""
    text = str(e).strip()
    return redact_text(text.splitlines()[0]) if text else ""


def describe(e: BaseException) -> str:
    if isinstance(e, ShortRead):
        return f"short read ({e})"
    text = first_line(e)
    return f"{e.__class__.__name__}: {text}" if text else e.__class__.__name__
