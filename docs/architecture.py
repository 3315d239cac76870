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
    "cond": (3.0, 3.9, 2.5, 1.4, "PSHuman conditioning\nVAE latent (body + face crop)\nCLIP image embedding (unCLIP)\nprompt embeds per (domain, view)", "#eef5e8"),
    "rig": (3.0, 2.2, 2.5, 1.1, "joints -> ViewRig\n6 body views, back/left mirrored\nsegments + weights", "#e8eef7"),
    "sampler": (6.0, 3.9, 2.8, 1.4, "DDIM over T steps\nUNetMV2DConditionModel + LoRA\n7 views x {normal, RGB}\nDRTune (real) | DRaFT-K (tiny)", "#fbefe0"),
    "gskel": (9.3, 4.2, 2.0, 0.8, "g_skel (6 body views)\nlatent -> heatmaps", "#eef5e8"),
    "op": (9.3, 2.2, 2.0, 1.1, "fused PoseScore\n(Triton, fwd + bwd)\ndrpose_kernels", "#f7e1e1"),
    "loss": (11.8, 3.3, 2.4, 1.2, "loss = -PoseScore\n+ w_KL * KL\n+ w_pres * preservation\n(adapters off = frozen)", "#f3e8f7"),
    "ds": (11.8, 1.6, 2.4, 1.0, "DeepSpeed ZeRO-2/3, bf16\nbackward + step\ncheckpoints, logs", "#e8f4f7"),
}
ARROWS = [("data", "cond"), ("data", "rig"), ("cond", "sampler"), ("sampler", "gskel"), ("gskel", "op"),
          ("rig", "op"), ("op", "loss"), ("sampler", "loss"), ("loss", "ds")]


def centre(name, side):
    x, y, w, h, *_ = BOXES[name]
    return {"right": (x + w, y + h / 2), "left": (x, y + h / 2), "top": (x + w / 2, y + h),
            "bottom": (x + w / 2, y)}[side]


def main() -> None:
    figure, axis = plt.subplots(figsize=(14.5, 5))
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
    axis.text(7.4, 3.6, "x0 latents (2 x G x 7 rows)", ha="center", fontsize=8, color="#533")
    axis.text(10.35, 3.7, "(B*6, C, h, w) logits", ha="left", fontsize=8, color="#533")
    axis.set_xlim(0, 14.4)
    axis.set_ylim(1.3, 5.4)
    axis.axis("off")
    axis.set_title("One DrPose training step (gradients flow from the reward back into the LoRA adapters)", fontsize=11)
    figure.tight_layout()
    out = Path(__file__).resolve().parent / "architecture.png"
    figure.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
