"""Draw docs/architecture.png: the data flow of one DrPose training step.

    python docs/architecture.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

BOXES = {
    # name: (x, y, width, height, label, colour)
    "data": (0.2, 3.6, 2.3, 1.0, "DrPose15K-format data\nfront image + pose\n(drpose.data)", "#e8eef7"),
    "codec": (3.1, 4.1, 2.1, 0.8, "latent codec (VAE)\ncondition latent", "#eef5e8"),
    "rig": (3.1, 2.6, 2.1, 1.0, "joints -> camera rig\nsegments + weights\n(drpose.cameras)", "#e8eef7"),
    "sampler": (5.8, 3.9, 2.6, 1.2, "DDIM over T steps\nmulti-view UNet + LoRA\ngradient policy (DRTune)\ncheckpointed calls", "#fbefe0"),
    "gskel": (9.0, 4.1, 1.9, 0.8, "g_skel\nlatent -> heatmaps", "#eef5e8"),
    "op": (9.0, 2.6, 1.9, 1.0, "fused PoseScore\n(Triton, fwd + bwd)\ndrpose_kernels", "#f7e1e1"),
    "loss": (11.5, 3.3, 2.3, 1.0, "loss = -PoseScore\n+ w_KL * KL\n(adapters off = frozen)", "#f3e8f7"),
    "ds": (11.5, 1.6, 2.3, 1.0, "DeepSpeed ZeRO-2/3\nbackward + step\ncheckpoints, logs", "#e8f4f7"),
}
ARROWS = [("data", "codec"), ("data", "rig"), ("codec", "sampler"), ("sampler", "gskel"), ("gskel", "op"),
          ("rig", "op"), ("op", "loss"), ("sampler", "loss"), ("loss", "ds")]


def centre(name, side):
    x, y, w, h, *_ = BOXES[name]
    return {"right": (x + w, y + h / 2), "left": (x, y + h / 2), "top": (x + w / 2, y + h),
            "bottom": (x + w / 2, y)}[side]


def main() -> None:
    figure, axis = plt.subplots(figsize=(14, 5))
    for name, (x, y, w, h, label, colour) in BOXES.items():
        axis.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc=colour, ec="#445", lw=1.2))
        axis.text(x + w / 2, y + h / 2, label, ha="center", va="center", fontsize=9)
    for start, end in ARROWS:
        sx, sy, sw, sh, *_ = BOXES[start]
        ex, ey, ew, eh, *_ = BOXES[end]
        if ex >= sx + sw - 0.01:
            a, b = centre(start, "right"), centre(end, "left")
        elif ey + eh <= sy:
            a, b = centre(start, "bottom"), centre(end, "top")
        else:
            a, b = centre(start, "top"), centre(end, "bottom")
        axis.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=14, lw=1.2, color="#334",
                                       connectionstyle="arc3,rad=0.0"))
    axis.text(7.1, 3.55, "x0 latents of 6 views x {normal, RGB}", ha="center", fontsize=8, color="#533")
    axis.text(10.05, 3.75, "(B*V, C, h, w) logits", ha="left", fontsize=8, color="#533")
    axis.set_xlim(0, 14)
    axis.set_ylim(1.3, 5.4)
    axis.axis("off")
    axis.set_title("One DrPose training step (gradients flow from the reward back into the LoRA adapters)", fontsize=11)
    figure.tight_layout()
    out = Path(__file__).resolve().parent / "architecture.png"
    figure.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
