"""``graft push``: publish a committed output to the Hugging Face Hub, with a model card.

``push_output`` makes one atomic Hub commit of a finished, verified output plus a model card
(``model_card``) whose metadata names the source models (``base_model``, ``base_model_relation:
merge``), the alphas and the rules. It sits above the manifest (it verifies the output first):
nothing in the engine imports it.
"""
from __future__ import annotations

import io
import json
import re
from typing import Any, Callable, Mapping

from huggingface_hub import CommitOperationAdd, ModelCardData
from huggingface_hub.errors import HfHubHTTPError

from ..errors import IntegrityError, OutputError, StorageError
from ..formats.checkpoint import unsafe_name
from ..formats.manifest import MANIFEST_NAME, verify_output
from ..storage import Storage
from ..storage.hub import first_line, hub_api, repo_id_of

__all__ = ["model_card", "push_output"]


def model_card(manifest: Mapping[str, Any]) -> str:
    """README.md for a pushed output: Hub metadata (YAML front matter) and a short description."""
    spec, inputs = manifest["spec"], manifest["inputs"]
    sources = {}
    for role, entry in inputs.items():  # target, then each diff's finetuned and base
        sources[role] = {"location": entry["uri"], **({"commit": entry["commit"]} if "commit" in entry else {})}
    hub_models = [r for r in (repo_id_of(e["uri"]) for e in inputs.values()) if r]
    diffs = spec.get("diffs")
    if manifest.get("kind") == "diff":
        formula, alphas = "finetuned - base", None
        described = (f"a diff checkpoint, `{formula}` per tensor, written as {spec.get('diff_dtype')} by graft "
                     f"diff (apply it with a graft transfer's `diff:` key; ")
    elif diffs:
        formula, alphas = "target + sum_i alpha_i * (finetuned_i - base_i)", [d["alpha"] for d in diffs]
        described = (f"`{formula}`, computed per tensor by graft with alphas {', '.join(map(str, alphas))} "
                     f"(the diffs summed left to right, then added to the target; ")
    else:
        formula, alphas = "target + alpha * (finetuned - base)", spec["alpha"]
        described = f"`{formula}`, computed per tensor by graft with alpha = {spec['alpha']} ("
    files = {o["name"] for o in manifest["outputs"]}
    formats = manifest.get("plan", {}).get("formats") or {}
    data = ModelCardData(
        base_model=list(dict.fromkeys(hub_models)) or None,
        base_model_relation="merge" if hub_models else None,
        library_name="transformers" if "config.json" in files else None,
        tags=["graft", "fine-tuning-transfer"],
        graft={
            "formula": formula,
            "alpha": alphas,
            "rules": [{"match": r["match"], "alpha": r["alpha"]} for r in spec.get("rules", [])],
            "compute_dtype": spec.get("compute_dtype", "float32"),
            **({"output_format": spec["output_format"]} if "output_format" in spec else {}),
            **({"formats": formats} if formats else {}),
            **sources,
        },
    )
    rules = "".join(f"\n| `{r['match']}` | {r['alpha']} |" for r in spec.get("rules", []))
    rule_table = f"\n\nPer-tensor alpha (first match wins):\n\n| tensor pattern | alpha |\n|---|---|{rules}" if rules else ""
    lines = "\n".join(f"- **{role}**: `{s['location']}`" + (f" (commit `{s['commit']}`)" if "commit" in s else "")
                      for role, s in sources.items())
    stored = ("How each stores its weights:\n\n" + "".join(f"- **{k}**: {v}\n" for k, v in formats.items())
              + "\n") if formats else ""
    return (
        f"---\n{data.to_yaml()}\n---\n\n"
        f"# Fine-tuning transfer\n\n"
        f"These weights are {described}{spec.get('compute_dtype', 'float32')} arithmetic, rounded once to the "
        f"output's dtype), following Lin et al. (2025), *Efficient Model Development through Fine-tuning "
        f"Transfer*.{rule_table}\n\n"
        f"Sources:\n\n{lines}\n\n{stored}"
        f"`{MANIFEST_NAME}` records the run (every input file's version, every output file's "
        f"sha256); `SHA256SUMS` checks the weights with `sha256sum -c SHA256SUMS`.\n"
    )


def _parse_repo(repo: str) -> tuple[str, str | None]:
    target = repo[len("hf://"):] if repo.startswith("hf://") else repo
    target = target.removeprefix("models/")
    repo_id, _, branch = target.partition("@")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise OutputError(f"{repo}: not a Hub model repository; write hf://org/name or org/name "
                          f"(optionally @branch)")
    return repo_id, branch or None


def _upload_source(out: Storage, name: str) -> Any:
    """What the Hub client uploads ``name`` from: a path locally, else a seekable stream."""
    if out.is_local:
        return out.path(name)
    return io.BufferedReader(out.fs.open(out.path(name), "rb"))


def push_output(output: str, repo: str, storage_options: Mapping[str, Mapping[str, Any]] | None = None,
                *, private: bool | None = None, message: str | None = None, verify: bool = True,
                log: Callable[[str], None] = lambda s: None) -> str:
    """Publish a committed graft output to ``repo`` (``hf://org/name[@branch]``) in one commit.

    Refuses an output without a manifest (unfinished), or, with ``verify``, one whose files no
    longer match their checksums. Returns the URL of the Hub commit.
    """
    options = storage_options or {}
    repo_id, branch = _parse_repo(repo)
    out = Storage(output, options)
    if verify:
        report = verify_output(output, options)
        if not report.ok:
            # The same failure as `graft verify`'s, and the same exit code (5).
            raise IntegrityError(f"{output}: not pushed: {report.problems[0] if report.problems else 'no files'}")
        log(f"verified {len(report.checked)} files of {output}")
    try:
        manifest = json.loads(out.read(MANIFEST_NAME))
    except StorageError:
        raise OutputError(f"{out.url(MANIFEST_NAME)}: missing; {output} is not a finished graft "
                          f"output, run the job to completion first") from None
    names = sorted({o["name"] for o in manifest["outputs"]} | {MANIFEST_NAME})
    for name in names:  # the manifest is a file in the output: trust its names no more than an index's
        why = unsafe_name(name)
        if why is not None:
            raise OutputError(f"{out.url(MANIFEST_NAME)}: lists an output file {name!r} that {why}; not "
                              f"pushed: this is not an output graft wrote, check where it came from")
    if "README.md" in names:
        log("the output's README.md is replaced by the generated model card")
    card = model_card(manifest).encode()
    api = hub_api(options.get("hf", {}))
    sources = []
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if branch:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card)]
        for name in names:
            if name != "README.md":
                sources.append(_upload_source(out, name))
                ops.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=sources[-1]))
        log(f"uploading {len(ops)} files to {repo_id}" + (f"@{branch}" if branch else ""))
        info = api.create_commit(repo_id, ops, commit_message=message or "graft: fine-tuning transfer",
                                 revision=branch)
    except HfHubHTTPError as e:
        raise OutputError(f"{repo}: push failed: {first_line(e)}; check the repository id and that "
                          f"your token (HF_TOKEN) may write to it") from None
    finally:
        for s in sources:
            if not isinstance(s, str):
                s.close()
    return str(info.commit_url)
