"""The job spec: defaults, normalisation, rules, overrides, redaction, and a one-line ``SpecError``
naming the key for every invalid spec.
"""
from __future__ import annotations

import os

import pytest
import yaml

from graft.engine.errors import SpecError
from graft.engine.plan.spec import DEFAULT_FILES, JobSpec, Rule, parse_size
from graft.engine.plan.specfile import apply_overrides, load_spec, spec_from_mapping

MINIMAL = {"target": "/ck/target", "finetuned": "/ck/ft", "base": "/ck/base", "output": "/ck/out"}


def _spec(**changes) -> JobSpec:
    return spec_from_mapping({**MINIMAL, **changes}, source="job.yaml")


def _write(tmp_path, data, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def _error(data=None, *, text: str | None = None, overrides=(), tmp_path=None) -> str:
    """The one-line SpecError message for an invalid spec (given as a mapping or as YAML text)."""
    with pytest.raises(SpecError) as caught:
        if tmp_path is not None:
            load_spec(_write(tmp_path, text if text is not None else data), overrides)
        else:
            spec_from_mapping(data, source="job.yaml")
    msg = str(caught.value)
    assert "\n" not in msg, msg
    return msg


# --- defaults and normalisation ------------------------------------------------------------------


def test_defaults_of_a_minimal_spec():
    spec = _spec()
    assert spec.alpha == 1.0
    assert spec.compute_dtype == "float32"
    assert spec.on_missing == "error"
    assert spec.allow_nonfinite is False
    assert spec.rules == ()
    assert spec.max_shard_size is None
    assert spec.chunk_size == 16 * 2**20
    assert spec.storage_options == {}
    assert spec.files == DEFAULT_FILES


@pytest.mark.parametrize("name,donor", [
    ("config.json", "target"),
    ("tokenizer.json", "finetuned"),
    ("tokenizer_config.json", "finetuned"),
    ("generation_config.json", "finetuned"),
    ("chat_template.jinja", "finetuned"),  # via the chat_template.* pattern
    ("chat_template.json", "finetuned"),
    ("README.md", None),
    ("pytorch_model.bin", None),
])
def test_default_donor_of_each_side_file(name, donor):
    assert _spec().donor_for(name) == donor


def test_relative_paths_become_absolute_against_the_working_directory():
    spec = spec_from_mapping({"target": "ck/target", "finetuned": "./ck/ft", "base": "../ck/base",
                              "output": "out/"})
    assert spec.target == os.path.abspath("ck/target")
    assert spec.finetuned == os.path.abspath("ck/ft")
    assert spec.base == os.path.abspath("../ck/base")
    assert spec.output == os.path.abspath("out")
    assert all(os.path.isabs(p) for p in (spec.target, spec.finetuned, spec.base, spec.output))


def test_home_is_expanded_and_uris_are_kept_without_a_trailing_slash():
    spec = _spec(target="~/models/t", finetuned="s3://bucket/ft/", base="memory://b")
    assert spec.target == os.path.join(os.path.expanduser("~"), "models", "t")
    assert spec.finetuned == "s3://bucket/ft"
    assert spec.base == "memory://b"


@pytest.mark.parametrize("text,expected", [
    ("5GB", 5 * 10**9),
    ("16MiB", 16 * 2**20),
    ("512KiB", 512 * 1024),
    ("2TB", 2 * 10**12),
    ("1gib", 2**30),
    (" 300 MB ", 300 * 10**6),
    ("1.5GB", 1_500_000_000),
    ("4096", 4096),
    (4096, 4096),
])
def test_sizes_parse_to_bytes(text, expected):
    assert parse_size(text, "max_shard_size") == expected


def test_sizes_in_a_spec_are_parsed():
    spec = _spec(max_shard_size="5GB", chunk_size="16MiB", max_side_file_size="2GiB")
    assert spec.max_shard_size == 5 * 10**9
    assert spec.chunk_size == 16 * 2**20
    assert spec.max_side_file_size == 2 * 2**30


def test_side_files_are_capped_at_512_mib_by_default():
    assert _spec().max_side_file_size == 512 * 2**20
    assert _spec().to_dict()["max_side_file_size"] == 512 * 2**20


def test_fractional_sizes_are_exact():
    assert parse_size("2.01KB", "max_shard_size") == 2010
    assert parse_size("8.03KB", "max_shard_size") == 8030


def test_first_matching_rule_wins_then_the_global_alpha():
    spec = _spec(alpha=0.7, rules=[
        {"match": r"^lm_head\.", "alpha": 0.0},
        {"match": r"embed", "alpha": 0.25},
        {"match": r"\.weight$", "alpha": 2.0},
    ])
    assert spec.rules == (Rule(r"^lm_head\.", 0.0), Rule("embed", 0.25), Rule(r"\.weight$", 2.0))
    assert spec.alpha_for("lm_head.weight") == 0.0       # matches rules 1 and 3: the first wins
    assert spec.alpha_for("model.embed_tokens.weight") == 0.25  # rules 2 and 3
    assert spec.alpha_for("model.norm.weight") == 2.0
    assert spec.alpha_for("model.norm.bias") == 0.7      # no rule: the global alpha


def test_rule_match_is_a_search_not_a_full_match():
    spec = _spec(rules=[{"match": "mlp", "alpha": 0.5}])
    assert spec.alpha_for("model.layers.3.mlp.up_proj.weight") == 0.5


def test_user_files_entries_override_the_defaults_and_none_copies_nothing():
    spec = _spec(files={"config.json": "finetuned", "tokenizer.json": "none", "extra.txt": "base"})
    assert spec.donor_for("config.json") == "finetuned"
    assert spec.donor_for("tokenizer.json") is None
    assert spec.donor_for("extra.txt") == "base"
    assert spec.donor_for("vocab.json") == "finetuned"  # untouched defaults remain
    assert [p for p, _ in spec.files].count("config.json") == 1


def test_user_file_patterns_come_before_default_patterns():
    spec = _spec(files={"chat_template.*": "target"})
    assert spec.donor_for("chat_template.jinja") == "target"


def test_load_spec_reads_yaml(tmp_path):
    path = _write(tmp_path, "target: /t\nfinetuned: /f\nbase: /b\noutput: /o\nalpha: 0.5\n"
                            "compute_dtype: float64\non_missing: carry_target\n")
    spec = load_spec(path)
    assert (spec.target, spec.finetuned, spec.base, spec.output) == ("/t", "/f", "/b", "/o")
    assert (spec.alpha, spec.compute_dtype, spec.on_missing) == (0.5, "float64", "carry_target")


# --- invalid specs: one line naming the key ------------------------------------------------------


def test_unknown_top_level_key_suggests_the_closest():
    msg = _error({**MINIMAL, "alpah": 0.5})
    assert msg.startswith("job.yaml: ")
    assert "unknown key 'alpah'" in msg and "did you mean 'alpha'?" in msg


def test_unknown_key_far_from_any_lists_the_valid_keys():
    msg = _error({**MINIMAL, "zzzzzz": 1})
    assert "unknown key 'zzzzzz'" in msg and "valid keys:" in msg and "compute_dtype" in msg


def test_unknown_key_in_a_rule_is_named_with_its_rule():
    msg = _error({**MINIMAL, "rules": [{"match": "x", "alpha": 0}, {"match": "y", "alhpa": 0}]})
    assert "rules[1]" in msg and "unknown key 'alhpa'" in msg and "did you mean 'alpha'?" in msg


def test_bad_regex_in_a_rule_is_refused():
    msg = _error({**MINIMAL, "rules": [{"match": "(unclosed", "alpha": 0}]})
    assert "rules.0.match" in msg and "invalid regular expression" in msg and "(unclosed" in msg


def test_compute_dtype_float16_is_refused():
    msg = _error({**MINIMAL, "compute_dtype": "float16"})
    assert "'compute_dtype'" in msg and "float32" in msg and "float64" in msg and "'float16'" in msg


def test_bad_on_missing_value_is_refused():
    msg = _error({**MINIMAL, "on_missing": "skip"})
    assert "'on_missing'" in msg and "carry_target" in msg and "'skip'" in msg


def test_bad_file_donor_is_refused():
    msg = _error({**MINIMAL, "files": {"config.json": "output"}})
    assert "files.config.json" in msg and "'output'" in msg


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_alpha_is_refused(tmp_path, value):
    text = "target: /t\nfinetuned: /f\nbase: /b\noutput: /o\n" + f"alpha: {value}\n"
    msg = _error(text=text, tmp_path=tmp_path)
    assert msg.startswith("job.yaml: ") and "'alpha'" in msg and "finite" in msg


def test_non_finite_rule_alpha_is_refused(tmp_path):
    text = "target: /t\nfinetuned: /f\nbase: /b\noutput: /o\nrules:\n  - {match: x, alpha: .nan}\n"
    msg = _error(text=text, tmp_path=tmp_path)
    assert "'rules.0.alpha'" in msg and "finite" in msg


@pytest.mark.parametrize("key,value", [
    ("max_shard_size", "5 gigs"), ("max_shard_size", "GB"), ("max_shard_size", "-5GB"),
    ("max_shard_size", 0), ("chunk_size", "0MiB"), ("chunk_size", [1]),
])
def test_bad_size_is_refused(key, value):
    msg = _error({**MINIMAL, key: value})
    assert f"key '{key}" in msg


@pytest.mark.parametrize("key", ["chunk_size", "max_shard_size"])
def test_boolean_size_is_refused(key):
    with pytest.raises(SpecError, match=f"'{key}'"):
        spec_from_mapping({**MINIMAL, key: True}, source="job.yaml")


def test_missing_required_key_output_is_refused():
    msg = _error({k: v for k, v in MINIMAL.items() if k != "output"})
    assert "'output'" in msg and "required" in msg.lower()


def test_empty_output_is_refused():
    msg = _error({**MINIMAL, "output": ""})
    assert "'output'" in msg


def test_yaml_that_is_a_list_is_refused(tmp_path):
    msg = _error(text="- target: /t\n- output: /o\n", tmp_path=tmp_path)
    assert "job.yaml" in msg and "expected a mapping" in msg


def test_invalid_yaml_is_refused(tmp_path):
    msg = _error(text="target: [unclosed\n", tmp_path=tmp_path)
    assert "job.yaml" in msg and "not valid YAML" in msg


def test_load_spec_on_a_missing_file_is_refused(tmp_path):
    with pytest.raises(SpecError, match="no such config file") as caught:
        load_spec(str(tmp_path / "absent.yaml"))
    assert "absent.yaml" in str(caught.value)


# --- overrides ----------------------------------------------------------------------------------


def test_set_alpha_overrides_the_file(tmp_path):
    path = _write(tmp_path, {**MINIMAL, "alpha": 1.0})
    assert load_spec(path, ["alpha=0.5"]).alpha == 0.5


def test_set_a_dotted_key_nests_into_storage_options(tmp_path):
    path = _write(tmp_path, {**MINIMAL, "storage_options": {"s3": {"anon": False}}})
    spec = load_spec(path, ["storage_options.s3.endpoint_url=http://127.0.0.1:9"])
    assert spec.storage_options == {"s3": {"anon": False, "endpoint_url": "http://127.0.0.1:9"}}


def test_set_rules_takes_a_yaml_list(tmp_path):
    spec = load_spec(_write(tmp_path, MINIMAL), ["rules=[{match: x, alpha: 0}]"])
    assert spec.rules == (Rule("x", 0.0),)


def test_later_overrides_win(tmp_path):
    spec = load_spec(_write(tmp_path, MINIMAL), ["alpha=0.5", "alpha=0.25"])
    assert spec.alpha == 0.25


def test_overrides_do_not_modify_the_input_mapping():
    data = {**MINIMAL, "storage_options": {"s3": {"anon": True}}}
    out = apply_overrides(data, ["storage_options.s3.anon=false", "alpha=2"])
    assert data == {**MINIMAL, "storage_options": {"s3": {"anon": True}}}
    assert out["storage_options"] == {"s3": {"anon": False}} and out["alpha"] == 2


def test_set_a_whole_files_mapping_for_names_with_dots(tmp_path):
    # Dotted keys nest, so a file name with a dot is set through its parent mapping.
    spec = load_spec(_write(tmp_path, MINIMAL), ["files={config.json: finetuned}"])
    assert spec.donor_for("config.json") == "finetuned"


def test_set_without_equals_is_refused():
    with pytest.raises(SpecError, match=r"expected key=value") as caught:
        apply_overrides(MINIMAL, ["alpha"])
    assert "'alpha'" in str(caught.value)


def test_set_of_an_unknown_key_suggests_the_closest(tmp_path):
    msg = _error(tmp_path=tmp_path, text=yaml.safe_dump(MINIMAL), overrides=["alpah=0.5"])
    assert "--set 'alpah=0.5'" in msg and "did you mean 'alpha'?" in msg


def test_set_with_an_invalid_value_is_refused_naming_the_key(tmp_path):
    msg = _error(tmp_path=tmp_path, text=yaml.safe_dump(MINIMAL), overrides=["compute_dtype=float16"])
    assert "'compute_dtype'" in msg


# --- redaction ----------------------------------------------------------------------------------


def test_to_dict_redacts_secrets_but_keeps_the_endpoint():
    spec = _spec(storage_options={"s3": {
        "key": "AKIAEXAMPLE", "secret": "s3cr3t", "token": "SESSIONTOKEN42", "endpoint_url": "http://127.0.0.1:9",
        "client_kwargs": {"aws_secret_access_key": "deep", "region_name": "eu-west-1"},
    }})
    d = spec.to_dict()
    s3 = d["storage_options"]["s3"]
    assert s3["key"] == s3["secret"] == s3["token"] == "***"
    assert s3["client_kwargs"]["aws_secret_access_key"] == "***"
    assert s3["endpoint_url"] == "http://127.0.0.1:9"
    assert s3["client_kwargs"]["region_name"] == "eu-west-1"
    for secret in ("AKIAEXAMPLE", "s3cr3t", "SESSIONTOKEN42", "deep"):
        assert secret not in repr(d)
    # The spec itself keeps the real values for the filesystems.
    assert spec.storage_options["s3"]["secret"] == "s3cr3t"
    assert spec.to_dict(redact_secrets=False)["storage_options"]["s3"]["key"] == "AKIAEXAMPLE"


def test_to_dict_redacts_an_azure_connection_string():
    conn = "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=QUJDREVGR0g=;EndpointSuffix=x"
    spec = _spec(storage_options={"az": {"connection_string": conn, "account_name": "acct"}})
    d = spec.to_dict()
    assert "QUJDREVGR0g=" not in repr(d)
    assert d["storage_options"]["az"]["account_name"] == "acct"


def test_to_dict_redacts_auth_headers_in_storage_options():
    spec = _spec(storage_options={
        "hf": {"headers": {"Authorization": "Bearer hunter2"}},
        "http": {"client_kwargs": {"headers": {"Cookie": "sid=hunter2", "Proxy-Authorization": "Basic hunter2",
                                               "X-Amz-Security-Token": "hunter2", "User-Agent": "graft"}}},
        "s3": {"endpoint_url": "http://minio:hunter2@127.0.0.1:9000"},
    })
    d = spec.to_dict()
    assert "hunter2" not in repr(d)
    assert d["storage_options"]["http"]["client_kwargs"]["headers"]["User-Agent"] == "graft"
    assert d["storage_options"]["s3"]["endpoint_url"] == "http://minio:***@127.0.0.1:9000"
    assert spec.storage_options["hf"]["headers"]["Authorization"] == "Bearer hunter2"


def test_to_dict_redacts_credentials_in_the_locations():
    spec = _spec(target="https://user:hunter2@host/models/llama",
                 finetuned="https://host/ft/model.safetensors?sv=2022&sig=hunter2",
                 base="s3://AKIA:hunter2@bucket/base", output="s3://bucket/out")
    d = spec.to_dict()
    assert "hunter2" not in repr(d)
    assert d["target"] == "https://user:***@host/models/llama"
    assert d["finetuned"] == "https://host/ft/model.safetensors?sv=2022&sig=***"
    assert d["output"] == "s3://bucket/out"
    assert spec.target == "https://user:hunter2@host/models/llama"  # the real one, for the I/O
    assert spec.to_dict(redact_secrets=False)["base"] == "s3://AKIA:hunter2@bucket/base"


def test_to_dict_is_plain_data():
    d = _spec(alpha=0.5, rules=[{"match": "x", "alpha": 0}]).to_dict()
    assert d["alpha"] == 0.5
    assert d["rules"] == [{"match": "x", "alpha": 0.0}]
    assert d["files"]["config.json"] == "target"
    assert yaml.safe_load(yaml.safe_dump(d)) == d


@pytest.mark.parametrize("name", ["demo.yaml", "s3.yaml", "hub.yaml"])
def test_shipped_example_configs_are_valid_specs(name):
    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    spec = load_spec(os.path.join(root, name))
    assert spec.alpha == 1.0 and spec.read_concurrency == 4


@pytest.mark.parametrize("value", [0, 65, True, "4"])
def test_read_concurrency_must_be_a_small_positive_integer(value):
    with pytest.raises(SpecError, match="read_concurrency"):
        spec_from_mapping({"target": "t", "finetuned": "f", "base": "b", "output": "o",
                           "read_concurrency": value})


def test_the_hub_is_refused_as_an_output_with_the_push_command_to_use():
    with pytest.raises(SpecError, match=r"graft push OUTPUT hf://org/name"):
        spec_from_mapping({"target": "t", "finetuned": "f", "base": "b", "output": "hf://org/name"})


# --- every key, every way to get it wrong ---------------------------------------------------------

# For each top-level key: invalid values, each with what the one-line error must say is allowed.
INVALID = {
    "target": [(5, "valid string"), ("", "at least 1 character"), (None, "valid string")],
    "finetuned": [(["a"], "valid string"), ("", "at least 1 character")],
    "base": [({"a": 1}, "valid string"), ("", "at least 1 character")],
    "output": [(3.5, "valid string"), ("", "at least 1 character"), ("hf://org/repo", "graft push")],
    "alpha": [("lots", "valid number"), (None, "valid number"), (float("inf"), "finite"), ([1], "valid number"),
              (True, "not a boolean")],
    "compute_dtype": [("bfloat16", "'float32' or 'float64'"), (32, "'float32' or 'float64'")],
    "vocab": [("resize", "'error', 'pad' or 'align'"), (True, "'error', 'pad' or 'align'")],
    "report": [("full", "'sampled', 'exact' or 'off'"), (True, "'sampled', 'exact' or 'off'"),
               (1, "'sampled', 'exact' or 'off'")],
    "output_format": [("fp8", "'target' or 'bf16'"), ("BF16", "'target' or 'bf16'"), (True, "'target' or 'bf16'")],
    "rules": [("x", "valid list"), ([5], "valid dictionary with keys match and alpha"),
              ([{"alpha": 0}], "Field required"), ([{"match": "x", "alpha": False}], "not a boolean"),
              ([{"match": "(", "alpha": 0}], "invalid regular expression"),
              ([{"match": "x", "alpha": "y"}], "valid number"),
              ([{"match": "x", "alhpa": 0}], "did you mean 'alpha'?"),
              ([{"match": "x", "alpha": 0, "beta": 1}], "valid keys: match, alpha")],
    "on_missing": [("skip", "'error' or 'carry_target'"), (True, "'error' or 'carry_target'")],
    "allow_nonfinite": [("maybe", "valid boolean"), ([], "valid boolean")],
    "allow_family_mismatch": [("perhaps", "valid boolean"), ({}, "valid boolean")],
    "files": [(["config.json"], "valid dictionary"),
              ({"config.json": "output"}, "use one of target, finetuned, base, none"),
              ({"config.json": "diffs[1].finetuned"}, "names diff 1, but the job has 1 diff(s)")],
    "diffs": [([{"finetuned": "a", "base": "b"}], "not both")],
    "diff": [("/d", "give either diff (a difference written by graft diff, or a LoRA adapter) or finetuned and base")],
    "max_shard_size": [("big", "a size like 5GB or 512MiB"), (0, "must be positive"), (True, "a size like")],
    "max_side_file_size": [("huge", "a size like 5GB or 512MiB"), ("0MiB", "must be positive"),
                           (False, "a size like")],
    "chunk_size": [("-1MiB", "a size like"), (0, "must be positive"), ([1], "a size like")],
    "read_concurrency": [(0, "greater than or equal to 1"), (65, "less than or equal to 64"),
                         ("4", "valid integer"), (2.5, "valid integer")],
    "storage_options": [(5, "valid dictionary"), ({"s3": "anon"}, "valid dictionary")],
}


def test_the_sweep_covers_every_key_of_the_spec():
    from graft.engine.plan.specfile import _KEYS

    assert sorted(INVALID) == sorted(_KEYS)


@pytest.mark.parametrize("key,value,allowed", [(k, v, a) for k, cases in INVALID.items() for v, a in cases],
                         ids=lambda x: repr(x)[:24])
def test_every_invalid_value_of_every_key_is_one_line_naming_the_key_and_what_is_allowed(key, value, allowed):
    msg = _error({**MINIMAL, key: value})
    assert msg.startswith("job.yaml: ")
    assert f"'{key}" in msg or f"{key}[" in msg, msg  # 'key', 'key.0.match' or rules[0]
    assert allowed in msg, msg


@pytest.mark.parametrize("key,value,allowed", [
    ("alpha", "lots", "valid number"), ("read_concurrency", "0", "greater than or equal to 1"),
    ("compute_dtype", "half", "'float32' or 'float64'"), ("allow_family_mismatch", "perhaps", "valid boolean"),
])
def test_invalid_set_overrides_are_one_line_naming_the_key(tmp_path, key, value, allowed):
    msg = _error(MINIMAL, overrides=[f"{key}={value}"], tmp_path=tmp_path)
    assert f"'{key}'" in msg and allowed in msg


def test_report_off_may_be_written_bare_although_yaml_reads_it_as_false(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("target: t\nfinetuned: f\nbase: b\noutput: o\nreport: off\n")
    assert load_spec(str(path)).report == "off"
    assert load_spec(str(path), ["report=exact"]).report == "exact"


# --- every problem at once -------------------------------------------------------------------------


def test_three_bad_keys_are_reported_together_one_line_each(tmp_path):
    path = _write(tmp_path, {"target": "t", "finetuned": "f", "base": "b", "output": "o",
                             "alpah": 1.0, "compute_dtype": "float16", "read_concurrency": 0})
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    problems = caught.value.problems
    assert len(problems) == 3, problems
    assert str(caught.value).splitlines() == problems
    assert "unknown key 'alpah'; did you mean 'alpha'?" in problems[0]
    assert any("key 'compute_dtype'" in p and "'float32' or 'float64'" in p for p in problems)
    assert any("key 'read_concurrency'" in p and "(got 0)" in p for p in problems)
    assert all(p.startswith("job.yaml: ") for p in problems)


def test_graft_checks_after_the_model_are_collected_too():
    with pytest.raises(SpecError) as caught:
        spec_from_mapping({"target": "t", "finetuned": "f", "base": "b", "output": "hf://me/out",
                           "alpha": float("inf"), "chunk_size": "lots"}, source="job.yaml")
    problems = caught.value.problems
    assert [p.split(":")[1].strip() for p in problems] == ["key 'alpha' must be finite, got inf",
                                                           "key 'output'", "key 'chunk_size'"]


def test_a_misspelled_required_key_is_one_problem_not_two():
    with pytest.raises(SpecError) as caught:
        spec_from_mapping({"target": "t", "finetuned": "f", "base": "b", "output": "o",
                           "rules": [{"match": "x", "alhpa": 0.0}]}, source="job.yaml")
    assert caught.value.problems == ["job.yaml: rules[0]: unknown key 'alhpa'; did you mean 'alpha'?"]
