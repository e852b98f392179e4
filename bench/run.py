"""``make bench``: graft against the I/O floor, mergekit and a naive script, in one run on one machine.

Every contender runs in a fresh process, several times after a warm-up read of its inputs; the
table reports medians. Ratios are against numbers measured in this same run (machines are noisy).
Ends with a small run of the node benchmark (bench/node.py: CPU rows, about 0.5 GB of inputs per
trio). Writes bench/results.json (the node benchmark under "node"), then renders from it
(bench/render.py) bench/results.md and the README's Measured block; and bench/results.png.

    python -m bench.run [--runs 5] [--quick]   # --quick: one run each, no mergekit / naive / S3
    python -m bench.run --s3-only              # just the S3 rows, printed
    python -m bench.run --frontier-only        # just the 671B-shaped planning figures, printed
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

import psutil
import yaml

from bench import render
from bench.data import ensure
from bench.frontier import make_trio
from bench.render import Row, frontier_lines, recipe_lines

HERE = os.path.dirname(os.path.abspath(__file__))
NODE_SIZE = 0.5  # GB of inputs per trio of the node benchmark's rows in make bench
ROLES = ("target", "finetuned", "base")
PY = sys.executable
ENV = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
ENV.pop("RAY_ADDRESS", None)


def input_files(paths: dict[str, str]) -> list[str]:
    return sorted(f for p in paths.values() for f in glob.glob(os.path.join(p, "*.safetensors")))


def warm(paths: dict[str, str]) -> None:
    subprocess.run(["cat", *input_files(paths)], stdout=subprocess.DEVNULL, check=True)


def clear(out: str) -> None:
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=True)


def tree_peak(proc: subprocess.Popen, pick: Callable[[psutil.Process], bool]) -> Callable[[], int]:
    """Poll the RSS of ``proc``'s process tree every 50 ms; returns a getter for the largest seen."""
    peak = [0]

    def poll() -> None:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                procs = [root, *root.children(recursive=True)]
                peak[0] = max([peak[0], *(p.memory_info().rss for p in procs if pick(p))])
            except psutil.Error:
                pass
            time.sleep(0.05)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    return lambda: (t.join(), peak[0])[1]


def children_cpu() -> float:
    """CPU-seconds (user + system) of every child process waited for so far, and of theirs."""
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def floor(paths: dict[str, str], out_bytes: int, scratch: str, direct: bool = False,
          row: Row | None = None) -> float:
    """Read every input byte once (cat > /dev/null), then write the output's size once with a sync
    (``direct``: in 8 MiB ``O_DIRECT`` writes, past the page cache, as graft's local writer does).
    With ``row``, its CPU-seconds are recorded there too."""
    target = os.path.join(scratch, "floor.bin")
    c0 = children_cpu()
    t0 = time.perf_counter()
    subprocess.run(["cat", *input_files(paths)], stdout=subprocess.DEVNULL, check=True)
    mib = -(-out_bytes // 2**20)
    how = ["bs=8M", f"count={-(-mib // 8)}", "oflag=direct"] if direct else ["bs=1M", f"count={mib}"]
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", *how, "conv=fsync"],
                   stderr=subprocess.DEVNULL, check=True)
    seconds = time.perf_counter() - t0
    if row is not None:
        row.cpu.append(children_cpu() - c0)
    os.remove(target)
    return seconds


def spec_file(paths: dict[str, str], out: str, scratch: str, **extra: object) -> str:
    path = os.path.join(scratch, f"spec-{len(os.listdir(scratch))}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({**paths, "output": out, **extra}, f)
    return path


def graft_local(row: Row, paths: dict[str, str], out: str, scratch: str, kind: str = "transfer",
                add: bool = False, **extra: object) -> None:
    """One measured run of graft's local executor; ``add``: add its numbers to the row's last run
    (a job made of several runs)."""
    clear(out)
    r = subprocess.run([PY, "-m", "bench.one", "graft", spec_file(paths, out, scratch, **extra), "--kind", kind],
                       capture_output=True, text=True, env=ENV, check=True)
    m = json.loads(r.stdout.strip().splitlines()[-1])
    if add:
        row.seconds[-1] += m["seconds"]
        row.peak_rss[-1] = max(row.peak_rss[-1], m["peak_rss"])
        row.bytes_read[-1] += m["rchar"]
        row.cpu[-1] += m["cpu"]
        return
    row.seconds.append(m["seconds"])
    row.peak_rss.append(m["peak_rss"])
    row.bytes_read.append(m["rchar"])
    row.cpu.append(m["cpu"])


RECIPES = ("graft, 2 diffs in one pass (5 checkpoints)", "graft, the same 2 diffs as 2 passes",
           "graft diff (float32)", "graft, target + float32 diff (2 checkpoints)",
           "graft, target + finetuned - base (3 checkpoints)")


def recipe_rows(llama: dict[str, str], scratch: str, runs: int) -> list[Row]:
    """Release-pipeline recipes on the 1.1B checkpoints: two diffs in one pass against two passes,
    writing a diff, and a transfer from it against the three-checkpoint one. The second diff's
    fine-tune and base are the first's files under other paths (links), so graft reads them as
    other checkpoints, as it would two real fine-tunes. What a recipe writes and the next step
    reads (the first pass's output, the diff) is read warm, like every input here."""
    links = {}
    for role in ("finetuned", "base"):
        links[role] = os.path.join(scratch, f"{role}2")
        if not os.path.exists(links[role]):
            os.symlink(llama[role], links[role])
    one, two, make, from_diff, three = (Row(name, "recipes") for name in RECIPES)
    out, mid, delta = (os.path.join(scratch, n) for n in ("r-out", "r-mid", "r-delta"))
    second = {"finetuned": links["finetuned"], "base": links["base"], "alpha": 0.5}
    for _ in range(runs):
        graft_local(one, {"target": llama["target"]}, out, scratch,
                    diffs=[{"finetuned": llama["finetuned"], "base": llama["base"]}, second])
        graft_local(two, llama, mid, scratch)
        warm({"mid": mid})  # written past the page cache; read warm, like every input here
        graft_local(two, {"target": mid, **{k: second[k] for k in ("finetuned", "base")}}, out, scratch,
                    add=True, alpha=0.5)
        graft_local(make, {"finetuned": llama["finetuned"], "base": llama["base"]}, delta, scratch, kind="diff")
        warm({"delta": delta})
        graft_local(from_diff, {"target": llama["target"], "diff": delta}, out, scratch)
        graft_local(three, llama, out, scratch)
    for d in (out, mid, delta):
        clear(d)
    return [one, two, make, from_diff, three]


def graft_ray(row: Row, paths: dict[str, str], out: str, scratch: str, workers: int) -> None:
    clear(out)
    cmd = [PY, "-m", "graft.cluster.cli", "run", spec_file(paths, out, scratch), "-q", "--executor", "ray",
           "--workers", str(workers)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = tree_peak(proc, lambda p: "ShardWorker" in " ".join(p.cmdline()))
    _, err = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"graft ray failed: {err[-2000:]}")
    manifest = json.load(open(os.path.join(out, "graft.manifest.json")))
    row.seconds.append(seconds)
    row.peak_rss.append(peak())
    row.bytes_read.append(manifest["run"]["bytes_read"])


def ray_startup(workers: int) -> float:
    """Ray's own start-up for this job's shape: a local Ray, ``workers`` shard actors that import the
    engine and answer, then shutdown; no data moves."""
    code = ("import ray; from graft.cluster.actors import ShardWorker; "
            "ray.init(address='local', include_dashboard=False, num_cpus=2, "
            "object_store_memory=128*2**20, logging_level='ERROR'); "
            f"ws = [ShardWorker.remote({{}}, '/tmp', {{}}) for _ in range({workers})]; "
            "ray.get([w.pid.remote() for w in ws]); ray.shutdown()")
    t0 = time.perf_counter()
    subprocess.run([PY, "-c", code], env=ENV, check=True, capture_output=True)
    return time.perf_counter() - t0


def measured(row: Row, cmd: list[str], out: str) -> None:
    """A command in its own process: wall time and the peak RSS of its largest process. (Bytes read
    are not reported: mergekit and safetensors' load_file read through mmap, which rchar misses.)"""
    clear(out)
    c0 = children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = tree_peak(proc, lambda p: True)
    _, err = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {err[-2000:]}")
    row.seconds.append(seconds)
    row.peak_rss.append(peak())
    row.cpu.append(children_cpu() - c0)


def mergekit(row: Row, paths: dict[str, str], out: str, scratch: str, alpha: float = 1.0) -> None:
    cfg = os.path.join(scratch, "mergekit.yaml")
    with open(cfg, "w") as f:
        yaml.safe_dump({
            "merge_method": "linear",
            "models": [{"model": paths["target"], "parameters": {"weight": 1.0}},
                       {"model": paths["finetuned"], "parameters": {"weight": alpha}},
                       {"model": paths["base"], "parameters": {"weight": -alpha}}],
            "parameters": {"normalize": False},
            "dtype": "float32",
            "out_dtype": "bfloat16",
        }, f)
    exe = os.path.join(os.path.dirname(PY), "mergekit-yaml")
    measured(row, [exe, cfg, out, "--no-cuda", "--lazy-unpickle", "--quiet", "--no-copy-tokenizer",
                   "--no-write-model-card"], out)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_server() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process on 127.0.0.1 (so that neither reader shares its GIL)."""
    import socket

    port = free_port()
    proc = subprocess.Popen([os.path.join(os.path.dirname(PY), "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.2)


# graft's read requests on this job: each 8 MiB tensor is one chunk, read as one 8 MiB range (S3's
# minimum range part), 3 inputs x 2 shards at once.
S3_PART, S3_INFLIGHT = 8 * 2**20, 6
# The S3 -> S3 job writes one shard (max_shard_size above the output's size): graft's multipart
# upload of it, 4 parts in flight, while a single shard reads 3 ranges at once. The output here is
# 134 MB, so parts are set to 16 MiB (s3 default_block_size, for graft and raw alike) to give the
# upload something to overlap; graft's default of 64 MiB is sized for real shards of GBs.
S3_OUT_PART, S3_OUT_INFLIGHT, S3_ONE_SHARD_READS = 16 * 2**20, 4, 3


def s3_rows(paths: dict[str, str], scratch: str, runs: int) -> list[Row]:
    """A moto S3 server on 127.0.0.1, same objects for all: raw s3fs range reads vs a graft job with
    S3 inputs and local output; raw reads + a concurrent multipart upload of the output's bytes vs a
    graft job from S3 to S3."""
    import fsspec

    server, endpoint = moto_server()
    try:
        opts = {"endpoint_url": endpoint, "key": "bench", "secret": "bench",
                "client_kwargs": {"region_name": "us-east-1"}}
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **opts)
        fs.call_s3("create_bucket", Bucket="bench")
        s3 = {}
        for role, path in paths.items():
            for f in sorted(glob.glob(os.path.join(path, "*"))):
                fs.put_file(f, f"bench/{role}/{os.path.basename(f)}")
            s3[role] = f"s3://bench/{role}"
        out_bytes = sum(os.path.getsize(f) for f in glob.glob(os.path.join(paths["target"], "*.safetensors")))
        raw, graft = Row(f"s3fs range reads, {S3_PART >> 20} MiB each, {S3_INFLIGHT} in flight", "s3"), \
            Row("graft --executor local, S3 inputs, local output", "s3")
        raw_rw = Row(f"s3fs range reads ({S3_PART >> 20} MiB, {S3_ONE_SHARD_READS} in flight) + multipart "
                     f"upload ({S3_OUT_PART >> 20} MiB parts, {S3_OUT_INFLIGHT} in flight) at once", "s3s3")
        graft_rw = Row("graft --executor local, S3 inputs, S3 output (one shard)", "s3s3")
        out = os.path.join(scratch, "s3-out")
        for i in range(runs):
            for row, upload, inflight in ((raw, None, S3_INFLIGHT), (raw_rw, i, S3_ONE_SHARD_READS)):
                job = os.path.join(scratch, "s3raw.json")
                with open(job, "w") as f:
                    json.dump({"options": opts, "dirs": [f"bench/{role}" for role in paths], "part": S3_PART,
                               "inflight": inflight, "upload": None if upload is None else {
                                   "bucket": "bench", "prefix": f"raw-out-{upload}", "sizes": [out_bytes],
                                   "part": S3_OUT_PART, "inflight": S3_OUT_INFLIGHT}}, f)
                r = subprocess.run([PY, "-m", "bench.one", "s3raw", job], capture_output=True, text=True,
                                   env=ENV, check=True)
                m = json.loads(r.stdout.strip().splitlines()[-1])
                row.seconds.append(m["seconds"])
                row.bytes_read.append(m["rchar"])
                row.cpu.append(m["cpu"])
            graft_local(graft, s3, out, scratch, storage_options={"s3": opts})
            clear(out)
            graft_local(graft_rw, s3, f"s3://bench/graft-out-{i}", scratch,
                        storage_options={"s3": {**opts, "default_block_size": S3_OUT_PART}},
                        max_shard_size=2 * out_bytes)
    finally:
        server.kill()
        server.wait()
    return [raw, graft, raw_rw, graft_rw]


def frontier(scratch: str, runs: int) -> dict:
    """Planning a DeepSeek-V3-671B-shaped FP8 transfer from headers alone (bench/frontier.py):
    ``graft plan``'s wall time and peak RSS, and the Ray driver's work before its first submit."""
    root = os.path.join(HERE, "data", "frontier")
    paths = make_trio(root)
    spec = spec_file(paths, os.path.join(scratch, "frontier-out"), scratch)
    seconds, peaks = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.Popen([PY, "-m", "graft.cluster.cli", "plan", spec], env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        peak = tree_peak(proc, lambda p: True)
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"graft plan failed: {err[-2000:]}")
        seconds.append(time.perf_counter() - t0)
        peaks.append(peak())
    probe = subprocess.run([PY, "-m", "bench.frontier", "probe", root], env=ENV, capture_output=True, text=True,
                           check=True)
    return {"plan_seconds": seconds, "plan_peak_rss": peaks, "driver": json.loads(probe.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one run each; no mergekit, naive or S3")
    ap.add_argument("--s3-only", action="store_true", help="only the S3 rows; printed, results not written")
    ap.add_argument("--frontier-only", action="store_true", help="only the 671B-shaped planning figures, printed")
    ap.add_argument("--recipes-only", action="store_true", help="only the release-recipe rows, printed")
    args = ap.parse_args()
    runs = 1 if args.quick else args.runs
    if args.frontier_only:
        scratch = tempfile.mkdtemp(prefix="graft-bench-")
        print("\n".join(frontier_lines(frontier(scratch, runs))))
        shutil.rmtree(scratch, ignore_errors=True)
        return
    # Generated in a process of its own: Linux carries a process's peak RSS (ru_maxrss) across fork
    # and exec, so a parent that held the generated tensors would hand its peak to every child
    # measured after it (seen: 6.8 GB reported for every graft row).
    subprocess.run([PY, "-m", "bench.data", "--root", os.path.join(HERE, "data")], env=ENV, check=True,
                   stdout=subprocess.DEVNULL)
    data = ensure(os.path.join(HERE, "data"))
    scratch = tempfile.mkdtemp(prefix="graft-bench-", dir=os.path.join(HERE, "data"))
    if args.s3_only:
        for r in s3_rows(data["s3"], scratch, runs):
            print(r.name, "wall", [f"{x:.2f}" for x in r.seconds], "cpu", [f"{x:.2f}" for x in r.cpu])
        shutil.rmtree(scratch, ignore_errors=True)
        return
    if args.recipes_only:
        warm(data["llama"])
        llama_in = sum(os.path.getsize(f) for f in input_files(data["llama"]))
        print("\n".join(recipe_lines(recipe_rows(data["llama"], scratch, runs), llama_in)))
        shutil.rmtree(scratch, ignore_errors=True)
        return
    out = os.path.join(scratch, "out")
    llama, big = data["llama"], data["big"]
    in_llama = sum(os.path.getsize(f) for f in input_files(llama))
    out_llama = sum(os.path.getsize(f) for f in input_files({"t": llama["target"]}))
    rows: list[Row] = []
    floor_row = Row("I/O floor: cat inputs, write + sync output", "1.1B")
    direct_floor = Row("I/O floor with O_DIRECT writes (dd oflag=direct, 8 MiB)", "1.1B")
    local = Row("graft --executor local (sized from the machine, the default)", "1.1B")
    no_report = Row("graft --executor local, report: off", "1.1B")  # what the transfer report costs
    exact_report = Row("graft --executor local, report: exact", "1.1B")  # ... measuring every element
    rays = {w: Row(f"graft --executor ray --workers {w}", "1.1B") for w in (1, 2)}
    startup = {w: Row(f"Ray start-up: init, {w} actor(s) ready, shutdown", "1.1B") for w in (1, 2)}
    merge, naive = Row("mergekit 0.1.5 linear", "1.1B"), Row("naive: 3 state dicts in memory, float64", "1.1B")
    big_local = Row("graft --executor local, one 768 MiB tensor", "768MiB")
    print(f"inputs {in_llama / 1e9:.2f} GB, output {out_llama / 1e9:.2f} GB; {runs} run(s) each", flush=True)
    warm(llama)
    # One unmeasured round first: on a VM whose host takes back idle memory, the first pass over
    # memory not touched for a while pays for it, whichever contender happens to run first.
    floor(llama, out_llama, scratch)
    graft_local(Row("warm-up", "1.1B"), llama, out, scratch)
    for i in range(runs):
        floor_row.seconds.append(floor(llama, out_llama, scratch, row=floor_row))
        # The floor's 2.2 GB of page-cache writes cost the next process (up to +30% in one round):
        # an unmeasured run pays for them. The report's cost is a few percent: its pair runs in
        # alternating order too.
        graft_local(Row("settle", "1.1B"), llama, out, scratch, report="off")
        pair = [(local, {}), (no_report, {"report": "off"}), (exact_report, {"report": "exact"})]
        for row, extra in pair if i % 2 == 0 else pair[::-1]:
            graft_local(row, llama, out, scratch, **extra)
        direct_floor.seconds.append(floor(llama, out_llama, scratch, direct=True, row=direct_floor))
        for w, row in rays.items():
            graft_ray(row, llama, out, scratch, w)
        for w, row in startup.items():
            row.seconds.append(ray_startup(w))
        if not args.quick:
            mergekit(merge, llama, out, scratch)
            measured(naive, [PY, "-m", "bench.one", "naive", llama["target"], llama["finetuned"], llama["base"],
                             out], out)
        print(f"run {i + 1}: floor {floor_row.seconds[-1]:.1f}s, local {local.seconds[-1]:.1f}s, "
              f"ray {rays[1].seconds[-1]:.1f}/{rays[2].seconds[-1]:.1f}s"
              + ("" if args.quick else f", mergekit {merge.seconds[-1]:.1f}s, naive {naive.seconds[-1]:.1f}s"),
              flush=True)
    warm(big)
    in_big = sum(os.path.getsize(f) for f in input_files(big))
    for _ in range(runs):
        graft_local(big_local, big, out, scratch)
    fp8 = data["fp8"]
    warm(fp8)
    in_fp8 = sum(os.path.getsize(f) for f in input_files(fp8))
    out_fp8 = sum(os.path.getsize(f) for f in input_files({"t": fp8["target"]}))
    fp8_floor = Row("I/O floor: cat inputs, write + sync output", "FP8")
    fp8_local = Row("graft --executor local, block FP8 in and out (float32)", "FP8")
    for _ in range(runs):
        fp8_floor.seconds.append(floor(fp8, out_fp8, scratch, row=fp8_floor))
        graft_local(fp8_local, fp8, out, scratch)
    rows = ([floor_row, direct_floor, local, no_report, exact_report, rays[1], rays[2], startup[1], startup[2]]
            + ([] if args.quick else [merge, naive]) + [big_local, fp8_floor, fp8_local])
    warm(llama)
    rows += recipe_rows(llama, scratch, runs)
    results = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "runs": runs,
               "input_bytes": {"1.1B": in_llama, "768MiB": in_big, "FP8": in_fp8}, "output_bytes": out_llama,
               "rows": [r.__dict__ for r in rows], "frontier": frontier(scratch, runs)}
    if not args.quick:
        s3 = s3_rows(data["s3"], scratch, runs)
        results["rows"] += [r.__dict__ for r in s3]
        rows += s3
    shutil.rmtree(scratch, ignore_errors=True)
    from bench.node import measure  # bench.node imports this module: imported once this one is loaded

    results["node"] = measure(os.path.join(HERE, "data", "node"), NODE_SIZE, min(runs, 3), "cpu")
    write_results(rows, results)


def machine() -> str:
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    return (f"{os.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def write_results(rows: list[Row], results: dict) -> None:
    floor_s = next(r for r in rows if r.job == "1.1B" and r.name.startswith("I/O floor: cat")).median
    with open(os.path.join(HERE, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    text = f"# graft benchmark ({results['date']})\n\n" + render.page(results)
    with open(os.path.join(HERE, "results.md"), "w") as f:
        f.write(text)
    render.write_readme()  # the README's Measured block, from the results.json just written
    chart(rows, floor_s)
    print(text)


def chart(rows: list[Row], floor_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.job == "1.1B" and "start-up" not in r.name]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(shown) + 1.2))
    names = [r.name for r in shown][::-1]
    values = [r.median for r in shown][::-1]
    colors = ["#2b7bb9" if n.startswith("graft") else "#999999" for n in names]
    ax.barh(names, values, color=colors)
    ax.axvline(floor_s, color="black", linestyle="--", linewidth=1)
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.1f}s", va="center", fontsize=8)
    ax.set_xlabel("wall time, seconds (1.1B bf16 transfer; dashed: I/O floor)")
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "results.png"), dpi=120)


if __name__ == "__main__":
    main()
