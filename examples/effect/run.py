"""The paper's protocol at toy scale, end to end: ``python -m examples.effect.run --out DIR``.

1. Pretrain v1 on language A with a little of language B; fine-tune it on the task (v1-ft), and a
   second time with two added special tokens as the task's markers (v1-ft+tokens).
2. Continue pretraining v1 into v2 on more of B; pretrain v2' the same length from another
   initialisation (same architecture, same data).
3. Transfer with graft (``graft.run`` on a dict spec, local executor): v2 + α(v1-ft − v1) for each α,
   v2' + (v1-ft − v1), and v2 + (v1-ft+tokens − v1) with ``vocab: pad`` and with ``vocab: align``.
4. Load every model back from its safetensors checkpoint with transformers and measure the task
   (exact match on held-out items, greedy) and each language (held-out loss); v2 fine-tuned with
   the same recipe is the ceiling.
5. Write ``results.json``, ``results.md`` (``render.page``) and ``accuracy.png`` into ``--out``.

Checkpoints go to ``--work`` (a temporary folder removed at the end when not given).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from . import render
from .corpus import ADDED_TOKENS, Language, Task
from .evaluate import accuracy, language_loss, language_text
from .model import Markers, Size, finetune, load, make_model, make_tokenizer, pretrain, save

__all__ = ["ALPHAS", "SCALES", "Scale", "experiment", "main"]

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)
# One thread: fixed, so that the same seed gives the same numbers on a machine with more cores, and
# because these small matrices gain little from a second thread and lose ten times over when another
# process holds a core (OpenMP's threads wait on each other).
THREADS = 1


@dataclass(frozen=True)
class Scale:
    """Sizes and step counts: ``full`` is ``make effect``, ``small`` the slow test."""

    words: int  # the vocabulary's words; the first 5/8 are language A's, the rest B's
    size: Size
    v1_steps: int  # pretraining v1
    v2_steps: int  # continuing v1 into v2 (v2' gets v1_steps + v2_steps from scratch)
    finetune_steps: int
    batch: int
    text_length: int  # words per pretraining sequence
    question_length: int  # words per task question
    train_items: int
    held_out: int
    text_held_out: int  # held-out sequences per language


SCALES = {
    "full": Scale(words=64, size=Size(hidden=64, layers=2, heads=4, intermediate=256), v1_steps=600,
                  v2_steps=400, finetune_steps=400, batch=32, text_length=24, question_length=3,
                  train_items=2000, held_out=500, text_held_out=500),
    "small": Scale(words=64, size=Size(hidden=64, layers=2, heads=4, intermediate=256), v1_steps=400,
                   v2_steps=300, finetune_steps=300, batch=32, text_length=24, question_length=3,
                   train_items=2000, held_out=200, text_held_out=200),
}
# The learning rates: pretraining, continuing (lower, as a continued pretraining is), fine-tuning.
LR_PRETRAIN, LR_CONTINUE, LR_FINETUNE = 3e-3, 1e-3, 2e-3


def experiment(out: str, scale: str = "full", seed: int = 0, work: str | None = None,
               log=print) -> dict:  # noqa: ANN001
    """Runs the protocol and writes ``results.json``, ``results.md`` and ``accuracy.png`` to ``out``;
    returns the results (what results.json holds). Checkpoints are left in ``work`` when given."""
    import graft

    started = time.perf_counter()
    torch.set_num_threads(THREADS)
    sc = SCALES[scale]
    own_work = work is None
    work = tempfile.mkdtemp(prefix="graft-effect-") if own_work else work
    os.makedirs(work, exist_ok=True)
    os.makedirs(out, exist_ok=True)
    try:
        # The data. Seeds are offsets of --seed, one per draw, so that no two draws share a stream.
        tokenizer = make_tokenizer(sc.words)
        markers = Markers.of(tokenizer)
        split = sc.words * 5 // 8
        lang_a = Language.random(sc.words, range(split), fanout=4, top=0.6, seed=seed + 100)
        lang_b = Language.random(sc.words, range(split, sc.words), fanout=4, top=0.6, seed=seed + 200)
        train_items, held_out = Task(lang_a, sc.question_length).split(sc.train_items, sc.held_out, 0, seed + 300)
        text_a = language_text(lang_a, sc.text_held_out, sc.text_length, seed + 400, markers.word0, markers.bos)
        text_b = language_text(lang_b, sc.text_held_out, sc.text_length, seed + 500, markers.word0, markers.bos)

        # v1 sees B in one sequence of 16; the continued pretraining (v2) in one of 2.
        v1_mix, v2_mix = [lang_a] * 15 + [lang_b], [lang_a, lang_b]

        def ft_recipe(model, mix: list[Language], tok_markers: Markers, ft_seed: int) -> None:  # noqa: ANN001
            # The task items, each batch with as much text of the model's own pretraining mix.
            finetune(model, train_items, tok_markers, sc.finetune_steps, sc.batch, LR_FINETUNE, ft_seed,
                     rehearsal=mix, text_length=sc.text_length)

        ckpt = lambda name: os.path.join(work, name)  # noqa: E731
        t = time.perf_counter()
        v1 = make_model(len(tokenizer), sc.size, seed + 1)
        pretrain(v1, v1_mix, sc.v1_steps, sc.batch, sc.text_length, LR_PRETRAIN, seed + 11, markers.word0)
        save(v1, tokenizer, ckpt("v1"))
        log(f"v1 pretrained ({time.perf_counter() - t:.0f} s)")

        t = time.perf_counter()
        v2 = copy.deepcopy(v1)
        pretrain(v2, v2_mix, sc.v2_steps, sc.batch, sc.text_length, LR_CONTINUE, seed + 12, markers.word0)
        save(v2, tokenizer, ckpt("v2"))
        log(f"v2 continued from v1 ({time.perf_counter() - t:.0f} s)")

        t = time.perf_counter()
        v2x = make_model(len(tokenizer), sc.size, seed + 2)
        # The same data as v1 then v2, in one run from its own initialisation.
        pretrain(v2x, v2_mix, sc.v1_steps + sc.v2_steps, sc.batch, sc.text_length, LR_PRETRAIN, seed + 13,
                 markers.word0)
        save(v2x, tokenizer, ckpt("v2x"))
        log(f"v2' pretrained from another initialisation ({time.perf_counter() - t:.0f} s)")

        t = time.perf_counter()
        ft = copy.deepcopy(v1)
        ft_recipe(ft, v1_mix, markers, seed + 14)
        save(ft, tokenizer, ckpt("v1-ft"))
        ceiling = copy.deepcopy(v2)
        ft_recipe(ceiling, v2_mix, markers, seed + 14)
        save(ceiling, tokenizer, ckpt("v2-ft"))
        # The chat-template case: the fine-tune adds its markers to the vocabulary.
        tok_plus = make_tokenizer(sc.words, ADDED_TOKENS)
        ft_tok = copy.deepcopy(v1)
        ft_tok.resize_token_embeddings(len(tok_plus), mean_resizing=False)
        ft_recipe(ft_tok, v1_mix, Markers.of(tok_plus, *ADDED_TOKENS), seed + 15)
        save(ft_tok, tok_plus, ckpt("v1-ft-tokens"))
        log(f"three fine-tunes ({time.perf_counter() - t:.0f} s)")
        del v1, v2, v2x, ft, ceiling, ft_tok

        # The transfers, with graft.
        transfers: list[tuple[str, str, dict]] = []
        for alpha in ALPHAS:
            transfers.append((f"v2 + {alpha:g}·Δ", f"transfer α = {alpha:g}",
                              {"target": ckpt("v2"), "finetuned": ckpt("v1-ft"), "alpha": alpha}))
        transfers.append(("v2' + Δ", "transfer onto the unrelated model, α = 1",
                          {"target": ckpt("v2x"), "finetuned": ckpt("v1-ft"), "alpha": 1.0}))
        for mode in ("pad", "align"):
            transfers.append((f"v2 + Δ+tokens ({mode})", f"the added-tokens fine-tune, `vocab: {mode}`",
                              {"target": ckpt("v2"), "finetuned": ckpt("v1-ft-tokens"), "alpha": 1.0,
                               "vocab": mode}))
        graft_seconds = 0.0
        outputs: dict[str, str] = {}
        for i, (name, _, spec) in enumerate(transfers):
            output = ckpt(f"transfer-{i}")
            shutil.rmtree(output, ignore_errors=True)
            t = time.perf_counter()
            graft.run({**spec, "base": ckpt("v1"), "output": output}, executor="local")
            graft_seconds += time.perf_counter() - t
            outputs[name] = output
        log(f"{len(transfers)} transfers with graft ({graft_seconds:.1f} s)")

        # Every model measured from its checkpoint on disk, as a user would load it.
        def measure(name: str, what: str, path: str, alpha: float | None = None) -> dict:
            model, tok = load(path)
            added = all(t in tok.get_vocab() for t in ADDED_TOKENS)
            task_markers = Markers.of(tok, *ADDED_TOKENS) if added else Markers.of(tok)
            la, lb = language_loss(model, text_a), language_loss(model, text_b)
            return {"name": name, "what": what, "alpha": alpha, "accuracy": accuracy(model, held_out, task_markers),
                    "loss_a": la, "loss_b": lb, "ppl_a": math.exp(la), "ppl_b": math.exp(lb),
                    "vocab_size": model.config.vocab_size, "added_tokens": added}

        t = time.perf_counter()
        rows = [
            measure("v1", "the old base", ckpt("v1")),
            measure("v1-ft", "the old base fine-tuned on the task", ckpt("v1-ft")),
            measure("v2", "the new base (v1 continued on more of B)", ckpt("v2")),
        ]
        rows += [measure(name, what, outputs[name], spec["alpha"]) for name, what, spec in transfers[:len(ALPHAS)]]
        rows += [
            measure("v2-ft", "the ceiling: v2 fine-tuned with the same recipe", ckpt("v2-ft")),
            measure("v2'", "an unrelated model: another initialisation, the same data", ckpt("v2x")),
        ]
        rows += [measure(name, what, outputs[name], 1.0) for name, what, _ in transfers[len(ALPHAS):len(ALPHAS) + 1]]
        rows += [measure("v1-ft+tokens", "v1 fine-tuned with 2 added special tokens", ckpt("v1-ft-tokens"))]
        rows += [measure(name, what, outputs[name], 1.0) for name, what, _ in transfers[len(ALPHAS) + 1:]]
        log(f"{len(rows)} models evaluated ({time.perf_counter() - t:.0f} s)")

        n_a, n_b = split, sc.words - split
        floor = lambda lang, n: (math.log(n) + (sc.text_length - 1) * lang.entropy()) / sc.text_length  # noqa: E731
        results = {
            "date": datetime.date.today().isoformat(),
            "machine": _machine(),
            "threads": THREADS,
            "seed": seed,
            "scale": scale,
            "config": asdict(sc),
            "learning_rates": {"pretrain": LR_PRETRAIN, "continue": LR_CONTINUE, "finetune": LR_FINETUNE},
            "alphas": list(ALPHAS),
            "held_out": sc.held_out,
            "text_held_out": sc.text_held_out,
            "chance": (1 / n_a) ** sc.question_length,
            "entropy": {"a": floor(lang_a, n_a), "b": floor(lang_b, n_b)},
            "transfers": len(transfers),
            "graft_version": graft.__version__,
            "graft_seconds": graft_seconds,
            "rows": rows,
        }
        results["seconds"] = time.perf_counter() - started
        write(results, out)
        return results
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def write(results: dict, out: str) -> None:
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(render.page(results))
    plot(results, os.path.join(out, "accuracy.png"))


def plot(results: dict, path: str) -> None:
    """Held-out accuracy of v2 + αΔ against α, with the ceiling and the unrelated model's transfer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {r["name"]: r for r in results["rows"]}
    sweep = [r for r in results["rows"] if r["name"].startswith("v2 + ") and "tokens" not in r["name"]]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot([r["alpha"] for r in sweep], [100 * r["accuracy"] for r in sweep], "o-", label="v2 + α·(v1-ft − v1)")
    ax.axhline(100 * rows["v2-ft"]["accuracy"], ls="--", color="gray", label="ceiling: v2 fine-tuned")
    ax.plot([1.0], [100 * rows["v2' + Δ"]["accuracy"]], "x", color="red", ms=9, mew=2,
            label="v2' + Δ (unrelated initialisation)")
    ax.set_xlabel("α")
    ax.set_ylabel("held-out exact match (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(f"Fine-tuning transfer at toy scale (seed {results['seed']}, {results['scale']})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.effect.run", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="effect-results", help="where results.json, results.md and accuracy.png go")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="keep the checkpoints here (default: a temporary folder)")
    args = parser.parse_args(argv)
    results = experiment(args.out, args.scale, args.seed, args.work, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(render.page(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
