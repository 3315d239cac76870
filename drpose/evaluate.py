"""Evaluate a multi-view model's poses with an estimator independent of the reward model.

    python -m drpose.evaluate --checkpoint {base | RUN_DIR | LORA_DIR} --data {DIR | builtin:hard | builtin:narrow}
                              --out DIR [--num N] [--steps T] [--seed S]
                              [--pipeline DIR --g-skel DIR --prompt-embeds DIR] [--estimator auto|colours|none]
                              [--reconstruction | --no-reconstruction] [--reconstruction-num N]

The model: a training run folder evaluates what that run trained (the bundle its ``config.yaml`` names,
with its ``lora/``); ``base`` or a LoRA folder evaluates the bundle given by ``--pipeline``/``--g-skel``
(default: the tiny world's), without or with those adapters. ``--data``: a DrPose15K-format folder (front
image + pose per record), or a built-in held-out set rendered at the bundle's image size:
``builtin:hard`` (the MixamoRP analogue: acrobatic poses from a fixed seed that no training set uses) or
``builtin:narrow``. ``--estimator``: ``colours`` reads keypoints from the decoded images by the tiny
world's part colours (the independent evaluator); ``none`` measures what real data allows: PoseScore,
and g_skel's reading of the joints against the data's poses (the reward model's own view); ``auto``
(default) takes ``colours`` for built-in sets and synthetic folders, else ``none``. Writes
``metrics.json``, ``metrics.md``, ``views.png`` (generated views with estimated vs true keypoints) and
``metrics.png``. ``--reconstruction`` (default on where the true bodies are the tiny world's capsule bodies:
built-in sets and synthetic folders) also carves the first ``--reconstruction-num`` samples' generated views into
meshes and scores them against the true surface (Chamfer, P2S, normal consistency, F-score, render PSNR/SSIM;
:mod:`drpose.reconstruction`), with the oracle (the same reconstruction from true renders), under
``"reconstruction"`` / ``"reconstruction_oracle"`` of each set's metrics, and draws ``meshes.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from drpose.data.dataset import DrPoseDataset
from drpose.evaluation.figures import keypoint_grid, metric_bars
from drpose.evaluation.metrics_run import EvaluationOutputs, run_model, summarize
from drpose.models.bundle import ModelBundle
from drpose.training.config import load_config
from drpose.training.lora import LORA_WEIGHTS, load_lora

HELD_OUT_SEEDS = {"hard": 4242, "narrow": 4343}
"""Seeds of the built-in evaluation sets; training data and the world's build use other seeds."""


def held_out_set(bundle: ModelBundle, distribution: str, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Front images (B, 3, R, R) (8-bit quantised, as a dataset on disk would hold them) and joints."""
    from drpose.body import joints_from_params
    from drpose.poses import sample_poses
    from drpose.render import render_bodies

    if distribution not in HELD_OUT_SEEDS:
        raise ValueError(f"--data builtin:{distribution}: built-in sets are {sorted(HELD_OUT_SEEDS)}")
    joints = joints_from_params(sample_poses(distribution, num, HELD_OUT_SEEDS[distribution]))
    front = render_bodies(joints, bundle.rig.cameras, bundle.image_size, framing=bundle.rig.frame(joints)).rgb[:, 0]
    return (front * 255).round() / 255, joints


def dataset_set(path: Path, num: int | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Images, joints, and whether every record is synthetic (so the colour estimator applies)."""
    dataset = DrPoseDataset(path)
    count = len(dataset) if num is None else min(num, len(dataset))
    items = [dataset[i] for i in range(count)]
    synthetic = all((r.source or "").startswith("synthetic:") for r in dataset.records[:count])
    return torch.stack([i["image"] for i in items]), torch.stack([i["joints"] for i in items]), synthetic


def load_evaluation_set(bundle: ModelBundle, data: str, num: int | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if data.startswith("builtin:"):
        return (*held_out_set(bundle, data.split(":", 1)[1], num or 48), True)
    path = Path(data)
    if not path.is_dir():
        raise FileNotFoundError(f"--data {data}: not a folder (or use builtin:hard / builtin:narrow)")
    images, joints, synthetic = dataset_set(path, num)
    if images.shape[-1] != bundle.image_size or images.shape[-2] != bundle.image_size:
        raise ValueError(f"--data {data}: {images.shape[-1]}x{images.shape[-2]} images; the model takes "
                         f"{bundle.image_size}x{bundle.image_size}")
    return images, joints, synthetic


def run_bundle(run_dir: Path) -> ModelBundle:
    """The bundle a training run trained (from its resolved config)."""
    model = load_config(run_dir / "config.yaml").model
    return ModelBundle.load(model.pipeline, model.g_skel, model.prompt_embeds, model.unet)


def load_model(bundle: ModelBundle, checkpoint: str):
    """The bundle's UNet, with the adapters of ``checkpoint`` (a run folder or a LoRA folder) loaded into it
    unless it is ``base``; :func:`~drpose.training.lora.adapters_disabled` gives the base model back."""
    unet = bundle.pipeline.unet
    if checkpoint == "base":
        return unet
    folder = Path(checkpoint)
    if (folder / "lora" / LORA_WEIGHTS).exists():
        folder = folder / "lora"
    load_lora(unet, folder)
    return unet.eval().requires_grad_(False)


def write_figures(outputs: EvaluationOutputs, bundle: ModelBundle, out: Path, label: str, count: int = 4) -> list[Path]:
    rows = [{"label": f"{label} #{i}", "images": outputs.generated_rgb[i], "estimate": outputs.points2d[i],
             "truth": outputs.truth2d[i]} for i in range(min(count, outputs.generated_rgb.shape[0]))]
    return [keypoint_grid(rows, bundle.rig.view_names, out / "views.png", title=label)]


RECONSTRUCTION_NUM = 8  # samples the evaluator reconstructs by default (each once more for the oracle)


def reconstruction_table(results: dict[str, dict[str, dict]], oracles: dict[str, dict] | None = None) -> str:
    """The reconstruction metrics of ``results[set][model]`` (where present) with each set's oracle row (from
    ``oracles[set]``, or a model's ``"reconstruction_oracle"``)."""
    from drpose.reconstruction.evaluation import TABLE_HEADER, markdown_rows

    lines = list(TABLE_HEADER)
    for set_name, models in results.items():
        summaries = {model: m["reconstruction"] for model, m in models.items() if "reconstruction" in m}
        oracle = (oracles or {}).get(set_name) or next(
            (m["reconstruction_oracle"] for m in models.values() if "reconstruction_oracle" in m), None)
        if oracle is not None:
            summaries["oracle (true renders)"] = oracle
        lines += markdown_rows(set_name, summaries)
    return "\n".join(lines) + "\n"


def add_reconstruction(metrics: dict, outputs: EvaluationOutputs, joints: torch.Tensor, bundle: ModelBundle, count: int,
                       figure: Path | None = None, label: str = "generated") -> None:
    """Reconstruct the first ``count`` samples (and the oracle), add their summaries to ``metrics``, draw meshes."""
    from drpose.evaluation.metrics_run import oracle_reconstruction_scores, reconstruction_scores
    from drpose.reconstruction.evaluation import mesh_comparison, truth_mesh
    from drpose.reconstruction.reconstruct import reconstruction_pool

    count = min(count, len(joints))
    with reconstruction_pool(2 * count) as pool:
        scores = reconstruction_scores(outputs, bundle.rig, list(range(count)), executor=pool)
        oracle = oracle_reconstruction_scores(joints[:count], bundle.rig, bundle.image_size, executor=pool)
    metrics["reconstruction"], metrics["reconstruction_oracle"] = scores.summary(), oracle.summary()
    if figure is not None:
        rows = [{"truth": truth_mesh(joints[i]), "oracle": oracle.meshes()[i], label: scores.meshes()[i]}
                for i in range(min(3, count))]
        mesh_comparison(rows, figure, title=f"{label}: reconstructed meshes vs the true body")


def markdown_table(results: dict[str, dict[str, dict]]) -> str:
    """``results[set][model] = metrics`` as one Markdown table."""
    lines = ["| set | model | PCK@0.05 | PCK@0.1 | mean px error | MPJPE (mm) | PA-MPJPE (mm) | PoseScore | samples |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for set_name, models in results.items():
        for model, m in models.items():
            lines.append(f"| {set_name} | {model} | {m['pck@0.05']:.3f} | {m['pck@0.1']:.3f} | {m['mean_px_error']:.2f} | "
                         f"{m['mpjpe']:.1f} | {m['pa_mpjpe']:.1f} | {m['pose_score']:.4f} | {m['samples']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="base, a run folder, or a LoRA folder")
    parser.add_argument("--data", required=True, help="a DrPose15K-format folder, builtin:hard or builtin:narrow")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num", type=int, default=None, help="samples to evaluate (default: 48 built-in, all on disk)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pipeline", type=Path, default=None, help="pipeline folder (default: the tiny world's)")
    parser.add_argument("--g-skel", type=Path, default=None, help="g_skel folder (default: the tiny world's)")
    parser.add_argument("--prompt-embeds", type=Path, default=None, help="PSHuman's prompt-embedding folder")
    parser.add_argument("--estimator", choices=("auto", "colours", "none"), default="auto")
    parser.add_argument("--reconstruction", action=argparse.BooleanOptionalAction, default=None,
                        help="3D reconstruction metrics (default: on for capsule bodies: built-in and synthetic sets)")
    parser.add_argument("--reconstruction-num", type=int, default=RECONSTRUCTION_NUM,
                        help=f"samples reconstructed (default {RECONSTRUCTION_NUM}; a few seconds each on a CPU core)")
    args = parser.parse_args(argv)
    if args.reconstruction_num < 1:
        parser.error(f"--reconstruction-num {args.reconstruction_num}: reconstruct at least one sample "
                     f"(or --no-reconstruction)")

    checkpoint = Path(args.checkpoint)
    if args.checkpoint != "base" and (checkpoint / "config.yaml").is_file():
        bundle = run_bundle(checkpoint)
    else:
        bundle = ModelBundle.load(args.pipeline, args.g_skel, args.prompt_embeds)
    images, joints, synthetic = load_evaluation_set(bundle, args.data, args.num)
    estimator = synthetic if args.estimator == "auto" else args.estimator == "colours"
    reconstruction = synthetic if args.reconstruction is None else args.reconstruction
    if reconstruction and not synthetic:
        raise SystemExit(f"--reconstruction: {args.data} is not made of the tiny world's capsule bodies, so there is no "
                         f"true surface to score meshes against (use --no-reconstruction)")
    unet = load_model(bundle, args.checkpoint)
    outputs = run_model(bundle, unet, images, joints, args.steps, args.seed, estimator=estimator,
                        keep_normals=list(range(args.reconstruction_num)) if reconstruction else False)
    metrics = summarize(outputs, bundle.image_size, bundle.rig.view_names)
    metrics["keypoints_from"] = "decoded images (part colours)" if estimator else "g_skel (the reward model)"
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.data.split(":", 1)[1] if args.data.startswith("builtin:") else Path(args.data).name
    if reconstruction:
        add_reconstruction(metrics, outputs, joints, bundle, args.reconstruction_num, args.out / "meshes.png",
                           args.checkpoint)
    results = {name: {args.checkpoint: metrics}}
    (args.out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "metrics.md").write_text(markdown_table(results) + f"\nKeypoints read from: {metrics['keypoints_from']}\n"
                                         + ("\n3D reconstruction (Chamfer etc. in cm):\n\n" + reconstruction_table(results)
                                            if reconstruction else ""))
    write_figures(outputs, bundle, args.out, f"{args.checkpoint} on {name}")
    metric_bars(results, args.out / "metrics.png")
    print(markdown_table(results))
    if reconstruction:
        print(reconstruction_table(results))
    print(f"[evaluate] wrote {args.out}/metrics.json, metrics.md, views.png, metrics.png"
          + (", meshes.png" if reconstruction else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
