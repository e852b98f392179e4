"""One measured process: run one contender and print a JSON line with its own numbers.

Each measurement runs in a fresh process so that its peak RSS (``ru_maxrss``) and the bytes it read
through system calls (``rchar`` in ``/proc/self/io``) belong to that run alone.

    python -m bench.one graft SPEC.yaml [--workers N] [--threads T] [--kind diff]   # graft's local executor
    python -m bench.one naive TARGET FINETUNED BASE OUT   # all three state dicts in memory, float64
    python -m bench.one s3raw JOB.json                    # raw s3fs range reads of the objects
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


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


_CPU0 = _cpu()  # set again when a measured region starts


def _start() -> tuple[int, float]:
    global _CPU0
    _CPU0 = _cpu()
    return _rchar(), time.perf_counter()


def _report(seconds: float, read: int, **extra: object) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"seconds": seconds, "peak_rss": peak, "rchar": read, "cpu": _cpu() - _CPU0, **extra}),
          flush=True)


def run_graft(spec_path: str, workers: int | None, kind: str = "transfer", threads: int | None = None) -> None:
    from graft.engine.run.local import run_local
    from graft.engine.plan.specfile import load_spec

    spec = load_spec(spec_path, kind=kind)
    if spec.storage_options.get("s3"):
        import s3fs  # noqa: F401 # imports stay outside the timed region, as in the s3raw row
    r0, t0 = _start()
    result = run_local(spec, workers=workers, **({"threads": threads} if threads else {}))
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

    r0, t0 = _start()
    t, f, b = load(target), load(finetuned), load(base)
    merged = {k: (v.double() + (f[k].double() - b[k].double())).to(v.dtype) for k, v in t.items()}
    os.makedirs(out, exist_ok=True)
    save_file(merged, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    fd = os.open(os.path.join(out, "model.safetensors"), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    _report(time.perf_counter() - t0, _rchar() - r0)


def run_s3raw(job_path: str) -> None:
    """Read every byte of the .safetensors objects in ``dirs`` with s3fs range requests, ``inflight`` at a time (a
    sliding window), ``part`` bytes each: the same request sizes graft makes. Timed from the
    client's creation and the objects' sizes, as graft's run is."""
    import fsspec

    with open(job_path) as f:
        job = json.load(f)
    _, t0 = _start()  # like graft's run: from the client's creation (imports excluded)
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **job["options"])
    sizes = {e["name"]: e["size"] for d in job["dirs"] for e in fs.ls(d, detail=True)
             if e["name"].endswith(".safetensors")}
    part = job["part"]
    ranges = [(p, a, min(a + part, n)) for p, n in sizes.items() for a in range(0, n, part)]
    got = 0

    def download() -> None:
        nonlocal got
        for i in range(0, len(ranges), 96):  # bounded memory: 96 parts held at most
            batch = ranges[i:i + 96]
            out = fs.cat_ranges([p for p, _, _ in batch], [a for _, a, _ in batch], [b for _, _, b in batch],
                                batch_size=job["inflight"], on_error="raise")
            got += sum(len(b) for b in out)

    upload = job.get("upload")
    if upload:  # the output's bytes go up at the same time, as one multipart upload per object
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as side:
            up = side.submit(_multipart_upload, fs, upload)
            download()
            up.result()
    else:
        download()
    seconds = time.perf_counter() - t0
    if got != sum(sizes.values()):
        raise SystemExit(f"read {got} bytes, expected {sum(sizes.values())}")
    _report(seconds, got)


def _multipart_upload(fs, upload: dict) -> None:  # noqa: ANN001
    """``upload["sizes"]`` objects under ``upload["prefix"]``, each a multipart upload of
    ``upload["part"]``-byte parts, ``upload["inflight"]`` parts on the wire at once."""
    from concurrent.futures import ThreadPoolExecutor

    bucket, prefix, part = upload["bucket"], upload["prefix"], upload["part"]
    body = bytes(part)
    with ThreadPoolExecutor(upload["inflight"]) as pool:
        for i, size in enumerate(upload["sizes"]):
            key = f"{prefix}/object-{i}"
            uid = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
            starts = range(0, size, part)
            parts = list(pool.map(lambda a: fs.call_s3(
                "upload_part", Bucket=bucket, Key=key, UploadId=uid, PartNumber=a // part + 1,
                Body=body[:min(part, size - a)])["ETag"], starts))
            fs.call_s3("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=uid,
                       MultipartUpload={"Parts": [{"ETag": e, "PartNumber": n + 1} for n, e in enumerate(parts)]})


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    g = sub.add_parser("graft")
    g.add_argument("spec")
    g.add_argument("--workers", type=int, default=None)  # None: sized from the machine, as the CLI's
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--kind", default="transfer", choices=["transfer", "diff"])  # graft run / graft diff
    n = sub.add_parser("naive")
    for role in ("target", "finetuned", "base", "out"):
        n.add_argument(role)
    r = sub.add_parser("s3raw")
    r.add_argument("job")
    args = ap.parse_args()
    if args.what == "graft":
        run_graft(args.spec, args.workers, args.kind, args.threads)
    elif args.what == "s3raw":
        run_s3raw(args.job)
    else:
        run_naive(args.target, args.finetuned, args.base, args.out)


if __name__ == "__main__":
    main()
