"""Example checkpoints for ``make demo`` and the tests, written by the real Hugging Face writers.

The Hub is out of reach on build machines, so the demo makes three small Llama-shaped checkpoints
that look like the paper's setting (Llama 3.0 base -> 3.0 Instruct, then a 3.1 base):

- ``base``: a random Llama, bf16, one ``model.safetensors`` (transformers ``save_pretrained``).
- ``finetuned``: base + a small update, stored in **float32**, sharded by huggingface_hub's
  ``save_torch_state_dict``, with a tokenizer that has a chat template (the "Instruct" model).
- ``target``: base + a different update, bf16, sharded with other boundaries by transformers, with a
  longer context (``max_position_embeddings`` and ``rope_scaling`` changed, as in 3.0 -> 3.1).

Usage: ``python -m graft.cluster.demo DIR [--size demo|tiny]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

__all__ = ["ModelSize", "SIZES", "make_checkpoints"]


@dataclass(frozen=True)
class ModelSize:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    shard_ft: str
    shard_target: str


SIZES = {
    "demo": ModelSize(8192, 512, 1376, 4, 8, 4, shard_ft="30MB", shard_target="15MB"),
    "tiny": ModelSize(512, 64, 172, 2, 4, 2, shard_ft="150KB", shard_target="100KB"),
}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _tokenizer(vocab_size: int, chat: bool):  # noqa: ANN202 - transformers type
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"tok{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_checkpoints(root: str, size: str = "demo", seed: int = 0) -> dict[str, str]:
    """Write base, finetuned and target checkpoints under ``root``; returns role -> directory.

    Deterministic for a given ``size`` and ``seed``. Existing directories are left as they are.
    """
    import torch
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    s = SIZES[size]
    paths = {role: os.path.join(root, role) for role in ("base", "finetuned", "target")}
    if all(os.path.exists(os.path.join(p, "config.json")) for p in paths.values()):
        return paths
    common = dict(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                  num_hidden_layers=s.layers, num_attention_heads=s.heads,
                  num_key_value_heads=s.kv_heads, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2)
    gen = torch.Generator().manual_seed(seed)

    base_cfg = LlamaConfig(max_position_embeddings=8192, rope_theta=500000.0, **common)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(base_cfg).to(torch.bfloat16)
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}

    def updated(scale: float) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in base_sd.items():
            std = float(v.float().std()) if v.numel() > 1 else 1.0
            out[k] = v.float() + torch.randn(v.shape, generator=gen) * (scale * (std or 1.0))
        return out

    # base: transformers writer, one file.
    base.save_pretrained(paths["base"], max_shard_size="10GB")
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(paths["base"])
    _tokenizer(s.vocab, chat=False).save_pretrained(paths["base"])

    # finetuned ("Instruct"): huggingface_hub writer, float32, its own shard boundaries.
    ft_sd = {k: v.contiguous() for k, v in updated(0.05).items()}
    os.makedirs(paths["finetuned"], exist_ok=True)
    save_torch_state_dict(ft_sd, paths["finetuned"], max_shard_size=s.shard_ft)
    ft_cfg = LlamaConfig(max_position_embeddings=8192, rope_theta=500000.0, **common)
    ft_cfg.dtype = "float32"
    ft_cfg.architectures = ["LlamaForCausalLM"]
    ft_cfg.save_pretrained(paths["finetuned"])
    GenerationConfig(bos_token_id=1, eos_token_id=[2], temperature=0.6, top_p=0.9,
                     do_sample=True).save_pretrained(paths["finetuned"])
    _tokenizer(s.vocab, chat=True).save_pretrained(paths["finetuned"])

    # target (the new base version): transformers writer, bf16, other shard boundaries, long context.
    tgt_cfg = LlamaConfig(
        max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        **common,
    )
    target = LlamaForCausalLM(tgt_cfg).to(torch.bfloat16)
    target.load_state_dict({k: v.to(torch.bfloat16) for k, v in updated(0.05).items()})
    target.save_pretrained(paths["target"], max_shard_size=s.shard_target)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(paths["target"])
    _tokenizer(s.vocab, chat=False).save_pretrained(paths["target"])
    with open(os.path.join(root, "README.txt"), "w") as f:
        f.write("Example checkpoints generated by `python -m graft.cluster.demo`; random weights.\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m graft.cluster.demo", description=__doc__.split("\n")[0])
    p.add_argument("root", help="directory to write base/, finetuned/ and target/ into")
    p.add_argument("--size", choices=sorted(SIZES), default="demo")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    paths = make_checkpoints(a.root, a.size, a.seed)
    print(json.dumps(paths, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
