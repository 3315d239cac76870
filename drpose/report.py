"""The report of a DrPose run: base vs fine-tuned model on held-out ``hard`` and ``narrow`` poses.

    python -m drpose.report --run runs/demo [--out runs/demo] [--num 48] [--steps 10]
                            [--reconstruction | --no-reconstruction] [--reconstruction-num 4]

Writes ``report.json`` (``{set: {"base": metrics, "finetuned": metrics}}`` plus ``by_family``: the same
split by the kind of pose, e.g. ``hard``'s inversions, splits, bends and tumbles; and ``meta``), ``report.md``
and figures: ``reward_curve.png`` (from the run's metrics.jsonl), ``metrics.png`` (bars), and per set
``<set>_views.png`` (true renders, base and fine-tuned views with keypoints read from the images). With
``--reconstruction`` (the default) ``--reconstruction-num`` samples of each set, spread over its kinds of pose,
are also carved into meshes (:mod:`drpose.reconstruction`) and scored against the true bodies (Chamfer, P2S,
normal consistency, F-score, render PSNR/SSIM) for both models, with the oracle (true renders), per family too
(``report.json``: each model's ``"reconstruction"``, and ``reconstruction``: per set the oracle, the families,
the samples' indices and the seconds taken), and ``<set>_meshes.png`` draws truth, oracle, base and fine-tuned
meshes side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from drpose.body import joints_from_params
from drpose.evaluate import HELD_OUT_SEEDS, load_model, markdown_table, reconstruction_table, run_bundle
from drpose.evaluation.figures import keypoint_grid, metric_bars, reward_curve
from drpose.evaluation.metrics_run import EvaluationOutputs, run_model, summarize
from drpose.poses import pose_families, sample_poses
from drpose.render import render_bodies
from drpose.training.lora import adapters_disabled
from drpose.training.metrics_log import read_metrics

SETS = ("hard", "narrow")
MODELS = ("base", "finetuned")
FIGURE_SAMPLES = 3


def comparison_rows(truth_rgb, truth2d, runs: dict, count: int) -> list[dict]:
    rows = []
    for i in range(count):
        rows.append({"label": f"#{i} truth", "images": truth_rgb[i], "estimate": None, "truth": truth2d[i]})
        for model, outputs in runs.items():
            rows.append({"label": f"#{i} {model}", "images": outputs.generated_rgb[i],
                         "estimate": outputs.points2d[i], "truth": outputs.truth2d[i]})
    return rows


FAMILY_METRICS = ("pck@0.1", "mpjpe", "pose_score", "samples")


def family_breakdown(runs: dict[str, EvaluationOutputs], families: list[str], image_size: int,
                     view_names: tuple[str, ...]) -> dict[str, dict[str, dict]]:
    """``{family: {model: metrics}}`` over the samples of each family (in order of first appearance)."""
    breakdown = {}
    for family in dict.fromkeys(families):
        mask = torch.tensor([f == family for f in families])
        breakdown[family] = {
            model: {k: v for k, v in summarize(outputs.select(mask), image_size, view_names).items() if k in FAMILY_METRICS}
            for model, outputs in runs.items()
        }
    return breakdown


RECONSTRUCTION_FAMILY_METRICS = ("chamfer", "p2s", "s2p", "fscore@2cm", "failures", "samples")
# Samples reconstructed per set by default (one of each kind of hard pose): with both models and the oracle,
# 2 sets x 4 x 3 = 24 reconstructions on one process per core (README, "3D reconstruction").
RECONSTRUCTION_NUM = 4


def spread_over_families(families: list[str], count: int) -> list[int]:
    """``count`` sample indices taken in turn from each family (in order of first appearance, each family's
    samples in order), so that every kind of pose is reconstructed; sorted."""
    queues = [[i for i, f in enumerate(families) if f == family] for family in dict.fromkeys(families)]
    picked = []
    while len(picked) < min(count, len(families)):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return sorted(picked)


def reconstruction_section(joints: torch.Tensor, runs: dict[str, EvaluationOutputs], picked: list[int],
                           families: list[str], rig, size: int, figure: Path | None) -> dict:
    """Reconstruction summaries of every model (``"models"``) and of the oracle on the samples ``picked``
    (``"samples"``), per family too, the wall time taken and the figure of meshes."""
    from drpose.evaluation.metrics_run import oracle_reconstruction_scores, reconstruction_scores
    from drpose.reconstruction.evaluation import mesh_comparison, truth_mesh
    from drpose.reconstruction.reconstruct import reconstruction_pool

    start = time.perf_counter()
    with reconstruction_pool((len(runs) + 1) * len(picked)) as pool:
        scores = {model: reconstruction_scores(outputs, rig, picked, executor=pool) for model, outputs in runs.items()}
        oracle = oracle_reconstruction_scores(joints[picked], rig, size, executor=pool)
    by_family = {}
    kinds = [families[i] for i in picked]
    if len(set(kinds)) > 1:
        for family in dict.fromkeys(kinds):
            mask = np.array([f == family for f in kinds])
            by_family[family] = {
                model: {k: v for k, v in s.select(mask).summary().items() if k in RECONSTRUCTION_FAMILY_METRICS}
                for model, s in {**scores, "oracle": oracle}.items()}
    if figure is not None:
        rows = [{"truth": truth_mesh(joints[i]), "oracle": oracle.meshes()[k],
                 **{model: s.meshes()[k] for model, s in scores.items()}}
                for k, i in enumerate(picked[:FIGURE_SAMPLES])]
        mesh_comparison(rows, figure, title="reconstructed meshes: truth, oracle (true renders), base, fine-tuned",
                        labels=[f"#{i} {families[i]}" for i in picked[:FIGURE_SAMPLES]])
    return {"models": {model: s.summary() for model, s in scores.items()}, "oracle": oracle.summary(),
            "by_family": by_family, "samples": picked, "seconds": time.perf_counter() - start}


def build_report(run_dir: Path, out: Path, num: int, steps: int, seed: int, reconstruction: bool = True,
                 reconstruction_num: int = RECONSTRUCTION_NUM) -> dict:
    bundle = run_bundle(run_dir)
    rig, size = bundle.rig, bundle.image_size
    unet = load_model(bundle, str(run_dir))
    out.mkdir(parents=True, exist_ok=True)
    results, figures, by_family, recon = {}, {}, {}, {}
    for set_name in SETS:
        joints = joints_from_params(sample_poses(set_name, num, HELD_OUT_SEEDS[set_name]))
        truth = render_bodies(joints, rig.cameras, size, framing=rig.frame(joints)).rgb  # (B, 6, 3, R, R)
        images = (truth[:, 0] * 255).round() / 255
        families = pose_families(set_name, num, HELD_OUT_SEEDS[set_name])
        picked = spread_over_families(families, reconstruction_num) if reconstruction else False
        runs = {}
        for model in MODELS:
            print(f"[report] {model} on held-out {set_name} ({num} samples, {steps} DDIM steps)", flush=True)
            with adapters_disabled(unet) if model == "base" else contextlib.nullcontext():
                runs[model] = run_model(bundle, unet, images, joints, steps, seed, keep_normals=picked)
        results[set_name] = {model: summarize(o, size, rig.view_names) for model, o in runs.items()}
        if len(set(families)) > 1:
            by_family[set_name] = family_breakdown(runs, families, size, rig.view_names)
        rows = comparison_rows(truth, runs["base"].truth2d, runs, min(FIGURE_SAMPLES, num))
        figures[f"{set_name}_views"] = keypoint_grid(rows, rig.view_names, out / f"{set_name}_views.png",
                                                     title=f"held-out {set_name} poses")
        if reconstruction:
            print(f"[report] 3D reconstruction of {set_name} samples {picked} (base, fine-tuned and the oracle)",
                  flush=True)
            figures[f"{set_name}_meshes"] = out / f"{set_name}_meshes.png"
            recon[set_name] = reconstruction_section(joints, runs, picked, families, rig, size,
                                                     figures[f"{set_name}_meshes"])
            for model, summary in recon[set_name].pop("models").items():
                results[set_name][model]["reconstruction"] = summary
    figures["metrics"] = metric_bars(results, out / "metrics.png")
    training = read_metrics(run_dir)
    if training:
        figures["reward_curve"] = reward_curve(training, out / "reward_curve.png")
    summary_path = run_dir / "summary.json"
    meta = {
        "run": str(run_dir), "evaluation_samples_per_set": num, "ddim_steps": steps, "seed": seed,
        "held_out_seeds": HELD_OUT_SEEDS, "training": json.loads(summary_path.read_text()) if summary_path.exists() else None,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "figures": {k: str(v) for k, v in figures.items()},
    }
    report = {**results, "by_family": by_family, "meta": meta}
    if recon:
        report["reconstruction"] = recon
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown_report(results, meta, by_family, recon))
    return report


def family_table(set_name: str, breakdown: dict[str, dict[str, dict]]) -> list[str]:
    lines = [f"Held-out {set_name} by kind of pose:", "",
             "| family | samples | PCK@0.1 base | PCK@0.1 fine-tuned | MPJPE base (mm) | MPJPE fine-tuned (mm) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for family, models in breakdown.items():
        base, tuned = models["base"], models["finetuned"]
        lines.append(f"| {family} | {base['samples']} | {base['pck@0.1']:.3f} | {tuned['pck@0.1']:.3f} | "
                     f"{base['mpjpe']:.1f} | {tuned['mpjpe']:.1f} |")
    return lines + [""]


def reconstruction_lines(results: dict, recon: dict) -> list[str]:
    """The 3D reconstruction table (with oracle rows), the change base -> fine-tuned, and per-family Chamfer."""
    lines = ["## 3D reconstruction", "",
             "Meshes carved from the generated views, against the true body surface (cm; Chamfer = mean of the two "
             "directions of point-to-surface distance; see the README's \"3D reconstruction\"):", "",
             reconstruction_table(results, {s: r["oracle"] for s, r in recon.items()}),
             "Reconstructed: " + "; ".join(f"{s} samples {r['samples']} ({r['seconds']:.0f} s for both models and the "
                                            f"oracle)" for s, r in recon.items()) + ".", ""]
    for set_name, models in results.items():
        if "reconstruction" not in models.get("base", {}):
            continue
        base, tuned = models["base"]["reconstruction"], models["finetuned"]["reconstruction"]
        oracle = recon[set_name]["oracle"]
        lines.append(f"- **{set_name}**: Chamfer {base['chamfer']:.2f} -> {tuned['chamfer']:.2f} cm "
                     f"({100 * (tuned['chamfer'] / base['chamfer'] - 1):+.1f}%; oracle {oracle['chamfer']:.2f}); "
                     f"F@2cm {base['fscore@2cm']:.3f} -> {tuned['fscore@2cm']:.3f}; "
                     f"PSNR {base['psnr']:.2f} -> {tuned['psnr']:.2f} dB")
    lines.append("")
    for set_name, section in recon.items():
        if not section["by_family"]:
            continue
        lines += [f"Reconstruction of held-out {set_name} by kind of pose (Chamfer, cm):", "",
                  "| family | samples | base | fine-tuned | oracle |", "| --- | --- | --- | --- | --- |"]
        for family, models in section["by_family"].items():
            lines.append(f"| {family} | {models['base']['samples']} | {models['base']['chamfer']:.2f} | "
                         f"{models['finetuned']['chamfer']:.2f} | {models['oracle']['chamfer']:.2f} |")
        lines.append("")
    return lines


def markdown_report(results: dict, meta: dict, by_family: dict | None = None, reconstruction: dict | None = None) -> str:
    lines = ["# DrPose report", "", markdown_table(results), "Change from base to fine-tuned:", ""]
    for set_name, models in results.items():
        base, tuned = models["base"], models["finetuned"]
        lines.append(
            f"- **{set_name}**: PCK@0.1 {base['pck@0.1']:.3f} -> {tuned['pck@0.1']:.3f} "
            f"({100 * (tuned['pck@0.1'] - base['pck@0.1']):+.1f} points); MPJPE {base['mpjpe']:.1f} -> "
            f"{tuned['mpjpe']:.1f} mm ({100 * (tuned['mpjpe'] / base['mpjpe'] - 1):+.1f}%); PoseScore "
            f"{base['pose_score']:.4f} -> {tuned['pose_score']:.4f}")
    lines.append("")
    for set_name, breakdown in (by_family or {}).items():
        lines += family_table(set_name, breakdown)
    if reconstruction:
        lines += reconstruction_lines(results, reconstruction)
    training = meta.get("training") or {}
    lines += [f"Evaluation: {meta['evaluation_samples_per_set']} held-out samples per set, {meta['ddim_steps']} DDIM "
              f"steps; keypoints read from decoded images by the analytic estimator (not the reward model). "
              f"Training: {training.get('steps')} steps in {training.get('wall_s', float('nan')):.0f} s on "
              f"{meta['machine']['cuda'] or str(meta['machine']['cpu_count']) + ' CPU cores'}.", ""]
    for name, path in meta["figures"].items():
        lines.append(f"![{name}]({Path(path).name})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="training run folder (output_dir)")
    parser.add_argument("--out", type=Path, default=None, help="default: the run folder")
    parser.add_argument("--num", type=int, default=48)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reconstruction", action=argparse.BooleanOptionalAction, default=True,
                        help="3D reconstruction metrics and mesh figures (default: on)")
    parser.add_argument("--reconstruction-num", type=int, default=RECONSTRUCTION_NUM,
                        help=f"samples reconstructed per set, spread over the kinds of pose (default {RECONSTRUCTION_NUM})")
    args = parser.parse_args(argv)
    if args.reconstruction_num < 1:
        parser.error(f"--reconstruction-num {args.reconstruction_num}: reconstruct at least one sample per set "
                     f"(or --no-reconstruction)")
    if not (args.run / "config.yaml").exists():
        raise SystemExit(f"--run {args.run}: not a training run folder (no config.yaml)")
    out = args.out or args.run
    report = build_report(args.run, out, args.num, args.steps, args.seed, args.reconstruction, args.reconstruction_num)
    print((out / "report.md").read_text())
    print(f"[report] wrote {out / 'report.json'}, {out / 'report.md'} and figures in {out}")
    return 0 if report else 1


if __name__ == "__main__":
    raise SystemExit(main())
