"""The ``graft`` command line as a contract a pipeline relies on, without running a job: the exit-code
table, flags refused before anything is read or written, one storage-option flag on every command,
``--json`` errors, and ``graft schema``. (Jobs that run are in tests/integration/test_cli.py.)"""
from __future__ import annotations

import glob
import json
import os

import jsonschema
import pytest
import yaml

from graft.cluster import cli, cli_flags, exits
from graft.cluster.commands import jobs
from graft.cluster.cli_flags import MAX_SHARDS_PER_WORKER
from graft.engine import errors
from graft.engine.plan.specfile import _SpecModel, spec_from_mapping, spec_schema

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMANDS = ["run", "diff", "plan", "verify", "report", "inspect", "push", "clean", "schema"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_every_exit_code_is_distinct_listed_in_help_and_clear_of_the_shells_own():
    codes = [e.code for e in exits.EXITS]
    assert len(set(codes)) == len(codes) and len({e.name for e in exits.EXITS}) == len(codes)
    signals = {exits.INTERRUPTED.code: 2, exits.BROKEN_PIPE.code: 13, exits.TERMINATED.code: 15}
    for code in codes:
        # 126 and 127 are the shell's; 128+n only as the signal n itself ended the command.
        assert code < 126 or signals.get(code) == code - 128, code
    text = cli.build_parser().format_help()
    for e in exits.EXITS:
        assert f"{e.code:>3}  {e.name}" in text


@pytest.mark.parametrize("error, code", [
    (errors.SpecError("x"), exits.USAGE),
    (errors.PlanError("x"), exits.REFUSED),
    (errors.QuantizationError("x"), exits.REFUSED),
    (errors.CheckpointError("x"), exits.REFUSED),
    (errors.HeaderError("x"), exits.REFUSED),
    (errors.OutputError("x"), exits.REFUSED),
    (errors.NotFoundError("x"), exits.REFUSED),
    (errors.StorageError("x"), exits.RETRYABLE),
    (errors.IntegrityError("x"), exits.INTEGRITY),
    (errors.NonFiniteError("x"), exits.NONFINITE),
    (errors.GraftError("x"), exits.FAILED),
    (RuntimeError("x"), exits.INTERNAL),
])
def test_each_error_class_has_its_exit(error, code):
    assert exits.exit_for(error) == code


def test_every_graft_error_class_is_placed_in_the_table():
    """A new error class must be given an exit on purpose, not fall into "failed" unnoticed."""
    for name in errors.__all__:
        cls = getattr(errors, name)
        if issubclass(cls, errors.GraftError) and cls is not errors.GraftError:
            assert exits.exit_for(cls("x")) is not exits.FAILED, name


def test_an_unexpected_exception_is_an_internal_error_with_the_traceback_hint(capsys, monkeypatch):
    def broken(args):  # noqa: ANN001, ANN202 - a bug inside a command
        raise KeyError("oops")

    monkeypatch.setattr(jobs, "cmd_schema", broken)
    code, out, err = run(capsys, "schema")
    assert code == exits.INTERNAL.code == 70
    assert err.startswith("graft: internal error: KeyError") and "--debug" in err and out == ""
    code, out, err = run(capsys, "schema", "--json")
    assert code == 70 and json.loads(out)["error"]["kind"] == "KeyError"
    assert json.loads(out)["error"]["exit"] == "internal"


@pytest.mark.parametrize("argv, flag, says", [
    (["--device", "gpu", "--executor", "local"], "--device", "use cpu, cuda or cuda:N"),
    (["--device", "cuda:99", "--executor", "local"], "--device", "not a CUDA device here"),
    (["--workers", "-1"], "--workers", "at least 1"),
    (["--workers", "0"], "--workers", "at least 1"),
    (["--threads", "0", "--executor", "local"], "--threads", "at least 1"),
    (["--shards-per-worker", "20"], "--shards-per-worker", f"from 1 to {MAX_SHARDS_PER_WORKER}"),
    (["--shards-per-worker", "0"], "--shards-per-worker", f"from 1 to {MAX_SHARDS_PER_WORKER}"),
    (["--cpus-per-worker", "0"], "--cpus-per-worker", "above 0"),
    (["--gpus-per-worker", "-1"], "--gpus-per-worker", "at least 0"),
    (["--start-timeout", "0"], "--start-timeout", "above 0"),
    (["--start-timeout", "nan"], "--start-timeout", "above 0"),
    (["--executor", "local", "--shards-per-worker", "2"], "--shards-per-worker", "--executor ray only"),
    (["--executor", "local", "--address", "ray://x:10001"], "--address", "--executor ray only"),
    (["--threads", "2"], "--threads", "--executor local only"),
    (["--storage-option", "s3endpoint"], "--storage-option", "PROTO.KEY=VALUE"),
])
@pytest.mark.parametrize("command", ["run", "diff"])
def test_a_bad_flag_is_one_usage_line_naming_it_and_nothing_is_read_or_written(capsys, tmp_path, command, argv,
                                                                              flag, says):
    config = tmp_path / "job.yaml"  # never read: the flags are refused first (it does not even exist)
    code, out, err = run(capsys, command, str(config), *argv)
    assert code == exits.USAGE.code == 2
    assert err.count("\n") == 1 and err.startswith("graft: error: ") and flag in err and says in err, err
    assert "internal error" not in err and out == ""
    assert os.listdir(tmp_path) == []


def test_a_bad_flag_under_json_is_a_json_error_on_stdout(capsys, tmp_path):
    code, out, err = run(capsys, "plan", str(tmp_path / "job.yaml"), "--workers", "-1", "--json")
    error = json.loads(out)["error"]
    assert code == 2 and error["exit_code"] == 2 and error["exit"] == "usage" and error["kind"] == "UsageError"
    assert "--workers" in error["message"] and error["problems"] == [error["message"]]
    assert err.startswith("graft: error: ") and "--workers" in err


def test_report_and_limit_numbers_are_checked(capsys, tmp_path):
    code, _, err = run(capsys, "report", str(tmp_path), "--limit", "-1")
    assert code == 2 and "--limit" in err


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "schema"])
def test_every_command_takes_one_storage_option_flag_named_after_the_spec_key(command):
    positional = {"push": ["out", "hf://org/name"]}.get(command, ["x"])
    args = cli.build_parser().parse_args([command, *positional, "--storage-option", "s3.endpoint_url=http://m:9000",
                                          "--storage-option", "s3.anon=true"])
    assert args.storage_option == ["s3.endpoint_url=http://m:9000", "s3.anon=true"]
    if command in ("run", "diff", "plan"):  # there, the same as --set storage_options.PROTO.KEY=VALUE
        assert cli_flags.overrides(args) == ["storage_options.s3.endpoint_url=http://m:9000", "storage_options.s3.anon=true"]
    else:
        assert cli_flags.storage_options(args.storage_option) == {"s3": {"endpoint_url": "http://m:9000", "anon": True}}


def test_the_old_short_spelling_still_works_with_a_warning(capsys):
    args = cli.build_parser().parse_args(["verify", "x", "-o", "s3.anon=true"])
    assert args.storage_option == ["s3.anon=true"]
    assert "-o is deprecated; use --storage-option" in capsys.readouterr().err
    assert "-o" not in cli.build_parser().format_help()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_json(command):
    positional = {"push": ["out", "hf://org/name"], "schema": []}.get(command, ["x"])
    assert cli.build_parser().parse_args([command, *positional, "--json"]).json is True


def test_the_ray_bound_on_shards_per_worker_is_the_actors_own():
    from graft.cluster.actors import MAX_SHARDS

    assert MAX_SHARDS_PER_WORKER == MAX_SHARDS


# -- graft schema -------------------------------------------------------------------------------------

def test_graft_schema_prints_the_json_schema_of_every_spec_key(capsys):
    code, out, _ = run(capsys, "schema", "--json")
    schema = json.loads(out)
    assert code == 0 and schema == spec_schema()
    assert set(schema["properties"]) == set(_SpecModel.model_fields) - {"diff_dtype"}
    assert schema["required"] == ["output"] and schema["additionalProperties"] is False
    diff = json.loads(run(capsys, "schema", "--diff")[1])
    assert "diff_dtype" in diff["properties"] and "target" not in diff["properties"]


def test_the_example_configs_are_valid_against_the_schema_and_a_typo_is_not():
    validators = {kind: jsonschema.Draft202012Validator(spec_schema(kind)) for kind in ("transfer", "diff")}
    validator = validators["transfer"]
    configs = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
    assert configs
    for path in configs:
        data = yaml.safe_load(open(path, encoding="utf-8"))
        kind = "transfer" if "target" in data else "diff"  # graft diff's spec has no target
        errors_found = [e.message for e in validators[kind].iter_errors(data)]
        assert not errors_found, (path, errors_found)
        spec_from_mapping(data, source=path, kind=kind)  # and the real validation agrees
    bad = {"target": "t", "finetuned": "f", "base": "b", "output": "o", "alpah": 2, "vocab": "grow"}
    found = " ".join(e.message for e in validator.iter_errors(bad))
    assert "alpah" in found and "grow" in found
