"""Credentials never reach what graft shows or records: the manifest, ``graft plan``, error
messages, logs. Three views of one rule:

- ``redact_uri(uri)``: a location with its userinfo secret and its signed query values hidden;
- ``redact_text(text)``: every URI inside a message (a backend's error quotes the URL it fetched);
- ``redact(options)``: nested storage options with credential-like keys hidden (and URIs redacted).

The real values stay where the I/O needs them (``Storage.uri``, ``JobSpec.storage_options``).
"""
from __future__ import annotations

import re
from typing import Any, Mapping
from urllib.parse import unquote_plus, urlsplit, urlunsplit

__all__ = ["HIDDEN", "redact", "redact_uri", "redact_text"]

HIDDEN = "***"

# Option names, header names and query parameters whose values are credentials: s3fs key / secret /
# token, adlfs account_key / connection_string / sas_token, gcsfs token, HTTP Authorization /
# Proxy-Authorization / Cookie / X-Amz-Security-Token / X-Api-Key, aiohttp's ``auth``, presigned
# S3 (X-Amz-Signature, X-Amz-Credential, AWSAccessKeyId + Signature), GCS (X-Goog-Signature) and
# Azure SAS (sig) query strings, and the access key ids that sign them (AWSAccessKeyId, GoogleAccessId).
_SECRET_NAMES = re.compile(r"secret|token|password|passwd|^pwd$|key$|^key|credential|signature|^sig$"
                           r"|connection_string|conn_str|sas|auth|cookie|access_?key|accessid", re.I)
# A URI inside free text: scheme://... up to whitespace, a quote or a bracket, less the punctuation
# of the sentence around it.
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{}]*[^\s'\"<>()\[\]{}.,;:]")


def _secret_name(name: object) -> bool:
    return bool(_SECRET_NAMES.search(str(name)))


def redact_uri(uri: str) -> str:
    """``uri`` with credentials replaced by ``***``: the password of ``user:password@`` (a bare
    ``token@`` userinfo is hidden whole: a personal access token is often passed that way) and the
    value of every secret-bearing query parameter (``sig``, ``X-Amz-Signature``, ``token``, ...).
    Anything else, and any string that is not a ``scheme://`` URI (a local path), is unchanged."""
    if "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:  # e.g. an unbalanced [ in the host: hide everything past the scheme
        return f"{uri.split('://', 1)[0]}://{HIDDEN}"
    netloc, path = parts.netloc, parts.path
    host_port = netloc.rpartition("@")[2]
    if ":" in host_port and not host_port.rpartition(":")[2].isdigit() and "@" in path:
        # An unescaped "/" in the password (AWS secrets have them) ends the authority early:
        # s3://AKIA:se/cret@bucket/x. Everything up to the first "@" is userinfo.
        secret_rest, _, after = path.partition("@")
        host, slash, tail = after.partition("/")
        netloc, path = f"{netloc}{secret_rest}@{host}", slash + tail
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{HIDDEN}@{host}" if colon else f"{HIDDEN}@{host}"
    query, fragment = _hide_values(parts.query), _hide_values(parts.fragment)
    if (netloc, path, query, fragment) == (parts.netloc, parts.path, parts.query, parts.fragment):
        return uri
    return urlunsplit((parts.scheme, netloc, path, query, fragment))


def _hide_values(query: str) -> str:
    # Each "name=value" piece is kept verbatim unless its name is secret-bearing.
    return "&".join(f"{seg.partition('=')[0]}={HIDDEN}" if _secret_name(unquote_plus(seg.partition("=")[0]))
                    else seg for seg in query.split("&"))


def redact_text(text: str) -> str:
    """``text`` with every URI in it passed through ``redact_uri``."""
    if "://" not in text:
        return text
    return _URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)


def redact(options: Any) -> Any:
    """Copy of nested storage options with every credential-like value (by its key: ``secret``,
    ``token``, ``Authorization``, ``Cookie``, ...) replaced by ``***`` and every URI redacted
    (an ``endpoint_url`` or a proxy with a password in it)."""
    if isinstance(options, Mapping):
        return {k: (HIDDEN if _secret_name(k) and v is not None else redact(v)) for k, v in options.items()}
    if isinstance(options, (list, tuple)):
        return [redact(v) for v in options]
    if isinstance(options, str):
        return redact_text(options)
    return options
