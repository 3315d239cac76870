"""Benchmark entry point.

    python benchmarks/run.py kernel [--device cuda|cpu] [--out DIR] [--quick]

Writes ``<suite>_<device>.json`` (rows + device facts + versions) and ``<suite>_<device>.md`` under
``--out`` (default ``benchmarks/results``). Figures are only meaningful for the device named in them.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kernel_suite  # noqa: E402
from common import device_facts, timestamp, versions, write_results  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=["kernel"], help="which suite to run")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON and Markdown results")
    parser.add_argument("--quick", action="store_true", help="a small subset (one small shape, fp32, no compile)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement")
    return parser.parse_args(argv)


def resolve_device(name: str | None) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device")
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def device_slug(facts: dict) -> str:
    if facts.get("gpu") == "no GPU":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", facts["name"].lower()).strip("-")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in kernel_suite.DTYPES]
    if unknown:
        raise SystemExit(f"--dtypes: unknown {unknown}; choose from {sorted(kernel_suite.DTYPES)}")
    on_gpu = device.type == "cuda"
    settings = kernel_suite.Settings(
        device=device,
        shapes=kernel_suite.QUICK_SHAPES if args.quick else kernel_suite.SHAPES,
        dtypes=["fp32"] if args.quick else dtypes,
        compile=not (args.quick or args.no_compile),
        warmup=3 if on_gpu else 1,
        repeats=args.repeats or (50 if on_gpu else (3 if args.quick else 5)),
    )
    facts = device_facts(device)
    print(f"[bench] kernel suite on {facts['name']} ({device}); {len(settings.shapes)} shapes x {settings.dtypes}")
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[bench] {time.perf_counter() - started:7.1f}s  {message}", flush=True)

    rows, suite_meta = kernel_suite.run(settings, progress)
    for row in rows:
        row.extra["device"] = facts["name"]
    meta = {"suite": "kernel", "timestamp": timestamp(), "device": facts, "versions": versions(),
            "quick": args.quick, "wall_s": time.perf_counter() - started, **suite_meta}
    header = (f"# Kernel benchmark: {facts['name']}\n\n"
              f"- device: {facts['name']} ({device}); {timestamp()}\n"
              f"- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v) + "\n"
              f"- measured copy bandwidth: {suite_meta['copy_bandwidth_gbps']:.1f} GB/s\n")
    if "note" in suite_meta:
        header += f"- note: {suite_meta['note']}\n"
    markdown = header + "\n" + kernel_suite.markdown(rows, suite_meta)
    stem = f"kernel_{device_slug(facts)}" + ("_quick" if args.quick else "")
    json_path, md_path = write_results(args.out, stem, rows, meta, markdown)
    print(markdown)
    print(f"[bench] wrote {json_path} and {md_path} in {meta['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
