"""An in-memory fake of the Hugging Face Hub HTTP API, for driving the real ``huggingface_hub`` client.

``FakeHub`` serves, on ``http://127.0.0.1:<port>``, what ``HfApi``, ``HfFileSystem``, ``hf_hub_download``
and ``create_commit`` / ``upload_folder`` call (paths below are for models; datasets are served under
``/api/datasets/...`` and ``/datasets/org/name/...``):

- ``POST /api/repos/create`` (409 with the repo url if it exists) and ``POST /api/validate-yaml``;
- ``GET /api/models/org/name[/revision/{rev}]`` (repo info; ``blobs``/``expand`` honoured),
  ``GET .../tree/{rev}[/{path}]`` (``recursive``, ``expand``; never paginated),
  ``POST .../paths-info/{rev}`` (form or JSON), ``GET .../commits/{rev}``, ``GET .../refs``,
  ``POST .../branch/{name}``, ``POST .../tag/{rev}``;
- ``GET``/``HEAD /org/name/resolve/{rev}/{path}``, with single ``Range: bytes=`` requests (206/416);
- uploads: ``POST .../preupload/{rev}``, the LFS batch API ``POST /org/name.git/info/lfs/objects/batch``
  ("basic" transfer: a ``PUT`` to this server, checked against the sha256, then a ``verify`` POST) and
  ``POST .../commit/{branch}`` (NDJSON: ``file``, ``lfsFile``, ``deletedFile``, ``deletedFolder``;
  ``parentCommit`` checked), applied atomically. Writes need ``Authorization: Bearer <any token>``.

Storage follows the Hub: a file of at least ``LFS_THRESHOLD`` bytes or named ``*.safetensors`` / ``*.bin``
is an LFS file (``oid`` is the git blob sha1 of its pointer file, ``lfs.oid`` its sha256); any other file is
a git blob (``oid`` = git blob sha1 of its content). New repos start with an "initial commit" holding a
``.gitattributes``, like on the Hub. Errors carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound,
EntryNotFound), ``X-Error-Message`` and a JSON ``{"error": ...}`` body, so the client raises its own exceptions.

Not served: Xet storage (the client itself picks Xet for LFS uploads whenever ``hf_xet`` is installed, unless
a ``create_commit`` operand is a file object; no server answer turns it off, so set ``HF_HUB_DISABLE_XET=1`` or
``constants.HF_HUB_DISABLE_XET``; its token routes answer 501), pull requests, multipart LFS, pagination,
access control (``private`` is only recorded), spaces.

Test helpers write and inspect the store directly (``commit``, ``commit_dir``, ``create_branch``,
``create_tag``, ``files_at``, ``head``), ``tamper`` makes ``resolve`` serve other bytes than the recorded
metadata describes, and ``requests`` logs every request (method, path, query, Range header, status).
Repos are named ``org/name`` (models) or ``datasets/org/name`` in these helpers, which raise ``HubError``
for an unknown repo, revision or path.
"""
from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_THRESHOLD = 1024
LFS_SUFFIXES = (".safetensors", ".bin")
_Reply = tuple[int, Any, dict[str, str]]  # status, JSON-able payload or raw bytes, headers
GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


class HubError(Exception):
    """An error answered as the Hub does: status, ``X-Error-Code`` and message."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # URL-decoded, without the query
    query: dict[str, list[str]]
    range: str | None
    status: int


@dataclass
class _Blob:
    data: bytes
    lfs: bool
    sha256: str = field(init=False)
    pointer: bytes = field(init=False)
    oid: str = field(init=False)

    def __post_init__(self) -> None:
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        self.pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                        f"size {len(self.data)}\n").encode()
        self.oid = git_blob_sha1(self.pointer if self.lfs else self.data)


@dataclass
class _Commit:
    sha: str
    parent: str | None
    tree: dict[str, _Blob]
    title: str
    date: datetime


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content, uploaded or committed
    tampered: dict[tuple[str, str], bytes] = field(default_factory=dict)  # (commit sha, path) -> served bytes


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str, size: int) -> bool:
    return size > 0 and (size >= LFS_THRESHOLD or path.endswith(LFS_SUFFIXES))


def _iso(d: datetime) -> str:
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"


def _in(path: str, folder: str) -> bool:
    return not folder or path == folder or path.startswith(folder + "/")


def _not_found(code: str, what: str, headers: dict[str, str] | None = None) -> HubError:
    return HubError(404, code, what, headers)


class FakeHub:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._repos: dict[str, _Repo] = {}
        self._requests: list[Request] = []
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self.url = ""
        self.throttle_ranges = 0  # answer this many more ranged GETs with 503 (Retry-After: 0)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ test helpers
    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> None:
        key = ("datasets/" if repo_type == "dataset" else "") + repo_id
        with self._lock:
            if key in self._repos:
                raise HubError(409, None, f"You already created this {repo_type} repo")
            self._repos[key] = repo = _Repo(repo_type, repo_id, private)
            self._commit(repo, "main", {".gitattributes": _Blob(GITATTRIBUTES, False)}, [], "initial commit")

    def commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main", message: str = "Update files",
               parent_files: bool = True, delete: tuple[str, ...] | list[str] = ()) -> str:
        """Commit ``files`` on top of ``branch`` (or instead of its files, without ``parent_files``), deleting
        the paths in ``delete`` (a folder if it ends with ``/``); returns the new commit sha."""
        blobs = {p: _Blob(d, is_lfs(p, len(d))) for p, d in files.items()}
        with self._lock:
            repo = self._repo(repo_id)
            head = self._branch(repo, branch)
            gone = list(delete) + ([] if parent_files else [p for p in repo.commits[head].tree if p not in files])
            return self._commit(repo, branch, blobs, gone, message)

    def commit_dir(self, repo_id: str, local_dir: str | os.PathLike[str], branch: str = "main",
                   message: str = "Upload folder") -> str:
        root = Path(local_dir)
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        return self.commit(repo_id, files, branch, message)

    def create_branch(self, repo_id: str, name: str, sha: str) -> None:
        with self._lock:
            repo = self._repo(repo_id)
            repo.branches[name] = self._resolve(repo, sha)

    def create_tag(self, repo_id: str, name: str, sha: str) -> None:
        with self._lock:
            repo = self._repo(repo_id)
            repo.tags[name] = self._resolve(repo, sha)

    def head(self, repo_id: str, branch: str = "main") -> str:
        with self._lock:
            return self._branch(self._repo(repo_id), branch)

    def files_at(self, repo_id: str, revision: str) -> dict[str, bytes]:
        with self._lock:
            repo = self._repo(repo_id)
            return {p: b.data for p, b in repo.commits[self._resolve(repo, revision)].tree.items()}

    def tamper(self, repo_id: str, revision: str, path: str, data: bytes) -> None:
        """Make ``resolve`` serve ``data`` for ``path`` at ``revision``; the recorded metadata is kept."""
        with self._lock:
            repo = self._repo(repo_id)
            sha = self._resolve(repo, revision)
            if path not in repo.commits[sha].tree:
                raise _not_found("EntryNotFound", f"{path} not found at {revision}")
            repo.tampered[(sha, path)] = data

    # ------------------------------------------------------------------ store (callers hold the lock)
    def _repo(self, key: str) -> _Repo:
        if key not in self._repos:
            raise _not_found("RepoNotFound", f"Repository not found: {key}")
        return self._repos[key]

    def _resolve(self, repo: _Repo, revision: str) -> str:
        sha = repo.branches.get(revision) or repo.tags.get(revision)
        if sha is None and revision in repo.commits:
            sha = revision
        if sha is None:
            raise _not_found("RevisionNotFound", f"Invalid rev id: {revision}")
        return sha

    def _branch(self, repo: _Repo, branch: str) -> str:
        if branch not in repo.branches:
            raise _not_found("RevisionNotFound", f"Invalid rev id: {branch} (not a branch)")
        return repo.branches[branch]

    def _commit(self, repo: _Repo, branch: str, adds: dict[str, _Blob], deletes: list[str], title: str) -> str:
        parent = repo.branches.get(branch)
        tree = dict(repo.commits[parent].tree) if parent else {}
        for path in deletes:
            folder = path.rstrip("/")
            hit = [p for p in tree if _in(p, folder)] if path.endswith("/") else [p for p in tree if p == path]
            if not hit:
                raise _not_found("EntryNotFound", f"A file with this name doesn't exist: {path}")
            for p in hit:
                del tree[p]
        tree.update(adds)
        seed = f"{repo.repo_id}|{parent}|{title}|{next(self._counter)}|{sorted((p, b.oid) for p, b in tree.items())}"
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[sha] = _Commit(sha, parent, tree, title, datetime.now(timezone.utc))
        repo.branches[branch] = sha
        repo.lfs_objects.update({b.sha256: b.data for b in adds.values() if b.lfs})
        return sha

    def _last_commit(self, repo: _Repo, sha: str, path: str) -> dict[str, str]:
        def view(c: _Commit) -> list[tuple[str, str]]:
            return sorted((p, b.oid) for p, b in c.tree.items() if _in(p, path))

        c = repo.commits[sha]
        while c.parent is not None and view(repo.commits[c.parent]) == view(c):
            c = repo.commits[c.parent]
        return {"id": c.sha, "title": c.title, "date": _iso(c.date)}

    def _entry(self, repo: _Repo, sha: str, path: str, expand: bool) -> dict[str, Any] | None:
        tree = repo.commits[sha].tree
        if path in tree:
            b = tree[path]
            out: dict[str, Any] = {"type": "file", "oid": b.oid, "size": len(b.data), "path": path}
            if b.lfs:
                out["lfs"] = {"oid": b.sha256, "size": len(b.data), "pointerSize": len(b.pointer)}
        elif path and any(_in(p, path) for p in tree):
            listing = sorted((p, b.oid) for p, b in tree.items() if _in(p, path))
            out = {"type": "directory", "oid": hashlib.sha1(repr(listing).encode()).hexdigest(), "size": 0,
                   "path": path}
        else:
            return None
        if expand:
            out["lastCommit"] = self._last_commit(repo, sha, path)
        return out

    def _tree(self, repo: _Repo, sha: str, folder: str, recursive: bool, expand: bool) -> list[dict[str, Any]]:
        tree = repo.commits[sha].tree
        if folder and (folder in tree or not any(_in(p, folder) for p in tree)):
            raise _not_found("EntryNotFound", f"{folder} is not a directory at {sha}")
        paths: set[str] = set()
        for p in tree:
            if _in(p, folder):
                parts = p[len(folder) + 1 if folder else 0:].split("/")
                depth = len(parts) if recursive else 1
                paths.update("/".join(filter(None, [folder, *parts[:i]])) for i in range(1, depth + 1))
        entries = [self._entry(repo, sha, p, expand) for p in sorted(paths)]
        return sorted((e for e in entries if e), key=lambda e: (e["type"] != "directory", e["path"]))

    def _info(self, repo: _Repo, sha: str, query: dict[str, list[str]]) -> dict[str, Any]:
        c = repo.commits[sha]
        blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for p, b in sorted(c.tree.items()):
            s: dict[str, Any] = {"rfilename": p}
            if blobs:
                s.update(size=len(b.data), blobId=b.oid)
                if b.lfs:
                    s["lfs"] = {"sha256": b.sha256, "size": len(b.data), "pointerSize": len(b.pointer)}
            siblings.append(s)
        first = min(repo.commits.values(), key=lambda x: x.date)
        info = {"_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0], "sha": sha, "lastModified": _iso(c.date),
                "createdAt": _iso(first.date), "private": repo.private, "disabled": False, "gated": False,
                "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
                "usedStorage": sum(len(d) for d in repo.lfs_objects.values())}
        if "expand" in query:
            info = {k: v for k, v in info.items() if k in ("_id", "id", *query["expand"])}
        return info


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_GET

    # ------------------------------------------------------------------ plumbing
    def _dispatch(self) -> None:
        self.hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        parts = urlsplit(self.path)
        self.query = parse_qs(parts.query, keep_blank_values=True)
        self.segs = [unquote(s) for s in parts.path.split("/")[1:]]
        try:
            self.body = self._read_body()
            with self.hub._lock:
                if self.command == "GET" and self.headers.get("Range") and self.hub.throttle_ranges > 0:
                    self.hub.throttle_ranges -= 1
                    raise HubError(503, None, "Service Unavailable (FakeHub throttle)", {"Retry-After": "0"})
                status, payload, headers = self._route()
            self._send(status, payload, headers)
        except HubError as e:
            body = json.dumps({"error": e.message}).encode()
            code = {"X-Error-Code": e.code} if e.code else {}
            self._send(e.status, body, {**e.headers, **code, "X-Error-Message": e.message})
        except Exception as e:  # noqa: BLE001 - a bug of the fake: answer it instead of hanging the client
            self._send(500, json.dumps({"error": f"FakeHub: {e!r}"}).encode(), {})

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload: Any, headers: dict[str, str]) -> None:
        with self.hub._lock:  # logged before answering, so the client never sees a reply not yet logged
            self.hub._requests.append(Request(self.command, unquote(urlsplit(self.path).path), self.query,
                                              self.headers.get("Range"), status))
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        if "Content-Type" not in headers and (not isinstance(payload, bytes) or "X-Error-Message" in headers):
            self.send_header("Content-Type", "application/json")
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self) -> Any:
        return json.loads(self.body or b"{}")

    def _auth(self) -> None:
        if not re.fullmatch(r"Bearer \S+", self.headers.get("Authorization", "")):
            raise HubError(401, None, "Invalid credentials in Authorization header")

    # ------------------------------------------------------------------ routes (run under the hub lock)
    def _route(self) -> _Reply:
        s, m, hub = self.segs, self.command, self.hub
        if s[:3] == ["api", "repos", "create"] and m == "POST":
            return self._create_repo()
        if s[:2] == ["api", "validate-yaml"] and m == "POST":
            return self._validate_yaml()
        if len(s) >= 4 and s[0] == "api" and s[1] in ("models", "datasets"):
            key = ("datasets/" if s[1] == "datasets" else "") + f"{s[2]}/{s[3]}"
            return self._api(hub._repo(key), key, s[4] if len(s) > 4 else "", s[5:])
        if s and s[0] == "__lfs__" and m == "PUT":
            return self._lfs_put(hub._repo("/".join(s[1:-1])), s[-1])
        prefix = "datasets/" if s[:1] == ["datasets"] else ""
        s = s[1:] if prefix else s
        if len(s) >= 4 and s[1].endswith(".git") and s[2:5] == ["info", "lfs", "objects"] and m == "POST":
            key = f"{prefix}{s[0]}/{s[1][:-4]}"
            return self._lfs(hub._repo(key), key, s[5] if len(s) > 5 else "")
        if len(s) >= 5 and s[2] == "resolve" and m in ("GET", "HEAD"):
            return self._resolve_file(hub._repo(f"{prefix}{s[0]}/{s[1]}"), s[3], "/".join(s[4:]))
        hint = " (Xet storage is not served: set HF_HUB_DISABLE_XET=1)" if "xet" in self.path else ""
        raise HubError(501, None, f"FakeHub does not serve {m} {self.path}{hint}")

    def _api(self, repo: _Repo, key: str, action: str, rest: list[str]) -> _Reply:
        hub, m = self.hub, self.command
        rev = rest[0] if rest else "main"
        if m == "GET" and action in ("", "revision"):
            return 200, hub._info(repo, hub._resolve(repo, rev), self.query), {}
        if m == "GET" and action == "tree":
            flag = {k: self.query.get(k, ["false"])[0].lower() in ("1", "true") for k in ("recursive", "expand")}
            return 200, hub._tree(repo, hub._resolve(repo, rev), "/".join(rest[1:]).strip("/"), **flag), {}
        if m == "POST" and action == "paths-info":
            if self.headers.get("Content-Type", "").startswith("application/json"):
                form = {k: v if isinstance(v, list) else [v] for k, v in self._json().items()}
            else:
                form = parse_qs(self.body.decode(), keep_blank_values=True)
            expand = str(form.get("expand", [False])[0]).lower() in ("1", "true")
            sha = hub._resolve(repo, rev)
            return 200, [e for p in form.get("paths", []) if (e := hub._entry(repo, sha, p.strip("/"), expand))], {}
        if m == "GET" and action == "commits":
            out, c = [], repo.commits[hub._resolve(repo, rev)]
            while True:
                out.append({"id": c.sha, "title": c.title, "message": "", "authors": [{"user": "fake-hub"}],
                            "date": _iso(c.date)})
                if c.parent is None:
                    return 200, out, {}
                c = repo.commits[c.parent]
        if m == "GET" and action == "refs":
            def refs(kind: str, names: dict[str, str]) -> list[dict[str, str]]:
                return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": t} for n, t in names.items()]
            return 200, {"branches": refs("heads", repo.branches), "converts": [], "tags": refs("tags", repo.tags),
                         "pullRequests": []}, {}
        if m != "POST":
            raise HubError(501, None, f"FakeHub does not serve {m} {self.path}")
        self._auth()
        if action == "preupload":
            tree = repo.commits[hub._resolve(repo, rev)].tree
            files = []
            for f in self._json()["files"]:
                old = tree.get(f["path"])
                files.append({"path": f["path"], "uploadMode": "lfs" if is_lfs(f["path"], f["size"]) else "regular",
                              "shouldIgnore": False, "oid": old and (old.sha256 if old.lfs else old.oid)})
            return 200, {"files": files, "commitOid": hub._resolve(repo, rev)}, {}
        if action == "commit":
            return self._commit(repo, key, rev)
        if action == "branch":
            name, start = "/".join(rest), self._json().get("startingPoint") or "main"
            if name in repo.branches:
                raise HubError(409, None, f"Reference already exists: refs/heads/{name}")
            repo.branches[name] = hub._resolve(repo, start)
            return 200, {}, {}
        if action == "tag":
            tag = self._json()["tag"]
            if tag in repo.tags:
                raise HubError(409, None, f"Tag {tag} already exists")
            repo.tags[tag] = hub._resolve(repo, rev)
            return 200, {}, {}
        raise HubError(501, None, f"FakeHub does not serve {m} {self.path}")

    def _create_repo(self) -> _Reply:
        self._auth()
        p = self._json()
        repo_type = p.get("type") or "model"
        if not p.get("organization") or repo_type not in ("model", "dataset"):
            raise HubError(400, None, "FakeHub needs an org/name repo id of type model or dataset")
        repo_id = f"{p['organization']}/{p['name']}"
        url = f"{self.hub.url}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
        try:
            self.hub.create_repo(repo_id, repo_type, private=p.get("visibility") == "private")
        except HubError as e:
            return 409, {"error": e.message, "url": url}, {"X-Error-Message": e.message}
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def _validate_yaml(self) -> _Reply:
        content = self._json().get("content", "")
        match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        try:
            meta = yaml.safe_load(match.group(1)) if match else {}
            if not isinstance(meta, (dict, type(None))):
                raise yaml.YAMLError("metadata must be a mapping")
        except yaml.YAMLError as e:
            return 400, {"errors": [{"message": str(e)}], "warnings": []}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def _commit(self, repo: _Repo, key: str, branch: str) -> _Reply:
        if self.query.get("create_pr", ["0"])[0] not in ("0", ""):
            raise HubError(400, None, "FakeHub does not support pull requests (create_pr)")
        head = self.hub._branch(repo, branch)
        adds: dict[str, _Blob] = {}
        deletes: list[str] = []
        title = ""
        for line in filter(None, self.body.splitlines()):
            item = json.loads(line)
            kind, v = item["key"], item["value"]
            if kind == "header":
                title = v["summary"]
                if v.get("parentCommit") not in (None, head):
                    raise HubError(412, None, "A commit has happened since. Please refresh and try again.")
            elif kind == "file":
                data = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v["content"].encode()
                if is_lfs(v["path"], len(data)):
                    raise HubError(400, None, f"{v['path']}: must be uploaded with LFS (FakeHub stores files of "
                                              f">= {LFS_THRESHOLD} bytes and *.safetensors / *.bin in LFS)")
                adds[v["path"]] = _Blob(data, False)
            elif kind == "lfsFile":
                data = repo.lfs_objects.get(v["oid"])
                if data is None or v.get("size", len(data)) != len(data):
                    raise HubError(400, None, f"{v['path']}: LFS object {v['oid']} was not uploaded")
                adds[v["path"]] = _Blob(data, True)
            elif kind in ("deletedFile", "deletedFolder"):
                deletes.append(v["path"].rstrip("/") + ("/" if kind == "deletedFolder" else ""))
            else:
                raise HubError(400, None, f"FakeHub does not support commit operation {kind!r}")
        sha = self.hub._commit(repo, branch, adds, deletes, title)
        return 200, {"success": True, "commitOid": sha, "commitUrl": f"{self.hub.url}/{key}/commit/{sha}",
                     "commitMessage": title, "hookOutput": ""}, {}

    def _lfs(self, repo: _Repo, key: str, action: str) -> _Reply:
        self._auth()
        p = self._json()
        if action == "verify":
            data = repo.lfs_objects.get(p["oid"])
            if data is None or len(data) != p["size"]:
                raise HubError(404, None, f"LFS object {p['oid']} not found")
            return 200, {"success": True}, {}
        if p.get("operation") != "upload" or "basic" not in p.get("transfers", ["basic"]):
            raise HubError(400, None, "FakeHub serves only 'upload' with the 'basic' transfer")
        objects = []
        for o in p["objects"]:
            entry = {"oid": o["oid"], "size": o["size"]}
            if o["oid"] not in repo.lfs_objects:
                entry.update(authenticated=True, actions={
                    "upload": {"href": f"{self.hub.url}/__lfs__/{key}/{o['oid']}"},
                    "verify": {"href": f"{self.hub.url}/{key}.git/info/lfs/objects/verify"}})
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}

    def _lfs_put(self, repo: _Repo, oid: str) -> _Reply:
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, None, f"uploaded content does not match sha256 {oid}")
        repo.lfs_objects[oid] = self.body
        return 200, b"", {"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'}

    def _resolve_file(self, repo: _Repo, rev: str, path: str) -> _Reply:
        sha = self.hub._resolve(repo, rev)
        blob = repo.commits[sha].tree.get(path)
        if blob is None:
            raise _not_found("EntryNotFound", f"{path} does not exist at {rev}", {"X-Repo-Commit": sha})
        data = repo.tampered.get((sha, path), blob.data)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{blob.sha256 if blob.lfs else blob.oid}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))})
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if not match or match.groups() == ("", ""):
            return 200, data, headers
        a, b = match.groups()
        start, end = (int(a), min(int(b or len(data) - 1), len(data) - 1)) if a else (max(len(data) - int(b), 0),
                                                                                 len(data) - 1)
        if start >= len(data) or start > end:
            return 416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"}
        return 206, data[start:end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}
