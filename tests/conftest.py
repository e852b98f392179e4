"""Shared fixtures: real checkpoints written by real writers, and the float64 reference.

Unit tests (tests/unit) exercise one module with small files they write themselves; integration
tests (tests/integration) run whole jobs, the CLI as a subprocess, and read the output back with
safetensors and transformers.
"""
from __future__ import annotations

import glob
import os
import shutil
from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, settings
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The tests' own gcsfs clients: the JSON-API filesystem, as graft uses it (gcsfs's default probes each
# bucket over gRPC, which the GCS emulator does not speak: a minute's timeout per bucket).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

# Property-based tests (tests/unit/test_fuzz_headers.py): "ci" is what `make test` runs (6 properties x
# 1000 examples, about 35 s here), "long" what `make fuzz` runs (20 times as many). No example
# database: nothing is written into the checkout, and a failure prints the example and a
# @reproduce_failure blob instead.
settings.register_profile("ci", max_examples=1000, deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", parent=settings.get_profile("ci"), max_examples=20000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class PrivateMemoryFileSystem:
    """Mixin for an fsspec MemoryFileSystem under a protocol of its own: ``class F(PrivateMemoryFileSystem,
    MemoryFileSystem)`` with ``protocol``, ``store = {}`` and ``pseudo_dirs = [""]`` of its own, then
    ``fsspec.register_implementation``. Paths are accepted with or without ``<protocol>://``."""

    root_marker = "/"

    @classmethod
    def _strip_protocol(cls, path):  # noqa: ANN001, ANN206 - fsspec's signature
        if isinstance(path, str):
            path = path.removeprefix(f"{cls.protocol}://")
        return super()._strip_protocol(path)


@contextmanager
def local_ray(**kwargs):  # noqa: ANN003, ANN201
    """A Ray of its own on this machine (2 CPUs, no dashboard, a small object store) for the length
    of the block; ``kwargs`` go to ``ray.init`` (e.g. a ``runtime_env``)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 * 2**20,
             log_to_driver=False, configure_logging=False, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def load_all(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) checkpoint directory, read with the reference reader."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        out.update(load_file(f))
    return out


def poison(checkpoint: str, value: float, index: int = 0, last: bool = True) -> str:
    """Write ``value`` (NaN/Inf) into one element of a tensor of the first or last shard of a
    checkpoint copy; returns the tensor's name."""
    from safetensors.torch import save_file

    shards = sorted(n for n in os.listdir(checkpoint) if n.endswith(".safetensors"))
    path = os.path.join(checkpoint, shards[-1] if last else shards[0])
    sd = load_file(path)
    victim = sorted(sd)[0]
    sd[victim].view(-1)[index] = value
    save_file(sd, path, metadata={"format": "pt"})
    return victim


def poisoned_copy(checkpoint: str, where: str) -> tuple[str, str]:
    """A copy of ``checkpoint`` at ``where`` with a NaN in one tensor (``poison``): (its path, the
    tensor's name)."""
    shutil.copytree(checkpoint, where)
    return where, poison(where, float("nan"))


def stop_after_first_shard(spec, output: str) -> dict:  # noqa: ANN001
    """Run ``spec`` on the local executor with Ctrl-C as soon as its first shard is committed;
    returns the run mark it leaves at ``output`` (its journal of kept shards)."""
    import json

    from graft.engine.run.local import run_local
    from graft.engine.run.runmark import RUN_MARK

    def interrupt(event: str) -> None:
        if event == "done":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_local(spec, workers=1, on_shard=interrupt)
    return json.load(open(os.path.join(output, RUN_MARK)))


def comparable(files: dict[str, bytes]) -> dict[str, bytes]:
    """Output files (name -> bytes) for bit-identity checks: all but the manifest (it records timing)
    and the transfer report (what it measures differs between jobs that write the same shards: a
    stored diff has no base, a GPU measures every element; test_report.py checks that the same job
    writes the same report), whose line is taken out of SHA256SUMS too."""
    out = {n: data for n, data in sorted(files.items()) if n not in ("graft.manifest.json", "graft.report.json")}
    if "SHA256SUMS" in out:
        out["SHA256SUMS"] = b"".join(line for line in out["SHA256SUMS"].splitlines(keepends=True)
                                     if not line.endswith(b"  graft.report.json\n"))
    return out


def shard_bytes(out: str) -> dict[str, bytes]:
    """Every output file's bytes, as ``comparable`` keeps them."""
    return comparable({n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)})


def reference(t: torch.Tensor, f: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """The float64 reference: exact arithmetic in float64, one cast to the target dtype."""
    return (t.double() + alpha * (f.double() - b.double())).to(t.dtype)


def reference_terms(t: torch.Tensor, terms: list[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """The float64 reference of several diffs: the change summed left to right in float64, then the
    target added, one cast to the target dtype (a diff with alpha 0 is left out)."""
    change = None
    for f, b, alpha in terms:
        if alpha == 0.0:
            continue
        d = alpha * (f.double() - b.double())
        change = d if change is None else change + d
    return t if change is None else (change + t.double()).to(t.dtype)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each value of ``x`` (float64 result; subnormal spacing near 0)."""
    fi = torch.finfo(dtype)
    _, e = torch.frexp(x.double().abs())
    return torch.maximum(torch.ldexp(torch.full_like(x, fi.eps, dtype=torch.float64), e - 1),
                         torch.tensor(fi.tiny * fi.eps, dtype=torch.float64))


def within_float32_contract(out: torch.Tensor, t: torch.Tensor, f: torch.Tensor, b: torch.Tensor,
                            alpha: float) -> torch.Tensor:
    """The float32 promise, per element: within 1 output ulp of the float64 reference, or within
    float32 evaluation error of the operands, |out - ref| <= 2^-22 (|t| + |alpha| (|f| + |b|)).

    One ulp covers double rounding (a float32 result exactly on a bf16 midpoint rounds to even);
    the bound covers near-cancellation, where float32 can be several output ulps off.
    """
    ref = reference(t, f, b, alpha).double()
    diff = (out.double() - ref).abs()
    bound = 2.0**-22 * (t.double().abs() + abs(alpha) * (f.double().abs() + b.double().abs()))
    one_ulp = torch.maximum(ulp(ref, out.dtype), ulp(out.double(), out.dtype))
    return (diff <= one_ulp) | (diff <= bound)


@pytest.fixture(scope="session")
def s3_server():  # noqa: ANN201
    """A real S3 wire protocol: moto in server mode on 127.0.0.1 (never any other address).

    Yields the fsspec ``storage_options`` that reach it. Credentials are moto's dummies, passed
    explicitly so nothing from the machine's AWS configuration is used.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server._server.server_address  # noqa: SLF001 - moto exposes no public accessor
    options = {"s3": {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing",
                      "client_kwargs": {"region_name": "us-east-1"}}}
    yield options
    server.stop()


def new_bucket(options: dict) -> str:
    """A fresh bucket on the test S3 server; returns its s3:// root."""
    import uuid

    import fsspec

    name = f"graft-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", **options["s3"]).call_s3("create_bucket", Bucket=name)
    return f"s3://{name}"


def unfinished_uploads(options: dict, bucket_uri: str) -> list:
    """Multipart uploads started and never completed nor aborted in a bucket."""
    import fsspec

    fs = fsspec.filesystem("s3", **options["s3"])
    bucket = bucket_uri.removeprefix("s3://").split("/")[0]
    return fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])


@pytest.fixture(scope="session")
def gcs_server():  # noqa: ANN201
    """Google Cloud Storage's JSON API: the gcp-storage-emulator on 127.0.0.1 (``cloud_servers``)."""
    from cloud_servers import gcs_emulator

    with gcs_emulator() as options:
        yield options


@pytest.fixture(scope="session")
def azure_server():  # noqa: ANN201
    """Azure Blob's REST API: Azurite on 127.0.0.1 (``cloud_servers``)."""
    from cloud_servers import azure_emulator

    with azure_emulator() as options:
        yield options


@pytest.fixture(scope="session")
def hub():  # noqa: ANN201
    """The fake Hugging Face Hub (tests/fake_hub.py): an HTTP server on 127.0.0.1 only."""
    from fake_hub import FakeHub

    with FakeHub() as h:
        yield h


@pytest.fixture
def hub_online(monkeypatch: pytest.MonkeyPatch, hub):  # noqa: ANN001, ANN201
    """Let the in-process Hub client reach the fake Hub, and start from a clean request log."""
    from huggingface_hub import HfFileSystem, constants

    # The suite runs with HF_HUB_OFFLINE=1, read once at import; the request hook asks is_offline_mode().
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # hf_xet is installed: without this the client uploads through Xet, which the fake does not serve.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    HfFileSystem.clear_instance_cache()
    hub.clear_requests()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """base (bf16, one file), finetuned (float32, hub-sharded), target (bf16, other shards).

    Session-scoped and read-only: tests that mutate inputs copy them first (``copy_checkpoints``).
    """
    from graft.cluster.demo import make_checkpoints

    root = tmp_path_factory.mktemp("ckpts")
    return make_checkpoints(str(root), size="tiny")


SECOND_FROZEN = "model.layers.1.self_attn.v_proj.weight"


@pytest.fixture(scope="session")
def second_diff(tiny_checkpoints: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A second fine-tune of the tiny model from a base of its own: ``base2`` (bf16, sharded by
    huggingface_hub) and ``finetuned2`` (float16 but for ``SECOND_FROZEN``, one file), with its own generation_config.json
    (temperature 0.3) and ``SECOND_FROZEN`` left equal to its base. Read-only."""
    import json

    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("second")
    gen = torch.Generator().manual_seed(2)
    base = load_all(tiny_checkpoints["base"])
    base2 = {n: (x.double() + 0.01 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).to(x.dtype)
             for n, x in base.items()}
    ft2 = {n: x.clone() if n == SECOND_FROZEN else
           (x.double() + 0.02 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).to(torch.float16)
           for n, x in base2.items()}
    out = {"base2": str(root / "base2"), "finetuned2": str(root / "finetuned2")}
    os.makedirs(out["base2"])
    save_torch_state_dict(base2, out["base2"], max_shard_size="20KB")
    os.makedirs(out["finetuned2"])
    save_file(ft2, os.path.join(out["finetuned2"], "model.safetensors"), metadata={"format": "pt"})
    for role, mine in (("base", "base2"), ("finetuned", "finetuned2")):
        for name in os.listdir(tiny_checkpoints[role]):
            if not name.endswith((".safetensors", ".index.json")):
                shutil.copy(os.path.join(tiny_checkpoints[role], name), out[mine])
    path = os.path.join(out["finetuned2"], "generation_config.json")
    config = json.load(open(path))
    json.dump({**config, "temperature": 0.3}, open(path, "w"))
    return out


@pytest.fixture
def copy_checkpoints(tiny_checkpoints: dict[str, str], tmp_path):  # noqa: ANN201
    """A private, mutable copy of the tiny checkpoints for this test."""
    out = {}
    for role, path in tiny_checkpoints.items():
        dest = tmp_path / "in" / role
        shutil.copytree(path, dest)
        out[role] = str(dest)
    return out


@pytest.fixture(scope="session")
def fp8_trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """DeepSeek-V3-style block FP8 (32x32 blocks, F32 ``weight_scale_inv``) target and base with a
    bf16 fine-tune, the common case: the lab fine-tuned in bf16 and releases in FP8. The base keeps
    its scales in a shard of their own; the target is sharded by huggingface_hub. Read-only."""
    from quantized import llama_weights, save_block_fp8, save_plain

    root = tmp_path_factory.mktemp("fp8")
    base = llama_weights(0)
    return {"target": save_block_fp8(llama_weights(2, base), str(root / "target")),
            "finetuned": save_plain(llama_weights(1, base), str(root / "finetuned")),
            "base": save_block_fp8(base, str(root / "base"), split_scales=True)}


@pytest.fixture(scope="session")
def ct_trio(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """``ct_trio(preset)``: three compressed-tensors checkpoints written by the compressed_tensors
    library (``FP8`` per-tensor + static input scales, ``FP8_DYNAMIC`` per-channel, ``FP8_BLOCK``
    16x32 blocks), built once per preset. Read-only."""
    from quantized import llama_weights, save_compressed_tensors

    made: dict[str, dict[str, str]] = {}
    base = llama_weights(0)
    weights = {"base": base, "finetuned": llama_weights(1, base), "target": llama_weights(2, base)}

    def make(preset: str) -> dict[str, str]:
        if preset not in made:
            root = tmp_path_factory.mktemp(preset.lower())
            block = (16, 32) if preset == "FP8_BLOCK" else None
            made[preset] = {role: save_compressed_tensors(sd, str(root / role), preset, block)
                            for role, sd in weights.items()}
        return made[preset]
    return make
