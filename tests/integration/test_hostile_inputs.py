"""Broken and hostile checkpoints are refused at planning, with a message naming the file, and no
output is ever created. Each case mutates a private copy of the tiny checkpoints."""
from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from graft.engine.errors import CheckpointError, HeaderError, PlanError
from graft.engine.run.local import run_local
from graft.engine.plan.specfile import spec_from_mapping


def _shards(d: str) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.endswith(".safetensors"))


def _rewrite_header(path: str, edit: Callable[[dict], str | dict], extra_data: bytes = b"") -> None:
    """Replace a safetensors header (keeping the data bytes) by ``edit(header_obj)``."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    obj = json.loads(raw[8:8 + n])
    new = edit(obj)
    text = (new if isinstance(new, str) else json.dumps(new)).encode()
    open(path, "wb").write(struct.pack("<Q", len(text)) + text + raw[8 + n:] + extra_data)


def truncate_last_shard(c: dict) -> str:
    p = os.path.join(c["target"], _shards(c["target"])[-1])
    os.truncate(p, os.path.getsize(p) - 100)
    return p


def huge_header_length(c: dict) -> str:
    p = os.path.join(c["target"], _shards(c["target"])[0])
    with open(p, "r+b") as f:
        f.write(struct.pack("<Q", 2**40))
    return p


def duplicate_tensor_key(c: dict) -> str:
    p = os.path.join(c["base"], "model.safetensors")

    def dup(obj: dict) -> str:
        k = next(k for k in obj if k != "__metadata__")
        return "{" + json.dumps(k) + ":" + json.dumps(obj[k]) + "," + json.dumps(obj)[1:]
    _rewrite_header(p, dup)
    return p


def unknown_dtype(c: dict) -> str:
    p = os.path.join(c["base"], "model.safetensors")

    def bad(obj: dict) -> dict:
        k = next(k for k in obj if k != "__metadata__")
        obj[k]["dtype"] = "Q7"
        return obj
    _rewrite_header(p, bad)
    return p


def gap_between_tensors(c: dict) -> str:
    p = os.path.join(c["base"], "model.safetensors")

    def shift_last(obj: dict) -> dict:
        k = max((k for k in obj if k != "__metadata__"), key=lambda k: obj[k]["data_offsets"][0])
        obj[k]["data_offsets"] = [o + 8 for o in obj[k]["data_offsets"]]
        return obj
    _rewrite_header(p, shift_last, extra_data=b"\0" * 8)
    return p


def metadata_not_strings(c: dict) -> str:
    p = os.path.join(c["base"], "model.safetensors")

    def meta(obj: dict) -> dict:
        obj["__metadata__"] = {"format": "pt", "steps": 1000}
        return obj
    _rewrite_header(p, meta)
    return p


def not_safetensors_at_all(c: dict) -> str:
    p = os.path.join(c["base"], "model.safetensors")
    open(p, "wb").write(b"PK\x03\x04 this is a zip archive, not safetensors" * 10)
    return p


def _edit_index(c: dict, role: str, edit: Callable[[dict], None]) -> str:
    p = os.path.join(c[role], "model.safetensors.index.json")
    index = json.load(open(p))
    edit(index)
    json.dump(index, open(p, "w"))
    return p


def index_path_traversal(c: dict) -> str:
    def edit(index: dict) -> None:
        k = next(iter(index["weight_map"]))
        index["weight_map"][k] = "../../etc/passwd.safetensors"
    return _edit_index(c, "target", edit)


def index_absolute_path(c: dict) -> str:
    def edit(index: dict) -> None:
        k = next(iter(index["weight_map"]))
        index["weight_map"][k] = "/tmp/evil.safetensors"
    return _edit_index(c, "finetuned", edit)


def index_disagrees_with_headers(c: dict) -> str:
    def edit(index: dict) -> None:
        wm = index["weight_map"]
        first = next(iter(wm))
        other = next(s for s in sorted(set(wm.values())) if s != wm[first])
        wm[first] = other
    return _edit_index(c, "target", edit)


def pickle_only_checkpoint(c: dict) -> str:
    d = c["base"]
    for n in os.listdir(d):
        if n.endswith(".safetensors"):
            os.remove(os.path.join(d, n))
    # Not even a valid pickle: the point is that it is refused before anything reads it.
    open(os.path.join(d, "pytorch_model.bin"), "wb").write(b"\x80\x04 not to be unpickled")
    return d


def config_json_an_array(c: dict) -> str:
    p = os.path.join(c["target"], "config.json")
    config = json.load(open(p))
    open(p, "w").write(json.dumps([config]))
    return p


def config_json_truncated(c: dict) -> str:
    p = os.path.join(c["finetuned"], "config.json")
    text = open(p).read()
    open(p, "w").write(text[:len(text) // 2])
    return p


def tokenizer_json_truncated(c: dict) -> str:
    # A download cut short: graft reads the donated tokenizer to check it fits the embeddings.
    p = os.path.join(c["finetuned"], "tokenizer.json")
    open(p, "w").write('{"model": {"type": "BPE", "vocab": {"a": 0')
    return p


CASES = [
    (truncate_last_shard, HeaderError, "ends at"),
    (huge_header_length, HeaderError, "exceeds"),
    (duplicate_tensor_key, HeaderError, "duplicate key"),
    (unknown_dtype, HeaderError, "unknown dtype"),
    (gap_between_tensors, HeaderError, "gap"),
    (metadata_not_strings, HeaderError, "__metadata__"),
    (not_safetensors_at_all, HeaderError, "invalid safetensors header"),
    (index_path_traversal, CheckpointError, "not a plain file name"),
    (index_absolute_path, CheckpointError, "not a plain file name"),
    (index_disagrees_with_headers, CheckpointError, "does not match"),
    (pickle_only_checkpoint, CheckpointError, "never unpickles"),
    (config_json_an_array, CheckpointError, "not a JSON object (it holds a list); graft reads it to plan"),
    (config_json_truncated, CheckpointError, "not valid JSON"),
    (tokenizer_json_truncated, CheckpointError, "not valid JSON"),
]


@pytest.mark.parametrize("mutate,error,text", CASES, ids=[c[0].__name__ for c in CASES])
def test_hostile_input_is_refused_before_any_output(copy_checkpoints, tmp_path, mutate, error, text):
    culprit = mutate(copy_checkpoints)
    out = tmp_path / "out"
    spec = spec_from_mapping({**{r: copy_checkpoints[r] for r in ("target", "finetuned", "base")},
                              "output": str(out)})
    with pytest.raises(error) as e:
        run_local(spec)
    msg = str(e.value)
    assert text in msg
    assert os.path.basename(culprit.rstrip("/")) in msg or culprit in msg
    assert "\n" not in msg
    assert not out.exists()


def test_shape_mismatch_names_tensor_shapes_and_checkpoints(tiny_checkpoints, tmp_path):
    # A fine-tune whose first tensor has one more row than the target's.
    ft = tmp_path / "ft"
    shutil.copytree(tiny_checkpoints["finetuned"], ft)
    shard = _shards(str(ft))[0]
    sd = load_file(str(ft / shard))
    name = sorted(sd)[0]
    sd[name] = torch.zeros(sd[name].shape[0] + 1, *sd[name].shape[1:], dtype=sd[name].dtype)
    save_file(sd, str(ft / shard), metadata={"format": "pt"})
    spec = spec_from_mapping({"target": tiny_checkpoints["target"], "finetuned": str(ft),
                              "base": tiny_checkpoints["base"], "output": str(tmp_path / "out")})
    with pytest.raises(PlanError) as e:
        run_local(spec)
    msg = str(e.value)
    assert name in msg and str(ft) in msg and tiny_checkpoints["target"] in msg
    assert not (tmp_path / "out").exists()
