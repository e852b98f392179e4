"""Fine-tunes that added tokens: ``vocab: pad`` (the paper's semantics) and ``vocab: align`` (rows
matched by token), on real checkpoints and real tokenizers written offline by transformers and the
``tokenizers`` library; the output is loaded by transformers and runs the new token ids. Numbers are
checked against an independent float64 reference, bit-exact (compute_dtype float64)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from graft.engine.errors import PlanError
from graft.engine.run.job import prepare_job
from graft.engine.run.local import run_local
from graft.engine.plan.specfile import spec_from_mapping

WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(29)]  # 32 tokens
ADDED = ["<|im_start|>", "<|im_end|>", "<tool>"]


def _tokenizer(words: list[str], added: list[str] = ()):  # noqa: ANN202
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if added:
        fast.add_special_tokens({"additional_special_tokens": list(added)})
    return fast


def _model(vocab: int, seed: int, tied: bool):  # noqa: ANN202
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied,
                         max_position_embeddings=64)
    return LlamaForCausalLM(config).to(torch.bfloat16)


def _save(model, tokenizer, path) -> str:  # noqa: ANN001
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _nudge(model, seed: int) -> None:  # noqa: ANN001
    """A different version / a fine-tune: every weight moved a little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def trio(request, tmp_path_factory):  # noqa: ANN001, ANN201
    return _trio(tmp_path_factory.mktemp("vocab"), request.param)


@pytest.fixture(scope="module")
def tied_trio(tmp_path_factory):  # noqa: ANN001, ANN201
    return _trio(tmp_path_factory.mktemp("vocab-tied"), True)


def _trio(root, tied: bool) -> dict[str, str]:  # noqa: ANN001
    """base (32 tokens); target: a new version of it; finetuned: the base plus 3 added chat tokens,
    its embeddings (and head) resized to 35 rows, then trained a little."""
    base = _model(len(WORDS), 0, tied)
    paths = {"base": _save(base, _tokenizer(WORDS), root / "base")}
    target = _model(len(WORDS), 0, tied)
    _nudge(target, 1)
    paths["target"] = _save(target, _tokenizer(WORDS), root / "target")
    paths["finetuned"] = _chat_finetune(root, tied)
    return paths


def _chat_finetune(root, tied: bool) -> str:  # noqa: ANN001
    """The base with 3 chat tokens added (embeddings and head resized to 35 rows), trained a little."""
    tokenizer = _tokenizer(WORDS, ADDED)
    model = _model(len(WORDS), 0, tied)
    model.resize_token_embeddings(len(tokenizer))
    _nudge(model, 2)
    return _save(model, tokenizer, root / "finetuned")


def _tensors(path: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([x.double(), torch.zeros(rows - x.shape[0], *x.shape[1:], dtype=torch.float64)])


def _run(paths: dict[str, str], out, **extra):  # noqa: ANN001, ANN202
    spec = spec_from_mapping({**paths, "output": str(out), "compute_dtype": "float64", **extra})
    return run_local(prepare_job(spec))


def _loads_and_runs_the_new_tokens(out: str, rows: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == rows == model.config.vocab_size
    assert model.get_output_embeddings().weight.shape[0] == rows
    ids = tok("<|im_start|> w3 w4 <tool> <|im_end|>", return_tensors="pt").input_ids
    assert ids.max().item() >= len(WORDS)  # the added tokens are used
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], rows) and torch.isfinite(logits).all()


def test_vocab_error_names_the_tensors_the_rows_and_both_ways(trio, tmp_path):
    with pytest.raises(PlanError) as e:
        _run(trio, tmp_path / "out")
    first, problems = str(e.value), "\n".join(e.value.problems)
    assert "'model.embed_tokens.weight'" in problems and "[35, 16] in finetuned" in first
    assert "[32, 16] in target" in first and "vocab: pad" in first and "vocab: align" in first
    assert not (tmp_path / "out").exists()


def test_carrying_the_target_embeddings_under_the_finetunes_tokenizer_is_refused(trio, tmp_path):
    """The old advice (alpha: 0 on the embeddings) gives 32 rows to a tokenizer of 35 tokens: ids
    32..34 would index past the matrix. Refused before any data moves."""
    with pytest.raises(PlanError, match=r"tokenizer\.json \(from finetuned.*token ids up to 34 but "
                                        r"'(model\.embed_tokens|lm_head)\.weight' has 32 rows.*vocab: pad"):
        _run(trio, tmp_path / "out", rules=[{"match": r"^(model\.embed_tokens|lm_head)\.", "alpha": 0.0}])
    assert not (tmp_path / "out").exists()


def test_vocab_pad_is_the_papers_rule_bit_exact_and_the_output_runs_the_new_tokens(trio, tmp_path):
    out = tmp_path / "out"
    result = _run(trio, out, vocab="pad")
    t, f, b = (_tensors(trio[r]) for r in ("target", "finetuned", "base"))
    got = _tensors(str(out))
    assert got.keys() == f.keys()
    for name, ft in f.items():
        rows = ft.shape[0] if ft.dim() else 0
        tt, bb = (t[name], b[name]) if ft.dim() == 0 or t[name].shape == ft.shape else (
            _padded(t[name], rows), _padded(b[name], rows))
        want = (tt.double() + (ft.double() - bb.double())).to(t[name].dtype)
        assert torch.equal(got[name], want), name
    emb = got["model.embed_tokens.weight"]
    assert emb.shape[0] == 35
    assert torch.equal(emb[32:], f["model.embed_tokens.weight"][32:])  # new rows: alpha * f
    config = json.load(open(out / "config.json"))
    assert config["vocab_size"] == 35
    manifest = result.manifest
    assert "3 added from the fine-tune" in manifest["plan"]["vocab"]["model.embed_tokens.weight"]
    side = {e["name"]: e for e in manifest["inputs"]["target"]["files"]}
    assert side["config.json"]["patched"] == {"vocab_size": 35}  # the target's config said 32
    _loads_and_runs_the_new_tokens(str(out), 35)


def test_vocab_pad_refuses_a_target_with_more_rows_than_the_finetune(trio, tmp_path):
    swapped = dict(trio, target=trio["finetuned"], finetuned=trio["target"])
    with pytest.raises(PlanError, match=r"vocab: pad keeps the fine-tune's 32 rows.*use vocab: align"):
        _run(swapped, tmp_path / "out", vocab="pad", files={"tokenizer.json": "target"})


@pytest.fixture(scope="module")
def reordered(tmp_path_factory):  # noqa: ANN201
    """A target whose vocabulary was reordered (w0 <-> w1 swapped) and extended by two tokens
    relative to the base (Mistral v0.1 -> v0.3 style), its embedding rows moved with them; the
    fine-tune adds 3 chat tokens to the base."""
    root = tmp_path_factory.mktemp("vocab-reordered")
    base = _model(len(WORDS), 0, False)
    paths = {"base": _save(base, _tokenizer(WORDS), root / "base")}
    words = list(WORDS)
    i, j = words.index("w0"), words.index("w1")
    words[i], words[j] = words[j], words[i]
    words += ["<ctrl0>", "<ctrl1>"]
    target = _model(len(WORDS), 0, False)
    _nudge(target, 1)
    target.resize_token_embeddings(len(words))
    with torch.no_grad():
        for m in (target.get_input_embeddings(), target.get_output_embeddings()):
            m.weight[[i, j]] = m.weight[[j, i]].clone()
    paths["target"] = _save(target, _tokenizer(words), root / "target")
    paths["finetuned"] = _chat_finetune(root, False)
    return paths


def test_vocab_align_matches_rows_by_token_and_the_output_runs_the_new_tokens(reordered, tmp_path):
    out = tmp_path / "out"
    result = _run(reordered, out, vocab="align")
    vocab = {role: json.load(open(os.path.join(reordered[role], "tokenizer.json"))) for role in reordered}
    ids = {role: {**v["model"]["vocab"], **{a["content"]: a["id"] for a in v["added_tokens"]}}
           for role, v in vocab.items()}
    t, f, b = (_tensors(reordered[r]) for r in ("target", "finetuned", "base"))
    got = _tensors(str(out))
    by_id = {i: tok for tok, i in ids["finetuned"].items()}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert got[name].shape == f[name].shape == (35, 16)
        for row in range(35):
            token = by_id[row]

            def of(role: str, x: dict[str, torch.Tensor]) -> torch.Tensor:
                i = ids[role].get(token)
                return x[name][i].double() if i is not None and i < x[name].shape[0] else torch.zeros(16, dtype=torch.float64)

            want = (of("target", t) + (of("finetuned", f) - of("base", b))).to(torch.bfloat16)
            assert torch.equal(got[name][row], want), (name, row, token)
    report = result.manifest["plan"]["vocab"]["model.embed_tokens.weight"]
    assert "2 taken from other row numbers" in report and "3 added from the fine-tune" in report
    assert "2 token(s) only in the target left out" in report
    _loads_and_runs_the_new_tokens(str(out), 35)


def test_vocab_align_without_tokenizers_is_a_clear_refusal(reordered, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(reordered["base"], base)
    os.remove(base / "tokenizer.json")
    with pytest.raises(PlanError, match=r"vocab: align matches embedding rows by token, but base .* has no "
                                        r"tokenizer\.json.*use vocab: pad"):
        _run(dict(reordered, base=str(base)), tmp_path / "out", vocab="align")


def test_a_tied_finetune_and_base_transfer_onto_an_untied_target(tied_trio, tmp_path):
    """Tied checkpoints store no lm_head: their head is their embedding matrix, and stands in for it
    when the target has a head of its own."""
    trio = tied_trio
    untied_target = tmp_path / "target"
    model = _model(len(WORDS), 0, False)
    _nudge(model, 1)
    _save(model, _tokenizer(WORDS), untied_target)
    paths = dict(trio, target=str(untied_target))
    out = tmp_path / "out"
    _run(paths, out, vocab="pad")
    t, f, b = (_tensors(paths[r]) for r in ("target", "finetuned", "base"))
    assert "lm_head.weight" not in f and "lm_head.weight" not in b and "lm_head.weight" in t
    head = _tensors(str(out))["lm_head.weight"]
    want = (_padded(t["lm_head.weight"], 35) + (f["model.embed_tokens.weight"].double()
                                                 - _padded(b["model.embed_tokens.weight"], 35))).to(torch.bfloat16)
    assert torch.equal(head, want)
    _loads_and_runs_the_new_tokens(str(out), 35)


def test_an_untied_finetune_onto_a_tied_target_keeps_the_output_tied(tied_trio, tmp_path):
    trio = tied_trio
    untied = {}
    for role, seed in (("base", 0), ("finetuned", 2)):
        model = _model(len(WORDS), 0, False)
        if role == "finetuned":
            model.resize_token_embeddings(35)
        _nudge(model, seed)
        untied[role] = _save(model, _tokenizer(WORDS, ADDED if role == "finetuned" else ()), tmp_path / role)
    out = tmp_path / "out"
    result = _run(dict(trio, **untied), out, vocab="pad")
    assert "lm_head.weight" not in _tensors(str(out))
    assert any("finetuned's lm_head.weight is left out" in w for w in result.manifest["plan"]["warnings"])
    _loads_and_runs_the_new_tokens(str(out), 35)


def test_graft_plan_reports_the_row_mapping_and_the_config_change(tied_trio, tmp_path):
    import subprocess
    import sys

    import yaml

    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({**tied_trio, "output": str(tmp_path / "out"), "vocab": "pad"}))
    r = subprocess.run([sys.executable, "-m", "graft.cluster.cli", "plan", str(cfg)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "model.embed_tokens.weight: 35 rows, 32 matched by position, 3 added from the fine-tune" in r.stdout
    assert "config.json: vocab_size set to 35" in r.stdout
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def grown_target(tmp_path_factory):  # noqa: ANN201
    """A target that already grew the fine-tune's 3 chat tokens (embeddings and head at 35 rows,
    trained on its own); the base has 32 rows."""
    root = tmp_path_factory.mktemp("vocab-grown")
    paths = {"base": _save(_model(len(WORDS), 0, False), _tokenizer(WORDS), root / "base")}
    target = _model(len(WORDS), 0, False)
    target.resize_token_embeddings(len(WORDS) + len(ADDED))
    _nudge(target, 1)
    paths["target"] = _save(target, _tokenizer(WORDS, ADDED), root / "target")
    paths["finetuned"] = _chat_finetune(root, False)
    return paths


@pytest.mark.parametrize("vocab", ["pad", "align"])
def test_rows_the_base_lacks_and_the_target_has_are_the_targets_unchanged(grown_target, tmp_path, vocab):
    """Those rows have no difference to transfer: t + alpha * f would add the fine-tune's embedding
    of the token to the target's own (two independent embeddings). Bit-exact against float64."""
    out = tmp_path / "out"
    result = _run(grown_target, out, vocab=vocab, alpha=0.75)
    t, f, b = (_tensors(grown_target[r]) for r in ("target", "finetuned", "base"))
    got = _tensors(str(out))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert got[name].shape == t[name].shape == f[name].shape == (35, 16)
        want = (t[name][:32].double() + 0.75 * (f[name][:32].double() - b[name].double())).to(torch.bfloat16)
        assert torch.equal(got[name][:32], want), name
        assert torch.equal(got[name][32:], t[name][32:]), name  # the target's rows, bit for bit
        report = result.manifest["plan"]["vocab"][name]
        assert ("3 the target's unchanged (the base lacks them: no difference to transfer)" in report
                and "0 added from the fine-tune" in report), report
    _loads_and_runs_the_new_tokens(str(out), 35)


def _untied(root, roles: tuple[str, ...] = ("base", "finetuned")) -> dict[str, str]:  # noqa: ANN001
    """Untied (an lm_head of their own) base and chat fine-tune (35 rows)."""
    out = {}
    for role, seed in (("base", 0), ("finetuned", 2)):
        if role not in roles:
            continue
        model = _model(len(WORDS), 0, False)
        if role == "finetuned":
            model.resize_token_embeddings(35)
        _nudge(model, seed)
        out[role] = _save(model, _tokenizer(WORDS, ADDED if role == "finetuned" else ()), root / role)
    return out


def _loads_with_every_weight(out: str):  # noqa: ANN202
    """The output as transformers loads it: no weight missing (none initialised at random)."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    return model


def test_an_untied_finetunes_config_json_is_made_to_describe_a_tied_output(tied_trio, tmp_path):
    """Target and base tie their head; the fine-tune is untied and donates config.json: the output
    stores no head, so its config must say tied, or transformers initialises the head at random."""
    out = tmp_path / "out"
    result = _run(dict(tied_trio, **_untied(tmp_path)), out, vocab="pad", files={"config.json": "finetuned"})
    assert "lm_head.weight" not in _tensors(str(out))
    config = json.load(open(out / "config.json"))
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 35
    side = {e["name"]: e for e in result.manifest["inputs"]["finetuned"]["files"]}
    assert side["config.json"]["patched"] == {"tie_word_embeddings": True}
    warnings = result.manifest["plan"]["warnings"]
    assert any("the output takes finetuned's config.json, its vocab_size, tie_word_embeddings" in w
               for w in warnings), warnings
    assert not any("the output takes the target's config.json" in w for w in warnings)
    model = _loads_with_every_weight(str(out))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    _loads_and_runs_the_new_tokens(str(out), 35)


def test_a_tied_finetunes_config_json_is_made_to_describe_an_untied_output(tied_trio, tmp_path):
    """The reverse: the output has the untied target's head, which a config saying "tied" would
    replace by the embeddings at load time."""
    paths = dict(tied_trio, target=_untied(tmp_path, ("base",))["base"])
    out = tmp_path / "out"
    _run(paths, out, vocab="pad", files={"config.json": "finetuned"})
    assert json.load(open(out / "config.json"))["tie_word_embeddings"] is False
    head = _tensors(str(out))["lm_head.weight"]
    model = _loads_with_every_weight(str(out))
    assert torch.equal(model.lm_head.weight.detach(), head)
    assert not torch.equal(head, model.model.embed_tokens.weight.detach())


def test_a_text_config_vocab_size_is_patched_and_compared_like_a_top_level_one(tied_trio, tmp_path):
    """Gemma 3 / LLaVA-style config.json: the language model's vocab_size and tie_word_embeddings
    live in text_config."""
    import shutil

    paths = {}
    for role, path in tied_trio.items():
        paths[role] = shutil.copytree(path, tmp_path / role)
        config = json.load(open(paths[role] / "config.json"))
        text = {k: config.pop(k) for k in ("vocab_size", "tie_word_embeddings")}
        json.dump({**config, "text_config": text}, open(paths[role] / "config.json", "w"))
    out = tmp_path / "out"
    result = _run({r: str(p) for r, p in paths.items()}, out, vocab="pad")
    config = json.load(open(out / "config.json"))
    assert config["text_config"] == {"vocab_size": 35, "tie_word_embeddings": True}
    assert "vocab_size" not in config and "tie_word_embeddings" not in config
    side = {e["name"]: e for e in result.manifest["inputs"]["target"]["files"]}
    assert side["config.json"]["patched"] == {"text_config.vocab_size": 35}
    assert any("text_config.vocab_size: target 32 vs finetuned 35" in w for w in result.manifest["plan"]["warnings"])


@pytest.fixture(scope="module")
def phi_trio(tmp_path_factory):  # noqa: ANN201
    """Phi-style checkpoints: an LM head with a bias (one entry per token); the fine-tune added the
    3 chat tokens (head weight and bias resized to 35 rows by transformers)."""
    from transformers import PhiConfig, PhiForCausalLM

    root = tmp_path_factory.mktemp("vocab-phi")
    paths = {}
    for role, seed in (("base", None), ("target", 1), ("finetuned", 2)):
        torch.manual_seed(0)
        model = PhiForCausalLM(PhiConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64,
                                         tie_word_embeddings=False)).to(torch.bfloat16)
        if role == "finetuned":
            model.resize_token_embeddings(len(WORDS) + len(ADDED))
        if seed is not None:
            _nudge(model, seed)
        paths[role] = _save(model, _tokenizer(WORDS, ADDED if role == "finetuned" else ()), root / role)
    return paths


@pytest.mark.parametrize("vocab", ["pad", "align"])
def test_a_head_bias_is_resized_with_its_head_bit_exact(phi_trio, tmp_path, vocab):
    out = tmp_path / "out"
    result = _run(phi_trio, out, vocab=vocab)  # the same tokens in the same rows: the same bytes
    t, f, b = (_tensors(phi_trio[r]) for r in ("target", "finetuned", "base"))
    got = _tensors(str(out))
    for name in ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"):
        assert got[name].shape[0] == 35, name
        want = (_padded(t[name], 35) + (f[name].double() - _padded(b[name], 35))).to(torch.bfloat16)
        assert torch.equal(got[name], want), name
    assert "lm_head.bias" in result.manifest["plan"]["vocab"]
    assert json.load(open(out / "config.json"))["vocab_size"] == 35
    _loads_with_every_weight(str(out))
    _loads_and_runs_the_new_tokens(str(out), 35)


def test_vocabulary_tensors_that_would_disagree_on_their_rows_are_refused(phi_trio, tmp_path):
    """The old hint (alpha: 0 on the bias) gave a 35-row head with a 32-entry bias: refused now,
    before any data moves."""
    with pytest.raises(PlanError, match=r"vocabulary tensors would have different row counts") as e:
        _run(phi_trio, tmp_path / "out", vocab="pad", rules=[{"match": r"^lm_head\.bias$", "alpha": 0.0}])
    assert "'lm_head.bias' 32" in str(e.value) and "'lm_head.weight' 35" in str(e.value)
    assert not (tmp_path / "out").exists()
