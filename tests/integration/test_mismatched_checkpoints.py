"""Checkpoints that do not belong together are explained by `graft plan` before any data moves:
another model family with the very same shapes, another architecture that shares few tensors, a
fine-tune with a resized vocabulary, and tensors stored in dtypes that have no arithmetic. The other
models are real transformers checkpoints, written by transformers."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from graft.engine.errors import PlanError
from graft.engine.run.job import prepare_job
from graft.engine.plan.specfile import spec_from_mapping
from test_cli import graft, write_config


@pytest.fixture(scope="module")
def other_models(tiny_checkpoints, tmp_path_factory):  # noqa: ANN201
    """Mistral with the tiny Llama's exact dimensions (same tensor names and shapes: only config.json
    tells them apart), GPT-2 of the same width, and a Llama fine-tune with 8 added tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    root = tmp_path_factory.mktemp("other-models")
    llama = json.load(open(os.path.join(tiny_checkpoints["base"], "config.json")))
    dims = {k: llama[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")}
    torch.manual_seed(1)
    MistralForCausalLM(MistralConfig(**dims)).to(torch.bfloat16).save_pretrained(root / "mistral")
    GPT2LMHeadModel(GPT2Config(vocab_size=dims["vocab_size"], n_embd=dims["hidden_size"],
                               n_layer=dims["num_hidden_layers"], n_head=dims["num_attention_heads"],
                               n_positions=128)).save_pretrained(root / "gpt2")
    resized = LlamaForCausalLM.from_pretrained(tiny_checkpoints["base"])
    resized.resize_token_embeddings(dims["vocab_size"] + 8)
    resized.save_pretrained(root / "llama-more-tokens")
    return {name: str(root / name) for name in ("mistral", "gpt2", "llama-more-tokens")}


def plan_error(ckpts: dict[str, str], tmp_path, **extra) -> str:  # noqa: ANN001
    spec = spec_from_mapping({**ckpts, "output": str(tmp_path / "out"), **extra})
    with pytest.raises(PlanError) as e:
        prepare_job(spec)
    assert not (tmp_path / "out").exists()
    return str(e.value)


def test_a_finetune_of_another_family_with_identical_shapes_is_refused_by_plan(tiny_checkpoints, other_models,
                                                                                tmp_path):
    cfg = write_config(tmp_path, dict(tiny_checkpoints, finetuned=other_models["mistral"]))
    r = graft("plan", cfg)
    assert r.returncode == 3  # refused
    first = r.stderr.strip().splitlines()[0]
    assert "different model families" in first and "model_type" in first
    assert "finetuned 'mistral'" in first and "target 'llama'" in first and other_models["mistral"] in first
    assert "allow_family_mismatch: true" in first
    assert not (tmp_path / "out").exists()
    # Said on purpose, it is a warning and the plan goes ahead.
    ok = graft("plan", cfg, "--set", "allow_family_mismatch=true", "--json")
    assert ok.returncode == 0, ok.stderr
    assert any("different model families" in w for w in json.loads(ok.stdout)["warnings"])


def test_a_base_of_another_family_is_refused_too(tiny_checkpoints, other_models, tmp_path):
    msg = plan_error(dict(tiny_checkpoints, base=other_models["mistral"]), tmp_path)
    assert "different model families" in msg and "base 'mistral'" in msg


@pytest.mark.parametrize("on_missing", ["error", "carry_target"])
def test_another_architecture_is_named_as_such_not_as_hundreds_of_missing_tensors(
        tiny_checkpoints, other_models, tmp_path, on_missing):
    # GPT-2 shares no tensor name with Llama; carry_target must not turn that into a copy of the target.
    msg = plan_error(dict(tiny_checkpoints, finetuned=other_models["gpt2"]), tmp_path,
                     on_missing=on_missing, allow_family_mismatch=True)
    n = len(load_all_names(tiny_checkpoints["target"]))
    assert msg.startswith(f"finetuned ({other_models['gpt2']}) holds only 0 of the {n} tensors of the target")
    assert "not the target's architecture" in msg and "\n" not in msg


def test_a_finetune_with_a_resized_vocabulary_names_the_embeddings_and_the_way_out(tiny_checkpoints, other_models,
                                                                                   tmp_path):
    ckpts = dict(tiny_checkpoints, finetuned=other_models["llama-more-tokens"])
    msg = plan_error(ckpts, tmp_path)
    assert "model.embed_tokens.weight" in msg and "[520, 64] in finetuned" in msg
    assert "resized vocabulary" in msg and "vocab: pad" in msg and "vocab: align" in msg
    # Without a tokenizer that needs the new rows, carrying the target's embeddings and head works.
    job = prepare_job(spec_from_mapping({**ckpts, "output": str(tmp_path / "out"), "rules": [
        {"match": r"^(model\.embed_tokens|lm_head)\.", "alpha": 0.0}]}))
    assert job.plan.copied == 2 and job.plan.combined == len(load_all_names(ckpts["target"])) - 2


def load_all_names(directory: str) -> list[str]:
    return [n for f in sorted(os.listdir(directory)) if f.endswith(".safetensors")
            for n in load_file(os.path.join(directory, f))]


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64, torch.float8_e8m0fnu],
                         ids=["I32", "BOOL", "C64", "F8_E8M0"])
def test_a_tensor_stored_in_a_dtype_without_arithmetic_is_refused_naming_it(tiny_checkpoints, tmp_path, dtype):
    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoints["base"], base)
    path = str(base / "model.safetensors")
    sd = load_file(path)
    victim = "model.layers.0.mlp.up_proj.weight"
    sd[victim] = torch.zeros(sd[victim].shape).to(dtype)
    save_file(sd, path, metadata={"format": "pt"})
    msg = plan_error(dict(tiny_checkpoints, base=str(base)), tmp_path)
    if dtype in (torch.int32, torch.float8_e8m0fnu):
        # An integer weight matrix or E8M0 (MX scale) values are how quantized checkpoints store
        # weights: refused as a quantization, with the way out.
        assert victim in msg and f"base ({base}) is quantized with" in msg and "unquantized release" in msg
    else:
        assert victim in msg and f"in base ({base})" in msg and "cannot compute a float difference" in msg
