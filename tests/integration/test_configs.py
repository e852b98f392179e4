"""Every example in configs/ plans: each is read as a user copies it, its checkpoint locations
pointed at checkpoints this test writes (on local disk, or on the store its URIs name: S3 on moto,
GCS and Azure on their emulators, the Hub on the fake Hub), every other key left as written, then
``graft.plan`` (headers only). An example whose keys go stale fails here."""
from __future__ import annotations

import glob
import os

import fsspec
import pytest
import yaml

import graft

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
# The checkpoints an example's keys need, where the tiny plain ones do not do.
TRIO_FOR = {"fp8-to-bf16.yaml": "fp8", "vocab-pad.yaml": "vocab", "vocab-align.yaml": "vocab"}
# What an example's ``diff`` is: a committed graft diff, or a PEFT LoRA adapter.
DIFF_FOR = {"lora.yaml": "adapter"}
ROLES = ("target", "finetuned", "base", "diff")


@pytest.fixture(scope="module")
def vocab_trio(tmp_path_factory):  # noqa: ANN001, ANN201
    """A fine-tune that added 3 chat tokens to its base, and a new version of the base."""
    from test_vocab import _trio

    return _trio(tmp_path_factory.mktemp("vocab-example"), tied=False)


@pytest.fixture(scope="module")
def adapter(tiny_checkpoints, tmp_path_factory):  # noqa: ANN001, ANN201
    """A LoRA adapter of the tiny model in PEFT's layout (rank 4 on every q_proj and v_proj)."""
    import json

    import torch
    from safetensors.torch import save_file

    from conftest import load_all

    path = tmp_path_factory.mktemp("adapter")
    g = torch.Generator().manual_seed(0)
    factors = {}
    for name, t in load_all(tiny_checkpoints["target"]).items():
        if name.endswith(("q_proj.weight", "v_proj.weight")):
            module = f"base_model.model.{name.removesuffix('.weight')}"
            factors[f"{module}.lora_A.weight"] = torch.randn(4, t.shape[1], generator=g)
            factors[f"{module}.lora_B.weight"] = torch.randn(t.shape[0], 4, generator=g)
    save_file(factors, str(path / "adapter_model.safetensors"))
    json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8}, open(path / "adapter_config.json", "w"))
    return str(path)


@pytest.fixture(scope="module")
def stored_diff(tiny_checkpoints, tmp_path_factory):  # noqa: ANN001, ANN201
    """A committed ``graft diff`` of the tiny fine-tune."""
    out = str(tmp_path_factory.mktemp("stored") / "diff")
    graft.run({"finetuned": tiny_checkpoints["finetuned"], "base": tiny_checkpoints["base"], "output": out},
              kind="diff")
    return out


def _remote(request, scheme: str, checkpoints: dict[str, str]) -> tuple[dict[str, str], dict, str]:  # noqa: ANN001
    """The checkpoints copied to a fresh bucket of the store ``scheme`` names: role -> URI, the
    storage options that reach it, and an output URI there."""
    if scheme == "hf":
        hub = request.getfixturevalue("hub")
        request.getfixturevalue("hub_online")
        uris = {}
        for role, path in checkpoints.items():
            repo = f"examples/{role}-{os.urandom(4).hex()}"
            hub.create_repo(repo)
            hub.commit_dir(repo, path)
            uris[role] = f"hf://{repo}@main"
        return uris, {"hf": {"endpoint": hub.url}}, ""
    from cloud_servers import new_root, store_fs
    from conftest import new_bucket

    options = request.getfixturevalue({"s3": "s3_server", "gs": "gcs_server", "az": "azure_server"}[scheme])
    root = new_bucket(options) if scheme == "s3" else new_root(options)
    fs = fsspec.filesystem("s3", **options["s3"]) if scheme == "s3" else store_fs(options, scheme)
    for role, path in checkpoints.items():
        for name in os.listdir(path):
            with open(os.path.join(path, name), "rb") as f:
                fs.pipe_file(f"{root.split('://')[1]}/{role}/{name}", f.read())
    return {role: f"{root}/{role}" for role in checkpoints}, options, f"{root}/out"


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_plans(name, request, tiny_checkpoints, second_diff, tmp_path):  # noqa: ANN001
    data = yaml.safe_load(open(os.path.join(ROOT, "configs", name), encoding="utf-8"))
    kind = "transfer" if "target" in data else "diff"  # graft diff's spec has no target
    trio = {"fp8": lambda: request.getfixturevalue("fp8_trio"),
            "vocab": lambda: request.getfixturevalue("vocab_trio")}.get(TRIO_FOR.get(name), lambda: tiny_checkpoints)()
    local = {**trio, "finetuned2": second_diff["finetuned2"], "base2": second_diff["base2"]}
    if "diff" in data:
        local["diff"] = request.getfixturevalue(DIFF_FOR.get(name, "stored_diff"))
    locations = [data.get(r) for r in ROLES] + [d.get(k) for d in data.get("diffs", []) for k in ROLES]
    schemes = {str(u).split("://")[0] for u in locations if u and "://" in str(u)}
    assert len(schemes) <= 1, f"{name}: inputs on several stores: {schemes}"
    output = str(tmp_path / "out")
    scheme = schemes.pop() if schemes else None
    if scheme:
        local, options, remote_out = _remote(request, scheme, local)
        data["storage_options"] = {**data.get("storage_options", {}), **options}
        output = remote_out or output
    for role in ROLES:
        if role in data:
            data[role] = local[role]
    for i, d in enumerate(data.get("diffs", [])):
        d["finetuned"], d["base"] = (local["finetuned"], local["base"]) if i == 0 else (local["finetuned2"],
                                                                                      local["base2"])
    data["output"] = output
    job = graft.plan(data, kind=kind)
    assert job.plan.tensor_count > 0 and job.plan.shards
    if scheme:  # planned on the store the example names, not on local copies
        assert {c.uri.split("://")[0] for c in job.checkpoints.values()} == {scheme}


def test_there_is_an_example_per_use_case():
    texts = {n: open(os.path.join(ROOT, "configs", n), encoding="utf-8").read() for n in EXAMPLES}
    wanted = {"several diffs": "\ndiffs:", "a stored diff": "\ndiff:", "FP8 to bf16": "output_format: bf16",
              "vocab pad": "vocab: pad", "vocab align": "vocab: align", "rules": "\nrules:",
              "S3": "s3://", "GCS": "gs://", "Azure": "az://", "the Hub": "hf://", "graft diff": "diff_dtype:",
              "a LoRA adapter": "adapter_config.json"}
    missing = [what for what, key in wanted.items() if not any(key in t for t in texts.values())]
    assert missing == []
    assert all(t.startswith("#") for t in texts.values())  # each says what it is for
