"""The synthetic data: two Markov languages over one word list, and a task with exact answers.

Pretraining text is drawn from first-order Markov chains over the words ``w00 .. wNN``: each word
has a few successors with fixed probabilities (``Language``). Language A uses the first 5/8 of the
words, language B the rest. v1 learns mostly A (one sequence in 16 is B); v2 continues on half B
(the "more, shifted data" of a new base version), so v2 is better on B than v1.

The task asks for what pretraining taught, in a new format: ``Q a b c A`` must be answered with
each word's most likely successor in language A. Training and held-out items are disjoint
questions, so exact-match accuracy on the held-out items measures the skill, not recall of the
fine-tune's items. Nothing in pretraining contains ``Q`` or ``A``: a pretrained model scores zero.

Every draw takes an explicit ``torch.Generator``: the same seed gives the same data.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ADDED_TOKENS", "Language", "Task", "TaskItems", "special_tokens", "words"]

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
# The task's markers in the base vocabulary (never seen in pretraining) ...
QUESTION, ANSWER = "Q", "A"
# ... and the ones a second fine-tune adds to the vocabulary (the chat-template case).
ADDED_TOKENS = ("<|question|>", "<|answer|>")


def special_tokens() -> list[str]:
    return [UNK, BOS, EOS, QUESTION, ANSWER]


def words(count: int) -> list[str]:
    return [f"w{i:02d}" for i in range(count)]


@dataclass(frozen=True)
class Language:
    """A first-order Markov chain over some of the words: ``successors[i]`` are the word ids that
    may follow word ``i``, ``probs[i]`` their probabilities (all zero for a word outside its domain).
    The first successor of each word is its most likely one by a wide margin: the task asks for it."""

    domain: torch.Tensor  # (n,) int64, the word ids the language uses
    successors: torch.Tensor  # (count, fanout) int64
    probs: torch.Tensor  # (count, fanout) float

    @classmethod
    def random(cls, count: int, domain: range, fanout: int, top: float, seed: int) -> Language:
        g = torch.Generator().manual_seed(seed)
        ids = torch.tensor(list(domain))
        successors = torch.zeros(count, fanout, dtype=torch.long)
        probs = torch.zeros(count, fanout)
        for w in ids.tolist():
            successors[w] = ids[torch.randperm(len(ids), generator=g)[:fanout]]
            rest = torch.rand(fanout - 1, generator=g) + 0.2
            probs[w, 0] = top
            probs[w, 1:] = (1 - top) * rest / rest.sum()
        return cls(ids, successors, probs)

    def sample(self, n: int, length: int, g: torch.Generator) -> torch.Tensor:
        """``n`` word-id sequences of ``length`` (ids into the word list, not the tokenizer)."""
        out = torch.empty(n, length, dtype=torch.long)
        out[:, 0] = self.domain[torch.randint(len(self.domain), (n,), generator=g)]
        for t in range(1, length):
            pick = torch.multinomial(self.probs[out[:, t - 1]], 1, generator=g).squeeze(1)
            out[:, t] = self.successors[out[:, t - 1], pick]
        return out

    def likeliest(self) -> torch.Tensor:
        """Each word's most likely successor (the task's answer key)."""
        return self.successors[:, 0]

    def entropy(self) -> float:
        """The chain's mean entropy rate in nats per token: a floor for any model's loss on it."""
        p = self.probs[self.domain]
        return float(-(p * p.clamp_min(1e-12).log()).sum(dim=1).mean())


@dataclass(frozen=True)
class TaskItems:
    """Questions and answers as word ids: ``questions`` (n, length), ``answers`` (n, length)."""

    questions: torch.Tensor
    answers: torch.Tensor

    def __len__(self) -> int:
        return self.questions.shape[0]


@dataclass(frozen=True)
class Task:
    """The task: for each of ``length`` question words, its most likely successor in ``language``.
    The words are split in two: training items use only the first part, held-out items only the
    second, so a held-out answer cannot be memorised from the fine-tune, only read from what the
    model learned in pretraining."""

    language: Language
    length: int

    def split(self, train: int, held_out: int, held_out_words: int, seed: int) -> tuple[TaskItems, TaskItems]:
        g = torch.Generator().manual_seed(seed)
        key = self.language.likeliest()
        domain = self.language.domain
        if held_out_words:
            words_ = domain[torch.randperm(len(domain), generator=g)]
            test_words, train_words = words_[:held_out_words], words_[held_out_words:]
            out = []
            for pool, n in ((train_words, train), (test_words, held_out)):
                q = pool[torch.randint(len(pool), (n, self.length), generator=g)]
                out.append(TaskItems(q, key[q]))
            return out[0], out[1]
        seen: set[tuple[int, ...]] = set()
        rows: list[torch.Tensor] = []
        while len(rows) < train + held_out:
            q = domain[torch.randint(len(domain), (self.length,), generator=g)]
            if tuple(q.tolist()) not in seen:
                seen.add(tuple(q.tolist()))
                rows.append(q)
        q = torch.stack(rows)
        return TaskItems(q[:train], key[q[:train]]), TaskItems(q[train:], key[q[train:]])
