"""Evaluate a multi-view model's poses with an estimator independent of the reward model.

    python -m drpose.evaluate --checkpoint {base | RUN_DIR | LORA_DIR} --data {DIR | builtin:hard | builtin:narrow}
                              --out DIR [--num N] [--steps T] [--world PATH] [--seed S]

``--checkpoint``: ``base`` (the world's base model), a training run folder (its ``lora/``), or a folder
with ``pytorch_lora_weights.safetensors``. ``--data``: a DrPose15K-format folder (front image + pose per
record), or a built-in held-out set: ``builtin:hard`` (the embedded world's MixamoRP analogue: acrobatic
poses from a fixed seed that no training set uses) or ``builtin:narrow``. Writes ``metrics.json``,
``metrics.md``, ``views.png`` (generated views with estimated vs true keypoints) and ``metrics.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from drpose.data.dataset import DrPoseDataset
from drpose.evaluation.figures import keypoint_grid, metric_bars
from drpose.evaluation.metrics_run import EvaluationOutputs, run_model, summarize
from drpose.models.multiview_unet import MultiViewUNet
from drpose.training.lora import LORA_WEIGHTS, load_lora
from drpose.world.assets import World, load_world
from drpose.world.views import sample_views

HELD_OUT_SEEDS = {"hard": 4242, "narrow": 4343}
"""Seeds of the built-in evaluation sets; training data and the world's build use other seeds."""


def held_out_set(world: World, distribution: str, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Front images (B, 3, R, R) (8-bit quantised, as a dataset on disk would hold them) and joints."""
    if distribution not in HELD_OUT_SEEDS:
        raise ValueError(f"--data builtin:{distribution}: built-in sets are {sorted(HELD_OUT_SEEDS)}")
    views = sample_views(distribution, num, HELD_OUT_SEEDS[distribution], world.rig, world.settings.resolution)
    return (views.condition * 255).round() / 255, views.joints


def dataset_set(path: Path, num: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = DrPoseDataset(path)
    count = len(dataset) if num is None else min(num, len(dataset))
    items = [dataset[i] for i in range(count)]
    return torch.stack([i["image"] for i in items]), torch.stack([i["joints"] for i in items])


def load_evaluation_set(world: World, data: str, num: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if data.startswith("builtin:"):
        return held_out_set(world, data.split(":", 1)[1], num or 48)
    path = Path(data)
    if not path.is_dir():
        raise FileNotFoundError(f"--data {data}: not a folder (or use builtin:hard / builtin:narrow)")
    return dataset_set(path, num)


def load_model(world: World, checkpoint: str) -> MultiViewUNet:
    """The world's base UNet, with adapters from ``checkpoint`` unless it is ``base``."""
    unet = MultiViewUNet.from_pretrained(world.folder / "base_model", torch_dtype=torch.float32).eval()
    if checkpoint == "base":
        return unet
    folder = Path(checkpoint)
    if (folder / "lora" / LORA_WEIGHTS).exists():
        folder = folder / "lora"
    load_lora(unet, folder)
    return unet.eval()


def write_figures(outputs: EvaluationOutputs, world: World, out: Path, label: str, count: int = 4) -> list[Path]:
    rows = [{"label": f"{label} #{i}", "images": outputs.generated_rgb[i], "estimate": outputs.points2d[i],
             "truth": outputs.truth2d[i]} for i in range(min(count, outputs.generated_rgb.shape[0]))]
    return [keypoint_grid(rows, world.rig.view_names, out / "views.png", title=label)]


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
    parser.add_argument("--world", type=Path, default=None, help="tiny-world folder (default: the built-in one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    world = load_world(args.world)
    images, joints = load_evaluation_set(world, args.data, args.num)
    unet = load_model(world, args.checkpoint)
    outputs = run_model(world, unet, images, joints, args.steps, args.seed)
    metrics = summarize(outputs, world.settings.resolution, world.rig.view_names)
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.data.split(":", 1)[1] if args.data.startswith("builtin:") else Path(args.data).name
    results = {name: {args.checkpoint: metrics}}
    (args.out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "metrics.md").write_text(markdown_table(results))
    write_figures(outputs, world, args.out, f"{args.checkpoint} on {name}")
    metric_bars(results, args.out / "metrics.png")
    print(markdown_table(results))
    print(f"[evaluate] wrote {args.out}/metrics.json, metrics.md, views.png, metrics.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
