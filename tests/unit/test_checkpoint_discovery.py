"""Finding the weights of a checkpoint: single file, hub-sharded, one file path; and refusals."""
from __future__ import annotations

import json
import os

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import save_file

from graft.engine.checkpoint import INDEX_NAME, open_checkpoint
from graft.engine.errors import CheckpointError

STATE = {f"layers.{i}.w": torch.full((64, 64), float(i)) for i in range(6)}


@pytest.fixture
def sharded(tmp_path):  # noqa: ANN201
    d = tmp_path / "sharded"
    d.mkdir()
    save_torch_state_dict(STATE, str(d), max_shard_size="40KB")
    (d / "config.json").write_text("{}")
    return d


def test_sharded_checkpoint_maps_every_tensor_to_its_shard(sharded):
    c = open_checkpoint(str(sharded))
    index = json.loads((sharded / INDEX_NAME).read_text())["weight_map"]
    assert c.sharded and len(c.files) > 1
    assert {n: t.file for n, t in c.tensors.items()} == index
    assert all(t.dtype == "F32" and t.shape == (64, 64) and t.nbytes == 64 * 64 * 4 for t in c.tensors.values())
    assert c.side_files == ("config.json",)
    assert c.total_bytes == sum(os.path.getsize(sharded / f.name) for f in c.files)


def test_single_file_directory_and_file_path(tmp_path):
    d = tmp_path / "single"
    d.mkdir()
    save_file(STATE, str(d / "model.safetensors"))
    by_dir = open_checkpoint(str(d))
    by_file = open_checkpoint(str(d / "model.safetensors"))
    assert not by_dir.sharded and set(by_dir.tensors) == set(STATE)
    assert by_dir.tensors == by_file.tensors


def test_a_lone_safetensors_file_of_another_name_is_used(tmp_path):
    save_file(STATE, str(tmp_path / "consolidated.safetensors"))
    assert set(open_checkpoint(str(tmp_path)).tensors) == set(STATE)


def _rewrite_index(d, edit) -> None:  # noqa: ANN001
    p = d / INDEX_NAME
    index = json.loads(p.read_text())
    edit(index["weight_map"])
    p.write_text(json.dumps(index))


@pytest.mark.parametrize("bad", ["../model-00001-of-00002.safetensors", "/abs/x.safetensors",
                                 "sub/x.safetensors", "..\\x.safetensors", "..", "weights.bin", ""])
def test_index_shard_names_must_be_plain_safetensors_names(sharded, bad):
    _rewrite_index(sharded, lambda wm: wm.update({"layers.0.w": bad}))
    with pytest.raises(CheckpointError, match=INDEX_NAME.replace(".", r"\.")):
        open_checkpoint(str(sharded))


def test_index_naming_a_missing_shard_is_refused(sharded):
    _rewrite_index(sharded, lambda wm: wm.update({"layers.0.w": "model-00009-of-00009.safetensors"}))
    with pytest.raises(CheckpointError, match="download the missing shard"):
        open_checkpoint(str(sharded))


def test_index_that_disagrees_with_the_headers_is_refused(sharded):
    index = json.loads((sharded / INDEX_NAME).read_text())["weight_map"]
    shards = sorted(set(index.values()))
    name = next(n for n, s in index.items() if s == shards[0])
    _rewrite_index(sharded, lambda wm: wm.update({name: shards[1]}))
    with pytest.raises(CheckpointError, match=f"{name}.*does not match"):
        open_checkpoint(str(sharded))


def test_tensor_missing_from_the_weight_map_is_refused(sharded):
    _rewrite_index(sharded, lambda wm: wm.pop("layers.5.w"))
    with pytest.raises(CheckpointError, match="missing from the weight_map"):
        open_checkpoint(str(sharded))


def test_duplicate_key_in_the_index_is_refused(sharded):
    p = sharded / INDEX_NAME
    text = p.read_text().replace('"weight_map": {', '"weight_map": {"layers.0.w": "x.safetensors", ', 1)
    p.write_text(text)
    with pytest.raises(CheckpointError, match="duplicate key"):
        open_checkpoint(str(sharded))


def test_tensor_stored_in_two_shards_is_refused(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"a": torch.ones(2)}, str(tmp_path / "s2.safetensors"))
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(CheckpointError, match="stored in both"):
        open_checkpoint(str(tmp_path))


def test_pickle_only_checkpoint_is_refused_without_reading_it(tmp_path):
    bomb = tmp_path / "pytorch_model.bin"
    # Not a valid pickle: an attempt to load it would raise an unpickling error, not CheckpointError.
    bomb.write_bytes(b"\x80\x04 never to be unpickled")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(str(tmp_path))
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "never unpickles" in msg and "safe_serialization=True" in msg


def test_several_safetensors_without_an_index_are_refused(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(2)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="add the index"):
        open_checkpoint(str(tmp_path))


def test_missing_or_empty_location_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        open_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(CheckpointError, match="no .safetensors weights"):
        open_checkpoint(str(tmp_path))
