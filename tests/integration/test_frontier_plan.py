"""Planning at frontier scale: three DeepSeek-V3-671B-shaped block-FP8 checkpoints (91,991 tensors in
163 shards each, real headers over sparse files, ``bench/frontier.py``) plan into the target's
layout with every scale tensor beside its weight, every input byte read once, and tasks small
enough to ship. The time and memory this takes are measured by ``make bench``, not here."""
from __future__ import annotations

import os
import pickle
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.frontier import BLOCK, HIDDEN, SHARDS, deepseek_v3_tensors, make_trio  # noqa: E402
from graft.engine.run.job import prepare_job  # noqa: E402
from graft.engine.plan.specfile import spec_from_mapping  # noqa: E402
from graft.engine.plan.chunks import iter_chunks  # noqa: E402


@pytest.fixture(scope="module")
def job(tmp_path_factory):  # noqa: ANN001, ANN201
    paths = make_trio(str(tmp_path_factory.mktemp("frontier")))
    return prepare_job(spec_from_mapping({**paths, "output": str(tmp_path_factory.mktemp("out") / "o")}))


def test_a_671b_shaped_fp8_trio_plans_into_the_targets_layout(job):
    stored = deepseek_v3_tensors()
    assert len(stored) == 91_991 and all(len(c.tensors) == 91_991 for c in job.checkpoints.values())
    plan = job.plan
    weights = [t for t in stored if not t[0].endswith("_scale_inv")]
    assert (len(plan.shards), plan.tensor_count, plan.combined) == (SHARDS, len(weights), len(weights))
    assert [s.file for s in plan.shards] == [f.name for f in job.checkpoints["target"].files]
    assert len(plan.weight_map()) == 91_991
    # Same format in, same format out: the output is exactly as large as the target.
    assert plan.write_bytes == job.checkpoints["target"].total_bytes
    for shard in plan.shards:
        names = [n for n, _, _ in shard.header_tensors()]
        for t in shard.tensors:
            if t.scales is not None:
                assert names[names.index(t.name) + 1] == t.scales.name == t.name + "_scale_inv"


def test_every_input_byte_is_read_once_and_tasks_are_small(job):
    tensor_bytes = sum(t.nbytes for c in job.checkpoints.values() for t in c.tensors.values())
    assert job.plan.read_bytes == tensor_bytes  # 128-row chunks: no scale row is read twice
    largest = max(len(pickle.dumps(s)) for s in job.plan.shards)
    assert largest < 1_000_000  # a task crosses to a Ray worker as a small value, not the plan


def test_chunks_of_the_widest_fp8_weights_are_whole_block_rows_within_the_chunk_size(job):
    chunk_size = job.plan.shards[0].settings.chunk_size
    widest = max((s for s in job.plan.shards), key=lambda s: max(t.shape[-1] for t in s.tensors))
    for chunk in iter_chunks(widest):
        t = chunk.tensor
        if t.scales is not None:
            first, rows = chunk.rows
            assert first % BLOCK == 0 and (rows % BLOCK == 0 or first + rows == t.shape[0])
            assert rows * t.shape[1] * 4 <= max(chunk_size, BLOCK * t.shape[1] * 4)
    assert max(t.shape[1] for t in widest.tensors if t.scales is not None) >= 2 * HIDDEN
