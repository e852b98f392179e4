"""Planning a resized vocabulary: the embedding and LM-head tensors whose rows differ.

``resized_pieces`` turns each such tensor into pieces whose rows come from the target and the diff
(shared rows), or from the fine-tune (new rows), as ``vocab: pad`` (by position, the paper's way)
or ``vocab: align`` (by token, through tokenizer.json) says; the row maps are ``vocab.py``'s.
``tokenizer_fits`` refuses an output whose tokenizer holds ids past its embedding rows.
"""
from __future__ import annotations

from typing import Mapping

from . import vocab as vocab_rows
from ..errors import PlanError
from ..formats.checkpoint import Checkpoint
from ..formats.safetensors import FLOATING_DTYPES
from .output_files import check_side_file_size
from .quant import Stored, source_of
from .spec import JobSpec
from .tasks import ROLES, OutScales, TensorTask

__all__ = ["resized_pieces", "output_vocab_rows", "tokenizer_fits"]


def resized_pieces(spec: JobSpec, checkpoints: Mapping[str, Checkpoint],
                   resized: Mapping[str, tuple[Stored, Stored, Stored, float, str, OutScales | None]],
                   canon: Mapping[str, str]
                   ) -> tuple[dict[str, tuple[TensorTask, ...]], list[tuple[str, str]], list[str],
                              dict[str, dict[str, int]] | None]:
    """The pieces of each embedding / LM head whose vocabulary differs between the checkpoints (as
    ``spec.vocab`` says), what the plan reports about their rows, the problems, and the three
    tokenizers' vocabularies if ``align`` read them."""
    pieces: dict[str, tuple[TensorTask, ...]] = {}
    report: list[tuple[str, str]] = []
    problems: list[str] = []
    vocabs: dict[str, dict[str, int]] | None = None
    for name, (t, f, b, alpha, dtype, scales) in resized.items():
        stored = {"target": t, "finetuned": f, "base": b}
        rows = {role: st.codes.shape[0] for role, st in stored.items()}
        where = ", ".join(f"{list(stored[r].codes.shape)} in {r} ({checkpoints[r].uri})" for r in ROLES)
        if spec.vocab == "error":
            problems.append(f"tensor {name!r} has shape {where}: a resized vocabulary; set vocab: pad to "
                            f"transfer the shared rows and take the new ones from the fine-tune (the "
                            f"paper's way), or vocab: align to match rows by token through tokenizer.json")
            continue
        odd = [r for r in ROLES if stored[r].codes.dtype not in FLOATING_DTYPES]
        if odd:
            problems.append(f"tensor {name!r} is {stored[odd[0]].codes.dtype} in {odd[0]} "
                            f"({checkpoints[odd[0]].uri}); cannot compute a float difference from it")
            continue
        if scales is not None:  # FP8 inputs are decoded row by row; an FP8 output's scales are not split
            problems.append(f"tensor {name!r}: vocab: {spec.vocab} writes its rows in pieces, but the target "
                            f"stores it as FP8, whose scales graft does not split; use output_format: bf16 "
                            f"(the whole output in BF16), or a target that stores it unquantized")
            continue
        if spec.vocab == "pad":
            lost = [r for r in ("target", "base") if rows[r] > rows["finetuned"]]
            if lost:
                problems.append(f"tensor {name!r} has shape {where}: vocab: pad keeps the fine-tune's "
                                f"{rows['finetuned']} rows, so {lost[0]}'s rows past them would be lost; "
                                f"use vocab: align (rows matched by token)")
                continue
            rowmap = vocab_rows.pad_map(rows)
        else:
            out_role = spec.donor_for(vocab_rows.TOKENIZER)
            if out_role is None:
                problems.append(f"vocab: align gives the output the rows of the checkpoint that donates "
                                f"{vocab_rows.TOKENIZER}, but files says none does; donate one")
                continue
            if vocabs is None:
                try:
                    for c in checkpoints.values():
                        if vocab_rows.TOKENIZER in c.side_files:
                            check_side_file_size(spec, c, vocab_rows.TOKENIZER)
                    vocabs = vocab_rows.load_vocabs(checkpoints)
                except PlanError as e:
                    problems.append(str(e))
                    break
            rowmap = vocab_rows.align_map(vocabs, rows, out_role)
        sources = {r: source_of(checkpoints[r], canon[r], st) for r, st in stored.items()}
        split = next(((r, first, s.scales.block[0]) for run in rowmap.runs for r, s in sources.items()
                      for first in (run.of(r),) if s.scales is not None and first
                      and not s.scales.splits_at(first)), None)
        if split is not None:
            r, first, bo = split
            problems.append(f"tensor {name!r}: vocab: {spec.vocab} takes rows from row {first} of {r} "
                            f"({checkpoints[r].uri}), inside one of its {bo}-row FP8 scale blocks, which "
                            f"graft does not split; use an unquantized release of {r}, or dequantize it "
                            f"first")
            continue
        pieces[name] = vocab_rows.pieces(name, dtype, t.codes.shape[1:], alpha, sources, rowmap)
        report.append((name, rowmap.describe()))
    return pieces, report, problems, vocabs


def _output_rows(tasks: Mapping[str, TensorTask], pieces: Mapping[str, tuple[TensorTask, ...]]) -> dict[str, int]:
    """Rows of the output's embedding / LM-head / head-bias tensors."""
    out = {}
    for name, t in tasks.items():
        if vocab_rows.VOCAB_TENSOR.search(name) and len(t.shape) in (1, 2):
            out[name] = pieces[name][0].piece[1] if name in pieces else t.shape[0]  # type: ignore[index]
    return out


def output_vocab_rows(tasks: Mapping[str, TensorTask], pieces: Mapping[str, tuple[TensorTask, ...]],
                      target_rows: Mapping[str, int]) -> tuple[int | None, list[str]]:
    """The output's vocabulary rows where it was resized (None where it was not), and the problem if
    its vocabulary tensors would disagree: every tensor indexed by the same tokens in the target
    (embeddings, LM head, head bias: the resized tensors' row count there) must have the same rows
    in the output, or a loader fails, or pairs a row of one with another token's row of the other.
    (Another vocabulary, a Q-Former's, has other rows in the target and is left alone.)"""
    if not pieces:
        return None, []
    rows = {**_output_rows(tasks, pieces), **{n: p[0].piece[1] for n, p in pieces.items()}}  # type: ignore[index]
    before = {target_rows[n] for n in pieces}
    group = {n: r for n, r in rows.items() if n in pieces or target_rows.get(n) in before}
    if len(set(group.values())) == 1:
        return next(iter(group.values())), []
    shown = ", ".join(f"{n!r} {r}" for n, r in group.items())
    return None, [f"the output's vocabulary tensors would have different row counts ({shown}): each row "
                  f"is a token, so they must agree; give them all the same rule (vocab: pad / align "
                  f"resizes them together; alpha: 0 on all of them carries the target's rows)"]


def tokenizer_fits(spec: JobSpec, checkpoints: Mapping[str, Checkpoint], tasks: Mapping[str, TensorTask],
                   pieces: Mapping[str, tuple[TensorTask, ...]],
                   vocabs: Mapping[str, Mapping[str, int]] | None = None) -> list[str]:
    """The output's tokenizer must not hold ids past its embeddings' rows (every such id would index
    outside the matrix at inference)."""
    donor = spec.donor_for(vocab_rows.TOKENIZER)
    rows = _output_rows(tasks, pieces)
    if donor is None or not rows or vocab_rows.TOKENIZER not in checkpoints[donor].side_files:
        return []
    # Its size was checked with the other side files; align has read it already.
    vocab = (vocabs or {}).get(donor) or vocab_rows.read_vocab(checkpoints[donor].read_json(vocab_rows.TOKENIZER))
    if vocab is None:
        return []
    need = vocab_rows.tokenizer_size(vocab)
    short = {n: r for n, r in rows.items() if r < need}
    if not short:
        return []
    name, have = next(iter(short.items()))
    hint = ("set vocab: pad or vocab: align so the output takes the fine-tune's rows (a rule with "
            "alpha: 0 carries the target's)" if spec.vocab == "error" else
            f"donate a tokenizer that fits (files: {{{vocab_rows.TOKENIZER}: target}}, with its other "
            f"tokenizer files)")
    return [f"the output's {vocab_rows.TOKENIZER} (from {donor}, {checkpoints[donor].uri}) has token ids up "
            f"to {need - 1} but {name!r} has {have} rows: those tokens would index past the embeddings "
            f"at inference; {hint}"]
