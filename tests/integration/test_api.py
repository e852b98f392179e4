"""The Python API as a user calls it: ``import graft``; ``graft.plan`` / ``graft.run`` /
``graft.verify`` on a mapping, a YAML path or a ``JobSpec``; docs/api.md's examples executed as
written; ``python -m graft`` and the one version."""
from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

import graft
from graft.engine.errors import GraftError, SpecError, StorageError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _spec(ckpts: dict[str, str], output: str, **more) -> dict:
    return {"target": ckpts["target"], "finetuned": ckpts["finetuned"], "base": ckpts["base"],
            "output": output, **more}


def test_the_api_page_runs_as_written(tmp_path, monkeypatch):
    """Every ```python block of docs/api.md, in order, in one namespace, from a directory laid out
    as the repository is after ``make demo`` (demo/ checkpoints, configs/demo.yaml)."""
    from graft.cluster.demo import make_checkpoints

    make_checkpoints(str(tmp_path / "demo"), size="tiny")
    shutil.copytree(os.path.join(ROOT, "configs"), tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    text = open(os.path.join(ROOT, "docs", "api.md"), encoding="utf-8").read()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert len(blocks) >= 4
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/api.md block {i + 1}", "exec"), namespace)  # noqa: S102
    assert namespace["report"].ok and not namespace["tampered"].ok


def test_a_dict_spec_plans_runs_and_verifies(tiny_checkpoints, tmp_path):
    out = str(tmp_path / "out")
    job = graft.plan(_spec(tiny_checkpoints, out), overrides=["alpha=0.5"])
    assert job.spec.diffs[0].alpha == 0.5 and job.plan.tensor_count > 0
    assert not os.path.exists(out)  # planning writes nothing
    calls = []
    result = graft.run(_spec(tiny_checkpoints, out), overrides=["alpha=0.5"],
                       progress=lambda done, total: calls.append((done, total)))
    assert result.output == out and len(result.results) == len(job.plan.shards)
    assert calls and calls[-1] == (job.plan.read_bytes, job.plan.read_bytes)
    done = [c[0] for c in calls]
    assert done == sorted(done)
    report = graft.verify(out)
    assert report.ok and set(report.checked) >= {r.file for r in result.results}


def test_a_yaml_path_and_a_jobspec_are_specs_too(tiny_checkpoints, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_spec(tiny_checkpoints, str(tmp_path / "out"))))
    from_path = graft.plan(path)  # a PathLike
    from_str = graft.plan(str(path), overrides=["output=" + str(tmp_path / "other")])
    assert from_str.spec.output == str(tmp_path / "other")
    assert graft.plan(from_path.spec).plan == from_path.plan
    result = graft.run(from_path)  # the Job plan returned
    assert graft.verify(result.output).ok


def test_a_tampered_output_fails_verify_with_the_file_named(tiny_checkpoints, tmp_path):
    out = str(tmp_path / "out")
    result = graft.run(_spec(tiny_checkpoints, out))
    victim = os.path.join(out, result.results[0].file)
    with open(victim, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    report = graft.verify(out)
    assert not report.ok
    assert any(result.results[0].file in p for p in report.problems)


def test_errors_are_typed(tiny_checkpoints, tmp_path):
    with pytest.raises(SpecError) as caught:
        graft.plan({"output": str(tmp_path / "o"), "alhpa": 1, "vocab": "grow"})
    assert len(caught.value.problems) >= 3  # target, finetuned, base missing; the typo; vocab
    with pytest.raises(SpecError, match="spec: expected a mapping"):
        graft.plan(42)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="overrides"):
        graft.plan(_spec(tiny_checkpoints, str(tmp_path / "o")), overrides="alpha=0.5")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="executor"):
        graft.run(_spec(tiny_checkpoints, str(tmp_path / "o")), executor="spark")  # type: ignore[arg-type]
    with pytest.raises(GraftError):
        graft.plan(_spec({**tiny_checkpoints, "base": str(tmp_path / "nowhere")}, str(tmp_path / "o")))
    with pytest.raises(StorageError):
        graft.verify("s3://")


def test_import_graft_loads_neither_torch_nor_ray_nor_pydantic():
    code = ("import sys, graft; assert graft.plan and graft.run and graft.verify and graft.JobSpec; "
            "print(sorted(m for m in ('torch', 'ray', 'pydantic', 'graft.cluster') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_spec_class_is_graft_jobspec():
    from graft.engine.plan.spec import JobSpec

    assert graft.JobSpec is JobSpec and "JobSpec" in graft.__all__


def test_one_version_everywhere():
    cli = subprocess.run([sys.executable, "-m", "graft", "--version"], capture_output=True, text=True,
                         check=True)
    assert cli.stdout.strip() == f"graft {graft.__version__}"
    assert graft.__version__ == importlib.metadata.version("graft")
    pyproject = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    assert re.search(r'^version\s*=\s*"', pyproject, flags=re.M) is None  # written once, not here
    assert 'version = { attr = "graft.engine.__version__" }' in pyproject


def test_python_dash_m_graft_is_the_cli(tiny_checkpoints, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_spec(tiny_checkpoints, str(tmp_path / "out"))))
    done = subprocess.run([sys.executable, "-m", "graft", "plan", str(path), "--json"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert '"tensors"' in done.stdout
    bad = subprocess.run([sys.executable, "-m", "graft", "nosuchcommand"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("graft: error: argument command: invalid choice")


@pytest.mark.slow
def test_run_on_ray(tiny_checkpoints, tmp_path):
    import ray

    from conftest import local_ray

    with local_ray():
        result = graft.run(_spec(tiny_checkpoints, str(tmp_path / "out")), executor="ray", workers=1)
        assert ray.is_initialized()
    assert result.manifest and graft.verify(result.output).ok
