"""Credentials never reach what graft shows: locations with a password or a signed query, error
messages quoting them, storage options with auth headers. The real values stay for the I/O."""
from __future__ import annotations

import socket

import pytest

from graft.engine.storage import retry as retry_mod
from graft.engine.formats.checkpoint import open_checkpoint
from graft.engine.errors import GraftError
from graft.engine.redaction import redact, redact_text, redact_uri
from graft.engine.storage import Storage

SECRET = "hunter2"


@pytest.mark.parametrize("uri, shown", [
    ("s3://AKIAKEY:hunter2@bucket/ckpt", "s3://AKIAKEY:***@bucket/ckpt"),
    # An AWS secret with an unescaped "/" ends the authority early; still hidden up to the "@".
    ("s3://AKIAKEY:hun/ter2@bucket/ckpt", "s3://AKIAKEY:***@bucket/ckpt"),
    ("https://user:hunter2@host:8443/models/x", "https://user:***@host:8443/models/x"),
    # A bare userinfo is usually a token (https://<token>@github.com/...): hidden whole.
    ("https://ghp_hunter2@github.com/org/repo", "https://***@github.com/org/repo"),
    ("https://acct.blob.core.windows.net/c/model.safetensors?sv=2022-11-02&se=2030-01-01&sr=b&sp=r"
     "&sig=hunter2%3D",
     "https://acct.blob.core.windows.net/c/model.safetensors?sv=2022-11-02&se=2030-01-01&sr=b&sp=r&sig=***"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20260101"
     "&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
     "&X-Amz-Security-Token=hunter2&X-Amz-Signature=hunter2",
     "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
     "&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
     "&X-Amz-Security-Token=***&X-Amz-Signature=***"),
    ("https://b.s3.amazonaws.com/k?AWSAccessKeyId=AKIA&Signature=hunter2&Expires=1",
     "https://b.s3.amazonaws.com/k?AWSAccessKeyId=***&Signature=***&Expires=1"),
    ("https://storage.googleapis.com/b/k?X-Goog-Signature=hunter2&X-Goog-Date=1",
     "https://storage.googleapis.com/b/k?X-Goog-Signature=***&X-Goog-Date=1"),
    ("https://host/x?token=hunter2&versionId=3", "https://host/x?token=***&versionId=3"),
])
def test_redact_uri_hides_userinfo_secrets_and_signed_query_values(uri, shown):
    assert redact_uri(uri) == shown
    assert SECRET not in redact_uri(uri)


@pytest.mark.parametrize("uri", [
    "/data/models/llama", "file:///data/models/llama", "s3://bucket/models/llama", "memory://x/y",
    "hf://meta-llama/Llama-3.1-8B@0123456789abcdef0123456789abcdef01234567/sub",  # @ of a revision
    "s3://bucket/key@v1/x", "https://host/x?versionId=3&partNumber=2", "gs://b/dir#frag",
])
def test_redact_uri_leaves_locations_without_credentials_alone(uri):
    assert redact_uri(uri) == uri


def test_redact_text_redacts_every_uri_in_a_message_and_keeps_the_rest():
    # aiohttp's error quotes the URL it fetched, signature and all.
    msg = ("403, message='Forbidden', url=URL('https://a.blob.core.windows.net/c/x?sv=1&sig=hunter2'); "
           "also tried https://u:hunter2@h/x, then gave up.")
    assert redact_text(msg) == ("403, message='Forbidden', url=URL('https://a.blob.core.windows.net/c/x?sv=1"
                                "&sig=***'); also tried https://u:***@h/x, then gave up.")


def test_redact_hides_auth_headers_and_uris_in_storage_options():
    options = {
        "hf": {"token": "hf_hunter2", "headers": {"Authorization": "Bearer hunter2"}},
        "http": {"client_kwargs": {"headers": {"Cookie": "session=hunter2", "Proxy-Authorization": "Basic hunter2",
                                               "X-Amz-Security-Token": "hunter2", "X-Api-Key": "hunter2",
                                               "Accept": "application/json"},
                                   "proxy": "http://me:hunter2@proxy:3128", "auth": ["me", "hunter2"]}},
        "s3": {"endpoint_url": "https://minio:hunter2@127.0.0.1:9000", "client_kwargs": {"region_name": "x"}},
    }
    shown = redact(options)
    assert SECRET not in repr(shown)
    headers = shown["http"]["client_kwargs"]["headers"]
    assert headers["Accept"] == "application/json"
    assert headers["Cookie"] == headers["Proxy-Authorization"] == headers["X-Api-Key"] == "***"
    assert shown["hf"]["headers"]["Authorization"] == "***"
    assert shown["http"]["client_kwargs"]["proxy"] == "http://me:***@proxy:3128"
    assert shown["s3"]["endpoint_url"] == "https://minio:***@127.0.0.1:9000"
    assert shown["s3"]["client_kwargs"] == {"region_name": "x"}
    assert options["hf"]["headers"]["Authorization"] == "Bearer hunter2"  # a copy: the original is intact


def test_a_storage_shows_its_location_redacted_and_keeps_the_real_one_for_io():
    store = Storage("http://user:hunter2@127.0.0.1:9/models/llama")
    assert store.uri == "http://user:hunter2@127.0.0.1:9/models/llama"
    assert store.display_uri == "http://user:***@127.0.0.1:9/models/llama"
    assert store.url("config.json") == "http://user:***@127.0.0.1:9/models/llama/config.json"
    assert SECRET not in repr(store)
    assert SECRET in store.path("config.json")  # what the I/O uses


def test_a_storage_error_never_quotes_a_secret(monkeypatch):
    monkeypatch.setattr(retry_mod, "RETRY_BASE_SECONDS", 0.001)
    store = Storage("https://user:hunter2@host/models?sig=hunter2")
    backend = OSError("403 Forbidden: https://host/models/a.bin?sv=1&sig=hunter2")
    assert SECRET not in str(store._fail("a.bin", "read", backend))

    def dropped() -> bytes:
        raise ConnectionResetError("reset by https://user:hunter2@host/models/a.bin")

    with pytest.raises(GraftError) as failure:
        store._retry("a.bin", "read bytes 0..4", dropped)
    assert "failed after" in str(failure.value) and SECRET not in str(failure.value)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_checkpoint_that_cannot_be_opened_is_named_without_its_password(monkeypatch):
    monkeypatch.setattr(retry_mod, "RETRY_ATTEMPTS", 1)
    uri = f"http://user:hunter2@127.0.0.1:{_closed_port()}/models/llama"
    with pytest.raises(GraftError) as failure:
        open_checkpoint(uri)
    assert "user:***@127.0.0.1" in str(failure.value) and SECRET not in str(failure.value)
