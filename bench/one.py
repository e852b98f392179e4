"""One measured process: run one contender and print a JSON line with its own numbers.

Each measurement runs in a fresh process so that its peak RSS (``ru_maxrss``) and the bytes it read
through system calls (``rchar`` in ``/proc/self/io``) belong to that run alone.

    python -m bench.one graft SPEC.yaml [--workers 2]     # graft's local executor, in-process
    python -m bench.one naive TARGET FINETUNED BASE OUT   # all three state dicts in memory, float64
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import time


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def _report(seconds: float, read: int, **extra: object) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"seconds": seconds, "peak_rss": peak, "rchar": read, **extra}), flush=True)


def run_graft(spec_path: str, workers: int) -> None:
    from graft.engine.local import run_local
    from graft.engine.spec import load_spec

    spec = load_spec(spec_path)
    r0, t0 = _rchar(), time.perf_counter()
    result = run_local(spec, workers=workers)
    seconds, read = time.perf_counter() - t0, _rchar() - r0
    _report(seconds, read, engine_bytes_read=result.manifest["run"]["bytes_read"])


def run_naive(target: str, finetuned: str, base: str, out: str) -> None:
    """What a short script does: load every tensor of all three, compute in float64, save."""
    import torch
    from safetensors.torch import load_file, save_file

    def load(d: str) -> dict[str, torch.Tensor]:
        sd: dict[str, torch.Tensor] = {}
        for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
            sd.update(load_file(f))
        return sd

    r0, t0 = _rchar(), time.perf_counter()
    t, f, b = load(target), load(finetuned), load(base)
    merged = {k: (v.double() + (f[k].double() - b[k].double())).to(v.dtype) for k, v in t.items()}
    os.makedirs(out, exist_ok=True)
    save_file(merged, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    fd = os.open(os.path.join(out, "model.safetensors"), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    _report(time.perf_counter() - t0, _rchar() - r0)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    g = sub.add_parser("graft")
    g.add_argument("spec")
    g.add_argument("--workers", type=int, default=2)  # the CLI's default for --executor local
    n = sub.add_parser("naive")
    for role in ("target", "finetuned", "base", "out"):
        n.add_argument(role)
    args = ap.parse_args()
    if args.what == "graft":
        run_graft(args.spec, args.workers)
    else:
        run_naive(args.target, args.finetuned, args.base, args.out)


if __name__ == "__main__":
    main()
