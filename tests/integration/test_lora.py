"""PEFT LoRA adapters as diffs: adapters written by the real ``peft`` library, transferred onto a
new base (a target that is not the base they were trained on).

Checked against two independent references: the rule in float64 numpy (each element
``t + alpha * s * sum_k u_k v_k``, products added in k order; graft's ``compute_dtype: float64`` is
bit-identical to it), and PEFT's own ``merge_and_unload`` on the same target (float64: within the
output's rounding; float32: within the float32 contract). Unsupported adapter types and variants
are refused by name before anything is written.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from conftest import load_all, ulp

import graft
from graft.engine.errors import CheckpointError, PlanError

peft = pytest.importorskip("peft")


def _llama(path: str, seed: int, dtype: torch.dtype = torch.float32) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=96,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(path)
    return path


def _gpt2(path: str, seed: int) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=96, n_positions=64)).save_pretrained(path)
    return path


def make_adapter(base: str, path: str, config, seed: int) -> str:  # noqa: ANN001
    """An adapter of ``base`` written by PEFT, every adapter weight random (a LoRA's B starts at 0)."""
    from transformers import AutoModelForCausalLM

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and any(k in name for k in ("lora_", "hada_", "lokr_", "ia3_", "vera_lambda")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "ia3_" in name else 0.0))
            elif p.requires_grad and "modules_to_save" in name:  # a trained copy of the base's weight
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """v1 (the base the adapters were trained on), v2 (the new base: another initialisation), v2 in
    bf16, and GPT-2's pair; adapters of every kind the tests need."""
    from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, VeraConfig

    root = tmp_path_factory.mktemp("lora")
    d = {"v1": _llama(str(root / "v1"), 0), "v2": _llama(str(root / "v2"), 1),
         "v2-bf16": _llama(str(root / "v2-bf16"), 1, torch.bfloat16),
         "g1": _gpt2(str(root / "g1"), 2), "g2": _gpt2(str(root / "g2"), 3)}
    llama = {
        "basic": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "rslora": LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear"),
        # A suffix key, a dotted one and a regular expression; q_proj's alpha from its own key.
        "patterns": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                               rank_pattern={"q_proj": 2, "layers.1.self_attn.v_proj": 6,
                                             r"layers\.[0-9]\.self_attn\.k_proj": 3},
                               alpha_pattern={"v_proj": 32, "model.layers.0.self_attn.q_proj": 4}),
        "embed": LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "lm_head"]),
        "second": LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "down_proj"]),
        "save": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "dora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True),
        "loha": LoHaConfig(r=4, alpha=8, target_modules=["q_proj"], init_weights=False),
        "lokr": LoKrConfig(r=4, alpha=8, target_modules=["q_proj"], init_weights=False),
        "ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "vera": VeraConfig(r=8, target_modules=["q_proj", "v_proj"]),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (name, config) in enumerate(llama.items()):
            d[name] = make_adapter(d["v1"], str(root / name), config, seed=10 + i)
        d["fifo"] = make_adapter(d["g1"], str(root / "fifo"), LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True), seed=30)
        d["bias_all"] = make_adapter(d["g1"], str(root / "bias_all"), LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, bias="all"), seed=32)
        d["lora_bias"] = make_adapter(d["g1"], str(root / "lora_bias"), LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_bias=True), seed=31)
    return d


def _factors(adapter: str) -> dict[str, tuple[np.ndarray, np.ndarray, float, bool]]:
    """The adapter's changes as the tests read them, independently of graft: weight -> (U, V, s,
    transposed) with the change s * U @ V, from PEFT's documented layout and scaling."""
    import re

    from safetensors.numpy import load_file

    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    out = {}
    for name, a in tensors.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A\.weight|lora_embedding_A)", name)
        if not m:
            continue
        module, embedding = m.group(1), m.group(2) == "lora_embedding_A"
        b = tensors[name.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")]
        alpha = next((v for k, v in cfg["alpha_pattern"].items() if re.fullmatch(rf"(?:.*\.)?(?:{k})", module)),
                     cfg["lora_alpha"])
        r = a.shape[0]
        s = alpha / np.sqrt(r) if cfg["use_rslora"] else alpha / r
        transposed = embedding or cfg["fan_in_fan_out"]
        a, b = a.astype(np.float64), b.astype(np.float64)
        out[f"{module}.weight"] = ((a.T, b.T) if transposed else (b, a)) + (s, transposed)
    return out


def change(u: np.ndarray, v: np.ndarray, s: float, *_: object) -> np.ndarray:
    """float64: s * sum_k u_k v_k, the products added in k order, then scaled."""
    d = u[:, 0:1] * v[0:1, :]
    for k in range(1, u.shape[1]):
        d = d + u[:, k:k + 1] * v[k:k + 1, :]
    return d * s


def _old_base_copies(adapter: str) -> set[str]:
    """The weights PEFT saved an unchanged copy of beside their factors (``<module>.base_layer.weight``)."""
    from safetensors import safe_open

    with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "np") as f:
        return {k.removeprefix("base_model.model.").replace(".base_layer.weight", ".weight")
                for k in f.keys() if k.endswith(".base_layer.weight")}


def rule(t: torch.Tensor, changes: list[tuple[np.ndarray, np.ndarray, float, bool]], alphas: list[float],
         before: np.ndarray | None = None) -> torch.Tensor:
    """float64: t + (sum_i alpha_i * change_i), the changes added left to right (after ``before``,
    an earlier diff's alpha * (f - b)), then the target."""
    total = before
    for c, alpha in zip(changes, alphas):
        d = change(*c)
        if alpha != 1.0:
            d = d * alpha
        total = d if total is None else total + d
    return torch.from_numpy(t.double().numpy() + total)


def peft_merged(target: str, adapter: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
        merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def transfer(tmp_path, spec: dict, executor: str = "local") -> dict[str, torch.Tensor]:  # noqa: ANN001
    out = str(tmp_path / "out")
    graft.run({"output": out, **spec}, executor=executor)
    assert graft.verify(out).ok
    return load_all(out)


CASES = [("basic", "v2"), ("rslora", "v2"), ("patterns", "v2"), ("embed", "v2"), ("fifo", "g2")]


@pytest.mark.parametrize("adapter, target", CASES)
def test_float64_is_the_rule_bit_for_bit_and_peft_merge_within_its_rounding(lora, tmp_path, adapter, target):
    got = transfer(tmp_path, {"target": lora[target], "diff": lora[adapter], "compute_dtype": "float64"})
    t = load_all(lora[target])
    changes = _factors(lora[adapter])
    merged = peft_merged(lora[target], lora[adapter], torch.float64)
    assert set(got) == set(t) and changes and set(changes) <= set(t)
    for name, out in got.items():
        if name not in changes:
            assert torch.equal(out, t[name]), name  # the adapter leaves it as it is
            continue
        assert torch.equal(out, rule(t[name], [changes[name]], [1.0]).to(out.dtype)), name
        assert not torch.equal(out, t[name]), name
        if name in _old_base_copies(lora[adapter]):
            # PEFT saved the old base's embedding with the adapter and, loaded onto the new base, puts
            # it back: its merge is v1 + change there. graft changes the new base's (the paper's rule).
            v1 = load_all(lora["v1"])[name]
            assert bool(((rule(v1, [changes[name]], [1.0]) - merged[name]).abs() <= 1e-12).all()), name
            continue
        # PEFT's float64 merge (a matrix product) rounded once to the output's float32.
        assert bool(((out.double() - merged[name]).abs() <= ulp(merged[name], out.dtype)).all()), name


@pytest.mark.parametrize("adapter, target", CASES)
def test_float32_is_within_the_float32_contract_and_close_to_peft(lora, tmp_path, adapter, target):
    got = transfer(tmp_path, {"target": lora[target], "diff": lora[adapter]})
    t = load_all(lora[target])
    changes = _factors(lora[adapter])
    merged = peft_merged(lora[target], lora[adapter], torch.float32)
    for name, (u, v, s, _) in changes.items():
        out, ref = got[name].double(), rule(t[name], [changes[name]], [1.0])
        # Float32 evaluation error of the change (r products and sums) and of the add.
        scale = torch.from_numpy(np.abs(u) @ np.abs(v) * s)
        bound = 2.0**-22 * (t[name].double().abs() + (u.shape[1] + 1) * scale)
        assert bool((((out - ref).abs() <= ulp(ref, torch.float32)) | ((out - ref).abs() <= bound)).all()), name
        if name not in _old_base_copies(lora[adapter]):  # PEFT merges v1's copy there (see above)
            assert bool(((out - merged[name].double()).abs() <= 2 * bound + ulp(ref, torch.float32)).all()), name


def test_a_bf16_target_is_rounded_once_from_float32(lora, tmp_path):
    """PEFT merges into bf16 as bf16(float32(W) + float32 change): graft adds in float32 and rounds
    once too, so it differs from PEFT only where the two float32 changes round apart."""
    got = transfer(tmp_path, {"target": lora["v2-bf16"], "diff": lora["basic"]})
    merged = peft_merged(lora["v2-bf16"], lora["basic"], torch.bfloat16)
    t = load_all(lora["v2-bf16"])
    for name in _factors(lora["basic"]):
        assert got[name].dtype == torch.bfloat16
        off = (got[name].double() - merged[name].double()).abs()
        assert bool((off <= ulp(merged[name], torch.bfloat16)).all()), name
        assert (off == 0).double().mean() > 0.99, name
        assert not torch.equal(got[name], t[name])


def test_alpha_and_two_adapters_in_one_pass(lora, tmp_path):
    got = transfer(tmp_path, {"target": lora["v2"], "compute_dtype": "float64",
                              "diffs": [{"diff": lora["basic"], "alpha": 0.5}, {"diff": lora["second"], "alpha": -1.25}]})
    t = load_all(lora["v2"])
    one, two = _factors(lora["basic"]), _factors(lora["second"])
    for name, out in got.items():
        changes = [(c[name], a) for c, a in ((one, 0.5), (two, -1.25)) if name in c]
        expected = rule(t[name], [c for c, _ in changes], [a for _, a in changes]).to(out.dtype) if changes else t[name]
        assert torch.equal(out, expected), name
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"} <= set(two)


def test_an_adapter_beside_a_fine_tune_and_its_base(lora, tmp_path):
    """One pass: a full fine-tune's diff (finetuned - base) and an adapter's, on one target."""
    got = transfer(tmp_path, {"target": lora["v2"], "compute_dtype": "float64", "diffs": [
        {"finetuned": lora["v2-bf16"], "base": lora["v1"], "alpha": 0.25}, {"diff": lora["basic"]}]})
    t, f, b = load_all(lora["v2"]), load_all(lora["v2-bf16"]), load_all(lora["v1"])
    changes = _factors(lora["basic"])
    name = "model.layers.0.self_attn.q_proj.weight"
    first = (0.25 * (f[name].double() - b[name].double())).numpy()
    assert torch.equal(got[name], rule(t[name], [changes[name]], [1.0], before=first).to(got[name].dtype))
    other = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(got[other], (t[other].double() + 0.25 * (f[other].double() - b[other].double())).float())


def test_the_ray_executor_writes_the_same_bytes(lora, tmp_path):
    from conftest import local_ray, shard_bytes

    spec = {"target": lora["v2"], "diff": lora["patterns"]}
    graft.run({**spec, "output": str(tmp_path / "local")})
    with local_ray():
        graft.run({**spec, "output": str(tmp_path / "ray")}, executor="ray")
    assert shard_bytes(str(tmp_path / "local")) == shard_bytes(str(tmp_path / "ray"))


def test_the_manifest_and_plan_name_the_adapter_and_what_it_changes(lora, tmp_path):
    out = str(tmp_path / "out")
    job = graft.plan({"target": lora["v2"], "diff": lora["patterns"], "output": out})
    changed = job.plan.lora()["diff"]
    ranks = {n: c["rank"] for n, c in changed.items()}
    assert ranks["model.layers.0.self_attn.q_proj.weight"] == 2 and ranks["model.layers.1.self_attn.v_proj.weight"] == 6
    assert ranks["model.layers.0.self_attn.k_proj.weight"] == 3 and ranks["model.layers.0.self_attn.o_proj.weight"] == 8
    assert changed["model.layers.0.self_attn.q_proj.weight"]["scale"] == 4 / 2  # alpha_pattern, then r
    assert dict(job.plan.formats)["diff"].startswith("LoRA adapter (r=2..8")
    # Each byte once: every tensor of the target, and the adapter's factors (all its tensors).
    assert job.plan.read_bytes == _data_bytes(os.path.join(lora["v2"], "model.safetensors")) + _data_bytes(
        os.path.join(lora["patterns"], "adapter_model.safetensors"))
    result = graft.run({"target": lora["v2"], "diff": lora["patterns"], "output": out, "report": "exact"})
    record = result.manifest["inputs"]["diff"]
    config = open(os.path.join(lora["patterns"], "adapter_config.json"), "rb").read()
    assert record["adapter"]["config_sha256"] == hashlib.sha256(config).hexdigest()
    assert record["adapter"]["weights"]["model.layers.0.self_attn.q_proj.weight"]["rank"] == 2
    assert [f["name"] for f in record["files"]] == ["adapter_model.safetensors"]
    assert result.manifest["run"]["bytes_read"] == job.plan.read_bytes
    report = {t["name"]: t for t in json.load(open(os.path.join(out, "graft.report.json")))["tensors"]}
    for name, c in _factors(lora["patterns"]).items():  # ||change|| per tensor, as for any diff
        assert report[name]["ft_delta_norm"] == pytest.approx(float(np.linalg.norm(change(*c))), rel=1e-5)
        assert report[name]["base_move_norm"] is None  # an adapter has no base here
    assert "model.layers.0.mlp.up_proj.weight" not in report  # left as it is: copied, not combined


def _content_sha256(path: str) -> str:
    """A safetensors file's ``content_sha256`` computed from the file alone, as docs/spec.md defines it:
    the header's sha256, then each tensor's bytes' sha256 and name, in the order of their bytes."""
    data = open(path, "rb").read()
    start = 8 + int.from_bytes(data[:8], "little")
    header = json.loads(data[8:start])
    lines = [f"header {hashlib.sha256(data[:start]).hexdigest()}\n"]
    for name, e in sorted(((n, e) for n, e in header.items() if n != "__metadata__"),
                          key=lambda item: item[1]["data_offsets"][0]):
        begin, end = e["data_offsets"]
        lines.append(f"{hashlib.sha256(data[start + begin:start + end]).hexdigest()}  {name}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_the_manifest_binds_the_adapters_content(lora, tmp_path, executor):
    """Its file's content_sha256, from the factors and whole tensors as they streamed; the factors a
    rule leaves out are read at commit."""
    from conftest import local_ray

    spec = {"target": lora["v2"], "diff": lora["save"], "base": lora["v1"], "chunk_size": 1024,
            "max_shard_size": 40_000, "rules": [{"match": r"layers\.1\.", "alpha": 0}]}
    file = os.path.join(lora["save"], "adapter_model.safetensors")
    if executor == "ray":
        with local_ray():
            result = graft.run({**spec, "output": str(tmp_path / "out")}, executor="ray")
    else:
        result = graft.run({**spec, "output": str(tmp_path / "out")})
    role = next(r for r, rec in result.manifest["inputs"].items() if "adapter" in rec)
    files = result.manifest["inputs"][role]["files"]
    assert [(f["name"], f["content_sha256"]) for f in files] == [("adapter_model.safetensors", _content_sha256(file))]
    assert result.manifest["plan"]["shards"] > 1
    # Weights are not hashed: their store versions bind them, as in any transfer.
    assert all("content_sha256" not in f for f in result.manifest["inputs"]["target"]["files"])


def test_a_resumed_transfer_binds_the_same_adapter_digests(lora, tmp_path):
    from conftest import stop_after_first_shard
    from graft.engine.plan.specfile import spec_from_mapping
    from graft.engine.run.local import run_local

    spec = {"target": lora["v2"], "diff": lora["save"], "base": lora["v1"], "max_shard_size": 40_000}
    whole = graft.run({**spec, "output": str(tmp_path / "whole")}).manifest
    out = str(tmp_path / "out")
    mark = stop_after_first_shard(spec_from_mapping({**spec, "output": out}), out)
    assert mark["shards"] and all(e["digests"] for e in mark["shards"].values())
    result = run_local(spec_from_mapping({**spec, "output": out}), workers=1)
    assert result.manifest["run"]["resumed_shards"] == sorted(mark["shards"])
    assert result.manifest["inputs"] == whole["inputs"]


def test_an_adapter_on_s3_gives_the_bytes_of_the_local_one(lora, tmp_path, s3_server):
    import fsspec
    from conftest import comparable, new_bucket, shard_bytes

    root = new_bucket(s3_server)
    fsspec.filesystem("s3", **s3_server["s3"]).put(lora["save"] + "/", f"{root}/adapter/", recursive=True)
    spec = {"target": lora["v2"], "base": lora["v1"], "max_shard_size": 40_000}
    local = graft.run({**spec, "diff": lora["save"], "output": str(tmp_path / "local")}).manifest
    remote = graft.run({**spec, "diff": f"{root}/adapter", "output": f"{root}/out",
                        "storage_options": s3_server}).manifest
    expected = comparable(shard_bytes(str(tmp_path / "local")))
    fs = fsspec.filesystem("s3", **s3_server["s3"])
    assert comparable({n: fs.cat(f"{root}/out/{n}") for n in shard_bytes(str(tmp_path / "local"))}) == expected
    role = next(r for r, rec in local["inputs"].items() if "adapter" in rec)
    assert remote["inputs"][role]["files"][0]["content_sha256"] == local["inputs"][role]["files"][0]["content_sha256"]
    assert remote["inputs"][role]["adapter"] == local["inputs"][role]["adapter"]


def test_an_adapter_on_the_hub_is_bound_by_the_hubs_sha256(lora, tmp_path, hub, hub_online):
    import uuid

    from conftest import shard_bytes

    repo = f"org/adapter-{uuid.uuid4().hex[:8]}"
    hub.create_repo(repo)
    hub.commit_dir(repo, lora["basic"])
    spec = {"target": lora["v2"], "output": str(tmp_path / "hub"), "diff": f"hf://{repo}",
            "storage_options": {"hf": {"endpoint": hub.url}}}
    job = graft.plan(spec)
    assert job.plan.shards[0].settings.hash_roles == ()  # the Hub vouches: nothing hashed again
    result = graft.run(spec)
    graft.run({"target": lora["v2"], "diff": lora["basic"], "output": str(tmp_path / "local")})
    assert shard_bytes(str(tmp_path / "hub")) == shard_bytes(str(tmp_path / "local"))
    entry = result.manifest["inputs"]["diff"]
    data = open(os.path.join(lora["basic"], "adapter_model.safetensors"), "rb").read()
    assert entry["commit"] == hub.head(repo)
    assert [(f["version"], "content_sha256" in f) for f in entry["files"]] == [
        ("sha256:" + hashlib.sha256(data).hexdigest(), False)]


def test_a_changed_adapter_changes_its_content_sha256(lora, tmp_path):
    changed = str(tmp_path / "changed")
    shutil.copytree(lora["basic"], changed)
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(changed, "adapter_model.safetensors"))
    name = sorted(n for n in tensors if "lora_B" in n)[0]
    tensors[name][0, 0] += 1
    save_file(tensors, os.path.join(changed, "adapter_model.safetensors"), metadata={"format": "pt"})
    digests = []
    for adapter, out in ((lora["basic"], "a"), (changed, "b")):
        manifest = graft.run({"target": lora["v2"], "diff": adapter, "output": str(tmp_path / out)}).manifest
        digests.append(manifest["inputs"]["diff"]["files"][0]["content_sha256"])
        assert digests[-1] == _content_sha256(os.path.join(adapter, "adapter_model.safetensors"))
    assert digests[0] != digests[1]


def _data_bytes(path: str) -> int:
    with open(path, "rb") as f:
        return os.path.getsize(path) - 8 - int.from_bytes(f.read(8), "little")


@pytest.mark.parametrize("adapter, says", [
    ("dora", "DoRA (use_dora)"), ("loha", "peft_type 'LOHA'"), ("lokr", "peft_type 'LOKR'"),
    ("ia3", "peft_type 'IA3'"), ("vera", "peft_type 'VERA'"),
    ("save", "holds a whole tensor for 'lm_head.weight' (modules_to_save"),  # without its base
])
def test_adapters_graft_cannot_transfer_are_refused_by_name_before_anything_is_written(lora, tmp_path, adapter, says):
    out = tmp_path / "out"
    with pytest.raises(PlanError, match="merge (this|the) adapter|merge this one|add base") as e:
        graft.run({"target": lora["v2"], "diff": lora[adapter], "output": str(out)})
    assert says in str(e.value) and not out.exists()


def test_an_adapter_given_as_weights_is_refused(lora, tmp_path):
    for spec in ({"target": lora["v2"], "diff": lora["save"], "base": lora["basic"]},
                 {"target": lora["basic"], "diff": lora["basic"]}):
        with pytest.raises(PlanError, match="is a PEFT adapter .* give it as diff"):
            graft.plan({**spec, "output": str(tmp_path / "out")})


def test_whole_tensors_change_against_the_adapters_base(lora, tmp_path):
    """modules_to_save (lm_head here) replaces the weight: its change is the saved tensor minus the
    base the adapter was trained on, transferred like a fine-tune's (PEFT itself would put v1's
    fine-tuned head on v2 as it is)."""
    spec = {"target": lora["v2"], "diff": lora["save"], "base": lora["v1"], "compute_dtype": "float64"}
    got = transfer(tmp_path, spec)
    t, v1 = load_all(lora["v2"]), load_all(lora["v1"])
    from safetensors.torch import load_file

    saved = load_file(os.path.join(lora["save"], "adapter_model.safetensors"))["base_model.model.lm_head.weight"]
    assert not torch.equal(saved, v1["lm_head.weight"])  # trained: modules_to_save are trainable
    assert torch.equal(got["lm_head.weight"], (t["lm_head.weight"].double() + (saved.double()
                                                                              - v1["lm_head.weight"].double())).float())
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(got[name], rule(t[name], [_factors(lora["save"])[name]], [1.0]).to(got[name].dtype))
    # finetuned: <adapter> with its base is the same job.
    same = transfer(tmp_path / "same", {**{k: v for k, v in spec.items() if k != "diff"}, "finetuned": lora["save"]})
    assert all(torch.equal(same[n], got[n]) for n in got)
    # Left out by a rule, the whole tensor needs no base.
    job = graft.plan({"target": lora["v2"], "diff": lora["save"], "output": str(tmp_path / "o"),
                      "rules": [{"match": "^lm_head", "alpha": 0}]})
    assert "lm_head.weight" not in job.plan.lora()["diff"] and job.plan.combined == 2


def test_an_adapter_of_another_architecture_is_refused(lora, tmp_path):
    with pytest.raises(PlanError, match="changes .* weight\\(s\\) the target does not have"):
        graft.plan({"target": lora["g2"], "diff": lora["basic"], "output": str(tmp_path / "out")})


def test_a_rank_pattern_that_disagrees_with_the_factors_is_refused(lora, tmp_path):
    broken = str(tmp_path / "broken")
    shutil.copytree(lora["patterns"], broken)
    path = os.path.join(broken, "adapter_config.json")
    cfg = json.load(open(path))
    cfg["rank_pattern"] = {"layers.0.self_attn.q_proj": 5, **cfg["rank_pattern"]}
    json.dump(cfg, open(path, "w"))
    with pytest.raises(CheckpointError, match="rank 2 but its config says r=5"):
        graft.plan({"target": lora["v2"], "diff": broken, "output": str(tmp_path / "out")})


def test_side_files_the_adapter_lacks_come_from_the_target(lora, tmp_path):
    target = str(tmp_path / "target")
    shutil.copytree(lora["v2"], target)
    open(os.path.join(target, "tokenizer_config.json"), "w").write('{"from": "target"}')
    out = str(tmp_path / "out")
    job = graft.plan({"target": target, "diff": lora["basic"], "output": out})
    assert {s.name: s.donor for s in job.plan.side_files}["tokenizer_config.json"] == "target"
    assert not any("has none" in w for w in job.plan.warnings)


def test_the_bytes_do_not_depend_on_chunks_threads_or_alpha_rules(lora, tmp_path):
    """Chunks that cut rows (a chunk of 96 float64 elements in 64-wide rows), one thread or several:
    the same file. A rule alpha: 0 leaves a tensor the adapter changes as the target's."""
    spec = {"target": lora["v2"], "diff": lora["rslora"], "compute_dtype": "float64", "report": "off"}
    graft.run({**spec, "output": str(tmp_path / "a")})
    from conftest import shard_bytes
    from graft.engine.plan.specfile import spec_from_mapping
    from graft.engine.run.local import run_local

    run_local(spec_from_mapping({**spec, "output": str(tmp_path / "b"), "chunk_size": 768}), workers=1, threads=2)
    assert shard_bytes(str(tmp_path / "a")) == shard_bytes(str(tmp_path / "b"))
    got = transfer(tmp_path / "c", {**spec, "rules": [{"match": r"mlp\.", "alpha": 0}]})
    t = load_all(lora["v2"])
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], t["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], t["model.layers.0.self_attn.q_proj.weight"])


def test_inspect_says_what_an_adapter_is(lora):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "graft", "inspect", lora["patterns"], "--json"], capture_output=True,
                         text=True, check=True)
    assert json.loads(out.stdout)["stored_as"].startswith("LoRA adapter (r=2..8; changes 8 weight(s)")
    out = subprocess.run([sys.executable, "-m", "graft", "inspect", lora["dora"], "--json"], capture_output=True,
                         text=True, check=True)
    assert "not transferable by graft" in json.loads(out.stdout)["stored_as"]


def test_biases_trained_with_bias_all_are_whole_tensors(lora, tmp_path):
    """bias: all saves every bias of the model (untrained here: each equals the base's), the targeted
    layers' under ``base_layer``: each is a change against the base, zero here."""
    got = transfer(tmp_path, {"target": lora["g2"], "diff": lora["bias_all"], "base": lora["g1"],
                              "compute_dtype": "float64"})
    t = load_all(lora["g2"])
    biases = [n for n in t if n.endswith(".bias") and t[n].dtype.is_floating_point]
    assert "transformer.h.0.attn.c_attn.bias" in biases and "transformer.ln_f.bias" in biases
    assert all(torch.equal(got[n], t[n]) for n in biases)
    name = "transformer.h.1.attn.c_attn.weight"
    assert torch.equal(got[name], rule(t[name], [_factors(lora["bias_all"])[name]], [1.0]).to(got[name].dtype))


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_a_lora_bias_changes_its_layers_bias_as_peft_merges_it(lora, tmp_path, alpha):
    """lora_bias: B has a bias b, and the layer's bias becomes bias + s * b (PEFT's merge); the
    weight changes by s * B.A as without it."""
    from safetensors.numpy import load_file

    got = transfer(tmp_path, {"target": lora["g2"], "diff": lora["lora_bias"], "alpha": alpha,
                              "compute_dtype": "float64"})
    t = load_all(lora["g2"])
    saved = load_file(os.path.join(lora["lora_bias"], "adapter_model.safetensors"))
    factors = _factors(lora["lora_bias"])
    biases = {k.removeprefix("base_model.model.").replace(".lora_B.bias", ".bias"): v
              for k, v in saved.items() if k.endswith(".lora_B.bias")}
    assert sorted(biases) == ["transformer.h.0.attn.c_attn.bias", "transformer.h.1.attn.c_attn.bias"]
    merged = peft_merged(lora["g2"], lora["lora_bias"], torch.float64) if alpha == 1.0 else {}
    for name, b in biases.items():
        s = factors[name.replace(".bias", ".weight")][2]
        d = b.astype(np.float64) * s
        expected = torch.from_numpy(t[name].double().numpy() + (d if alpha == 1.0 else d * alpha)).float()
        assert torch.equal(got[name], expected), name
        if merged:  # PEFT's float64 merge, rounded once to the output's float32: the same bits
            assert torch.equal(got[name], merged[name].float()), name
        weight = name.replace(".bias", ".weight")
        assert torch.equal(got[weight], rule(t[weight], [factors[weight]], [alpha]).float()), weight
    others = [n for n in t if n.endswith(".bias") and n not in biases]
    assert others and all(torch.equal(got[n], t[n]) for n in others)
    changed = graft.plan({"target": lora["g2"], "diff": lora["lora_bias"],
                          "output": str(tmp_path / "p")}).plan.lora()["diff"]
    assert changed["transformer.h.0.attn.c_attn.bias"] == {"bias": True, "scale": 2.0, "alpha": 1.0}


def test_a_lora_bias_of_another_shape_than_the_targets_bias_is_refused(lora, tmp_path):
    """The weight fits but the bias does not (a target whose c_attn bias is shorter): refused, named."""
    from safetensors.torch import load_file, save_file

    target = str(tmp_path / "target")
    shutil.copytree(lora["g2"], target)
    tensors = load_file(os.path.join(target, "model.safetensors"))
    tensors["transformer.h.0.attn.c_attn.bias"] = tensors["transformer.h.0.attn.c_attn.bias"][:100].clone()
    save_file(tensors, os.path.join(target, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PlanError, match=r"'transformer.h.0.attn.c_attn.bias' is \[100\] in target .* changes it as \[192\]"):
        graft.plan({"target": target, "diff": lora["lora_bias"], "output": str(tmp_path / "out")})
