"""Checkpoint discovery: single-file, hub-sharded and single-path checkpoints are found tensor by
tensor; every unusable layout is refused with a ``CheckpointError`` that names the file or tensor at
fault and says how to fix it. Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import save_file

from graft.engine.formats.checkpoint import INDEX_NAME, open_checkpoint
from graft.engine.errors import CheckpointError

_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


def _state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8).to(torch.bfloat16),
        "model.layers.0.mlp.weight": torch.randn(8, 8),
        "model.layers.1.mlp.weight": torch.randn(8, 8),
        "model.norm.weight": torch.ones(8, dtype=torch.float16),
        "model.position_ids": torch.arange(8),
        "lm_head.weight": torch.randn(16, 8),
    }


def _assert_finds_every_tensor(ckpt, sd: dict[str, torch.Tensor], directory) -> None:
    assert set(ckpt.tensors) == set(sd)
    for name, t in sd.items():
        ref = ckpt.tensors[name]
        assert ref.dtype == _DTYPE_NAMES[t.dtype], name
        assert ref.shape == tuple(t.shape), name
        data = (directory / ref.file).read_bytes()[ref.begin:ref.end]
        assert data == t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), name


def _sharded(path, sd=None) -> dict[str, torch.Tensor]:
    sd = sd if sd is not None else _state_dict()
    os.makedirs(path, exist_ok=True)
    save_torch_state_dict(sd, str(path), max_shard_size=600)
    return sd


def _index(path) -> dict:
    return json.loads((path / INDEX_NAME).read_text())


def _write_index(path, index: dict) -> None:
    (path / INDEX_NAME).write_text(json.dumps(index))


# --- what is found -------------------------------------------------------------------------------


def test_single_file_checkpoint_lists_every_tensor_with_dtype_shape_and_file(tmp_path):
    sd = _state_dict()
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text('{"vocab_size": 16}')

    ckpt = open_checkpoint(str(tmp_path))

    _assert_finds_every_tensor(ckpt, sd, tmp_path)
    assert {r.file for r in ckpt.tensors.values()} == {"model.safetensors"}
    assert not ckpt.sharded
    assert [f.name for f in ckpt.files] == ["model.safetensors"]
    assert ckpt.total_bytes == (tmp_path / "model.safetensors").stat().st_size
    assert ckpt.side_files == ("config.json",)
    assert ckpt.read_json("config.json") == {"vocab_size": 16}


def test_sharded_checkpoint_follows_the_index_to_every_shard(tmp_path):
    sd = _sharded(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    weight_map = _index(tmp_path)["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 2 and all(s.startswith("model-0000") for s in shards)

    ckpt = open_checkpoint(str(tmp_path))

    _assert_finds_every_tensor(ckpt, sd, tmp_path)
    assert {n: r.file for n, r in ckpt.tensors.items()} == weight_map
    assert ckpt.sharded
    assert [f.name for f in ckpt.files] == shards
    assert [f.size for f in ckpt.files] == [(tmp_path / s).stat().st_size for s in shards]
    assert ckpt.side_files == ("config.json", "tokenizer.json")  # neither the index nor a shard


def test_naming_the_index_itself_opens_its_directory(tmp_path):
    sd = _sharded(tmp_path)
    ckpt = open_checkpoint(str(tmp_path / INDEX_NAME))
    assert ckpt.uri == str(tmp_path) and ckpt.sharded
    _assert_finds_every_tensor(ckpt, sd, tmp_path)


@pytest.mark.parametrize("name", ["config.json", "other.safetensors.index.json"])
def test_naming_another_json_file_says_to_name_the_directory(tmp_path, name):
    _sharded(tmp_path)
    (tmp_path / name).write_text("{}")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(str(tmp_path / name))
    assert str(e.value) == (f"{tmp_path / name}: a JSON file, not a checkpoint; point graft at the "
                            f"checkpoint's directory (the one holding {INDEX_NAME} or model.safetensors) "
                            f"or at one .safetensors file")


def test_sharded_tensors_are_ordered_shard_by_shard_then_by_offset(tmp_path):
    _sharded(tmp_path)
    ckpt = open_checkpoint(str(tmp_path))
    order = [(r.file, r.begin) for r in ckpt.tensors.values()]
    assert order == sorted(order)


def test_path_to_one_safetensors_file_opens_just_that_file(tmp_path):
    sd = _state_dict()
    save_file(sd, str(tmp_path / "weights.safetensors"))
    save_file({"other": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "config.json").write_text("{}")

    ckpt = open_checkpoint(str(tmp_path / "weights.safetensors"))

    _assert_finds_every_tensor(ckpt, sd, tmp_path)
    assert {r.file for r in ckpt.tensors.values()} == {"weights.safetensors"}
    assert [f.name for f in ckpt.files] == ["weights.safetensors"]
    assert ckpt.side_files == ("config.json",)


def test_directory_with_one_differently_named_safetensors_file_is_accepted(tmp_path):
    sd = _state_dict()
    save_file(sd, str(tmp_path / "adapter.safetensors"))
    ckpt = open_checkpoint(str(tmp_path))
    _assert_finds_every_tensor(ckpt, sd, tmp_path)


def test_path_to_a_missing_safetensors_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors: no such file"):
        open_checkpoint(str(tmp_path / "nope.safetensors"))


# --- refusals of a bad index ---------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    "sub/model-00001-of-00003.safetensors",
    "sub\\model-00001-of-00003.safetensors",
    "../outside.safetensors",
    "..",
    "/abs/outside.safetensors",
    "C:\\outside.safetensors",
], ids=["slash", "backslash", "dotdot-path", "dotdot", "absolute", "windows-absolute"])
def test_index_shard_name_that_is_not_a_plain_file_name_is_refused(tmp_path, bad):
    ckpt_dir = tmp_path / "ckpt"
    _sharded(ckpt_dir)
    # A valid file outside the checkpoint must not be reachable through the index.
    save_file({"x": torch.zeros(1)}, str(tmp_path / "outside.safetensors"))
    index = _index(ckpt_dir)
    index["weight_map"]["lm_head.weight"] = bad
    _write_index(ckpt_dir, index)

    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(str(ckpt_dir))
    msg = str(caught.value)
    assert msg.startswith(f"{ckpt_dir}/{INDEX_NAME}: "), msg
    assert repr(bad) in msg
    assert "fix the index" in msg


@pytest.mark.parametrize("bad,why", [
    ("model-00001\nf00d  SHA256SUMS.safetensors", "holds a control character"),
    ("model-\x1b[2J.safetensors", "holds a control character"),
    (".model-00001-of-00003.safetensors", "is hidden"),
    ("model.graft-tmp-1234.safetensors", "graft's temporary marker"),
], ids=["newline", "escape", "hidden", "temporary-marker"])
def test_shard_names_that_would_break_the_output_are_refused(tmp_path, bad, why):
    """A newline would forge lines of the output's SHA256SUMS; a hidden or temporary-looking name
    would be swept away by the commit, which then reported success with a shard missing."""
    ckpt_dir = tmp_path / "ckpt"
    sd = _sharded(ckpt_dir)
    index = _index(ckpt_dir)
    old = index["weight_map"]["lm_head.weight"]
    os.rename(ckpt_dir / old, ckpt_dir / bad)
    index["weight_map"] = {k: (bad if v == old else v) for k, v in index["weight_map"].items()}
    _write_index(ckpt_dir, index)
    with pytest.raises(CheckpointError, match=why) as caught:
        open_checkpoint(str(ckpt_dir))
    assert repr(bad) in str(caught.value) and "rename the shard" in str(caught.value)
    # The same file as a checkpoint's only shard (found by listing, not through an index).
    alone = tmp_path / "alone"
    alone.mkdir()
    save_file({"x": sd["lm_head.weight"]}, str(alone / bad))
    with pytest.raises(CheckpointError, match=why):
        open_checkpoint(str(alone))


def test_index_shard_that_is_not_safetensors_is_refused(tmp_path):
    _sharded(tmp_path)
    torch.save({"x": torch.zeros(1)}, str(tmp_path / "pytorch_model-00001-of-00001.bin"))
    index = _index(tmp_path)
    index["weight_map"]["lm_head.weight"] = "pytorch_model-00001-of-00001.bin"
    _write_index(tmp_path, index)

    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(str(tmp_path))
    msg = str(caught.value)
    assert INDEX_NAME in msg and "'pytorch_model-00001-of-00001.bin'" in msg
    assert "not a .safetensors file" in msg


def test_index_naming_a_missing_shard_is_refused(tmp_path):
    _sharded(tmp_path)
    os.remove(tmp_path / "model-00002-of-00003.safetensors")
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(str(tmp_path))
    msg = str(caught.value)
    assert INDEX_NAME in msg and "'model-00002-of-00003.safetensors'" in msg
    assert "download the missing shard" in msg


def test_index_mapping_a_tensor_to_the_wrong_shard_is_refused(tmp_path):
    _sharded(tmp_path)
    index = _index(tmp_path)
    shards = list(index["weight_map"].values())
    # A tensor whose shard holds others too, so the index still names that shard after the edit.
    name = next(n for n, s in index["weight_map"].items() if shards.count(s) > 1)
    actual = index["weight_map"][name]
    wrong = next(s for s in sorted(set(shards)) if s != actual)
    index["weight_map"][name] = wrong
    _write_index(tmp_path, index)

    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(str(tmp_path))
    msg = str(caught.value)
    assert INDEX_NAME in msg and repr(name) in msg
    assert f"to {wrong} but it is in {actual}" in msg
    assert "re-create it" in msg


def test_index_naming_a_tensor_no_shard_holds_is_refused(tmp_path):
    _sharded(tmp_path)
    index = _index(tmp_path)
    index["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    _write_index(tmp_path, index)
    with pytest.raises(CheckpointError, match=r"'ghost\.weight'.*does not hold it"):
        open_checkpoint(str(tmp_path))


def test_tensor_in_a_shard_but_not_in_the_weight_map_is_refused(tmp_path):
    _sharded(tmp_path)
    index = _index(tmp_path)
    shard = index["weight_map"].pop("model.norm.weight")
    _write_index(tmp_path, index)

    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(str(tmp_path))
    msg = str(caught.value)
    assert INDEX_NAME in msg and "'model.norm.weight'" in msg and shard in msg
    assert "missing from the weight_map" in msg


def test_duplicate_key_in_the_index_json_is_refused(tmp_path):
    _sharded(tmp_path)
    weight_map = _index(tmp_path)["weight_map"]
    first = next(iter(weight_map))
    body = ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in weight_map.items())
    body += f",{json.dumps(first)}:{json.dumps(weight_map[first])}"
    (tmp_path / INDEX_NAME).write_text('{"metadata":{},"weight_map":{' + body + "}}")

    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(str(tmp_path))
    msg = str(caught.value)
    assert INDEX_NAME in msg and "duplicate key" in msg and repr(first) in msg
    assert "re-create the index" in msg


def test_index_without_a_weight_map_is_refused(tmp_path):
    _sharded(tmp_path)
    _write_index(tmp_path, {"metadata": {"total_size": 1}})
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: no 'weight_map'"):
        open_checkpoint(str(tmp_path))


def test_index_over_the_size_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    # The index used to be read whole whatever its size: a multi-GB file named like an index cost that
    # much memory (test_fuzz_headers checks every read against the cap). A valid index padded with
    # spaces past a lowered cap shows that the size is checked before anything is read.
    from graft.engine.formats import checkpoint
    from graft.engine.storage import Storage

    _sharded(tmp_path)
    index = (tmp_path / INDEX_NAME).read_bytes()
    monkeypatch.setattr(checkpoint, "MAX_INDEX_BYTES", len(index) + 10)
    (tmp_path / INDEX_NAME).write_bytes(index + b" " * 10)
    assert open_checkpoint(str(tmp_path)).sharded  # exactly at the cap: read
    (tmp_path / INDEX_NAME).write_bytes(index + b" " * 11)
    reads = []
    monkeypatch.setattr(Storage, "read", lambda self, name, *a, **k: reads.append(name))
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(str(tmp_path))
    msg = str(caught.value)
    size, cap = len(index) + 11, len(index) + 10
    assert msg.startswith(f"{tmp_path}/{INDEX_NAME}: {size} bytes, over the {cap}-byte limit"), msg
    assert "re-create it" in msg
    assert reads == []


def test_tensor_stored_in_two_shards_is_refused(tmp_path):
    save_file({"a": torch.zeros(2), "dup": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(2), "dup": torch.ones(2)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    _write_index(tmp_path, {"weight_map": {"a": "model-00001-of-00002.safetensors",
                                           "b": "model-00002-of-00002.safetensors",
                                           "dup": "model-00001-of-00002.safetensors"}})
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(str(tmp_path))
    msg = str(caught.value)
    assert "'dup'" in msg
    assert "model-00001-of-00002.safetensors and model-00002-of-00002.safetensors" in msg
    assert "remove the duplicate" in msg


def test_corrupt_shard_is_refused_with_the_shard_named(tmp_path):
    from graft.engine.errors import HeaderError

    _sharded(tmp_path)
    shard = tmp_path / "model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1])  # truncated by one byte
    with pytest.raises(HeaderError, match="model-00002-of-00003.safetensors"):
        open_checkpoint(str(tmp_path))


# --- refusals of a directory ---------------------------------------------------------------------


class _Tripwire:
    """Unpickling this creates ``path``: proof that somebody unpickled the file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("content", ["garbage", "tripwire-pickle"])
def test_pickle_only_checkpoint_is_refused_without_unpickling(tmp_path, content):
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    sentinel = tmp_path / "UNPICKLED"
    if content == "garbage":
        payload = b"\x80\x05this is not a pickle at all\xff\xfe"
    else:
        payload = pickle.dumps(_Tripwire(str(sentinel)))
    (ckpt_dir / "pytorch_model.bin").write_bytes(payload)
    (ckpt_dir / "config.json").write_text("{}")

    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(str(ckpt_dir))
    msg = str(caught.value)
    assert msg.startswith(str(ckpt_dir))
    assert "pytorch_model.bin" in msg
    assert "never unpickles" in msg
    assert "safe_serialization=True" in msg and "Convert" in msg
    assert not sentinel.exists()


def test_empty_directory_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="empty"):
        open_checkpoint(str(tmp_path))


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"no such checkpoint directory"):
        open_checkpoint(str(tmp_path / "absent"))


def test_directory_without_any_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(str(tmp_path))
    msg = str(caught.value)
    assert "no .safetensors weights found" in msg and "config.json" in msg


def test_several_safetensors_without_an_index_are_refused(tmp_path):
    save_file({"a": torch.zeros(1)}, str(tmp_path / "part-a.safetensors"))
    save_file({"b": torch.zeros(1)}, str(tmp_path / "part-b.safetensors"))
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(str(tmp_path))
    msg = str(caught.value)
    assert msg.startswith(str(tmp_path))
    assert "2 .safetensors files but no model.safetensors.index.json" in msg
    assert "add the index" in msg


def test_model_safetensors_wins_over_other_files_without_an_index(tmp_path):
    # The refusal above does not apply when the standard single-file name is present.
    save_file({"a": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    save_file({"b": torch.zeros(1)}, str(tmp_path / "extra.safetensors"))
    ckpt = open_checkpoint(str(tmp_path))
    assert set(ckpt.tensors) == {"a"}
    assert "extra.safetensors" not in ckpt.side_files


def test_raw_header_bytes_are_what_open_checkpoint_reports(tmp_path):
    save_file({"w": torch.zeros(3, 2)}, str(tmp_path / "model.safetensors"))
    raw = (tmp_path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    ref = open_checkpoint(str(tmp_path)).tensors["w"]
    assert (ref.begin, ref.end) == (8 + n, 8 + n + 24)


def test_index_that_stops_naming_a_shard_is_still_refused(tmp_path):
    # Remapping the only tensor of a shard leaves that shard unnamed by the index (so unread);
    # the mismatch must still be caught.
    _sharded(tmp_path)
    index = _index(tmp_path)
    shards = list(index["weight_map"].values())
    name = next(n for n, s in index["weight_map"].items() if shards.count(s) == 1)
    index["weight_map"][name] = next(s for s in shards if s != index["weight_map"][name])
    _write_index(tmp_path, index)
    with pytest.raises(CheckpointError, match=f"maps tensor {name!r}"):
        open_checkpoint(str(tmp_path))


def test_a_config_json_too_big_to_be_one_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from graft.engine.formats import checkpoint
    from graft.engine.storage import Storage

    save_file(_state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"vocab_size": 16}')
    ckpt = open_checkpoint(str(tmp_path))
    monkeypatch.setattr(checkpoint, "MAX_INDEX_BYTES", 10)
    monkeypatch.setattr(Storage, "read", lambda *a, **k: pytest.fail("read a config.json over the cap"))
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}/config\.json: 18 bytes, over the 10-byte limit "
                                              rf"for a JSON config; it is not one"):
        ckpt.read_json("config.json")
