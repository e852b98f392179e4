"""The two measures: exact-match accuracy on held-out task items (greedy decoding), and held-out
loss on each pretraining language."""
from __future__ import annotations

import torch

from .corpus import Language, TaskItems
from .model import Markers, encode_task

__all__ = ["accuracy", "language_loss", "language_text"]


@torch.no_grad()
def accuracy(model, items: TaskItems, markers: Markers, batch: int = 256) -> float:  # noqa: ANN001
    """The fraction of held-out items whose greedy answer is exactly right, ``</s>`` included."""
    ids, _ = encode_task(items, markers)
    prompt_len = items.questions.shape[1] + 3
    right = 0
    for start in range(0, len(items), batch):
        seq = ids[start: start + batch, :prompt_len]
        expected = ids[start: start + batch, prompt_len:]
        for _ in range(expected.shape[1]):
            nxt = model(input_ids=seq).logits[:, -1].argmax(dim=-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        right += int((seq[:, prompt_len:] == expected).all(dim=1).sum())
    return right / len(items)


def language_text(language: Language, n: int, length: int, seed: int, word0: int, bos: int) -> torch.Tensor:
    """Held-out text of one language as token ids (its own seed, apart from every training draw)."""
    text = language.sample(n, length, torch.Generator().manual_seed(seed)) + word0
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), text], dim=1)


@torch.no_grad()
def language_loss(model, ids: torch.Tensor, batch: int = 256) -> float:  # noqa: ANN001
    """Mean next-token loss (nats per token) on held-out text; exp() of it is the perplexity."""
    total, count = 0.0, 0
    for start in range(0, ids.shape[0], batch):
        chunk = ids[start: start + batch]
        logits = model(input_ids=chunk).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                                 reduction="sum")
        total += float(loss)
        count += chunk[:, 1:].numel()
    return total / count
