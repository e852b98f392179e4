"""Markdown from ``bench/results.json``: the one renderer of every published benchmark figure.

Three outputs, all from the same dict (what ``bench/run.py`` writes): ``page(results)``, every table
the run holds (``bench/results.md`` and the docs site's benchmark page); ``readme_block(results)``,
the short "Row" block between the README's markers; ``update_readme(readme, results)``, that
block put in place. Nothing here measures or imports torch: the docs build and the unit tests call
it with the project's own venv.
"""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field

__all__ = ["BEGIN", "END", "Row", "frontier_lines", "load", "page", "paired", "readme_block", "recipe_lines",
           "update_readme", "write_readme"]

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results.json")
README = os.path.join(os.path.dirname(HERE), "README.md")
BEGIN = "<!-- bench:begin: rendered from bench/results.json by bench/render.py; do not edit -->"
END = "<!-- bench:end -->"
# The date of the local executor's change (issue 26, bench/NOTES.md section 15): runs before it
# measured the executor as it was, which the README block must say.
EXECUTOR_CHANGED = "2026-12-04"


@dataclass
class Row:
    """One contender on one job, one value per round: what bench/run.py measures and results.json holds."""

    name: str
    job: str
    seconds: list[float] = field(default_factory=list)
    peak_rss: list[int] = field(default_factory=list)
    bytes_read: list[int] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def load(path: str = RESULTS) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def paired(num: list[float], den: list[float]) -> float:
    """The median of per-round ratios (round i of one row against round i of another, measured
    moments apart), so that the machine's drift between rounds cancels out."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def _rows(results: dict) -> list[Row]:
    return [Row(**r) for r in results["rows"]]


def _default_local(rows: list[Row]) -> Row | None:
    # The default local row's name changed with the executor (issue 26); it says "the default".
    return next((r for r in rows if r.job == "1.1B" and r.name.startswith("graft --executor local")
                 and "the default" in r.name), None)


def _main_table(results: dict, rows: list[Row]) -> list[str]:
    inputs = results["input_bytes"]
    by = {r.name: r for r in rows if r.job == "1.1B"}
    floors = {r.job: r for r in rows if r.name.startswith("I/O floor: cat")}
    floor = floors["1.1B"]
    merge = next((r for r in rows if r.job == "1.1B" and r.name.startswith("mergekit")), None)
    out = ["| contender | job | wall (s) | × floor | speed-up vs mergekit | peak RSS (MB) "
           "| bytes read ÷ input | CPU-s per GB |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.job not in inputs:
            continue
        if "--workers" in r.name and r.name.startswith("graft --executor ray"):
            w = r.name.rsplit(" ", 1)[1]
            up = by[f"Ray start-up: init, {w} actor(s) ready, shutdown"].seconds
            ratio = f"{paired(r.seconds, [f + u for f, u in zip(floor.seconds, up)]):.2f} of floor + start-up"
        elif r.job in floors and "start-up" not in r.name:
            ratio = f"{paired(r.seconds, floors[r.job].seconds):.2f}"
        else:
            ratio = ""
        speed = (f"{paired(merge.seconds, r.seconds):.1f}×" if merge and r.job == "1.1B"
                 and "floor" not in r.name and "start-up" not in r.name else "")
        rss = f"{statistics.median(r.peak_rss) / 1e6:.0f}" if r.peak_rss else ""
        read = f"{statistics.median(r.bytes_read) / inputs[r.job]:.3f}" if r.bytes_read else ""
        cpu = f"{statistics.median(r.cpu) / (inputs[r.job] / 1e9):.2f}" if r.cpu else ""
        out.append(f"| {r.name} | {r.job} | {r.median:.2f} | {ratio} | {speed} | {rss} | {read} | {cpu} |")
    return out


def _report_cost(rows: list[Row]) -> list[str]:
    by = {r.name: r for r in rows if r.job == "1.1B"}
    off, on = by.get("graft --executor local, report: off"), _default_local(rows)
    if off is None or on is None or not off.seconds:
        return []
    out = ["", f"The transfer report (`report: sampled`, the default) costs {paired(on.seconds, off.seconds) - 1:+.1%} "
               f"wall time and {paired(on.cpu, off.cpu) - 1:+.1%} CPU against the same job with `report: off` "
               "(paired runs of this table)."]
    exact = by.get("graft --executor local, report: exact")
    if exact is not None and exact.seconds:
        out += ["", f"Measuring every element (`report: exact`) costs {paired(exact.seconds, off.seconds) - 1:+.1%} "
                    f"wall time and {paired(exact.cpu, off.cpu) - 1:+.1%} CPU against `report: off`."]
    return out


def recipe_lines(rows: list[Row], in_llama: int) -> list[str]:
    """The release recipes' table (rows: any with name, job, seconds, cpu, peak_rss)."""
    recipes = [r for r in rows if r.job == "recipes"]
    if len(recipes) != 5:
        return []
    one, two, make, from_diff, three = recipes
    out = ["", "## Release recipes", "",
           "On the 1.1B checkpoints (graft local; CPU-s per GB of the three-checkpoint job's input):", "",
           "| recipe | wall (s) | CPU-s per GB | peak RSS (MB) | vs |", "|---|---:|---:|---:|---|"]
    for r, vs in ((one, f"{paired(one.seconds, two.seconds):.2f} of 2 passes (CPU {paired(one.cpu, two.cpu):.2f})"),
                  (two, ""), (make, ""),
                  (from_diff, f"{paired(from_diff.seconds, three.seconds):.2f} of 3 checkpoints "
                              f"(CPU {paired(from_diff.cpu, three.cpu):.2f})"), (three, "")):
        out.append(f"| {r.name} | {r.median:.2f} | {statistics.median(r.cpu) / (in_llama / 1e9):.2f} "
                   f"| {statistics.median(r.peak_rss) / 1e6:.0f} | {vs} |")
    return out


def _s3(rows: list[Row]) -> list[str]:
    s3 = [r for r in rows if r.job in ("s3", "s3s3")]
    if len(s3) != 4:
        return []
    raw, job, raw_rw, job_rw = s3
    total = raw.bytes_read[0]
    out = ["", "## Object storage (S3)", "",
           f"moto's server in its own process on 127.0.0.1; three checkpoints of 16 tensors of 8 MiB, one per "
           f"object ({total / 1e6:.0f} MB in all). Throughput = those input bytes ÷ wall time; graft's time is "
           "the whole job (read, compute, write, hash). The S3 → S3 job writes its output as one shard to the "
           "same server, and its raw contender uploads as many bytes while it reads; each raw contender makes "
           "the same requests (range and part sizes, requests in flight) as graft's job.",
           "", "| contender | wall (s) | MB/s | vs raw | CPU-s per GB |", "|---|---:|---:|---:|---:|"]
    for base, r in ((raw, raw), (raw, job), (raw_rw, raw_rw), (raw_rw, job_rw)):
        cpu = f"{statistics.median(r.cpu) / (total / 1e9):.2f}" if r.cpu else ""
        out.append(f"| {r.name} | {r.median:.2f} | {total / r.median / 1e6:.0f} "
                   f"| {paired(base.seconds, r.seconds):.2f} | {cpu} |")
    return out


def frontier_lines(f: dict) -> list[str]:
    d = f["driver"]
    return [
        "", "## Planning at frontier scale", "",
        f"Three DeepSeek-V3-671B-shaped block-FP8 checkpoints made of real headers and sparse data "
        f"(`bench/frontier.py`): {d['tensors']:,} tensors each ({d['logical_tensors']:,} weights with "
        f"their scales) in {d['shards']} shards, {d['write_bytes'] / 1e9:.1f} GB per checkpoint as the "
        f"headers claim. Planning reads only the headers, so this is what the real job's planning costs.",
        "", "| measure | result | target |", "|---|---:|---:|",
        f"| `graft plan` wall time (median of {len(f['plan_seconds'])}, a fresh process each) "
        f"| {statistics.median(f['plan_seconds']):.1f} s | ≤ 10 s |",
        f"| `graft plan` peak RSS | {statistics.median(f['plan_peak_rss']) / 1e6:.0f} MB | |",
        f"| Ray driver before its first submit (ray and torch loaded; headers, plan, fingerprint, every "
        f"task pickled): wall time | {d['driver_seconds']:.1f} s | |",
        f"| Ray driver peak RSS | {d['peak_rss'] / 1e6:.0f} MB | ≤ 1 GB |",
        f"| largest pickled `ShardTask` (all {d['shards']}: {d['all_tasks_bytes'] / 1e6:.1f} MB) "
        f"| {d['largest_task_bytes'] / 1e3:.0f} KB | |",
        f"| planned reads / writes | {d['read_bytes'] / 1e12:.2f} TB / {d['write_bytes'] / 1e9:.0f} GB | |",
    ]


def page(results: dict) -> str:
    """Every table of one ``make bench`` run, with its date and machine, as markdown (no title)."""
    rows = _rows(results)
    inputs = results["input_bytes"]
    lines = [
        f"Run of {results['date']} on {results['machine']}; warm page cache; median of {results['runs']} "
        f"run(s) each, all in one `make bench` run. 1.1B job: three TinyLlama-1.1B-shaped bf16 checkpoints "
        f"({inputs['1.1B'] / 1e9:.2f} GB of inputs, {results['output_bytes'] / 1e9:.2f} GB written). "
        f"768 MiB job: one 768 MiB tensor per checkpoint ({inputs['768MiB'] / 1e9:.2f} GB of inputs). "
        f"FP8 job: three block-FP8 checkpoints of DeepSeek-V3 expert shapes ({inputs['FP8'] / 1e9:.2f} GB of "
        "inputs), decoded, combined and re-encoded with fresh 128x128 block scales.",
        "", *_main_table(results, rows), *_report_cost(rows)]
    fp8 = next((r for r in rows if r.job == "FP8" and r.cpu and r.name.startswith("graft")), None)
    local = _default_local(rows)
    if fp8 is not None and local is not None:
        lines += ["", f"FP8 job: graft used {statistics.median(fp8.cpu) / (inputs['FP8'] / 1e9):.1f} CPU-seconds "
                      f"per GB of input (median); the plain 1.1B job "
                      f"{statistics.median(local.cpu) / (inputs['1.1B'] / 1e9):.1f}."]
    lines += recipe_lines(rows, inputs["1.1B"]) + _s3(rows)
    if results.get("frontier"):
        lines += frontier_lines(results["frontier"])
    lines += ["", "## How to read these tables", "",
              "CPU-s per GB: user + system CPU-seconds per GB of the job's input, of the process (graft local, "
              "naive) or of the command and every process it waited for (the floor: cat and dd; mergekit); "
              "not for Ray, whose daemons and workers are not all reaped by the command (their CPU would be "
              "undercounted). On this VM a buffered write costs CPU in the kernel (the floor's dd), which "
              "graft's O_DIRECT writes avoid.",
              "", "Peak RSS: the largest single process (for Ray, the largest shard worker). Bytes read: "
              "`rchar` of the process (every system-call read, headers and configs included) for graft local; "
              "graft's own count for Ray; not measurable for mergekit and naive, which read through mmap. Ray "
              "rows are compared with the floor plus Ray's own start-up for the same number of actors (the "
              "start-up rows). Wall times are medians; every ratio is the median of per-run ratios (run i of "
              "a row against run i of the floor, of mergekit or of raw s3fs, from the same round), so that "
              "drift of the machine between rounds cancels out."]
    if results.get("node"):
        from bench.node import lines as node_lines  # only a run with the node benchmark has this part

        lines += ["", "## The node benchmark (bench/node.py, CPU rows)", "", *node_lines(results["node"])]
    return "\n".join(lines) + "\n"


def readme_block(results: dict) -> str:
    """The README's few "Row" lines: the headline ratios of the run, its date and machine."""
    rows = _rows(results)
    by = {r.name: r for r in rows if r.job == "1.1B"}
    floor = by["I/O floor: cat inputs, write + sync output"]
    local = _default_local(rows)
    merge = next((r for r in rows if r.job == "1.1B" and r.name.startswith("mergekit")), None)
    lines = [f"`make bench`, {results['date']}, {results['machine']}; median of {results['runs']} rounds "
             f"(all tables: [docs/benchmarks.md](docs/benchmarks.md)). A 1.1B-parameter bf16 transfer "
             f"({results['input_bytes']['1.1B'] / 1e9:.1f} GB read):", ""]
    if local is not None:
        lines.append(f"- graft `--executor local`: {local.median:.2f} s, {paired(local.seconds, floor.seconds):.2f} × "
                     f"the I/O floor (cat + write), peak RSS {statistics.median(local.peak_rss) / 1e6:.0f} MB"
                     + (f", {paired(merge.seconds, local.seconds):.1f} × faster than {merge.name.split(' linear')[0]}"
                        if merge else ""))
    ray = [r for r in rows if r.job == "1.1B" and r.name.startswith("graft --executor ray")]
    ups = [r for r in rows if r.name.startswith("Ray start-up")]
    if ray and ups:
        lines.append(f"- graft on Ray: {min(r.median for r in ray):.1f}–{max(r.median for r in ray):.1f} s, of which "
                     f"Ray's own start-up is {min(r.median for r in ups):.1f}–{max(r.median for r in ups):.1f} s")
    if results.get("frontier"):
        f = results["frontier"]
        lines.append(f"- planning a DeepSeek-V3-671B-shaped FP8 trio ({f['driver']['tensors']:,} tensors per "
                     f"checkpoint): {statistics.median(f['plan_seconds']):.1f} s, "
                     f"{statistics.median(f['plan_peak_rss']) / 1e6:.0f} MB")
    if results["date"] < EXECUTOR_CHANGED:
        lines += ["", f"The local executor changed after this run ({EXECUTOR_CHANGED}, issue 26: it sizes itself "
                      "from the machine and computes several chunks of a shard at once); the paired runs since "
                      "are in `bench/NOTES.md` section 15."]
    return "\n".join(lines)


def update_readme(text: str, results: dict) -> str:
    """``text`` (a README) with the block between its markers replaced by ``readme_block(results)``."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"README.md: the markers {BEGIN!r} and {END!r} are missing; put them back "
                         "where the Row block goes")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{readme_block(results)}\n{END}{tail}"


def write_readme(readme: str = README, results_path: str = RESULTS) -> None:
    """Re-render the README's Row block from ``results_path`` in place."""
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    new = update_readme(text, load(results_path))
    if new != text:
        with open(readme, "w", encoding="utf-8") as f:
            f.write(new)


if __name__ == "__main__":
    write_readme()
    print(page(load()))
