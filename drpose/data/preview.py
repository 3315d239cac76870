"""Contact sheet of a dataset: samples x views, with the projected joints and bones drawn on top.

``python -m drpose.data.preview DIR --out sheet.png [--samples 8] [--scale 3]``

Rows are the first samples of the dataset. The first column is the record's image, the others are
the rig's views: the record's stored renders when it has them, otherwise the capsule body rendered
from the record's pose. Over every cell the record's ``body22`` joints are projected through the
record's camera rig (the default rig when the record names none: its image is taken as view 0) and
drawn as white dots and black bones, so a misaligned pose is visible at a glance.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from drpose.cameras import CameraRig, rescale_pixels
from drpose.data.dataset import DrPoseDataset, read_renders
from drpose.render import render_bodies
from drpose.skeleton import BODY22_BONES

_HEADER = 14  # pixels of the title row


def _to_pil(image: torch.Tensor, scale: int) -> Image.Image:
    """A float (3, R, R) image in [0, 1] as an upscaled PIL image (nearest neighbour, crisp pixels)."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(np.ascontiguousarray(array))
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def _draw_skeleton(picture: Image.Image, pixels: torch.Tensor, source_size: int) -> None:
    """Draw joints (J, 2), given in pixels of a ``source_size`` image, onto the upscaled picture."""
    points = rescale_pixels(pixels, source_size, picture.width).tolist()
    draw = ImageDraw.Draw(picture)
    width = max(1, picture.width // 96)
    for parent, child in BODY22_BONES:
        draw.line([tuple(points[parent]), tuple(points[child])], fill=(0, 0, 0), width=width)
    radius = max(1.5, picture.width / 96)
    for x, y in points:
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(255, 255, 255),
                     outline=(0, 0, 0))


def contact_sheet(root: str | Path, out: str | Path, samples: int = 8, scale: int = 3) -> Path:
    """Draw the first ``samples`` records of the dataset at ``root`` into the PNG ``out``."""
    if samples < 1 or scale < 1:
        raise ValueError(f"samples and scale: expected >= 1, got {samples}, {scale}")
    dataset = DrPoseDataset(root)
    rows = []
    for index in range(min(samples, len(dataset))):
        record, item = dataset.records[index], dataset[index]
        rig = record.camera if record.camera is not None else CameraRig()
        joints = item["joints"][None]
        if record.renders is not None:
            views = read_renders(record.renders)["rgb"]
        else:
            views = render_bodies(joints, rig, item["image"].shape[-1]).rgb[0]
        cells = [(item["image"], 0)] + [(view, v) for v, view in enumerate(views)]
        row = []
        for image, view in cells:
            picture = _to_pil(image, scale)
            pixels, _ = rig.project(joints, image.shape[-1])
            _draw_skeleton(picture, pixels[0, view], image.shape[-1])
            row.append(picture)
        ImageDraw.Draw(row[0]).text((2, 1), record.id, fill=(0, 0, 0))
        rows.append((row, ("image",) + rig.view_names))
    cell_width = max(p.width for row, _ in rows for p in row)
    cell_height = max(p.height for row, _ in rows for p in row)
    columns = max(len(row) for row, _ in rows)
    sheet = Image.new("RGB", (columns * cell_width, _HEADER + len(rows) * cell_height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for column, title in enumerate(rows[0][1]):
        draw.text((column * cell_width + 2, 1), title, fill=(0, 0, 0))
    for r, (row, _) in enumerate(rows):
        for column, picture in enumerate(row):
            sheet.paste(picture, (column * cell_width, _HEADER + r * cell_height))
    for column in range(1, columns):
        draw.line([(column * cell_width, 0), (column * cell_width, sheet.height)], fill=(200, 200, 200))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m drpose.data.preview",
        description="Draw a contact sheet (samples x views) of a DrPose dataset with joints overlaid.",
    )
    parser.add_argument("dataset", type=Path, help="dataset folder (with manifest.jsonl)")
    parser.add_argument("--out", required=True, type=Path, help="output PNG")
    parser.add_argument("--samples", type=int, default=8, help="number of samples (rows)")
    parser.add_argument("--scale", type=int, default=3, help="pixel upscaling factor")
    args = parser.parse_args(argv)
    print(f"wrote {contact_sheet(args.dataset, args.out, args.samples, args.scale)}")


if __name__ == "__main__":
    main()
