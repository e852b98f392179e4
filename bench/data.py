"""Benchmark inputs, generated once and cached under ``bench/data/`` (about 9 GB).

- ``llama``: three TinyLlama-1.1B-shaped bf16 checkpoints (vocab 32000, hidden 2048, intermediate
  5632, 22 layers, 32 heads, 4 KV heads; 1.1 B parameters, 2.2 GB each), written by the Hub's
  sharded safetensors writer with different layouts: base and finetuned in 400 MB shards, target
  in 700 MB shards. finetuned = base + noise, target = base + other noise.
- ``big``: three checkpoints holding one 768 MiB bf16 tensor each (memory must not grow with it).
- ``fp8``: three DeepSeek-V3-style block-FP8 checkpoints of MoE expert shapes (8 experts x gate /
  up / down, 2048 x 7168 F8_E4M3 codes with F32 128x128 ``weight_scale_inv``; 352 MB each): the FP8
  path's cost against the same floor.
- ``s3``: three small checkpoints (16 tensors of 8 MiB each, one per shard file) for the S3 row.
  moto answers every range request by reading the whole object, so its cost per request grows with
  the object's size; small objects keep the server from dominating what is compared.

Usage: ``python -m bench.data [--root bench/data]``; prints the directories.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

__all__ = ["LLAMA", "make_llama", "make_big", "make_fp8", "make_s3", "ensure"]

LLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4)
SHARDS = {"base": "400MB", "finetuned": "400MB", "target": "700MB"}
BIG_SHAPE = (49152, 8192)  # 768 MiB of bf16
S3_TENSORS, S3_SHAPE = 16, (2048, 2048)  # 8 MiB of bf16 each
FP8_EXPERTS, FP8_HIDDEN, FP8_FFN = 8, 7168, 2048
_DONE = ".complete"


def _shapes(cfg: dict = LLAMA) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def _config(cfg: dict = LLAMA) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1,
            "eos_token_id": 2, "initializer_range": 0.02, **cfg}


def _save(sd: dict[str, torch.Tensor], path: str, shard: str, cfg: dict = LLAMA) -> None:
    from huggingface_hub import save_torch_state_dict

    os.makedirs(path, exist_ok=True)
    save_torch_state_dict(sd, path, max_shard_size=shard)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(_config(cfg), f, indent=2)
    open(os.path.join(path, _DONE), "w").close()


def make_llama(root: str, seed: int = 0, cfg: dict = LLAMA, shards: dict[str, str] = SHARDS,
               kind: str = "llama") -> dict[str, str]:
    """Llama-shaped bf16 checkpoints of config ``cfg``, each role written in ``shards[role]``-sized
    shards, under ``root/kind``."""
    paths, done = _roles(root, kind)
    if done:
        return paths
    gen = torch.Generator().manual_seed(seed)
    shapes = _shapes(cfg)
    base = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            base[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            base[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    _save(base, paths["base"], shards["base"], cfg)
    for role, scale in (("finetuned", 0.002), ("target", 0.001)):
        sd = {}
        for name, t in base.items():
            noise = torch.randn(t.shape, generator=gen).mul_(scale)
            sd[name] = noise.add_(t).to(torch.bfloat16)
        _save(sd, paths[role], shards[role], cfg)
        del sd
    return paths


def _roles(root: str, kind: str) -> tuple[dict[str, str], bool]:
    """The three checkpoint directories of data set ``kind``, and whether all are already complete."""
    paths = {role: os.path.join(root, kind, role) for role in SHARDS}
    return paths, all(os.path.exists(os.path.join(p, _DONE)) for p in paths.values())


def make_big(root: str, seed: int = 1, shape: tuple[int, int] = BIG_SHAPE, kind: str = "big") -> dict[str, str]:
    """One bf16 tensor of ``shape`` per checkpoint, in a single model.safetensors."""
    from safetensors.torch import save_file

    paths, done = _roles(root, kind)
    if done:
        return paths
    gen = torch.Generator().manual_seed(seed)
    for role, path in paths.items():
        os.makedirs(path, exist_ok=True)
        t = torch.randn(shape, generator=gen).mul_(0.02).to(torch.bfloat16)
        save_file({"big.weight": t}, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        del t
        open(os.path.join(path, _DONE), "w").close()
    return paths


def make_fp8(root: str, seed: int = 3, experts: int = FP8_EXPERTS, shards: int = 2,
             kind: str = "fp8") -> dict[str, str]:
    """``experts`` MoE experts per checkpoint in ``shards`` files (at most one per tensor). Codes are
    drawn over every finite E4M3 value and scales around 1e-4: the arithmetic is what is measured,
    so the values need only be finite and of realistic spread."""
    from safetensors.torch import save_file

    paths, done = _roles(root, kind)
    if done:
        return paths
    gen = torch.Generator().manual_seed(seed)
    shapes = {}
    for e in range(experts):
        p = f"model.layers.3.mlp.experts.{e}."
        shapes.update({p + "gate_proj.weight": (FP8_FFN, FP8_HIDDEN), p + "up_proj.weight": (FP8_FFN, FP8_HIDDEN),
                       p + "down_proj.weight": (FP8_HIDDEN, FP8_FFN)})
    for role, path in paths.items():
        os.makedirs(path, exist_ok=True)
        parts: list[dict[str, torch.Tensor]] = [{} for _ in range(min(shards, len(shapes)))]
        for i, (name, (rows, cols)) in enumerate(shapes.items()):
            codes = torch.randn(rows, cols, generator=gen).mul_(100).clamp_(-448, 448).to(torch.float8_e4m3fn)
            scales = torch.rand(-(-rows // 128), -(-cols // 128), generator=gen).mul_(2e-4)
            parts[i * len(parts) // len(shapes)].update({name: codes, name + "_scale_inv": scales})
        names = [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
        for name, sd in zip(names, parts):
            save_file(sd, os.path.join(path, name), metadata={"format": "pt"})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": {t: n for n, sd in zip(names, parts) for t in sd}}, f)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"model_type": "deepseek_v3", "quantization_config": {
                "quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                "weight_block_size": [128, 128]}}, f)
        open(os.path.join(path, _DONE), "w").close()
    return paths


def make_s3(root: str, seed: int = 2) -> dict[str, str]:
    from safetensors.torch import save_file

    paths, done = _roles(root, "s3")
    if done:
        return paths
    gen = torch.Generator().manual_seed(seed)
    for role, path in paths.items():
        os.makedirs(path, exist_ok=True)
        names, weight_map = [f"model-{i + 1:05d}-of-{S3_TENSORS:05d}.safetensors" for i in range(S3_TENSORS)], {}
        for i, name in enumerate(names):
            t = torch.randn(S3_SHAPE, generator=gen).mul_(0.02).to(torch.bfloat16)
            save_file({f"layers.{i}.weight": t}, os.path.join(path, name), metadata={"format": "pt"})
            weight_map[f"layers.{i}.weight"] = name
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
        open(os.path.join(path, _DONE), "w").close()
    return paths


def ensure(root: str) -> dict[str, dict[str, str]]:
    """The data sets under ``root``, generating what is missing."""
    t0 = time.monotonic()
    out = {"llama": make_llama(root), "big": make_big(root), "fp8": make_fp8(root), "s3": make_s3(root)}
    took = time.monotonic() - t0
    if took > 1:
        print(f"bench data generated in {took:.0f} s under {root}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", default=os.path.join(os.path.dirname(__file__), "data"))
    args = ap.parse_args()
    print(json.dumps(ensure(args.root), indent=2))


if __name__ == "__main__":
    main()
