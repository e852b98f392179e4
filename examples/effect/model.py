"""The tokenizer, the tiny Llama and its training loop.

The tokenizer is a real one: a ``tokenizers`` WordLevel model wrapped in transformers'
``PreTrainedTokenizerFast``, saved with every checkpoint (``tokenizer.json``), which is what graft's
``vocab: align`` reads. Models are transformers' ``LlamaForCausalLM`` in float32, saved with
``save_pretrained`` (safetensors, ``config.json``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .corpus import ANSWER, BOS, EOS, QUESTION, UNK, Language, TaskItems, special_tokens, words

__all__ = ["Markers", "Size", "encode_task", "load", "make_model", "make_tokenizer", "pretrain", "save",
           "finetune"]


@dataclass(frozen=True)
class Size:
    """The model's shape."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 256


@dataclass(frozen=True)
class Markers:
    """The token ids a task item is framed with: ``<s> question q... answer a... </s>``."""

    bos: int
    eos: int
    question: int
    answer: int
    word0: int  # the id of w00; words are contiguous

    @classmethod
    def of(cls, tokenizer, question: str = QUESTION, answer: str = ANSWER) -> Markers:  # noqa: ANN001
        ids = tokenizer.convert_tokens_to_ids([BOS, EOS, question, answer, "w00"])
        return cls(*ids)


def make_tokenizer(word_count: int, added: tuple[str, ...] = ()):  # noqa: ANN201
    """The base vocabulary (specials, then the words); ``added`` special tokens on top, as a chat
    fine-tune adds its template tokens."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = special_tokens() + words(word_count)
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, bos_token=BOS, eos_token=EOS)
    if added:
        fast.add_special_tokens({"additional_special_tokens": list(added)})
    return fast


def make_model(vocab_size: int, size: Size, seed: int):  # noqa: ANN201
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=size.hidden, intermediate_size=size.intermediate,
                         num_hidden_layers=size.layers, num_attention_heads=size.heads,
                         num_key_value_heads=size.heads, max_position_embeddings=64, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=None)
    return LlamaForCausalLM(config)


def save(model, tokenizer, path: str) -> str:  # noqa: ANN001
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def load(path: str):  # noqa: ANN201
    """A checkpoint directory as (model, tokenizer), the way a user of the output would load it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def encode_task(items: TaskItems, markers: Markers) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole sequences ``<s> Q q.. A a.. </s>`` and their labels (-100 except on the answer and
    ``</s>``: the fine-tune learns to answer, not to predict random questions)."""
    n, length = items.questions.shape
    col = lambda v: torch.full((n, 1), v, dtype=torch.long)  # noqa: E731
    ids = torch.cat([col(markers.bos), col(markers.question), items.questions + markers.word0,
                     col(markers.answer), items.answers + markers.word0, col(markers.eos)], dim=1)
    labels = ids.clone()
    labels[:, : length + 3] = -100
    return ids, labels


def _schedule(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _train(model, batches, steps: int, lr: float) -> list[float]:  # noqa: ANN001
    """AdamW with warm-up and cosine decay; ``batches(step)`` gives (ids, labels). Returns the losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps, max(1, steps // 10)))
    model.train()
    losses = []
    for step in range(steps):
        ids, labels = batches(step)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def pretrain(model, languages: list[Language], steps: int, batch: int, length: int, lr: float, seed: int,  # noqa: ANN001
             word0: int) -> list[float]:
    """Next-token training on text drawn from ``languages`` (each batch split evenly among them)."""
    g = torch.Generator().manual_seed(seed)

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [lang.sample(batch // len(languages), length, g) for lang in languages]
        text = torch.cat(parts) + word0
        ids = torch.cat([torch.full((text.shape[0], 1), 1, dtype=torch.long), text], dim=1)  # 1: <s>
        return ids, ids

    return _train(model, batches, steps, lr)


def finetune(model, items: TaskItems, markers: Markers, steps: int, batch: int, lr: float, seed: int,  # noqa: ANN001
             rehearsal: list[Language] = (), text_length: int = 0) -> list[float]:
    """The fine-tuning recipe: shuffled mini-batches of the training items (loss on the answers),
    each with as many sequences of ``rehearsal`` text as task items when given (so the fine-tune
    keeps the language, as instruction tuning keeps a base model's text ability)."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = encode_task(items, markers)
    order = torch.randperm(len(items), generator=g)
    cursor = 0

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal order, cursor
        if cursor + batch > len(order):
            order, cursor = torch.randperm(len(items), generator=g), 0
        pick = order[cursor: cursor + batch]
        cursor += batch
        task_ids, task_labels = ids[pick], labels[pick]
        if not rehearsal:
            return task_ids, task_labels
        text = _text(torch.cat([lang.sample(batch // len(rehearsal), text_length, g) for lang in rehearsal]), markers)
        width = max(text.shape[1], task_ids.shape[1])
        return (torch.cat([_pad(task_ids, width, markers.eos), _pad(text, width, markers.eos)]),
                torch.cat([_pad(task_labels, width, -100), _pad(text, width, -100)]))

    return _train(model, batches, steps, lr)


def _text(word_ids: torch.Tensor, markers: Markers) -> torch.Tensor:
    return torch.cat([torch.full((word_ids.shape[0], 1), markers.bos, dtype=torch.long), word_ids + markers.word0], 1)


def _pad(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)
