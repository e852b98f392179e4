"""The job spec: defaults, normalisation, overrides, and one-line errors naming the key."""
from __future__ import annotations

import os

import pytest

from graft.engine.errors import SpecError
from graft.engine.spec import apply_overrides, load_spec, parse_size, spec_from_mapping

MIN = {"target": "t", "finetuned": "f", "base": "b", "output": "o"}


def test_defaults_and_absolute_paths():
    s = spec_from_mapping(MIN)
    assert (s.alpha, s.compute_dtype, s.on_missing, s.allow_nonfinite) == (1.0, "float32", "error", False)
    assert s.target == os.path.abspath("t") and s.max_shard_size is None and s.chunk_size == 16 * 2**20
    assert s.donor_for("config.json") == "target"
    assert s.donor_for("tokenizer.json") == "finetuned"
    assert s.donor_for("chat_template.jinja") == "finetuned"
    assert s.donor_for("README.md") is None


def test_uris_are_kept_as_given():
    s = spec_from_mapping({**MIN, "target": "s3://bucket/llama/", "output": "memory://x"})
    assert s.target == "s3://bucket/llama" and s.output == "memory://x"


def test_sizes_parse_in_decimal_and_binary_units():
    assert parse_size("5GB", "k") == 5 * 10**9
    assert parse_size("16MiB", "k") == 16 * 2**20
    assert parse_size(1234, "k") == 1234
    assert spec_from_mapping({**MIN, "max_shard_size": "1.5GB"}).max_shard_size == 1_500_000_000


def test_rules_first_match_wins_over_global_alpha():
    s = spec_from_mapping({**MIN, "alpha": 0.5, "rules": [{"match": "embed", "alpha": 0},
                                                          {"match": "embed_tokens", "alpha": 2}]})
    assert s.alpha_for("model.embed_tokens.weight") == 0.0
    assert s.alpha_for("model.layers.0.mlp.up_proj.weight") == 0.5


def test_user_file_donors_override_the_defaults():
    s = spec_from_mapping({**MIN, "files": {"config.json": "finetuned", "tokenizer*": "none",
                                            "README.md": "base"}})
    assert s.donor_for("config.json") == "finetuned"
    assert s.donor_for("tokenizer.json") is None
    assert s.donor_for("README.md") == "base"
    assert s.donor_for("generation_config.json") == "finetuned"


@pytest.mark.parametrize("data,needle", [
    ({**MIN, "alpah": 1}, "unknown key 'alpah'; did you mean 'alpha'"),
    ({**MIN, "rules": [{"match": "x", "alhpa": 1}]}, "rules[0]: unknown key 'alhpa'; did you mean 'alpha'"),
    ({**MIN, "rules": [{"match": "(", "alpha": 1}]}, "rules.0.match"),
    ({**MIN, "compute_dtype": "float16"}, "key 'compute_dtype'"),
    ({**MIN, "on_missing": "skip"}, "key 'on_missing'"),
    ({**MIN, "alpha": float("nan")}, "key 'alpha' must be finite"),
    ({**MIN, "alpha": "lots"}, "key 'alpha'"),
    ({**MIN, "max_shard_size": "big"}, "key 'max_shard_size'"),
    ({**MIN, "chunk_size": 0}, "key 'chunk_size'"),
    ({**MIN, "files": {"config.json": "mine"}}, "key 'files.config.json'"),
    ({k: v for k, v in MIN.items() if k != "output"}, "key 'output': Field required"),
    ([1, 2], "expected a mapping"),
])
def test_invalid_spec_is_one_line_naming_the_key(data, needle):
    with pytest.raises(SpecError) as e:
        spec_from_mapping(data, source="job.yaml")
    assert needle in str(e.value) and str(e.value).startswith("job.yaml") and "\n" not in str(e.value)


def test_overrides_nest_parse_yaml_and_validate(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("target: t\nfinetuned: f\nbase: b\noutput: o\n")
    s = load_spec(str(p), ["alpha=0.5", "storage_options.s3.endpoint_url=http://127.0.0.1:9",
                           "rules=[{match: x, alpha: 0}]"])
    assert s.alpha == 0.5 and s.storage_options == {"s3": {"endpoint_url": "http://127.0.0.1:9"}}
    assert s.rules[0].match == "x" and s.rules[0].alpha == 0.0
    with pytest.raises(SpecError, match="expected key=value"):
        apply_overrides({}, ["alpha"])
    with pytest.raises(SpecError, match="did you mean 'output'"):
        apply_overrides({}, ["outptu=x"])


def test_load_spec_errors_name_the_file(tmp_path):
    with pytest.raises(SpecError, match="no such config file"):
        load_spec(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("target: [unclosed\n")
    with pytest.raises(SpecError, match="bad.yaml: not valid YAML"):
        load_spec(str(bad))


def test_secrets_are_redacted_but_endpoints_kept():
    s = spec_from_mapping({**MIN, "storage_options": {"s3": {
        "endpoint_url": "http://127.0.0.1:9", "key": "AKIA", "secret": "s3cr3t", "token": "t",
        "client_kwargs": {"aws_secret_access_key": "x"}}}})
    d = s.to_dict()["storage_options"]["s3"]
    assert d["endpoint_url"] == "http://127.0.0.1:9"
    assert d["key"] == d["secret"] == d["token"] == "***"
    assert d["client_kwargs"]["aws_secret_access_key"] == "***"
    assert "s3cr3t" not in str(s.to_dict())
