"""Benchmark entry point.

    python benchmarks/run.py {kernel,trainer,all} [--device cuda|cpu] [--out DIR] [--quick]
    python benchmarks/run.py kernel --compile-only [--targets sm_80,sm_90] [--quick]
    python benchmarks/run.py dryrun [--config configs/pshuman.yaml] [--sweep config] [--g-skel] [--out DIR]
    python benchmarks/run.py step [--config configs/pshuman.yaml] [--device cuda] [--repeats N] [--tiny]

kernel: the fused PoseScore op vs the eager and compiled PyTorch reference (forward, backward, full),
plus a sweep over heatmap sizes. kernel --compile-only: every kernel variant compiled for real GPU
targets without a GPU, with registers, spills, instruction mix per element and a static roofline for
H100/H200 (``kernel_static.json`` / ``.md``; ``--quick`` compiles a covering set at one shape). trainer: the
trainer's own step (``drpose.training.step.train_step``) under DeepSpeed at K = 1, 2, 4, 8
gradient-carrying steps with activation checkpointing off / per UNet call / inside the UNet too / with
offload, ZeRO-2 and ZeRO-3. dryrun: one training step of a config at its real size on fake tensors (no GPU,
no weights): peak memory by category, FLOPs and a modelled step time on H100 and H200, per configuration
(``benchmarks/dryrun.py``). step: the same step measured on a device with random weights (peak memory
from the CUDA allocator, step time), next to the dry run's modelled figures for the same settings
(``benchmarks/step_suite.py``). Each suite writes ``<suite>_<device>.json``
(rows in one schema + device facts + versions), ``<suite>_<device>.md`` and PNG plots under ``--out``
(default ``benchmarks/results``). ``--quick`` runs a small CPU subset in about a minute.

On CPU the process re-executes itself with ``MALLOC_MMAP_THRESHOLD_`` set, so that peak-RSS figures
track live tensors (see ``drpose.memory``); CPU timings then include the cost of fresh mappings.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dryrun  # noqa: E402
import kernel_suite  # noqa: E402
from common import device_facts, timestamp, versions, write_results  # noqa: E402
from drpose.memory import cpu_peak_is_exact, exact_cpu_env  # noqa: E402
from drpose.training.rendezvous import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=["kernel", "trainer", "dryrun", "step", "all"],
                        help="which suite to run (all: kernel and trainer)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON, Markdown and PNG results")
    parser.add_argument("--quick", action="store_true", help="a small CPU subset (about a minute)")
    parser.add_argument("--dtypes", default=None,
                        help="kernel suite: comma-separated subset of fp32,bf16 (default both); with --compile-only "
                             "of fp32,fp16,bf16 (default all)")
    parser.add_argument("--compile-only", action="store_true",
                        help="kernel suite: compile for real targets and model the kernels statically (no GPU needed)")
    parser.add_argument("--targets", default="sm_80,sm_90", help="--compile-only: comma-separated GPU targets")
    parser.add_argument("--shapes", default=None,
                        help="--compile-only: compile every variant at these shapes only, e.g. 12x43x96x96 (comma-"
                             "separated; default: the benchmark shapes, DrPose's and the size sweep)")
    parser.add_argument("--no-compile", action="store_true", help="kernel suite: skip the torch.compile reference")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement")
    parser.add_argument("--config", type=Path, default=None,
                        help="the run config whose step is measured (dryrun: configs/pshuman.yaml; trainer: its "
                             "bundle, LoRA and reward, default configs/tiny.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a config override (repeatable), e.g. --set model.pipeline=DIR --set model.g_skel=DIR")
    parser.add_argument("--sweep", choices=["none", "config"], default="none",
                        help="dryrun: 'config' adds one change at a time (checkpointing off / per call / inside the "
                             "UNet, groups per call, K)")
    parser.add_argument("--g-skel", action="store_true", help="dryrun: also g_skel training and VAE encoding")
    parser.add_argument("--tiny", action="store_true", help="dryrun, step: a small model of the same structure")
    parser.add_argument("--exact", action="store_true", help="dryrun: execute every UNet call (slower)")
    parser.add_argument("--no-validate", action="store_true",
                        help="dryrun: skip the check against real CPU tensors at tiny size")
    parser.add_argument("--resume", action="store_true", help="dryrun: reuse configurations already in --out")
    parser.add_argument("--measured-only", action="store_true",
                        help="dryrun: report the configurations already in --out, measuring no new ones")
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


def ensure_process_group() -> None:
    """DeepSpeed engines need a process group; make a one-process one for the trainer suite."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


def header(title: str, facts: dict, device: torch.device, meta: dict) -> str:
    lines = [f"# {title}: {facts['name']}", "", f"- device: {facts['name']} ({device}); {timestamp()}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items() if v)]
    for key in ("copy_bandwidth_gbps",):
        if key in meta:
            lines.append(f"- measured copy bandwidth: {meta[key]:.1f} GB/s")
    if device.type == "cpu":
        lines.append("- peak memory: process peak RSS (exact: allocations unmapped on free)" if cpu_peak_is_exact()
                     else "- peak memory: process peak RSS (approximate)")
    if "model" in meta:
        lines.append(f"- model: {meta['model']}")
    if "lora" in meta:
        lines.append(f"- adapters: {meta['lora']}")
    if "note" in meta:
        lines.append(f"- note: {meta['note']}")
    return "\n".join(lines) + "\n\n"


def split_list(text: str | None, allowed, what: str, default) -> list[str]:
    chosen = [t.strip() for t in text.split(",") if t.strip()] if text else list(default)
    unknown = [t for t in chosen if t not in allowed]
    if unknown or not chosen:
        raise SystemExit(f"{what}: unknown {unknown or text!r}; choose from {sorted(allowed)}")
    return chosen


def compile_only(args, progress, started: float) -> list[Path]:
    """kernel --compile-only: compile every variant for real targets and write the static model."""
    import kernel_static

    targets = split_list(args.targets, kernel_static.TARGETS, "--targets", kernel_static.TARGETS)
    dtypes = split_list(args.dtypes, kernel_static.DTYPES, "--dtypes", kernel_static.DTYPES)
    if args.quick:
        shapes, variants = kernel_suite.QUICK_SHAPES, kernel_static.representative_variants()
        variants = [v for v in variants if v.dtype in dtypes]
        roofline_shapes = []
    elif args.shapes:
        try:
            shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",")]
        except ValueError:
            raise SystemExit(f"--shapes: expected N x C x H x W like 12x43x96x96, got {args.shapes!r}") from None
        if any(len(shape) != 4 for shape in shapes):
            raise SystemExit(f"--shapes: expected N x C x H x W like 12x43x96x96, got {args.shapes!r}")
        variants = kernel_static.all_variants(tuple(dtypes))
        roofline_shapes = [kernel_static.SHAPE_DRPOSE, *kernel_suite.SHAPES]
    else:
        shapes = list(dict.fromkeys([*kernel_suite.SHAPES, kernel_static.SHAPE_DRPOSE]))
        variants = kernel_static.all_variants(tuple(dtypes))
        roofline_shapes = [kernel_static.SHAPE_DRPOSE, *kernel_suite.SHAPES]
    # the size sweep times pose_score on fp32 contiguous logits: those variants at its heatmap sizes
    sweep = [(24, 23, side, side) for side in kernel_suite.SIZE_SWEEP] if not (args.quick or args.shapes) else []
    sweep_variants = [v for v in kernel_static.all_variants(("fp32",))
                      if v.mode == "pose_score" and v.layout == "contiguous" and "fp32" in dtypes]
    settings = kernel_static.StaticSettings(targets=targets, shapes=shapes, variants=variants,
                                            roofline_shapes=roofline_shapes,
                                            roofline_dtypes=[d for d in ("fp32", "bf16") if d in dtypes],
                                            sweep_shapes=sweep, sweep_variants=sweep_variants)
    rows, meta = kernel_static.run(settings, progress)
    meta = {"suite": "kernel_static", "timestamp": timestamp(), "versions": versions(), "quick": args.quick,
            "variant_shapes": [list(shape) for shape in shapes], "sweep_shapes": [list(shape) for shape in sweep],
            "targets": targets, "wall_s": time.perf_counter() - started, **meta}
    text = f"# Kernel static figures ({', '.join(targets)})\n\n- {timestamp()}; " + ", ".join(
        f"{k} {v}" for k, v in versions().items() if v) + "\n\n" + kernel_static.markdown(rows, meta)
    stem = "kernel_static" + ("_quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out / f"{stem}.json", args.out / f"{stem}.md"
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    md_path.write_text(text)
    return [json_path, md_path]


def compile_main(args) -> int:
    if args.suite != "kernel":
        raise SystemExit("--compile-only applies to the kernel suite: python benchmarks/run.py kernel --compile-only")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or "TRITON_DEFAULT_FP_FUSION" not in os.environ:
        # compiling for a real target needs the kernels as JITFunctions, which the interpreter replaces
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, set to silence its warning
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[bench] {time.perf_counter() - started:7.1f}s  {message}", flush=True)

    written = compile_only(args, progress, started)
    print(f"[bench] wrote {', '.join(str(p) for p in written)} in {time.perf_counter() - started:.0f}s")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compile_only:
        return compile_main(args)
    device = resolve_device(args.device)
    if device.type == "cpu" and not cpu_peak_is_exact():
        os.execve(sys.executable, [sys.executable, *sys.argv], exact_cpu_env())
    facts = device_facts(device)
    started = time.perf_counter()
    slug = device_slug(facts) + ("_quick" if args.quick else "")

    def progress(message: str) -> None:
        print(f"[bench] {time.perf_counter() - started:7.1f}s  {message}", flush=True)

    written = []
    if args.suite == "dryrun":
        written += dryrun.run(args.config or ROOT / "configs" / "pshuman.yaml", args.out, sweep=args.sweep, g_skel=args.g_skel, tiny=args.tiny,
                              exact=args.exact, validation=not args.no_validate, resume=args.resume,
                              measured_only=args.measured_only,
                              overrides=args.overrides, progress=progress,
                              meta_extra={"timestamp": timestamp(), "host": facts, "versions": versions()})
    if args.suite == "step":
        import step_suite

        config = args.config or ROOT / "configs" / "pshuman.yaml"
        repeats = args.repeats or (2 if device.type == "cuda" else 1)
        payload = step_suite.run(config, device, repeats, args.tiny, args.overrides, progress, facts)
        payload["meta"].update(suite="step", timestamp=timestamp(), versions=versions(),
                               wall_s=time.perf_counter() - started)
        stem = f"step_{config.stem}{'_tiny' if args.tiny else ''}_{slug}"
        args.out.mkdir(parents=True, exist_ok=True)
        json_path, md_path = args.out / f"{stem}.json", args.out / f"{stem}.md"
        json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        md_path.write_text(header(f"Measured training step of {payload['meta']['config']}", facts, device, {})
                           + step_suite.markdown(payload))
        written += [json_path, md_path]
    if args.suite in ("kernel", "all"):
        dtypes = [d.strip() for d in (args.dtypes or "fp32,bf16").split(",") if d.strip()]
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
            repeats=args.repeats or (50 if on_gpu else 3),
            size_sweep=[] if args.quick else kernel_suite.SIZE_SWEEP,
        )
        rows, meta = kernel_suite.run(settings, progress)
        markdown = header("Kernel benchmark", facts, device, meta) + kernel_suite.markdown(rows, meta)
        written += write_results(args.out, f"kernel_{slug}", rows, suite_meta("kernel", facts, args, started, meta), markdown)
        plot = kernel_suite.plot_sizes(rows, args.out / f"kernel_{slug}_sizes.png")
        written += [plot] if plot else []
    if args.suite in ("trainer", "all"):
        import trainer_suite  # the training stack, imported only when its suite runs

        ensure_process_group()
        settings = trainer_suite.TrainerSettings(
            device=device,
            ks=[1, 2] if args.quick else [1, 2, 4, 8],
            modes=["off", "call"] if args.quick else ["off", "call", "call+unet", "call+offload"],
            zero_configs=["ds_zero2.json"] if args.quick else ["ds_zero2.json", "ds_zero3.json"],
            num_steps=3 if args.quick else 10,
            batch_size=1 if args.quick else 2,
            warmup=1,
            repeats=args.repeats or (2 if args.quick else 3),
            guidance_scale=1.0 if args.quick else 3.0,
            config=args.config or ROOT / "configs" / "tiny.yaml",
            overrides=tuple(args.overrides),
        )
        rows, meta = trainer_suite.run(settings, progress)
        markdown = header("Trainer benchmark", facts, device, meta) + trainer_suite.markdown(rows)
        written += write_results(args.out, f"trainer_{slug}", rows, suite_meta("trainer", facts, args, started, meta), markdown)
        plot = trainer_suite.plot_growth(rows, args.out / f"trainer_{slug}_growth.png")
        written += [plot] if plot else []
    print(f"[bench] wrote {', '.join(str(p) for p in written)} in {time.perf_counter() - started:.0f}s")
    return 0


def suite_meta(suite: str, facts: dict, args, started: float, meta: dict) -> dict:
    return {"suite": suite, "timestamp": timestamp(), "device": facts, "versions": versions(), "quick": args.quick,
            "wall_s": time.perf_counter() - started, "cpu_peak_exact": cpu_peak_is_exact(), **meta}


if __name__ == "__main__":
    sys.exit(main())
