"""The ``graft`` command as a user drives it: a subprocess, exit codes, stdout/stderr."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import save_file

from conftest import shard_bytes
from graft.cluster.progress import Progress

GRAFT = [sys.executable, "-m", "graft.cluster.cli"]


def graft(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)  # the embedded default: graft starts (and stops) its own Ray
    return subprocess.run([*GRAFT, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def write_config(tmp_path, ckpts: dict[str, str], **extra) -> str:  # noqa: ANN001
    cfg = {"target": ckpts["target"], "finetuned": ckpts["finetuned"], "base": ckpts["base"],
           "output": str(tmp_path / "out"), **extra}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "graft")
    r = subprocess.run([script, "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("graft ")


def test_run_on_the_default_embedded_ray_then_verify_then_sha256sum(tiny_checkpoints, tmp_path):
    cfg = write_config(tmp_path, tiny_checkpoints)
    r = graft("run", cfg, "--set", "alpha=0.5", "--workers", "2")
    assert r.returncode == 0, r.stderr
    out = str(tmp_path / "out")
    assert f"wrote {out}" in r.stdout
    assert "% " in r.stderr and "read" in r.stderr  # plain progress lines when not on a TTY
    manifest = json.load(open(os.path.join(out, "graft.manifest.json")))
    assert manifest["spec"]["alpha"] == 0.5 and manifest["run"]["executor"] == "ray"
    v = graft("verify", out)
    assert v.returncode == 0 and "verified" in v.stdout
    s = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
    assert s.returncode == 0, s.stdout + s.stderr


def test_verify_catches_a_flipped_bit(tiny_checkpoints, tmp_path):
    cfg = write_config(tmp_path, tiny_checkpoints)
    assert graft("run", cfg, "-q", "--executor", "local").returncode == 0
    out = tmp_path / "out"
    shard = sorted(p for p in os.listdir(out) if p.endswith(".safetensors"))[-1]
    with open(out / shard, "r+b") as f:
        f.seek(os.path.getsize(out / shard) - 10)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    v = graft("verify", str(out))
    assert v.returncode == 5  # integrity
    assert shard in v.stderr and "does not match" in v.stderr
    s = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
    assert s.returncode != 0


def test_plan_reads_headers_and_reports_without_writing(tiny_checkpoints, tmp_path):
    cfg = write_config(tmp_path, tiny_checkpoints)
    r = graft("plan", cfg, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["combined"] == summary["tensors"] > 0
    assert [s["file"] for s in summary["shards"]] == sorted(
        n for n in os.listdir(tiny_checkpoints["target"]) if n.endswith(".safetensors"))
    assert any("max_position_embeddings" in w for w in summary["warnings"])
    assert summary["side_files"]["config.json"] == "target"
    assert summary["side_files"]["chat_template.jinja"] == "finetuned"
    assert not (tmp_path / "out").exists()
    human = graft("plan", cfg)
    assert human.returncode == 0 and "combined" in human.stdout


def test_plan_exits_nonzero_and_lists_every_problem(tiny_checkpoints, tmp_path):
    # A "fine-tune" holding one tensor, of the wrong shape: two kinds of problem at once.
    ft = tmp_path / "ft"
    ft.mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(3)}, str(ft / "model.safetensors"))
    cfg = write_config(tmp_path, dict(tiny_checkpoints, finetuned=str(ft)))
    r = graft("plan", cfg)
    assert r.returncode == 3  # refused
    lines = r.stderr.strip().splitlines()
    assert any("missing from finetuned" in line for line in lines)
    assert any("model.embed_tokens.weight" in line and "shape" in line for line in lines)


def test_plan_reports_an_unusable_output(tiny_checkpoints, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    r = graft("plan", write_config(tmp_path, tiny_checkpoints))
    assert r.returncode == 3 and "not empty" in r.stderr


def test_plan_reports_an_unfinished_run_without_waiting_to_judge_it(tiny_checkpoints, tmp_path):
    """graft plan reads an unfinished run's mark and says what graft run will do; it does not watch
    the mark for the stale period (that is graft run's job), and it does not take it for a live run."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".graft-run.json").write_text(json.dumps({"token": "t", "host": "elsewhere", "pid": 7, "beat": 3}))
    started = time.monotonic()
    r = graft("plan", write_config(tmp_path, tiny_checkpoints))
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - started < 25  # did not watch the mark for 30 s
    assert "note: " in r.stdout and "host elsewhere" in r.stdout and "watches it for up to 30s" in r.stdout


def test_inspect_lists_tensors_dtypes_and_shards(tiny_checkpoints):
    r = graft("inspect", tiny_checkpoints["finetuned"])
    assert r.returncode == 0
    assert "model.layers.0.self_attn.q_proj.weight" in r.stdout and "F32" in r.stdout
    j = json.loads(graft("inspect", tiny_checkpoints["target"], "--json").stdout)
    assert j["tensors"]["model.embed_tokens.weight"]["dtype"] == "BF16"
    assert len(j["files"]) > 1


def test_a_config_json_that_is_a_json_array_is_one_line_naming_it(copy_checkpoints, tmp_path):
    """Once an internal error (AttributeError); inspect still lists the tensors and says why."""
    config = os.path.join(copy_checkpoints["target"], "config.json")
    text = open(config).read()
    open(config, "w").write(f"[{text}]")
    r = graft("plan", write_config(tmp_path, copy_checkpoints))
    assert r.returncode == 3 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"graft: error: {config}: not a JSON object (it holds a list)"), r.stderr
    r = graft("inspect", copy_checkpoints["target"])
    assert r.returncode == 0 and "not transferable by graft:" in r.stdout and "not a JSON object" in r.stdout


def test_errors_are_one_line_naming_the_file_and_tracebacks_only_with_debug(copy_checkpoints, tmp_path):
    shard = sorted(n for n in os.listdir(copy_checkpoints["target"]) if n.endswith(".safetensors"))[0]
    path = os.path.join(copy_checkpoints["target"], shard)
    os.truncate(path, os.path.getsize(path) - 1)
    cfg = write_config(tmp_path, copy_checkpoints)
    r = graft("run", cfg)
    assert r.returncode == 3  # an unusable input: refused
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("graft: error: ")
    assert shard in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    d = graft("run", cfg, "--debug")
    assert d.returncode == 3 and "Traceback" in d.stderr


@pytest.mark.parametrize("args,needle", [
    (["--set", "alpah=2"], "did you mean 'alpha'"),
    (["--set", "compute_dtype=float16"], "compute_dtype"),
    (["--set", "rules=[{match: '(', alpha: 1}]"], "rules.0.match"),
    (["--set", "alpha"], "expected key=value"),
])
def test_bad_config_gives_one_line_naming_the_key(tiny_checkpoints, tmp_path, args, needle):
    r = graft("run", write_config(tmp_path, tiny_checkpoints), *args)
    assert r.returncode == 2  # a spec error is a usage error
    assert needle in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_progress_draws_a_bar_on_a_tty_and_log_lines_otherwise(caplog):
    tty = io.StringIO()
    p = Progress(1000, tty, tty=True, interval=0)
    p.update(500)
    p.update(500)
    p.close()
    assert "\r[###############" in tty.getvalue() and "100.0%" in tty.getvalue() and "ETA" in tty.getvalue()
    plain = io.StringIO()
    p = Progress(1000, plain, tty=False, interval=0, shards=4)
    for event in ("done", "done", "retried", "done", "done"):
        p.shard(event)
    with caplog.at_level("INFO", logger="graft.progress"):
        p.update(1000)
    assert plain.getvalue() == ""  # not a terminal: log records, which the command timestamps
    (line,) = [r.getMessage() for r in caplog.records if r.name == "graft.progress"]
    assert line.startswith("100.0% ") and "\r" not in line
    assert "shards 4/4 done, 1 retried" in line


def test_engine_never_imports_ray():
    code = ("import sys, graft.engine.run.local, graft.engine.run.session, graft.engine.run.execute, graft.engine.formats.manifest;"
            "sys.exit(1 if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    engine_dir = os.path.dirname(__import__("graft.engine", fromlist=["x"]).__file__)
    for folder, _, files in os.walk(engine_dir):
        for name in files:
            if name.endswith(".py"):
                src = open(os.path.join(folder, name)).read()
                assert "import ray" not in src and "from ray" not in src, name


@pytest.mark.parametrize("executor, sig, code", [("local", signal.SIGINT, 130), ("local", signal.SIGTERM, 143),
                                                 ("ray", signal.SIGINT, 130), ("ray", signal.SIGTERM, 143)])
def test_an_interrupted_run_keeps_its_shards_and_the_same_command_resumes_bit_identically(
        tiny_checkpoints, tmp_path, executor, sig, code):
    ref = tmp_path / "ref"
    assert graft("run", _config_to(tmp_path, tiny_checkpoints, ref), "-q", "--executor", "local").returncode == 0
    # Eight elements per chunk makes this tiny job take seconds; signal once a shard is committed
    # (journaled in the run mark) and another is being written (its temporary file exists).
    cfg = write_config(tmp_path, tiny_checkpoints, chunk_size=32, report="off")
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    shards = [n for n in os.listdir(ref) if n.endswith(".safetensors")]
    # A shell's background job inherits SIGINT ignored; give graft the terminal default back.
    proc = subprocess.Popen([*GRAFT, "run", cfg, "-q", "--executor", executor], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 180
        while not (out.exists() and any(".graft-tmp-" in n for n in os.listdir(out))
                   and _journaled(out)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    kept = sorted(n for n in os.listdir(out) if n in shards)
    assert f"{len(kept)} of {len(shards)} shard(s) are committed and kept" in err, (err[-400:], os.listdir(out))
    assert "run the same command again to resume" in err
    assert ("SIGTERM" in err) == (sig == signal.SIGTERM)
    assert kept and sorted(os.listdir(out)) == sorted([*kept, ".graft-run.json"])  # no temporaries
    # The same command (faster chunks do not change the job) resumes at once and keeps those shards.
    again = graft("run", cfg, "--set", "chunk_size=1MiB", "-q", "-v", "--executor", "local")
    assert again.returncode == 0, again.stderr
    assert f"resuming: keeping {len(kept)} shard(s)" in again.stderr
    assert shard_bytes(str(out)) == shard_bytes(str(ref))
    assert graft("verify", str(out)).returncode == 0


def _journaled(out) -> list[str]:  # noqa: ANN001
    """Shards the run mark lists as committed (empty while there is none or it is being rewritten)."""
    try:
        return list(json.loads((out / ".graft-run.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return []


def _config_to(tmp_path, ckpts: dict[str, str], out) -> str:  # noqa: ANN001
    path = tmp_path / "ref.yaml"
    path.write_text(yaml.safe_dump({**ckpts, "output": str(out)}))
    return str(path)


def test_a_failed_run_says_what_it_kept_on_one_line_and_graft_clean_removes_it(copy_checkpoints, tmp_path):
    from conftest import poison

    poison(copy_checkpoints["target"], float("nan"))  # the last shard fails; the others commit first
    config = write_config(tmp_path, copy_checkpoints)
    out = tmp_path / "out"
    proc = graft("run", config, "--executor", "local", "--workers", "1", "-q")
    assert proc.returncode == 6  # NaN refused
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("graft: error:")]
    assert "NaN" in line or "nan" in line
    assert line.endswith(f"3 of 4 shard(s) are committed and kept in {out}: fix the cause and run the same "
                         f"command to resume (or remove them: graft clean {out})")
    cleaned = graft("clean", str(out))
    assert cleaned.returncode == 0 and "removed 4 file(s) of an unfinished graft run" in cleaned.stdout
    assert os.listdir(out) == []
    again = graft("clean", str(out))
    assert again.returncode == 3 and "nothing to clean" in again.stderr


# -- the CLI contract: exit codes, --json on every command, quiet broken pipes, flags, storage options --

def in_process(capsys, *argv: str) -> tuple[int, str, str]:  # noqa: ANN001
    from graft.cluster.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """graft's real backoff, in milliseconds instead of seconds (the attempts are the same)."""
    from graft.engine.storage import retry

    monkeypatch.setattr(retry, "RETRY_BASE_SECONDS", 0.002)
    monkeypatch.setattr(retry, "RETRY_MAX_SECONDS", 0.02)


@pytest.fixture
def committed(tiny_checkpoints, tmp_path, capsys):  # noqa: ANN001, ANN201
    """A committed output of the tiny job (local executor) and its config."""
    from graft.cluster.cli import main

    cfg = write_config(tmp_path, tiny_checkpoints)
    assert main(["run", cfg, "--executor", "local", "-q"]) == 0
    capsys.readouterr()
    return str(tmp_path / "out"), cfg


def test_every_command_prints_one_json_object_with_the_prose_fields(capsys, tiny_checkpoints, committed, tmp_path):
    out, cfg = committed
    code, stdout, err = in_process(capsys, "verify", out, "--json")
    v = json.loads(stdout)
    assert code == 0 and v["ok"] is True and v["uri"] == out and len(v["checked"]) > 1 and v["problems"] == []
    code, stdout, _ = in_process(capsys, "inspect", out, "--json")
    i = json.loads(stdout)
    assert code == 0 and i["bytes"] > 0 and sum(i["dtypes"].values()) == len(i["tensors"])
    code, stdout, _ = in_process(capsys, "report", out, "--json")
    assert code == 0 and isinstance(json.loads(stdout), dict)
    code, stdout, _ = in_process(capsys, "plan", cfg, "--json", "--set", f"output={tmp_path / 'other'}")
    assert code == 0 and json.loads(stdout)["tensors"] > 0
    code, stdout, err = in_process(capsys, "run", cfg, "--json", "--executor", "local",
                                   "--set", f"output={tmp_path / 'again'}")
    r = json.loads(stdout)
    assert code == 0 and r["output"] == str(tmp_path / "again") and r["shards"] == 4 and r["write_bytes"] > 0
    assert r["verify_command"] == f"graft verify {r['output']}" and "tensors" in err  # the log on stderr
    diff_cfg = tmp_path / "diff.yaml"
    diff_cfg.write_text(yaml.safe_dump({"finetuned": tiny_checkpoints["finetuned"], "base": tiny_checkpoints["base"],
                                        "output": str(tmp_path / "d")}))
    code, stdout, _ = in_process(capsys, "diff", str(diff_cfg), "--json", "--executor", "local", "-q")
    assert code == 0 and json.loads(stdout)["output"] == str(tmp_path / "d")
    code, stdout, _ = in_process(capsys, "schema", "--json")
    assert code == 0 and "properties" in json.loads(stdout)


def test_a_failed_verify_is_exit_5_and_a_json_error_listing_every_problem(capsys, committed):
    out, _ = committed
    shards = sorted(p for p in os.listdir(out) if p.endswith(".safetensors"))
    for shard in shards[:2]:
        with open(os.path.join(out, shard), "r+b") as f:
            f.seek(-1, 2)
            last = f.read(1)
            f.seek(-1, 2)
            f.write(bytes([last[0] ^ 1]))
    code, stdout, err = in_process(capsys, "verify", out, "--json")
    v = json.loads(stdout)
    assert code == 5 and v["ok"] is False and v["error"]["exit"] == "integrity" and v["error"]["exit_code"] == 5
    assert len(v["error"]["problems"]) == 2 and all(s in " ".join(v["error"]["problems"]) for s in shards[:2])
    assert "graft: FAILED" in err


def test_a_refused_plan_under_json_lists_every_problem(capsys, tiny_checkpoints, tmp_path):
    ft = tmp_path / "ft"
    ft.mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(3)}, str(ft / "model.safetensors"))
    code, stdout, err = in_process(capsys, "plan", write_config(tmp_path, dict(tiny_checkpoints, finetuned=str(ft))),
                                   "--json")
    error = json.loads(stdout)["error"]
    assert code == 3 and error["kind"] == "PlanError" and error["exit"] == "refused" and len(error["problems"]) > 1
    assert err.count("graft: error: ") == len(error["problems"])


def test_a_nan_refused_under_json_is_exit_6(capsys, copy_checkpoints, tmp_path):
    from conftest import poison

    poison(copy_checkpoints["target"], float("nan"))
    code, stdout, _ = in_process(capsys, "run", write_config(tmp_path, copy_checkpoints), "--executor", "local",
                                 "-q", "--json", "--workers", "1")
    error = json.loads(stdout)["error"]
    assert code == 6 and error["kind"] == "NonFiniteError" and error["exit"] == "nonfinite"


@pytest.mark.parametrize("command", ["run", "diff", "plan", "verify", "report", "inspect", "clean", "push"])
def test_the_same_storage_option_flag_reaches_the_store_on_every_command_and_a_store_that_stays_down_is_exit_4(
        capsys, tiny_checkpoints, tmp_path, fast_retries, command):
    """faulty:// (tests/faulty_fs.py) is the local disk with a listing that always fails the way a
    store that stays unreachable does; its rules travel only in --storage-option."""
    from faulty_fs import count, faulty_uri, rule

    journal = str(tmp_path / "journal")
    options = ["--storage-option", f"faulty.journal={journal}", "--storage-option",
               "faulty.rules=" + json.dumps([rule("reset", op="list", times=None)])]
    if command in ("run", "diff", "plan"):
        roles = ("finetuned", "base") if command == "diff" else ("target", "finetuned", "base")
        cfg = write_config(tmp_path, {r: faulty_uri(tiny_checkpoints[r]) for r in ("target", "finetuned", "base")})
        if command == "diff":
            spec = yaml.safe_load(open(cfg))
            del spec["target"]
            open(cfg, "w").write(yaml.safe_dump(spec))
        argv = [command, cfg, *(["--executor", "local"] if command != "plan" else [])]
        assert roles
    else:
        argv = [command, faulty_uri(tiny_checkpoints["target"]), *(["hf://org/name"] if command == "push" else [])]
    code, stdout, err = in_process(capsys, *argv, *options, "--json")
    error = json.loads(stdout)["error"]
    assert code == 4 and error["exit"] == "retryable" and error["kind"] == "StorageError", err
    assert count(journal)[("reset", "list")] >= 1  # the option reached the store
    assert not (tmp_path / "out").exists()


def test_report_json_draws_no_picture_unless_asked(capsys, committed, tmp_path, monkeypatch):
    out, _ = committed
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = in_process(capsys, "report", out, "--json")
    assert code == 0 and json.loads(stdout) and not (tmp_path / "graft-report.png").exists()
    code, stdout, err = in_process(capsys, "report", out, "--json", "--png", "r.png")
    assert code == 0 and json.loads(stdout) and (tmp_path / "r.png").exists() and "wrote r.png" in err


def test_a_device_that_is_not_one_is_a_usage_error_and_leaves_no_output(capsys, tiny_checkpoints, tmp_path):
    cfg = write_config(tmp_path, tiny_checkpoints)
    code, stdout, err = in_process(capsys, "run", cfg, "--executor", "local", "--device", "gpu")
    assert code == 2 and err.count("\n") == 1 and "--device" in err and "cpu, cuda or cuda:N" in err
    assert not (tmp_path / "out").exists()
    if not torch.cuda.is_available():
        code, stdout, err = in_process(capsys, "run", cfg, "--executor", "local", "--device", "cuda")
        assert code == 2 and "not a CUDA device here" in err and not (tmp_path / "out").exists()


def test_diff_plan_and_plan_diff_are_the_same_and_run_plan_is_plan(capsys, tiny_checkpoints, tmp_path):
    diff_cfg = tmp_path / "diff.yaml"
    diff_cfg.write_text(yaml.safe_dump({"finetuned": tiny_checkpoints["finetuned"], "base": tiny_checkpoints["base"],
                                        "output": str(tmp_path / "d")}))
    def plan(*argv: str) -> dict:
        summary = json.loads(in_process(capsys, *argv, "--json")[1])
        del summary["local_run"]["available_memory"]  # of this machine, now
        return summary

    a = plan("plan", "--diff", str(diff_cfg))
    assert a == plan("diff", str(diff_cfg), "--plan") and a["tensors"] > 0 and not (tmp_path / "d").exists()
    cfg = write_config(tmp_path, tiny_checkpoints)
    assert plan("run", cfg, "--plan") == plan("plan", cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [
    ["plan", "{cfg}", "--json"], ["plan", "{cfg}"], ["inspect", "{target}", "--json"], ["inspect", "{target}"],
    ["schema"], ["verify", "{out}", "--json"], ["report", "{out}", "--json"], ["--help"],
], ids=lambda a: " ".join(a))
def test_a_reader_that_goes_away_gets_a_quiet_exit_141(committed, tiny_checkpoints, argv):
    """`graft plan job.yaml --json | head -1`: the pipe is closed before graft writes a byte."""
    out, cfg = committed
    argv = [a.format(cfg=cfg, target=tiny_checkpoints["target"], out=out) for a in argv]
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    try:
        proc = subprocess.run([*GRAFT, *argv], stdout=write_end, stderr=subprocess.PIPE, text=True, env=env,
                              timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr
