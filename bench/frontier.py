"""DeepSeek-V3-671B-shaped checkpoints made of headers alone, for planning at frontier scale.

The tensor names, dtypes and shapes follow DeepSeek-V3's published layout: 61 layers (3 dense, 58
MoE with 256 routed experts and one shared expert) plus one multi-token-prediction layer, block FP8
(F8_E4M3 codes, F32 ``weight_scale_inv`` per 128x128 block) for every projection, BF16 for the
embeddings, head, norms and router, 163 shards of about 4.3 GB. Each shard file is a real
safetensors header followed by a hole: the file has its full size (a sparse file on local disk)
but no data, so planning reads exactly what it would read of the real thing.

Usage: ``python -m bench.frontier DIR`` writes ``DIR/{target,finetuned,base}`` and prints them;
``python -m bench.frontier probe DIR`` prints, as JSON, what a Ray driver does before its first
task is sent (ray and torch imported, headers read, plan, fingerprint, every task pickled): its
seconds, its peak RSS and the largest pickled ``ShardTask``.
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys

__all__ = ["HIDDEN", "deepseek_v3_tensors", "write_sparse_checkpoint", "make_trio", "probe"]

HIDDEN, VOCAB, DENSE_FFN, EXPERT_FFN, EXPERTS = 7168, 129280, 18432, 2048, 256
LAYERS, DENSE_LAYERS, SHARDS, BLOCK = 61, 3, 163, 128
_SIZES = {"F8_E4M3": 1, "BF16": 2, "F32": 4}


def _fp8(name: str, rows: int, cols: int) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(name, "F8_E4M3", (rows, cols)),
            (name + "_scale_inv", "F32", (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)))]


def _layer(i: int) -> list[tuple[str, str, tuple[int, ...]]]:
    p = f"model.layers.{i}."
    out = [(p + "input_layernorm.weight", "BF16", (HIDDEN,)),
           (p + "post_attention_layernorm.weight", "BF16", (HIDDEN,)),
           (p + "self_attn.q_a_layernorm.weight", "BF16", (1536,)),
           (p + "self_attn.kv_a_layernorm.weight", "BF16", (512,))]
    out += _fp8(p + "self_attn.q_a_proj.weight", 1536, HIDDEN)
    out += _fp8(p + "self_attn.q_b_proj.weight", 128 * 192, 1536)
    out += _fp8(p + "self_attn.kv_a_proj_with_mqa.weight", 512 + 64, HIDDEN)
    out += _fp8(p + "self_attn.kv_b_proj.weight", 128 * 256, 512)
    out += _fp8(p + "self_attn.o_proj.weight", HIDDEN, 128 * 128)
    if i < DENSE_LAYERS:
        out += _fp8(p + "mlp.gate_proj.weight", DENSE_FFN, HIDDEN) + _fp8(p + "mlp.up_proj.weight", DENSE_FFN, HIDDEN)
        out += _fp8(p + "mlp.down_proj.weight", HIDDEN, DENSE_FFN)
        return out
    out += [(p + "mlp.gate.weight", "BF16", (EXPERTS, HIDDEN)),
            (p + "mlp.gate.e_score_correction_bias", "F32", (EXPERTS,))]
    for e in [*(f"experts.{j}." for j in range(EXPERTS)), "shared_experts."]:
        out += _fp8(p + f"mlp.{e}gate_proj.weight", EXPERT_FFN, HIDDEN)
        out += _fp8(p + f"mlp.{e}up_proj.weight", EXPERT_FFN, HIDDEN)
        out += _fp8(p + f"mlp.{e}down_proj.weight", HIDDEN, EXPERT_FFN)
    return out


def deepseek_v3_tensors() -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of every stored tensor, in checkpoint order."""
    out = [("model.embed_tokens.weight", "BF16", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        out += _layer(i)
    mtp = f"model.layers.{LAYERS}."  # the multi-token-prediction module
    out += [(mtp + "embed_tokens.weight", "BF16", (VOCAB, HIDDEN)), (mtp + "enorm.weight", "BF16", (HIDDEN,)),
            (mtp + "hnorm.weight", "BF16", (HIDDEN,)), (mtp + "eh_proj.weight", "BF16", (HIDDEN, 2 * HIDDEN)),
            (mtp + "shared_head.norm.weight", "BF16", (HIDDEN,)),
            (mtp + "shared_head.head.weight", "BF16", (VOCAB, HIDDEN))]
    out += _layer(LAYERS)
    out += [("model.norm.weight", "BF16", (HIDDEN,)), ("lm_head.weight", "BF16", (VOCAB, HIDDEN))]
    return out


def _header(tensors: list[tuple[str, str, tuple[int, ...]]]) -> tuple[bytes, int]:
    obj: dict = {"__metadata__": {"format": "pt"}}
    cursor = 0
    for name, dtype, shape in tensors:
        size = math.prod(shape) * _SIZES[dtype]
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, cursor + size]}
        cursor += size
    text = json.dumps(obj, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, cursor


def write_sparse_checkpoint(directory: str, tensors: list[tuple[str, str, tuple[int, ...]]],
                            shards: int = SHARDS) -> int:
    """Shards of about equal size in checkpoint order, each a header and a hole; returns the bytes
    the files claim."""
    os.makedirs(directory, exist_ok=True)
    total = sum(math.prod(s) * _SIZES[d] for _, d, s in tensors)
    per = total / shards
    groups: list[list] = [[]]
    size = 0
    for t in tensors:
        n = math.prod(t[2]) * _SIZES[t[1]]
        if groups[-1] and size + n > per * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(t)
        size += n
    weight_map, claimed = {}, 0
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):06d}.safetensors"
        prefix, data = _header(group)
        with open(os.path.join(directory, name), "wb") as f:
            f.write(prefix)
            f.truncate(len(prefix) + data)
        claimed += len(prefix) + data
        weight_map.update({t[0]: name for t in group})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": HIDDEN,
              "num_hidden_layers": LAYERS, "n_routed_experts": EXPERTS, "vocab_size": VOCAB,
              "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [BLOCK, BLOCK]}}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return claimed


def make_trio(root: str) -> dict[str, str]:
    """Three DeepSeek-V3-shaped FP8 checkpoints (V3 -> V3-0324 style: one layout)."""
    tensors = deepseek_v3_tensors()
    paths = {}
    for role in ("target", "finetuned", "base"):
        paths[role] = os.path.join(root, role)
        if not os.path.exists(os.path.join(paths[role], "config.json")):
            write_sparse_checkpoint(paths[role], tensors)
    return paths


def probe(root: str) -> dict:
    """The driver's work before its first submit, measured in this process."""
    import pickle
    import resource
    import time

    import graft.cluster.driver  # noqa: F401 - ray and torch, as a driver has them
    from graft.engine.run.job import fingerprint, prepare_job
    from graft.engine.plan.specfile import spec_from_mapping

    paths = make_trio(root)
    t0 = time.perf_counter()
    job = prepare_job(spec_from_mapping({**paths, "output": os.path.join(root, "out")}))
    planned = time.perf_counter() - t0
    fingerprint(job)
    sizes = [len(pickle.dumps(s, protocol=pickle.HIGHEST_PROTOCOL)) for s in job.plan.shards]
    seconds = time.perf_counter() - t0
    return {"plan_seconds": planned, "driver_seconds": seconds, "tensors": sum(len(c.tensors) for c in job.checkpoints.values()) // 3,
            "logical_tensors": job.plan.tensor_count, "shards": len(job.plan.shards),
            "read_bytes": job.plan.read_bytes, "write_bytes": job.plan.write_bytes,
            "largest_task_bytes": max(sizes), "all_tasks_bytes": sum(sizes),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


if __name__ == "__main__":
    if sys.argv[1:2] == ["probe"]:
        print(json.dumps(probe(sys.argv[2])))
    else:
        print(json.dumps(make_trio(sys.argv[1] if len(sys.argv) > 1 else "bench/data/frontier"), indent=2))
