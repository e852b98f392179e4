"""The fake Hub (tests/fake_hub.py) driven by the real huggingface_hub client: what the client sees must be
what the real Hub would answer (revisions, LFS metadata, byte ranges, uploads, errors)."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, HfFileSystem, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import get_session

from fake_hub import FakeHub, git_blob_sha1

TOKEN = "hf_fake_token"
WEIGHTS = bytes(range(256)) * 40  # 10 KiB: LFS
CONFIG = b'{"hidden_size": 8}'  # git blob


pytestmark = pytest.mark.usefixtures("hub_online")


def new_repo(hub: FakeHub, files: dict[str, bytes] | None = None) -> tuple[str, str]:
    repo = f"org/m-{uuid.uuid4().hex[:8]}"
    hub.create_repo(repo)
    sha = hub.commit(repo, files if files is not None else {"model.safetensors": WEIGHTS, "config.json": CONFIG})
    return repo, sha


def fs_for(hub: FakeHub) -> HfFileSystem:
    return HfFileSystem(endpoint=hub.url, skip_instance_cache=True)


def resolves(hub: FakeHub, name: str) -> list[tuple[str, str | None, int]]:
    return [(r.method, r.range, r.status) for r in hub.requests if "/resolve/" in r.path and r.path.endswith(name)]


def test_revisions_resolve_like_the_hub(hub: FakeHub) -> None:
    repo, first = new_repo(hub)
    hub.create_tag(repo, "v1", first)
    second = hub.commit(repo, {"config.json": b"{}"})
    api = HfApi(endpoint=hub.url)
    assert api.repo_info(repo, revision="main").sha == hub.head(repo) == second
    assert api.repo_info(repo).sha == second
    assert api.repo_info(repo, revision="v1").sha == first
    assert api.repo_info(repo, revision=first).sha == first
    assert [c.commit_id for c in api.list_repo_commits(repo)][:2] == [second, first]
    refs = api.list_repo_refs(repo)
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", first)]
    siblings = {s.rfilename: s for s in api.repo_info(repo, revision="v1", files_metadata=True).siblings}
    assert siblings["model.safetensors"].lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert siblings["config.json"].lfs is None and siblings["config.json"].blob_id == git_blob_sha1(CONFIG)
    assert ".gitattributes" in siblings  # created with the repo, as on the Hub


def test_filesystem_lists_and_describes_files(hub: FakeHub) -> None:
    repo, sha = new_repo(hub, {"model.safetensors": WEIGHTS, "config.json": CONFIG, "sub/dir/a.txt": b"a"})
    fs = fs_for(hub)
    assert sorted(fs.ls(repo, detail=False)) == [f"{repo}/{n}" for n in
                                                 (".gitattributes", "config.json", "model.safetensors", "sub")]
    assert fs.find(f"{repo}/sub") == [f"{repo}/sub/dir/a.txt"]
    info = fs.info(f"{repo}@{sha}/model.safetensors", refresh=True, expand_info=True)
    assert info["size"] == len(WEIGHTS) and info["type"] == "file"
    assert info["lfs"].sha256 == hashlib.sha256(WEIGHTS).hexdigest() and info["lfs"].size == len(WEIGHTS)
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{info['lfs'].sha256}\nsize {len(WEIGHTS)}\n"
    assert info["blob_id"] == git_blob_sha1(pointer.encode()) and info["lfs"].pointer_size == len(pointer)
    assert info["last_commit"].oid == sha
    small = fs.info(f"{repo}@{sha}/config.json", refresh=True, expand_info=True)
    assert small["lfs"] is None and small["blob_id"] == git_blob_sha1(CONFIG) and small["size"] == len(CONFIG)
    assert fs.info(f"{repo}/sub")["type"] == "directory"


def test_cat_file_reads_pinned_bytes_by_range(hub: FakeHub) -> None:
    repo, sha = new_repo(hub)
    fs, path = fs_for(hub), f"{repo}@{sha}/model.safetensors"
    assert fs.cat_file(path, start=100, end=200, cache_type="none") == WEIGHTS[100:200]
    assert resolves(hub, "model.safetensors") == [("GET", "bytes=100-199", 206)]
    hub.clear_requests()
    # The default read-ahead cache asks from `start` to a whole 5 MiB block (here: the end of the file).
    assert fs.cat_file(path, start=100, end=200) == WEIGHTS[100:200]
    assert resolves(hub, "model.safetensors") == [("GET", f"bytes=100-{len(WEIGHTS) - 1}", 206)]
    hub.clear_requests()
    with fs.open(path, "rb", cache_type="none") as f:
        f.seek(4000)
        assert f.read(96) == WEIGHTS[4000:4096]
    assert resolves(hub, "model.safetensors") == [("GET", "bytes=4000-4095", 206)]


def test_resolve_serves_ranges_like_the_hub(hub: FakeHub) -> None:
    repo, sha = new_repo(hub)
    url = f"{hub.url}/{repo}/resolve/{sha}/model.safetensors"
    head = get_session().head(url)
    assert head.status_code == 200 and head.headers["X-Repo-Commit"] == sha
    assert head.headers["ETag"] == head.headers["X-Linked-Etag"] == f'"{hashlib.sha256(WEIGHTS).hexdigest()}"'
    assert head.headers["X-Linked-Size"] == head.headers["Content-Length"] == str(len(WEIGHTS))
    suffix = get_session().get(url, headers={"Range": "bytes=-10"})
    assert suffix.status_code == 206 and suffix.content == WEIGHTS[-10:]
    assert suffix.headers["Content-Range"] == f"bytes {len(WEIGHTS) - 10}-{len(WEIGHTS) - 1}/{len(WEIGHTS)}"
    assert get_session().get(url, headers={"Range": f"bytes={len(WEIGHTS)}-"}).status_code == 416
    small = get_session().head(f"{hub.url}/{repo}/resolve/main/config.json")
    assert small.headers["ETag"] == f'"{git_blob_sha1(CONFIG)}"' and "X-Linked-Etag" not in small.headers


def test_an_old_commit_keeps_its_bytes(hub: FakeHub) -> None:
    repo, old = new_repo(hub)
    new_weights = WEIGHTS[::-1]
    new = hub.commit(repo, {"model.safetensors": new_weights})
    fs = fs_for(hub)
    assert fs.cat_file(f"{repo}@{old}/model.safetensors", start=0, end=64) == WEIGHTS[:64]
    assert fs.cat_file(f"{repo}@{new}/model.safetensors", start=0, end=64) == new_weights[:64]
    assert fs.cat_file(f"{repo}/model.safetensors") == new_weights
    assert hub.files_at(repo, old)["model.safetensors"] == WEIGHTS


def test_hf_hub_download(hub: FakeHub, tmp_path: Path) -> None:
    repo, sha = new_repo(hub)
    for revision in ("main", sha):
        path = hf_hub_download(repo, "model.safetensors", revision=revision, endpoint=hub.url, cache_dir=tmp_path)
        assert open(path, "rb").read() == WEIGHTS
        assert f"snapshots/{sha}/" in path
    path = hf_hub_download(repo, "config.json", endpoint=hub.url, cache_dir=tmp_path)
    assert open(path, "rb").read() == CONFIG


def test_tampered_bytes_keep_their_recorded_digest(hub: FakeHub) -> None:
    repo, sha = new_repo(hub)
    evil = bytes([WEIGHTS[0] ^ 1]) + WEIGHTS[1:]
    hub.tamper(repo, sha, "model.safetensors", evil)
    fs = fs_for(hub)
    info = fs.info(f"{repo}@{sha}/model.safetensors", refresh=True, expand_info=True)
    assert info["lfs"].sha256 == hashlib.sha256(WEIGHTS).hexdigest() and info["size"] == len(WEIGHTS)
    served = fs.cat_file(f"{repo}@{sha}/model.safetensors")
    assert served == evil and hashlib.sha256(served).hexdigest() != info["lfs"].sha256
    assert hub.files_at(repo, sha)["model.safetensors"] == WEIGHTS


def test_create_repo_exist_ok(hub: FakeHub) -> None:
    api = HfApi(endpoint=hub.url, token=TOKEN)
    repo = f"org/new-{uuid.uuid4().hex[:8]}"
    first = api.create_repo(repo, exist_ok=True)
    assert api.create_repo(repo, exist_ok=True) == first == f"{hub.url}/{repo}"
    with pytest.raises(HfHubHTTPError) as e:
        api.create_repo(repo)
    assert e.value.response.status_code == 409
    assert api.repo_info(repo).sha == hub.head(repo)


def test_create_commit_uploads_lfs_and_regular_files(hub: FakeHub, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url, token=TOKEN)
    repo = f"org/up-{uuid.uuid4().hex[:8]}"
    api.create_repo(repo)
    shard = os.urandom(3000)
    (tmp_path / "shard2.bin").write_bytes(shard[::-1])
    info = api.create_commit(repo, [
        CommitOperationAdd("model-1.safetensors", io.BytesIO(WEIGHTS)),  # a file object
        CommitOperationAdd("model-2.bin", str(tmp_path / "shard2.bin")),
        CommitOperationAdd("big.json", shard),  # LFS by size alone
        CommitOperationAdd("config.json", CONFIG),
    ], commit_message="add weights")
    assert info.oid == hub.head(repo) and info.repo_url.repo_id == repo
    puts = [r for r in hub.requests if r.method == "PUT"]
    assert len(puts) == 3 and all(r.status == 200 for r in puts)
    files = hub.files_at(repo, "main")
    assert files["model-1.safetensors"] == WEIGHTS and files["model-2.bin"] == shard[::-1]
    assert files["big.json"] == shard and files["config.json"] == CONFIG
    tree = {f.path: f for f in api.list_repo_tree(repo)}
    assert tree["big.json"].lfs.sha256 == hashlib.sha256(shard).hexdigest() and tree["config.json"].lfs is None
    path = hf_hub_download(repo, "model-1.safetensors", endpoint=hub.url, cache_dir=tmp_path / "cache")
    assert open(path, "rb").read() == WEIGHTS
    assert fs_for(hub).cat_file(f"{repo}/big.json", start=10, end=20) == shard[10:20]
    # Same content again: the client skips the upload and the (empty) commit.
    hub.clear_requests()
    again = api.create_commit(repo, [CommitOperationAdd("big.json", shard)], commit_message="same")
    assert again.oid == info.oid and not [r for r in hub.requests if r.method == "PUT" or "/commit/" in r.path]


def test_upload_folder(hub: FakeHub, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url, token=TOKEN)
    repo = f"org/folder-{uuid.uuid4().hex[:8]}"
    api.create_repo(repo)
    (tmp_path / "sub").mkdir()
    content = {"model.safetensors": WEIGHTS, "config.json": CONFIG, "sub/notes.txt": b"notes"}
    for name, data in content.items():
        (tmp_path / name).write_bytes(data)
    info = api.upload_folder(repo_id=repo, folder_path=tmp_path)
    assert info.oid == hub.head(repo)
    assert {k: v for k, v in hub.files_at(repo, "main").items() if k != ".gitattributes"} == content
    deleted = api.delete_file("sub/notes.txt", repo)
    assert "sub/notes.txt" not in hub.files_at(repo, deleted.oid)


def test_commits_are_atomic_and_checked(hub: FakeHub) -> None:
    api = HfApi(endpoint=hub.url, token=TOKEN)
    repo, sha = new_repo(hub)
    with pytest.raises(EntryNotFoundError):
        api.create_commit(repo, [CommitOperationAdd("new.txt", b"new"), CommitOperationDelete("missing.txt")],
                          commit_message="half")
    assert hub.head(repo) == sha and "new.txt" not in hub.files_at(repo, "main")
    with pytest.raises(HfHubHTTPError) as e:
        api.create_commit(repo, [CommitOperationAdd("new.txt", b"new")], commit_message="stale",
                          parent_commit="0" * 40)
    assert e.value.response.status_code == 412
    # Below the client: an lfsFile that was never uploaded, a PUT whose bytes do not match its sha256, a
    # "regular" file that must be LFS. Each commit is refused whole.
    ghost = hashlib.sha256(b"never uploaded").hexdigest()
    ok = {"key": "file", "value": {"path": "ok.txt", "content": base64.b64encode(b"ok").decode(), "encoding": "base64"}}
    assert post_commit(hub, repo, ok, {"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256",
                                                                   "oid": ghost, "size": 14}}) == 400
    assert get_session().put(f"{hub.url}/__lfs__/{repo}/{ghost}", content=b"something else").status_code == 400
    assert post_commit(hub, repo, ok, {"key": "file", "value": {"path": "x.safetensors", "content": "eA==",
                                                                "encoding": "base64"}}) == 400
    assert hub.head(repo) == sha


def post_commit(hub: FakeHub, repo: str, *operations: dict) -> int:
    items = [{"key": "header", "value": {"summary": "raw", "description": ""}}, *operations]
    r = get_session().post(f"{hub.url}/api/models/{repo}/commit/main", content="\n".join(map(json.dumps, items)),
                           headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"})
    return r.status_code


def test_branches_tags_and_model_cards(hub: FakeHub) -> None:
    api = HfApi(endpoint=hub.url, token=TOKEN)
    repo, sha = new_repo(hub)
    for _ in range(2):
        api.create_branch(repo, branch="dev", exist_ok=True)
    card = b"---\nlicense: mit\ntags: [graft]\n---\n# A model\n"
    info = api.create_commit(repo, [CommitOperationAdd("README.md", card)], commit_message="card", revision="dev")
    assert hub.head(repo, "dev") == info.oid and hub.head(repo) == sha
    api.create_tag(repo, tag="v2", revision="dev")
    assert api.repo_info(repo, revision="v2").sha == info.oid
    with pytest.raises(ValueError, match="Invalid metadata"):  # the Hub validates README.md metadata first
        api.create_commit(repo, [CommitOperationAdd("README.md", b"---\n- [\n---\n")], commit_message="bad")
    with pytest.raises(RevisionNotFoundError):
        api.create_commit(repo, [CommitOperationAdd("a.txt", b"a")], commit_message="x", revision="no-such-branch")


def test_writes_need_a_token(hub: FakeHub) -> None:
    repo, _ = new_repo(hub)
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(endpoint=hub.url, token=False).create_commit(repo, [CommitOperationAdd("a.txt", b"a")],
                                                           commit_message="anonymous")
    assert e.value.response.status_code == 401


def test_missing_repo_revision_and_file(hub: FakeHub, tmp_path: Path) -> None:
    repo, _ = new_repo(hub)
    api = HfApi(endpoint=hub.url)
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("org/does-not-exist")
    with pytest.raises(RevisionNotFoundError):
        api.repo_info(repo, revision="nope")
    assert api.get_paths_info(repo, ["absent.txt"]) == []
    kwargs = {"endpoint": hub.url, "cache_dir": tmp_path}
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo, "absent.txt", **kwargs)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo, "config.json", revision="nope", **kwargs)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/does-not-exist", "config.json", **kwargs)
    fs = fs_for(hub)
    for path in (f"{repo}/absent.txt", f"{repo}@nope/config.json", "org/does-not-exist/config.json"):
        with pytest.raises(FileNotFoundError):
            fs.info(path)
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{repo}/absent.txt")


def test_dataset_repos(hub: FakeHub) -> None:
    api = HfApi(endpoint=hub.url, token=TOKEN)
    repo = f"org/data-{uuid.uuid4().hex[:8]}"
    api.create_repo(repo, repo_type="dataset")
    api.upload_file(path_or_fileobj=WEIGHTS, path_in_repo="data.bin", repo_id=repo, repo_type="dataset")
    assert hub.files_at(f"datasets/{repo}", "main")["data.bin"] == WEIGHTS
    assert fs_for(hub).cat_file(f"datasets/{repo}/data.bin", start=5, end=9) == WEIGHTS[5:9]


def test_a_child_process_reaches_the_fake_through_the_environment(hub: FakeHub, tmp_path: Path) -> None:
    repo, sha = new_repo(hub)
    script = textwrap.dedent(f"""
        from huggingface_hub import HfApi, HfFileSystem
        print(HfApi().repo_info({repo!r}).sha)
        print(HfFileSystem().cat_file("hf://{repo}/config.json").decode())
    """)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN,
           "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf_home")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == [sha, CONFIG.decode()]
