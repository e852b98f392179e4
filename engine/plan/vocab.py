"""Resized vocabularies: which output row of an embedding (or LM head) comes from which rows of the
three checkpoints, and whether the output's tokenizer fits its embeddings.

Chat fine-tunes add tokens (``<|im_start|>``, tool tokens) and grow ``embed_tokens`` / ``lm_head``
(and a head's bias, one value per token) from V to V + k rows. ``vocab`` in the job spec says what
to do:

- ``error``: refuse, naming the tensors, the row counts and the two ways below;
- ``pad`` (Lin et al.'s semantics): rows a checkpoint lacks count as zeros. The output has the
  fine-tune's rows; row r is t_r + alpha (f_r - b_r) where each term is 0 past its checkpoint's
  rows, so shared rows are transferred and the new rows are alpha * f (rounded once);
- ``align``: rows matched by token through the three ``tokenizer.json`` files. The output's rows are
  those of the checkpoint that donates ``tokenizer.json`` (the fine-tune by default): row r is its
  token r; each checkpoint contributes the row of that same token, or zeros if its vocabulary lacks
  it. Rows with no token (padding to a multiple, beyond the tokenizer) are matched by position as
  in ``pad``. Tokens only in a vocabulary that is not the output's are left out (counted in the
  report).

In both, a row the base lacks but the target has (a target that already grew the fine-tune's
tokens) has no difference to transfer: it is the target's row, unchanged (the fine-tune's row is
not read; alpha * f would add a second, independently trained embedding of the token to it).

A ``RowMap`` is a few ``Run``s of consecutive output rows, each a contiguous row range (or zeros) of
every checkpoint: streamed as contiguous byte ranges like any tensor (``TensorTask.piece``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ..errors import PlanError
from ..formats.checkpoint import Checkpoint
from ..formats.safetensors import DTYPE_SIZES
from .tasks import ROLES, Source, TensorTask, Term, zero_source

__all__ = ["VOCAB_TENSOR", "TEXT_CONFIGS", "Run", "RowMap", "is_vocab_tensor", "config_entries", "untie",
           "output_ties", "pad_map", "align_map", "read_vocab", "tokenizer_size", "pieces", "load_vocabs"]

# Tensors with one row per token, by the names transformers' families give them: embedding and
# LM-head weights, and an LM head's bias (Phi-1/2: one entry per token, resized with the head).
VOCAB_TENSOR = re.compile(r"((^|\.)(embed_tokens|lm_head|wte|word_embeddings|embed_out|embed_in)"
                          r"|^(tok_embeddings|shared|output))\.weight$"
                          r"|((^|\.)(lm_head|embed_out)|^output)\.bias$")
TOKENIZER = "tokenizer.json"
# The sub-configs of a multimodal config.json that describe its language model (Gemma 3, LLaVA:
# text_config; InternVL: llm_config; DeepSeek-VL: language_config): their vocab_size and
# tie_word_embeddings describe the same embeddings as top-level ones would.
TEXT_CONFIGS = ("text_config", "llm_config", "language_config")


@dataclass(frozen=True)
class Run:
    """Output rows ``[out, out + count)`` from rows ``[first, first + count)`` of each role (None: zeros)."""

    out: int
    count: int
    first: tuple[tuple[str, int | None], ...]

    def of(self, role: str) -> int | None:
        return dict(self.first)[role]


@dataclass(frozen=True)
class RowMap:
    """Where each output row comes from, and what the plan reports about it."""

    rows: int
    runs: tuple[Run, ...]
    added: int = 0  # rows the target lacks: alpha * f (or alpha * (f - b))
    kept: int = 0  # rows the base lacks and the target has: the target's row, no difference
    matched: int = 0  # rows of a token all three have
    moved: int = 0  # rows taken from another row number in some checkpoint (reordered tokens)
    padding: int = 0  # rows with no token, matched by position
    dropped: int = 0  # tokens of the target's vocabulary the output's does not have
    by: str = "token"  # how rows were matched: "token" (align) or "position" (pad)

    def describe(self) -> str:
        parts = [f"{self.rows} rows"]
        if self.matched:
            parts.append(f"{self.matched} matched by {self.by}")
        if self.moved:
            parts.append(f"{self.moved} taken from other row numbers (reordered)")
        if self.kept:
            parts.append(f"{self.kept} the target's unchanged (the base lacks them: no difference to "
                         f"transfer)")
        parts.append(f"{self.added} added from the fine-tune (zeros in the checkpoints that lack them)")
        if self.padding:
            parts.append(f"{self.padding} padding rows matched by position")
        if self.dropped:
            parts.append(f"{self.dropped} token(s) only in the target left out")
        return ", ".join(parts)


def config_entries(config: Mapping[str, Any] | None, key: str) -> dict[str, Any]:
    """``key``'s values in a parsed config.json by dotted path: the top-level ``key``, and
    ``<sub>.<key>`` in each of the ``TEXT_CONFIGS`` that holds it."""
    if not isinstance(config, Mapping):
        return {}
    out = {key: config[key]} if key in config else {}
    for sub in TEXT_CONFIGS:
        if isinstance(config.get(sub), Mapping) and key in config[sub]:
            out[f"{sub}.{key}"] = config[sub][key]
    return out


def is_vocab_tensor(name: str, rows: Mapping[str, int], configs: Mapping[str, Mapping[str, Any] | None]) -> bool:
    """An embedding, LM head or head bias: by its name, or because every checkpoint's row count is
    its config.json ``vocab_size`` (top-level or in a text sub-config)."""
    if VOCAB_TENSOR.search(name):
        return True
    return all(n in config_entries(configs.get(r), "vocab_size").values() for r, n in rows.items())


_HEADS = ("lm_head.weight", "embed_out.weight", "output.weight")
_HEAD = re.compile(r"((^|\.)(lm_head|embed_out)|^output)\.weight$")
_EMBEDDING = re.compile(r"((^|\.)(embed_tokens|wte|word_embeddings|embed_in)|^tok_embeddings)\.weight$")


def _tied(config: Mapping[str, Any] | None) -> bool:
    """config.json says the head is the embeddings: at the top level, else in a text sub-config."""
    said = config_entries(config, "tie_word_embeddings")
    return said.get("tie_word_embeddings", next(iter(said.values()), None)) is True


def untie(logical: Mapping[str, Mapping[str, Any]], configs: Mapping[str, Mapping[str, Any] | None],
          ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Each checkpoint's logical tensors with tied embeddings reconciled, and what to say about it.

    A checkpoint that ties its LM head to its embeddings (config.json ``tie_word_embeddings``) often
    stores no head tensor: where the target has a head, such a fine-tune's or base's head *is* its
    embedding matrix, and stands in for it. Where the target ties and stores no head, the output
    ties too: a fine-tune's or base's own head is left out (only the embeddings' difference moves),
    with a warning."""
    out = {role: dict(tensors) for role, tensors in logical.items()}
    notes: list[str] = []
    target = out["target"]
    embedding = next((n for n in target if _EMBEDDING.search(n)), None)
    for head in _HEADS:
        for role in (r for r in out if r != "target"):
            mine = out[role]
            if head in target and head not in mine and embedding in mine and _tied(configs.get(role)):
                mine[head] = mine[embedding]
            elif head in mine and head not in target and _tied(configs.get("target")):
                del mine[head]
                notes.append(f"{role}'s {head} is left out: the target ties its head to its embeddings "
                             f"(tie_word_embeddings) and so does the output, which takes only the "
                             f"embeddings' difference")
    return out, notes


def output_ties(names: Iterable[str], target_config: Mapping[str, Any] | None) -> bool | None:
    """The ``tie_word_embeddings`` that describes an output of tensors ``names`` (None: it has no
    embeddings). An output with embeddings and no LM head must tie (a loader that unties would
    initialise the head at random); one with a head ties only if the target did (it stores both)."""
    names = list(names)
    if not any(_EMBEDDING.search(n) for n in names):
        return None
    if not any(_HEAD.search(n) for n in names):
        return True
    return _tied(target_config)


def _runs(sources: list[dict[str, int | None]]) -> tuple[Run, ...]:
    """Group output rows (each a role -> source row or None) into runs of consecutive rows."""
    runs: list[Run] = []
    start = 0
    for r in range(1, len(sources) + 1):
        if r < len(sources) and all(
                (sources[r][k] is None) == (sources[r - 1][k] is None)
                and (sources[r][k] is None or sources[r][k] == sources[r - 1][k] + 1)  # type: ignore[operator]
                for k in ROLES):
            continue
        runs.append(Run(start, r - start, tuple((k, sources[start][k]) for k in ROLES)))
        start = r
    return tuple(runs)


def _no_diff(src: dict[str, int | None]) -> dict[str, int | None]:
    """A row the target has and the base lacks has no difference: the fine-tune's is not read."""
    if src["target"] is not None and src["base"] is None:
        return {**src, "finetuned": None}
    return src


def pad_map(rows: Mapping[str, int]) -> RowMap:
    """``vocab: pad``: the fine-tune's row count, each checkpoint's rows by position, zeros past them
    (and none of the fine-tune's where the target has the row and the base does not)."""
    n = rows["finetuned"]
    cuts = sorted({0, n, *(min(rows[r], n) for r in ROLES)})
    runs = tuple(Run(a, b - a, tuple(_no_diff({r: a if a < rows[r] else None for r in ROLES}).items()))
                 for a, b in zip(cuts, cuts[1:]) if b > a)
    have = min(rows["target"], n)
    kept = have - min(rows["base"], have)
    return RowMap(n, runs, added=n - have, kept=kept, matched=have - kept, by="position")


def read_vocab(tokenizer: Any) -> dict[str, int] | None:
    """token -> id of a ``tokenizer.json`` (its model's vocabulary and its added tokens); None if it
    has neither in a form graft reads."""
    if not isinstance(tokenizer, Mapping):
        return None
    vocab: dict[str, int] = {}
    model = tokenizer.get("model")
    table = model.get("vocab") if isinstance(model, Mapping) else None
    if isinstance(table, Mapping):  # BPE, WordPiece, WordLevel
        vocab.update({str(k): int(v) for k, v in table.items() if isinstance(v, int)})
    elif isinstance(table, list):  # Unigram: [[piece, score], ...], ids by position
        vocab.update({str(e[0]): i for i, e in enumerate(table) if isinstance(e, list) and e})
    for added in tokenizer.get("added_tokens") or []:
        if isinstance(added, Mapping) and isinstance(added.get("id"), int) and "content" in added:
            vocab[str(added["content"])] = added["id"]
    return vocab or None


def tokenizer_size(vocab: Mapping[str, int]) -> int:
    """The embedding rows a tokenizer needs: its largest id plus one."""
    return max(vocab.values()) + 1 if vocab else 0


def align_map(vocabs: Mapping[str, Mapping[str, int]], rows: Mapping[str, int], out_role: str) -> RowMap:
    """``vocab: align``: the rows of ``out_role`` (whose tokenizer the output gets), each from the row
    of the same token in every checkpoint (zeros where its vocabulary lacks the token); rows with no
    token by position."""
    n = rows[out_role]
    token_of: dict[int, str] = {}
    for token, i in vocabs[out_role].items():
        token_of.setdefault(i, token)
    sources: list[dict[str, int | None]] = []
    added = matched = moved = padding = kept = 0
    for r in range(n):
        token = token_of.get(r)
        if token is None:
            src = _no_diff({k: (r if r < rows[k] else None) for k in ROLES})
            padding += 1
        else:
            src = {}
            for k in ROLES:
                i = vocabs[k].get(token)
                src[k] = i if i is not None and i < rows[k] else None
            if src["target"] is None:
                added += 1
            elif src["base"] is None:
                src = _no_diff(src)
                kept += 1
            elif src["finetuned"] is not None:
                matched += 1
            if any(src[k] is not None and src[k] != r for k in ROLES):
                moved += 1
        sources.append(src)
    dropped = sum(1 for token in vocabs["target"] if token not in vocabs[out_role])
    return RowMap(n, _runs(sources), added=added, kept=kept, matched=matched, moved=moved, padding=padding,
                  dropped=dropped)


def _rows_of(src: Source, first: int | None, count: int, cols: int) -> Source:
    if first is None:
        return zero_source(src.role, src.dtype)
    row = cols * DTYPE_SIZES[src.dtype]
    scales = src.scales.rows(first, count, cols) if src.scales is not None else None  # FP8 rows: their scales
    return Source(src.role, src.file, src.dtype, src.begin + first * row, src.begin + (first + count) * row,
                  src.version, scales)


def pieces(name: str, dtype: str, row: tuple[int, ...], alpha: float, sources: Mapping[str, Source],
           rowmap: RowMap) -> tuple[TensorTask, ...]:
    """The ``TensorTask`` pieces of one row-mapped tensor, in row order; ``row`` is the shape of one
    row (``(cols,)``; ``()`` for a head bias, one value per token)."""
    out = []
    cols = math.prod(row)
    for run in rowmap.runs:
        by_role = {k: _rows_of(sources[k], run.of(k), run.count, cols) for k in ROLES}
        out.append(TensorTask(name, dtype, (run.count, *row), by_role["target"],
                              (Term(by_role["finetuned"], by_role["base"], alpha),), piece=(run.out, rowmap.rows)))
    return tuple(out)


def load_vocabs(checkpoints: Mapping[str, Checkpoint]) -> dict[str, dict[str, int]]:
    """Every checkpoint's tokenizer vocabulary, for ``vocab: align``; a clear error if one is missing."""
    vocabs = {}
    for role in ROLES:
        c = checkpoints[role]
        vocab = read_vocab(c.read_json(TOKENIZER))
        if vocab is None:
            raise PlanError(f"vocab: align matches embedding rows by token, but {role} ({c.uri}) has no "
                            f"{TOKENIZER} graft can read (a fast tokenizer's vocabulary and added tokens); "
                            f"use vocab: pad (rows by position, the paper's way)")
        vocabs[role] = vocab
    return vocabs
