"""The node benchmark (issue 26): how much of one machine graft uses, against floors measured on it.

    python -m bench.node [--size GB] [--runs N] [--rows cpu|all] [--data DIR] [--out DIR] [--json PATH]

Three trios (target, fine-tune, base), each of about ``--size`` GB of inputs, generated once per size
under ``--data`` (bench/data.py's generators, scaled):

- ``llama``: Llama-shaped bf16 checkpoints (TinyLlama's layer shapes, the layer count and vocabulary
  scaled to the size); the target in shards of a quarter of its size (4 to 7 files: the output
  follows its layout), the others in shards of a sixth.
- ``one-shard``: one bf16 tensor per checkpoint in a single model.safetensors, so one output shard:
  the row that measures parallelism inside a shard.
- ``fp8``: block-FP8 checkpoints of DeepSeek-V3 expert shapes (bench.data.make_fp8), in 4 shards.

The defaults (``--size 3 --runs 1``, GPU rows when torch sees a GPU) are sized to finish in about
5 minutes on a 16-core GPU node with a warm page cache: some 40 graft processes of 2 to 10 s of
start-up each dominate; ``--runs 3`` for medians. On a 2-core machine ``--size 0.5 --rows cpu`` takes
a few minutes a round. The table ends with the time the whole benchmark took.

Per trio, each round (``--runs`` rounds; the table shows medians, ratios are medians of per-round
ratios), after one unmeasured graft run per trio (this VM pays for the first touch of memory):

- serial floor: one ``cat`` of the inputs, then one ``dd`` write of the output's size with fsync
  (bench.run.floor);
- parallel floor: the inputs cut into as many equal byte spans as there are cores, each read by its
  own ``dd`` process, all at once; then the output's size written as cores / 2 equal files by as many
  ``dd`` processes at once, each with fsync; then ``sync``. Both floors are external processes, so
  their CPU is exact (they are reaped);
- ``graft run --executor local`` with default flags, with ``--workers`` swept over 1, 2, 4, ... up
  to the cores (the sharded trios), with ``--threads`` swept the same way on the one-shard trio
  (when ``graft run --help`` lists it), ``--device cuda`` (when torch sees a GPU);
- ``graft run --executor ray`` (CPU actors), and ``--gpus-per-worker 0.25`` and ``1`` (GPU);
- on the one-shard trio, every graft row again under ``taskset -c 0`` (one core).

graft runs as the CLI in a subprocess; start-up and steady state are measured from outside. The
clock starts just before the process is spawned. Every 10 ms the benchmark samples ``rchar`` (bytes
read through system calls, /proc/PID/io) of the process, and for Ray of its shard actors too
(``ShardWorker`` in their command line), keeping each process's last value. Imports, configs and
headers are read before the data, and graft reads each input byte once, so after the run the bytes
read that are not data are known: total ``rchar`` − input bytes. Start-up ends at the first sample
whose ``rchar`` passes that plus 1 MiB: the first data read, to within 10 ms. Reads that are not data
and come later (a Ray actor importing while another already reads) make start-up longer by the time
taken to read as many data bytes, never shorter. Steady = wall − start-up; throughput = input bytes ÷
steady seconds.

CPU-s per GB: user + system CPU of every process reaped (local graft and the floors: exact); for Ray,
the sum of each process's last sampled CPU over the command's whole process tree (daemons included;
a lower bound, short of each process's last 10 ms). Peak RSS: the largest single process (for Ray,
the largest shard actor).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psutil

from bench.data import LLAMA, make_big, make_fp8, make_llama
from bench.render import paired
from bench.run import ENV, HERE, PY, Row, children_cpu, clear, floor, input_files, machine, spec_file, warm

__all__ = ["NodeRow", "trios", "measure", "lines"]

JOBS = ("llama", "one-shard", "fp8")
SAMPLE_S = 0.01
REFRESH = 20  # samples between listings of the process tree (about 0.2 s)
SLACK = 2**20  # bytes past the non-data reads that mark the first data read
FP8_EXPERT_BYTES = 3 * 2048 * 7168  # gate, up, down codes (the scales add 0.02%)


@dataclass
class NodeRow(Row):
    """One contender on one trio: bench.run.Row plus start-up and steady seconds per round."""
    startup: list[float] = field(default_factory=list)
    steady: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Contender:
    """A graft command line: its flags, the cores it may use (None: all), whether it runs Ray."""
    name: str
    flags: tuple[str, ...]
    cores: int | None = None

    @property
    def ray(self) -> bool:
        return "ray" in self.flags


def llama_config(checkpoint_bytes: float) -> dict:
    """TinyLlama's layer shapes, with the layers taking about 3/4 of ``checkpoint_bytes`` and the
    embeddings (input and output) the rest."""
    h, i = LLAMA["hidden_size"], LLAMA["intermediate_size"]
    kv = h // LLAMA["num_attention_heads"] * LLAMA["num_key_value_heads"]
    layer_bytes = 2 * (2 * h * h + 2 * kv * h + 3 * h * i + 2 * h)  # bf16 attention, MLP and norms
    layers = max(1, round(0.75 * checkpoint_bytes / layer_bytes))
    vocab = max(256, int(0.25 * checkpoint_bytes / (2 * 2 * LLAMA["hidden_size"])) // 64 * 64)
    return {**LLAMA, "num_hidden_layers": layers, "vocab_size": vocab}


def trios(root: str, size: float) -> dict[str, dict[str, str]]:
    """The three trios of about ``size`` GB of inputs each under ``root``, generated if missing."""
    per = size * 1e9 / 3
    mb = lambda n: f"{max(1, int(per / n / 1e6))}MB"  # noqa: E731
    tag = f"{size:g}"
    return {
        "llama": make_llama(root, cfg=llama_config(per), kind=f"llama-{tag}",
                            shards={"target": mb(4), "finetuned": mb(6), "base": mb(6)}),
        "one-shard": make_big(root, shape=(max(128, int(per / (2 * 8192)) // 128 * 128), 8192), kind=f"big-{tag}"),
        "fp8": make_fp8(root, experts=max(1, round(per / FP8_EXPERT_BYTES)), shards=4, kind=f"fp8-{tag}"),
    }


def sweep(cores: int) -> list[int]:
    """1, 2, 4, ... below ``cores``, then ``cores``."""
    return [n for n in (2**i for i in range(cores.bit_length())) if n < cores] + [cores]


def graft_flags() -> str:
    r = subprocess.run([PY, "-m", "graft.cluster.cli", "run", "--help"], env=ENV, capture_output=True, text=True,
                       check=True)
    return r.stdout


def contenders(job: str, cores: int, gpu: bool, threads: bool) -> list[Contender]:
    """The graft rows of ``job`` (GPU rows only when ``gpu``; ``--threads`` only when ``threads``)."""
    local = ("--executor", "local")
    rows = [Contender("graft local, defaults", local)]
    if job == "one-shard":
        rows += [Contender(f"graft local --threads {n}", (*local, "--threads", str(n))) for n in sweep(cores)
                 if threads]
    else:
        rows += [Contender(f"graft local --workers {n}", (*local, "--workers", str(n))) for n in sweep(cores)]
    if gpu:
        rows.append(Contender("graft local --device cuda", (*local, "--device", "cuda")))
    rows.append(Contender("graft ray, CPU actors", ("--executor", "ray")))
    if gpu:
        rows += [Contender(f"graft ray --gpus-per-worker {g}", ("--executor", "ray", "--gpus-per-worker", g))
                 for g in ("0.25", "1")]
    if job == "one-shard" and cores > 1:
        rows += [Contender(f"{c.name}, 1 core (taskset -c 0)", c.flags, cores=1) for c in list(rows)]
    return rows


def parallel_floor(paths: dict[str, str], out_bytes: int, scratch: str, readers: int, row: NodeRow) -> float:
    """``readers`` dd processes reading equal byte spans of the inputs at once, then ``readers // 2``
    dd processes writing equal parts of ``out_bytes`` at once (each with fsync), then sync."""
    files = [(f, os.path.getsize(f)) for f in input_files(paths)]
    total = sum(n for _, n in files)
    edges = [total * i // readers for i in range(readers + 1)]
    scripts, start = [], 0
    for f, n in files:  # each reader's span may cross files: its dd commands run one after another
        for r in range(readers):
            a, b = max(edges[r], start), min(edges[r + 1], start + n)
            if a < b:
                scripts.append((r, f"dd if={shlex.quote(f)} of=/dev/null bs=8M iflag=skip_bytes,count_bytes "
                                   f"skip={a - start} count={b - a} status=none"))
        start += n
    per_reader = [" && ".join(s for r, s in scripts if r == i) for i in range(readers)]
    writers = max(1, readers // 2)
    mib = -(-out_bytes // writers // 2**20)
    targets = [os.path.join(scratch, f"floor-{i}.bin") for i in range(writers)]
    c0, t0 = children_cpu(), time.perf_counter()
    concurrently([["bash", "-c", s] for s in per_reader if s])
    concurrently([["dd", "if=/dev/zero", f"of={t}", "bs=1M", f"count={mib}", "conv=fsync", "status=none"]
                  for t in targets])
    subprocess.run(["sync"], check=True)
    seconds = time.perf_counter() - t0
    row.cpu.append(children_cpu() - c0)
    for t in targets:
        os.remove(t)
    return seconds


def concurrently(cmds: list[list[str]]) -> None:
    with ThreadPoolExecutor(len(cmds)) as pool:
        list(pool.map(lambda c: subprocess.run(c, check=True), cmds))


@dataclass
class Trace:
    """What the 10 ms samples of one command's processes saw."""
    times: list[float] = field(default_factory=list)
    rchar: list[int] = field(default_factory=list)  # sum over the counted processes, per sample
    cpu: float = 0.0  # sum of each process's last sampled user + system CPU
    peak_rss: int = 0


def traced(cmd: list[str], ray: bool) -> tuple[float, Trace]:
    """Run ``cmd``, sampling its processes every 10 ms; the wall seconds and the trace. Bytes read,
    CPU and RSS of the command's own process and, for Ray, its shard actors, every sample; CPU of
    the rest of its process tree every 0.2 s, when the tree is listed again. RSS: of the process
    (local) or of the largest shard actor (Ray)."""
    trace, last_read, last_cpu = Trace(), {}, {}
    err = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty child must not block on a full pipe
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=err, text=True)
    root = psutil.Process(proc.pid)
    tree, counted = [root], [root]
    for n in itertools.count():
        if proc.poll() is not None:
            break
        if n % REFRESH == 0:  # listing the tree reads every /proc/PID/stat of the machine: not every sample
            tree = [root, *children(root)]
            counted = [root, *(p for p in tree[1:] if "ShardWorker" in " ".join(cmdline(p)))]
        for p in tree if n % REFRESH == 0 else counted:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    last_cpu[p.pid] = t.user + t.system
                    if p in counted:
                        last_read[p.pid] = p.io_counters().read_chars
                        if p is not root or not ray:
                            trace.peak_rss = max(trace.peak_rss, p.memory_info().rss)
            except psutil.Error:
                pass
        trace.times.append(time.perf_counter() - t0)
        trace.rchar.append(sum(last_read.values()))
        time.sleep(SAMPLE_S)
    seconds = time.perf_counter() - t0
    err.seek(0)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err.read()[-2000:]}")
    err.close()
    trace.cpu = sum(last_cpu.values())
    return seconds, trace


def children(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.children(recursive=True)
    except psutil.Error:
        return []


def cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def first_read(trace: Trace, input_bytes: int) -> float | None:
    """Seconds from the start to the first data read (see the module's docstring); None when the
    command read fewer bytes than its inputs (then it was not seen reading them)."""
    other = trace.rchar[-1] - input_bytes if trace.rchar else -1
    if other < 0:
        return None
    return next(t for t, r in zip(trace.times, trace.rchar) if r > other + SLACK or r == trace.rchar[-1])


def graft(row: NodeRow, c: Contender, paths: dict[str, str], out: str, scratch: str, input_bytes: int) -> None:
    """One measured run of ``c`` on a trio: wall, start-up, steady, CPU and peak RSS into ``row``."""
    clear(out)
    pin = ["taskset", "-c", ",".join(map(str, range(c.cores)))] if c.cores else []
    c0 = children_cpu()
    seconds, trace = traced([*pin, PY, "-m", "graft.cluster.cli", "run", spec_file(paths, out, scratch), "-q",
                             *c.flags], c.ray)
    startup = first_read(trace, input_bytes)
    row.seconds.append(seconds)
    row.startup.append(startup if startup is not None else float("nan"))
    row.steady.append(seconds - startup if startup is not None else float("nan"))
    row.cpu.append(trace.cpu if c.ray else children_cpu() - c0)
    row.peak_rss.append(trace.peak_rss)
    row.bytes_read.append(trace.rchar[-1] if trace.rchar else 0)


def gpu_name() -> str:
    """The first CUDA device's name, or "" (asked in a child process: the CUDA runtime stays out of
    this one)."""
    r = subprocess.run([PY, "-c", "import torch; print(torch.cuda.get_device_name(0) "
                                  "if torch.cuda.is_available() else '')"], env=ENV, capture_output=True,
                       text=True, check=True)
    return r.stdout.strip()


def measure(root: str, size: float, runs: int, kind: str | None = None) -> dict:
    """Generate (once) and measure the three trios; the results as a JSON-ready dict. ``kind``:
    "cpu" (CPU rows only) or "all"; by default "all" when torch sees a GPU."""
    t0 = time.monotonic()
    # Generated in a process of its own, as bench.run does: the parent stays small.
    subprocess.run([PY, "-c", f"from bench.node import trios; trios({root!r}, {size!r})"], env=ENV, check=True)
    data = trios(root, size)
    cores = len(os.sched_getaffinity(0))
    gpu = gpu_name()
    kind = kind or ("all" if gpu else "cpu")
    threads = "--threads" in graft_flags()
    notes = [f"parallel floor: {cores} dd readers of equal byte spans, then {max(1, cores // 2)} dd writers "
             "of equal parts (each with fsync), then sync; subprocesses, not threads."]
    if not threads:
        notes.append("--threads: skipped, `graft run --help` does not list it yet.")
    if kind == "all" and not gpu:
        notes.append("GPU rows: skipped, torch.cuda.is_available() is False.")
    use_gpu = kind == "all" and bool(gpu)
    scratch = os.path.join(root, "scratch")
    os.makedirs(scratch, exist_ok=True)
    out = os.path.join(scratch, "out")
    jobs, table = {}, []
    plan = {job: contenders(job, cores, use_gpu, threads) for job in JOBS}
    for job in JOBS:
        paths = data[job]
        jobs[job] = {"input_bytes": sum(os.path.getsize(f) for f in input_files(paths)),
                     "output_bytes": sum(os.path.getsize(f) for f in input_files({"t": paths["target"]})),
                     "output_shards": len(input_files({"t": paths["target"]}))}
        table += [NodeRow("serial floor (cat + dd + sync)", job), NodeRow("parallel floor", job)]
        table += [NodeRow(c.name, job) for c in plan[job]]
    by = {(r.job, r.name): r for r in table}
    for job in JOBS:  # unmeasured: the first touch of memory is paid here
        warm(data[job])
        graft(NodeRow("warm-up", job), plan[job][0], data[job], out, scratch, jobs[job]["input_bytes"])
    for i in range(runs):
        for job in JOBS:
            paths, info = data[job], jobs[job]
            warm(paths)
            serial = by[(job, "serial floor (cat + dd + sync)")]
            serial.seconds.append(floor(paths, info["output_bytes"], scratch, row=serial))
            par = by[(job, "parallel floor")]
            par.seconds.append(parallel_floor(paths, info["output_bytes"], scratch, cores, par))
            for c in plan[job]:
                graft(by[(job, c.name)], c, paths, out, scratch, info["input_bytes"])
        print(f"round {i + 1} of {runs} done", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    for r in table:
        if "floor" in r.name:
            r.startup, r.steady = [0.0] * len(r.seconds), list(r.seconds)
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine() + (f", GPU {gpu}" if gpu else ", no GPU"),
            "cores": cores, "gpu": gpu, "runs": runs, "size_gb": size, "rows_kind": kind, "jobs": jobs,
            "elapsed_s": time.monotonic() - t0,
            "notes": notes, "rows": [r.__dict__ for r in table]}


def lines(results: dict) -> list[str]:
    """The markdown table of ``results`` (from measure), its machine line, notes and 1-core scaling."""
    rows = [NodeRow(**r) for r in results["rows"]]
    par = {r.job: r for r in rows if r.name == "parallel floor"}
    out = [f"{results['machine']}; warm page cache; median of {results['runs']} run(s); about "
           f"{results['size_gb']:g} GB of inputs per trio ("
           + ", ".join(f"{j}: {v['input_bytes'] / 1e9:.2f} GB in, {v['output_shards']} output shard(s)"
                       for j, v in results["jobs"].items()) + ").", "",
           "| job | contender | wall s | start-up s | steady s | GB/s in (steady) | × parallel floor "
           "| CPU-s per GB | peak RSS MB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gb = results["jobs"][r.job]["input_bytes"] / 1e9
        steady = statistics.median(r.steady)
        rss = f"{statistics.median(r.peak_rss) / 1e6:.0f}" if r.peak_rss else ""
        out.append(f"| {r.job} | {r.name} | {r.median:.2f} | {statistics.median(r.startup):.2f} | {steady:.2f} "
                   f"| {gb / steady:.2f} | {paired(par[r.job].seconds, r.steady):.2f} "
                   f"| {statistics.median(r.cpu) / gb:.2f} | {rss} |")
    one = {r.name: r for r in rows if r.job == "one-shard"}
    scaling = [f"{name}: {paired(one[name + ', 1 core (taskset -c 0)'].steady, r.steady):.2f}×"
               for name, r in one.items() if name + ", 1 core (taskset -c 0)" in one]
    if scaling:
        out += ["", f"One-shard trio, steady-state speed-up of {results['cores']} cores over 1 (paired): "
                + "; ".join(scaling) + "."]
    out += ["", *results["notes"], f"The whole benchmark took {results['elapsed_s']:.0f} s, data generation "
            "included. Start-up: from spawning the process to its first data read (rchar past "
            "imports, configs and headers; bench/node.py's docstring); steady: the rest. × parallel floor: "
            "steady throughput over the parallel floor's, paired per round."]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=3.0, help="GB of inputs per trio (default 3)")
    ap.add_argument("--runs", type=int, default=1, help="rounds; the table shows medians (default 1)")
    ap.add_argument("--rows", choices=["cpu", "all"], help="default: all with a GPU, else cpu")
    ap.add_argument("--data", default=os.path.join(HERE, "data", "node"), help="where the trios are generated")
    ap.add_argument("--out", help="also write the table as DIR/node.md")
    ap.add_argument("--json", default=os.path.join(HERE, "node.json"))
    args = ap.parse_args()
    results = measure(args.data, args.size, args.runs, args.rows)
    table = lines(results)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "node.md"), "w") as f:
            f.write("\n".join(["# graft node benchmark", "", *table, ""]))
    print("\n".join(table))


if __name__ == "__main__":
    main()
