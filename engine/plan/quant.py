"""Quantized checkpoints: how a checkpoint stores each logical weight, and what graft refuses.

A *logical tensor* is what the arithmetic sees: a weight of real values. A checkpoint stores it
either plainly (one F16/BF16/F32/F64 tensor) or as scaled FP8: codes (F8_E4M3 or F8_E5M2) plus a
scale tensor next to them (``<name>_scale_inv`` for ``quant_method: fp8``, DeepSeek-V3 style, or
``<name>_scale`` for per-tensor ``fp8`` as AutoFP8 / vLLM write it; ``<name>_scale`` for
``compressed-tensors``, ``modelopt`` FP8 and ``fbgemm_fp8``). The format is read from config.json's
``quantization_config`` *and* checked against the tensors: an FP8 tensor is never taken for a plain
one, and every other quantization (GPTQ, AWQ, bitsandbytes, HQQ, EETQ, MXFP4, NVFP4, int8, packed
integer weights, unknown methods) is refused before any data moves.

Order of use: ``read_scheme(config, where)`` -> ``Scheme | None``; ``layout_of(checkpoint, scheme)``
-> ``Layout`` (logical name -> ``Stored``). Both raise ``QuantizationError`` with one line naming
the checkpoint, the method, an example tensor and what to do.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import QuantizationError
from ..formats.checkpoint import Checkpoint, TensorRef
from .tasks import Scales, Source

__all__ = ["FP8_CODES", "SCALE_DTYPES", "HF_QUANT_CONFIG", "Scheme", "Stored", "Layout", "read_scheme", "layout_of",
           "layout_for"]

FP8_CODES = ("F8_E4M3", "F8_E5M2")
SCALE_DTYPES = ("F32", "BF16", "F16")
HF_QUANT_CONFIG = "hf_quant_config.json"  # NVIDIA ModelOpt's own description of its weights
_INTEGER = ("I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64")
_WHAT_TO_DO = ("graft transfers plain floating-point and FP8 (block, per-tensor or per-channel scales: "
               "fp8, compressed-tensors, ModelOpt FP8, FBGEMM FP8) checkpoints: use the unquantized "
               "release of this model, or dequantize it first (load it with transformers and "
               "save_pretrained it in bf16)")
_METHOD_NAMES = {
    "gptq": "GPTQ", "awq": "AWQ", "bitsandbytes": "bitsandbytes", "hqq": "HQQ", "eetq": "EETQ",
    "mxfp4": "MXFP4",
    "quanto": "Quanto", "torchao": "torchao", "aqlm": "AQLM", "vptq": "VPTQ", "higgs": "HIGGS",
    "bitnet": "BitNet", "spqr": "SpQR", "fp_quant": "FP-Quant", "auto-round": "AutoRound",
    "quark": "Quark", "nvfp4": "NVFP4", "gguf": "GGUF",
}
# compressed-tensors formats other than FP8 codes with float scales.
_CT_FORMATS = {
    "int-quantized": "int8 W8A8 (compressed-tensors int-quantized)",
    "pack-quantized": "packed integer weights (compressed-tensors pack-quantized, e.g. W4A16)",
    "nvfp4-pack-quantized": "NVFP4 (compressed-tensors nvfp4-pack-quantized)",
    "mxfp4-pack-quantized": "MXFP4 (compressed-tensors mxfp4-pack-quantized)",
    "mxfp6-pack-quantized": "MXFP6 (compressed-tensors mxfp6-pack-quantized)",
    "mxfp8-quantized": "MXFP8 with E8M0 scales (compressed-tensors mxfp8-quantized)",
    "sparse-24-bitmask": "2:4 sparsity (compressed-tensors sparse-24-bitmask)",
    "sparse-bitmask": "sparsity (compressed-tensors sparse-bitmask)",
    "marlin-24": "2:4 sparsity (compressed-tensors marlin-24)",
    "dense": "compressed-tensors dense format with quantization parameters",
}
_CT_FLOAT_FORMATS = ("float-quantized", "naive-quantized")
# Tensor-name endings that give a quantization away even without a config.json.
_SIGNATURES = {
    ".qweight": "packed integer weights (GPTQ / AWQ layout)", ".qzeros": "packed integer weights (GPTQ / AWQ layout)",
    ".g_idx": "packed integer weights (GPTQ / AWQ layout)",
    ".SCB": "bitsandbytes", ".absmax": "bitsandbytes", ".quant_map": "bitsandbytes",
    "_blocks": "MXFP4 (*_blocks / *_scales)",
    ".weight_packed": "packed integer weights (compressed-tensors pack-quantized)",
    ".weight_shape": "packed integer weights (compressed-tensors pack-quantized)",
    ".weight_scale_2": "NVFP4", ".weight_global_scale": "NVFP4", ".input_global_scale": "NVFP4",
    ".W_q": "HQQ", ".weight_scales": "EETQ",
}
_SIGNATURE_ENDINGS = tuple(_SIGNATURES)
# Calibrated activation / KV-cache scales (and FBGEMM's activation bound, ``input_scale_ub``, where a
# checkpoint stores it): properties of a checkpoint's activations, not weights.
_ACTIVATION = re.compile(r"(^|\.)((input|output|activation|k|v|q)_scale|input_scale_ub)$")


@dataclass(frozen=True)
class Scheme:
    """A checkpoint's declared quantization (config.json ``quantization_config``), validated.

    ``suffix`` names each scale tensor after its codes; ``blocks`` are the declared block shapes
    and ``strategies`` the declared granularities (``tensor``, ``channel``, ``block``)."""

    method: str
    suffix: str
    strategies: frozenset[str]
    blocks: tuple[tuple[int, int], ...] = ()
    config_json: str = field(default="{}", compare=False)
    pow2: bool = False  # scale_fmt ue8m0: every scale is a power of two (stored as F32 / BF16)

    @property
    def config(self) -> dict[str, Any]:
        """The ``quantization_config`` object as config.json has it."""
        return json.loads(self.config_json)


@dataclass(frozen=True)
class Stored:
    """How one checkpoint stores one logical tensor: plain ``codes`` (then they are the values), or
    FP8 codes plus ``scales``, one per ``block`` = (rows, cols) of codes, clipped to the tensor (so
    a per-tensor scale has ``block == shape`` and a per-channel one ``(1, cols)``)."""

    codes: TensorRef
    scales: TensorRef | None = None
    block: tuple[int, int] | None = None

    @property
    def granularity(self) -> str:
        if self.scales is None or self.block is None:
            return "plain"
        if self.block == tuple(self.codes.shape):
            return "per-tensor"
        if self.block == (1, self.codes.shape[1]):
            return "per-channel"
        return f"{self.block[0]}x{self.block[1]} block"


@dataclass(frozen=True)
class Layout:
    """A checkpoint seen as logical tensors (keyed by the codes' name), in file order, plus its
    calibrated activation scales (``input_scale``, ``k_scale``, ...), which are not weights."""

    scheme: Scheme | None
    tensors: dict[str, Stored]
    activation_scales: dict[str, TensorRef] = field(default_factory=dict)

    def describe(self) -> str:
        """One line: the format and how many tensors it quantizes, e.g. for ``graft plan``."""
        quantized = [s for s in self.tensors.values() if s.scales is not None]
        if self.scheme is None or not quantized:
            return f"plain ({len(self.tensors)} tensors)"
        pow2 = " (powers of two, ue8m0)" if self.scheme.pow2 else ""
        kinds = sorted({f"{s.codes.dtype} codes, {s.scales.dtype} scales{pow2} {s.granularity}"
                        for s in quantized if s.scales is not None})
        extra = f", {len(self.activation_scales)} activation scales" if self.activation_scales else ""
        return (f"FP8 (quant_method {self.scheme.method}: {'; '.join(kinds)}): {len(quantized)} "
                f"quantized + {len(self.tensors) - len(quantized)} plain tensors{extra}")


def _refuse(where: str, what: str, example: str | None | Mapping[str, TensorRef]) -> QuantizationError:
    if isinstance(example, Mapping):
        example = _example(example)
    eg = f", e.g. tensor {example!r}" if example else ""
    return QuantizationError(f"{where} is quantized with {what}{eg}; {_WHAT_TO_DO}")


def _positive_pair(v: Any) -> tuple[int, int] | None:
    if (isinstance(v, (list, tuple)) and len(v) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)):
        return int(v[0]), int(v[1])
    return None


def read_scheme(config: Mapping[str, Any] | None, where: str,
                tensors: Mapping[str, TensorRef] | None = None) -> Scheme | None:
    """The quantization config.json declares (None: unquantized). Refuses every method but FP8 with
    float scales (``fp8``, ``compressed-tensors``, ``modelopt`` FP8, ``fbgemm_fp8``); ``tensors``
    (optional) supply the example named in the error and tell per-tensor ``fp8``'s scale names."""
    qc = config.get("quantization_config") if isinstance(config, Mapping) else None
    if qc is None:
        return None
    example = tensors or {}  # the example tensor is found only if something is refused
    if not isinstance(qc, Mapping):
        raise QuantizationError(f"{where}: config.json quantization_config is not an object; fix "
                                f"config.json")
    method = qc.get("quant_method")
    text = json.dumps(qc, sort_keys=True)
    if method == "fp8":
        scale_fmt = qc.get("scale_fmt")
        if scale_fmt not in (None, "float", "float32", "fp32", "ue8m0"):  # "float": transformers' writer
            raise _refuse(where, f"FP8 with {scale_fmt} scales (quant_method fp8, scale_fmt {scale_fmt!r})",
                          example)
        pow2 = scale_fmt == "ue8m0"  # DeepSeek-V3.1 and later: power-of-two scales kept in F32
        wbs = qc.get("weight_block_size")
        if wbs is None:
            return Scheme("fp8", _per_tensor_suffix(tensors), frozenset({"tensor"}), (), text, pow2)
        block = _positive_pair(wbs)
        if block is None:
            raise QuantizationError(f"{where}: config.json quantization_config.weight_block_size is "
                                    f"{wbs!r}, expected two positive integers like [128, 128]")
        return Scheme("fp8", "_scale_inv", frozenset({"block"}), (block,), text, pow2)
    if method == "compressed-tensors":
        return _compressed_tensors(qc, where, example, text)
    if method == "fbgemm_fp8":  # FBGEMM FP8: one F32 scale per output channel ([out, 1]), dynamic activations
        return Scheme("fbgemm_fp8", "_scale", frozenset({"channel"}), (), text)
    if method == "modelopt":
        # NVIDIA ModelOpt: quant_algo at the top (config.json) or under "quantization" (the layout of
        # its hf_quant_config.json, which some releases copy into config.json).
        inner = qc.get("quantization")
        algo = qc.get("quant_algo", inner.get("quant_algo") if isinstance(inner, Mapping) else None)
        if algo == "FP8":  # a scalar F32 weight_scale (and input_scale) per weight
            return Scheme("modelopt", "_scale", frozenset({"tensor"}), (), text)
        what = f"NVIDIA ModelOpt {algo}" if algo else "NVIDIA ModelOpt with no quant_algo"
        raise _refuse(where, f"{what} (quant_method 'modelopt', quant_algo {algo!r}; graft reads its "
                             f"quant_algo FP8 only)", example)
    if isinstance(method, str) and method.lower() in _METHOD_NAMES:
        name = _METHOD_NAMES[method.lower()]
        raise _refuse(where, f"{name} (quant_method {method!r})", example)
    raise _refuse(where, f"an unknown method (quant_method {method!r})", example)


def _per_tensor_suffix(tensors: Mapping[str, TensorRef] | None) -> str:
    """Per-tensor ``fp8`` scales are ``weight_scale_inv`` as transformers writes them, ``weight_scale``
    as AutoFP8 and vLLM do (codes x scale either way): the checkpoint's own names tell which."""
    names = tensors or {}
    if any(n.endswith(".weight_scale") for n in names) and not any(n.endswith("_scale_inv") for n in names):
        return "_scale"
    return "_scale_inv"


def _compressed_tensors(qc: Mapping[str, Any], where: str, example: Mapping[str, TensorRef], text: str) -> Scheme:
    def refuse(what: str) -> QuantizationError:
        return _refuse(where, what, example)

    for key, what in (("sparsity_config", "sparsity"), ("transform_config", "transforms (rotations)")):
        value = qc.get(key)
        if isinstance(value, Mapping) and value and value.get("format", "x") != "dense":
            raise refuse(f"compressed-tensors {what} ({key})")
    groups = qc.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise refuse("compressed-tensors with no config_groups")
    strategies: set[str] = set()
    blocks: list[tuple[int, int]] = []
    for gname, group in groups.items():
        if not isinstance(group, Mapping):
            raise refuse(f"compressed-tensors (config group {gname!r} is not an object)")
        fmt = group.get("format") or qc.get("format")
        if fmt not in _CT_FLOAT_FORMATS:
            raise refuse(_CT_FORMATS.get(str(fmt), f"compressed-tensors format {fmt!r}"))
        w = group.get("weights")
        if not isinstance(w, Mapping):
            raise refuse(f"compressed-tensors activation-only quantization (group {gname!r})")
        kind, bits = w.get("type"), w.get("num_bits")
        if kind != "float" or bits != 8:
            what = "integer" if kind == "int" else f"{bits}-bit {kind}"
            raise refuse(f"compressed-tensors {what} weights (group {gname!r}: type {kind!r}, num_bits "
                         f"{bits!r})")
        if w.get("symmetric") is False:
            raise refuse(f"compressed-tensors asymmetric FP8 weights (group {gname!r})")
        strategy = w.get("strategy")
        if strategy == "block":
            block = _positive_pair(w.get("block_structure"))
            if block is None:
                raise refuse(f"compressed-tensors block FP8 without a valid block_structure (group "
                             f"{gname!r})")
            blocks.append(block)
        elif strategy not in ("tensor", "channel"):
            raise refuse(f"compressed-tensors FP8 with {strategy!r} weight scales (group {gname!r})")
        strategies.add(str(strategy))
    return Scheme("compressed-tensors", "_scale", frozenset(strategies), tuple(dict.fromkeys(blocks)),
                  text)


def _example(tensors: Mapping[str, TensorRef]) -> str | None:
    for name, ref in tensors.items():
        if _signature(name, ref) is not None:
            return name
    return next(iter(tensors), None)


def _signature(name: str, ref: TensorRef) -> str | None:
    """What a tensor gives away about a quantization, whatever config.json says (None: nothing)."""
    if name.endswith(_SIGNATURE_ENDINGS):  # one C-level test per name: a 671B model has 92k
        return next(what for end, what in _SIGNATURES.items() if name.endswith(end))
    if ".weight.quant_state." in name:
        return "bitsandbytes"
    if ref.dtype == "F8_E8M0":
        return "microscaling (MX) block scales (F8_E8M0)"
    if ref.dtype in _INTEGER and len(ref.shape) == 2 and name.endswith(".weight"):
        return f"integer weights ({ref.dtype}; int8 or packed int4)"
    return None


def _blocks_for(codes: TensorRef, scales: TensorRef, scheme: Scheme) -> list[tuple[int, int]]:
    """The declared granularities whose scale grid has the scale tensor's shape, as clipped blocks."""
    rows, cols = codes.shape
    found = []
    if "tensor" in scheme.strategies and math.prod(scales.shape) == 1 and len(scales.shape) <= 2:
        found.append((rows, cols))
    if "channel" in scheme.strategies and tuple(scales.shape) == (rows, 1):
        found.append((1, cols))
    if "block" in scheme.strategies:
        for bo, bi in scheme.blocks:
            if tuple(scales.shape) == (-(-rows // bo), -(-cols // bi)):
                found.append((min(bo, rows), min(bi, cols)))
    return list(dict.fromkeys(found))


def layout_of(ckpt: Checkpoint, scheme: Scheme | None, role: str) -> Layout:
    """The logical tensors of ``ckpt`` under ``scheme``; refuses what it cannot decode honestly."""
    where = f"{role} ({ckpt.uri})"
    tensors = ckpt.tensors
    for name, ref in tensors.items():
        what = _signature(name, ref)
        if what is not None:
            raise _refuse(where, what, name)
    if scheme is None:
        fp8 = next((n for n, r in tensors.items() if r.dtype in FP8_CODES), None)
        if fp8 is not None and HF_QUANT_CONFIG in ckpt.side_files:
            raise QuantizationError(
                f"{where}: tensor {fp8!r} is {tensors[fp8].dtype} and its quantization is declared only in "
                f"{HF_QUANT_CONFIG} (an older NVIDIA ModelOpt export), which graft does not read; copy "
                f"that file's \"quantization\" object into config.json as quantization_config, with "
                f"\"quant_method\": \"modelopt\" added (as newer ModelOpt exports write it)")
        if fp8 is not None:
            raise QuantizationError(
                f"{where}: tensor {fp8!r} is {tensors[fp8].dtype} but config.json declares no "
                f"quantization_config, so its scales cannot be known; add the checkpoint's config.json "
                f"(with quantization_config), or {_WHAT_TO_DO.split(': ', 1)[1]}")
        return Layout(None, {n: Stored(r) for n, r in tensors.items()})

    scale_of = {n + scheme.suffix: n for n, r in tensors.items() if r.dtype in FP8_CODES}
    stored: dict[str, Stored] = {}
    activations: dict[str, TensorRef] = {}
    for name, ref in tensors.items():
        if name in scale_of:
            continue  # travels with its codes
        if _ACTIVATION.search(name):
            activations[name] = ref
            continue
        if ref.dtype not in FP8_CODES:
            if name.endswith(scheme.suffix) and (name.endswith("weight" + scheme.suffix)
                                                 or name[:-len(scheme.suffix)] in tensors):
                raise QuantizationError(f"{where}: tensor {name!r} looks like a scale tensor but there is "
                                        f"no FP8 tensor {name[:-len(scheme.suffix)]!r} it belongs to; the "
                                        f"checkpoint is incomplete or in a layout graft does not know")
            stored[name] = Stored(ref)
            continue
        scale = tensors.get(name + scheme.suffix)
        if scale is None:
            raise QuantizationError(f"{where}: FP8 tensor {name!r} has no scale tensor "
                                    f"{name + scheme.suffix!r} (quant_method {scheme.method}); the "
                                    f"checkpoint is incomplete or in a layout graft does not know")
        if len(ref.shape) != 2 or ref.numel == 0:
            raise QuantizationError(f"{where}: FP8 tensor {name!r} has shape {list(ref.shape)}; graft "
                                    f"decodes scaled FP8 only for non-empty 2-D weights")
        if scale.dtype not in SCALE_DTYPES:
            raise _refuse(where, f"FP8 with {scale.dtype} scales", name + scheme.suffix)
        blocks = _blocks_for(ref, scale, scheme)
        if len(blocks) != 1:
            declared = ", ".join(sorted(scheme.strategies)) + "".join(f" {b[0]}x{b[1]}" for b in scheme.blocks)
            why = "matches none" if not blocks else "is ambiguous between several"
            raise QuantizationError(f"{where}: scale tensor {name + scheme.suffix!r} of shape "
                                    f"{list(scale.shape)} for codes of shape {list(ref.shape)} {why} of "
                                    f"the declared scale granularities ({declared}); fix config.json's "
                                    f"quantization_config")
        stored[name] = Stored(ref, scale, blocks[0])
    if not any(s.scales is not None for s in stored.values()):
        raise QuantizationError(f"{where}: config.json declares quant_method {scheme.method} but no tensor "
                                f"is FP8 with a {scheme.suffix} scale; fix or remove quantization_config")
    return Layout(scheme, stored, activations)


def layout_for(ckpt: Checkpoint, config: Mapping[str, Any] | None, role: str) -> Layout:
    """``layout_of`` under the scheme ``config`` (the checkpoint's parsed config.json) declares."""
    return layout_of(ckpt, read_scheme(config, f"{role} ({ckpt.uri})", ckpt.tensors), role)


def source_of(ckpt: Checkpoint, role: str, stored: Stored, pow2: bool = False) -> Source:
    """Where a worker reads ``stored`` (codes, and scales if any) in ``ckpt``, read as ``role``."""
    ref, sc = stored.codes, stored.scales
    scales = None
    if sc is not None and stored.block is not None:
        scales = Scales(sc.name, sc.dtype, sc.shape, stored.block, pow2, sc.file, sc.begin, sc.end,
                        ckpt.version_of(sc.file))
    return Source(role, ref.file, ref.dtype, ref.begin, ref.end, ckpt.version_of(ref.file), scales)
