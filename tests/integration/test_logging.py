"""graft's log lines are ``logging`` records of the ``graft.*`` loggers: a host application routes
them; the ``graft`` command prints them on stderr, timestamped (ISO-8601) when stderr is not a
terminal and as plain ``graft: ...`` lines on one."""
from __future__ import annotations

import io
import logging
import re
import subprocess
import sys

import yaml

import graft
from graft.cluster.progress import Progress, configure_logging

ISO_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d graft: \S")


def _spec(ckpts: dict[str, str], output: str) -> dict:
    return {"target": ckpts["target"], "finetuned": ckpts["finetuned"], "base": ckpts["base"],
            "output": output}


def test_a_library_users_logger_receives_graft_records(tiny_checkpoints, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="graft"):
        result = graft.run(_spec(tiny_checkpoints, str(tmp_path / "out")), progress=True)
    names = {r.name for r in caplog.records}
    assert {"graft.run", "graft.progress"} <= names, names
    messages = [r.getMessage() for r in caplog.records if r.name == "graft.run"]
    assert any(m.startswith(f"committed {result.output}") for m in messages), messages
    assert any(r.getMessage().startswith("100.0% ") for r in caplog.records if r.name == "graft.progress")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("input dtypes differ" in w for w in warnings), warnings  # the plan's, as the CLI logs them


def test_the_command_timestamps_its_log_lines_when_stderr_is_not_a_terminal(tiny_checkpoints, tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(_spec(tiny_checkpoints, str(tmp_path / "out"))))
    r = subprocess.run([sys.executable, "-m", "graft", "run", str(cfg), "--executor", "local", "-v"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) >= 3, r.stderr  # the plan line, warnings, shards (-v), progress, the commit
    assert all(ISO_LINE.match(line) for line in lines), r.stderr
    assert any("committed" in line for line in lines) and any("% " in line for line in lines)
    assert r.stdout.startswith("wrote ")  # the result stays on stdout, untimestamped


def test_on_a_terminal_the_lines_stay_plain_and_the_bar_stays_live(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    try:
        configure_logging(tty=True)
        logging.getLogger("graft.cli").info("resuming: keeping 2 shard(s) already committed")
        bar = Progress(100, err, tty=True, interval=0)
        bar.update(100)
        bar.close()
    finally:
        for h in list(logging.getLogger("graft").handlers):
            logging.getLogger("graft").removeHandler(h)
    text = err.getvalue()
    assert text.startswith("graft: resuming: keeping 2 shard(s) already committed\n")
    assert "\r[" in text and "100.0%" in text
