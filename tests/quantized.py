"""Quantized checkpoints for the tests, written by real writers, and an independent reference.

- Block FP8 (DeepSeek-V3 style, ``quant_method: fp8``): codes and ``weight_scale_inv`` computed by
  ``quantize_blocks`` below, written with ``safetensors`` / ``huggingface_hub``; config.json by
  transformers' ``LlamaConfig``.
- compressed-tensors FP8 (per tensor, per channel, block): written by the ``compressed_tensors``
  library itself (``ModelCompressor``), as llm-compressor does.
- Per-tensor and per-channel FP8 as AutoFP8 / vLLM (``quant_method: fp8``), NVIDIA ModelOpt
  (``modelopt``, ``quant_algo: FP8``) and FBGEMM (``fbgemm_fp8``) release it: ``save_scaled_fp8``.
  Their writers need a GPU (or are not on PyPI), so the tensors are written with ``safetensors`` in
  exactly their documented layout; FBGEMM's config.json block comes from transformers' own
  ``FbgemmFp8Config``.

``quantize_blocks`` / ``dequantize`` are the reference rule of docs/quantized.md written out block by block in
float64, deliberately unlike graft's vectorized codec, so a bit-identical match means something.
"""
from __future__ import annotations

import json
import math
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FMAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
TORCH = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F32": torch.float32,
         "BF16": torch.bfloat16, "F16": torch.float16}


def tiny_llama_config(**extra):  # noqa: ANN201
    from transformers import LlamaConfig

    # 96 columns: three 32-wide blocks; the 160-row MLP: five block rows.
    return LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                       max_position_embeddings=256, tie_word_embeddings=False, **extra)


def llama_weights(seed: int, like: dict[str, torch.Tensor] | None = None, step: float = 0.02,
                  ) -> dict[str, torch.Tensor]:
    """float32 weights of the tiny Llama: random (``like`` None) or ``like`` moved by a random step."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    if like is None:
        model = LlamaForCausalLM(tiny_llama_config())
        return {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    return {k: v + step * v.abs().mean() * torch.randn_like(v) for k, v in like.items()}


def quantize_blocks(w: torch.Tensor, block: tuple[int, int], code=torch.float8_e4m3fn,
                    scale_dtype=torch.float32, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference rule, one block at a time in float64: scale = amax / FMAX (with ``pow2``, the
    next power of two up; 1 where that rounds to 0), codes = W / scale clamped, rounded through
    float32 to the code dtype."""
    w = w.double()
    rows, cols = w.shape
    bo, bi = block
    scales = torch.empty(math.ceil(rows / bo), math.ceil(cols / bi), dtype=scale_dtype)
    codes = torch.empty(rows, cols, dtype=code)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            blk = w[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi]
            x = float(blk.abs().max()) / FMAX[code]
            if pow2 and x > 0:
                x = 2.0 ** math.ceil(math.log2(x))
            s = torch.tensor(x, dtype=torch.float64).float().to(scale_dtype)
            if float(s) == 0.0:
                s = torch.tensor(1.0, dtype=scale_dtype)
            q = (blk / s.double()).clamp(-FMAX[code], FMAX[code]).float().to(code)
            codes[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi] = q
            scales[i, j] = s
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Real values (float64, exact) of codes whose scales cover ``block``-shaped blocks."""
    rows, cols = codes.shape
    s = scales.double().reshape(math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    full = s.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return codes.double() * full


def is_quantized_weight(name: str, t: torch.Tensor) -> bool:
    return name.endswith("proj.weight") and t.dim() == 2


def save_block_fp8(sd: dict[str, torch.Tensor], directory: str, block: tuple[int, int] = (32, 32),
                   code=torch.float8_e4m3fn, scale_dtype=torch.float32, split_scales: bool = False,
                   pow2: bool = False, fp8_head: bool = False, vocab_size: int | None = None) -> str:
    """A DeepSeek-V3-style checkpoint: every ``*proj.weight`` as codes + ``*.weight_scale_inv``, the
    rest bf16. ``split_scales``: the scales in a shard of their own (an index maps them), so no
    weight has its scale in the same file. ``pow2``: power-of-two scales, ``scale_fmt: ue8m0``
    (DeepSeek-V3.1 and later). ``fp8_head``: ``lm_head.weight`` is FP8 too; ``vocab_size``: config.json's,
    where the weights have more rows (a resized vocabulary)."""
    os.makedirs(directory, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, w in sd.items():
        if is_quantized_weight(name, w) or (fp8_head and name == "lm_head.weight"):
            tensors[name], scales[name + "_scale_inv"] = quantize_blocks(w, block, code, scale_dtype, pow2)
        else:
            tensors[name] = w.to(torch.bfloat16).contiguous()
    if split_scales:
        save_file(tensors, os.path.join(directory, "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
        save_file(scales, os.path.join(directory, "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
        weight_map = {**{n: "model-00001-of-00002.safetensors" for n in tensors},
                      **{n: "model-00002-of-00002.safetensors" for n in scales}}
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    else:
        from huggingface_hub import save_torch_state_dict

        save_torch_state_dict({**tensors, **scales}, directory, max_shard_size=60_000)
    cfg = tiny_llama_config()
    cfg.vocab_size = vocab_size or cfg.vocab_size
    cfg.quantization_config = {"quant_method": "fp8", "activation_scheme": "dynamic",
                               "fmt": "e4m3" if code == torch.float8_e4m3fn else "e5m2",
                               "weight_block_size": list(block), **({"scale_fmt": "ue8m0"} if pow2 else {})}
    cfg.save_pretrained(directory)
    return directory


SCALED_FP8 = ("autofp8-static", "autofp8-dynamic", "modelopt", "fbgemm")


def save_scaled_fp8(sd: dict[str, torch.Tensor], directory: str, layout: str, input_scale: float = 0.0625) -> str:
    """A per-tensor or per-channel FP8 checkpoint as released on the Hub, every ``*proj.weight`` as
    F8_E4M3 codes + F32 ``weight_scale`` (codes x scale), the rest bf16:

    - ``autofp8-static`` / ``autofp8-dynamic``: AutoFP8 / vLLM, ``{quant_method: fp8,
      activation_scheme, ignored_layers}``, a scalar (shape []) ``weight_scale``; static adds a
      scalar ``input_scale`` per weight.
    - ``modelopt``: NVIDIA ModelOpt FP8, ``{quant_method: modelopt, quant_algo: FP8, ...}`` in
      config.json and hf_quant_config.json; scalar ``weight_scale`` and ``input_scale``, and
      ``k_scale`` / ``v_scale`` on k_proj / v_proj (its FP8 KV cache).
    - ``fbgemm``: FBGEMM FP8 (``FbgemmFp8Config``), ``weight_scale`` of shape [out, 1], dynamic
      activations.
    Scales are amax / 448 of the tensor (or row), by ``quantize_blocks``."""
    os.makedirs(directory, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, w in sd.items():
        if not is_quantized_weight(name, w):
            tensors[name] = w.to(torch.bfloat16).contiguous()
            continue
        block = (1, w.shape[1]) if layout == "fbgemm" else tuple(w.shape)
        tensors[name], scale = quantize_blocks(w, block)
        tensors[name + "_scale"] = scale if layout == "fbgemm" else scale.reshape(())
        if layout in ("autofp8-static", "modelopt"):
            tensors[name[:-len("weight")] + "input_scale"] = torch.tensor(input_scale)
        if layout == "modelopt" and name.endswith(("k_proj.weight", "v_proj.weight")):
            tensors[name[:-len("weight")] + name[-len("k_proj.weight")] + "_scale"] = torch.tensor(1.0)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    cfg = tiny_llama_config()
    if layout.startswith("autofp8"):
        cfg.quantization_config = {"quant_method": "fp8", "activation_scheme": layout.split("-")[1],
                                   "ignored_layers": ["lm_head"]}
    elif layout == "modelopt":
        quantization = {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}
        producer = {"name": "modelopt", "version": "0.29.0"}
        cfg.quantization_config = {"quant_method": "modelopt", **quantization, "producer": producer}
        with open(os.path.join(directory, "hf_quant_config.json"), "w") as f:
            json.dump({"producer": producer, "quantization": quantization}, f)
    else:
        from transformers import FbgemmFp8Config

        cfg.quantization_config = FbgemmFp8Config(modules_to_not_convert=["lm_head"]).to_dict()
    cfg.save_pretrained(directory)
    return directory


def save_plain(sd: dict[str, torch.Tensor], directory: str, dtype=torch.bfloat16) -> str:
    """An unquantized checkpoint written by transformers' save_pretrained."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config())
    model.load_state_dict(sd)
    model.to(dtype).save_pretrained(directory)
    return directory


def save_compressed_tensors(sd: dict[str, torch.Tensor], directory: str, preset: str,
                            block: tuple[int, int] | None = None) -> str:
    """A compressed-tensors checkpoint written by the compressed_tensors library: ``preset`` is one of
    its schemes (``FP8`` per-tensor with static input scales, ``FP8_DYNAMIC`` per channel,
    ``FP8_BLOCK``, or the integer ones graft refuses). Weight scales are amax / 448 (the library's
    own ``calculate_qparams``), static input scales a fixed calibration."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, apply_quantization_config,
                                                 preset_name_to_scheme)
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config())
    model.load_state_dict(sd)
    model.to(torch.bfloat16)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    if block is not None:
        scheme.weights.block_structure = list(block)
        if scheme.input_activations is not None and scheme.input_activations.group_size:
            scheme.input_activations.group_size = block[1]  # the tiny model's widths, not 128
    if scheme.weights.group_size:
        scheme.weights.group_size = 32  # the tiny model's widths, not 128
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    for module in model.modules():
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if args is None:
            continue
        w = module.weight.data.float()
        if args.strategy == "tensor":
            lo, hi = w.min(), w.max()
        elif args.strategy == "channel":
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        elif args.strategy == "group":
            g = w.unflatten(1, (-1, args.group_size))
            lo, hi = g.amin(2), g.amax(2)
        else:
            bo, bi = args.block_structure
            b = w.unflatten(0, (-1, bo)).unflatten(2, (-1, bi))
            lo, hi = b.amin((1, 3)), b.amax((1, 3))
        scale, zero = calculate_qparams(lo, hi, args)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
        if hasattr(module, "input_scale"):
            module.input_scale.data.fill_(0.0625)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(directory)
    compressor.update_config(directory)
    return directory


def read_tensors(directory: str) -> dict[str, torch.Tensor]:
    """Every stored tensor of a checkpoint directory, read with the reference reader."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(directory, f), "pt") as st:
                out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def quant_config(directory: str) -> dict | None:
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f).get("quantization_config")


def scale_suffix(directory: str) -> str:
    qc = quant_config(directory)
    if qc and qc["quant_method"] == "fp8":  # block FP8 and transformers' per-tensor; AutoFP8's are _scale
        return "_scale_inv" if any(n.endswith("_scale_inv") for n in read_tensors(directory)) else "_scale"
    return "_scale"


def block_of(codes: torch.Tensor, scales: torch.Tensor, qc: dict) -> tuple[int, int]:
    """The block a scale tensor covers, from config.json (clipped to the tensor)."""
    rows, cols = codes.shape
    if scales.numel() == 1:
        return rows, cols
    if tuple(scales.shape) == (rows, 1):
        return 1, cols
    if qc["quant_method"] == "fp8":
        bo, bi = qc["weight_block_size"]
    else:
        bo, bi = next(g["weights"]["block_structure"] for g in qc["config_groups"].values())
    return min(bo, rows), min(bi, cols)


def real_values(directory: str) -> dict[str, torch.Tensor]:
    """Logical tensors in float64 (FP8 weights dequantized), activation scales left out."""
    raw = read_tensors(directory)
    qc = quant_config(directory)
    suffix = scale_suffix(directory)
    out = {}
    for name, t in raw.items():
        if name.endswith(suffix) or name.endswith(("input_scale", ".k_scale", ".v_scale")):
            continue
        if t.dtype in FMAX:
            scales = raw[name + suffix]
            out[name] = dequantize(t, scales, block_of(t, scales, qc))
        else:
            out[name] = t.double()
    return out
