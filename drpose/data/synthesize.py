"""Synthetic DrPose15K-style datasets: sampled poses rendered as capsule bodies.

``python -m drpose.data.synthesize --out DIR --num N --distribution {narrow,broad,hard} --seed S
[--resolution 64] [--fps-pool M]`` writes N records; with ``--fps-pool`` they are the N most diverse of
M drawn poses (farthest-point sampling, as DrPose15K is picked from a motion corpus). Each record's image
is the front view (azimuth 0) of the default rig, its pose the sampled SMPL-X parameters (mean shape:
betas 0, transl 0, since the built-in skeleton has one shape), and its renders all six views (RGB,
normals, mask, part ids) for evaluation. The same seed always writes the same dataset.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from drpose.body import SMPLXBody, SMPLXParams, joints_from_params
from drpose.cameras import CameraRig
from drpose.data.dataset import DatasetWriter
from drpose.poses import BREAKING_SHARE, DISTRIBUTIONS, farthest_point_sampling, remove_heading, sample_poses
from drpose.render import Renders, render_bodies

NUM_BETAS = 10


def write_rendered_records(writer: DatasetWriter, params: SMPLXParams, record_ids: Sequence[str], *,
                           rig: CameraRig, resolution: int, with_renders: bool,
                           sources: Sequence[str] | None = None, groups: Sequence[str] | None = None,
                           frames: Sequence[int] | None = None, body_model: SMPLXBody | None = None,
                           batch_size: int = 64, progress: bool = True) -> None:
    """Render every sample of ``params`` through ``rig`` and write it as one record.

    The image is view 0 of the rig; with ``with_renders`` every view is stored for evaluation.
    ``params`` must carry betas and transl (the record format requires them).
    """
    num = len(params)
    if len(record_ids) != num:
        raise ValueError(f"record_ids: expected {num} ids (one per sample), got {len(record_ids)}")
    with tqdm(total=num, desc="rendering", unit="sample", disable=not progress) as bar:
        for first in range(0, num, batch_size):
            batch = params.select(slice(first, first + batch_size))
            renders = render_bodies(joints_from_params(batch, body_model), rig, resolution)
            for offset in range(len(batch)):
                index = first + offset
                sample = slice(offset, offset + 1)
                writer.add(
                    record_ids[index], renders.rgb[offset, 0],
                    params=batch.select(sample), camera=rig,
                    renders=Renders(renders.rgb[sample], renders.normal[sample],
                                    renders.mask[sample], renders.part_id[sample]) if with_renders else None,
                    source=None if sources is None else sources[index],
                    group=None if groups is None else groups[index],
                    frame=None if frames is None else frames[index],
                )
            bar.update(len(batch))


def select_diverse(params: SMPLXParams, num: int, seed: int) -> torch.Tensor:
    """Indices (num,) of ``params``, in pool order, picked by farthest-point sampling of the heading-free joints.

    This is how DrPose15K picks its poses from a motion corpus: the most diverse ones, so that rare poses
    (here: breaking moves, strong tilts) are over-represented compared with the corpus itself.
    """
    joints = remove_heading(joints_from_params(params))
    return farthest_point_sampling(joints, num, seed=seed).sort().values


def source_prefix(distribution: str, seed: int, fps_pool: int | None = None, breaking_share: float | None = None) -> str:
    """What each synthesized record's source starts with (its pose index follows): the settings that drew it, so
    that a folder can be checked against the settings that ask for it. The share of breaking moves is named
    only when ``broad`` is drawn with another share than the default (the other distributions have none)."""
    named = breaking_share is not None and breaking_share != BREAKING_SHARE and distribution == "broad"
    share = f"breaking={float(breaking_share):g}:" if named else ""
    pool = f"pool={fps_pool}:" if fps_pool is not None else ""
    return f"synthetic:{distribution}:seed={seed}:{share}{pool}index="


def synthesize(out: str | Path, num: int, distribution: str, seed: int, resolution: int = 72,
               rig: CameraRig | None = None, progress: bool = True, fps_pool: int | None = None,
               breaking_share: float | None = None) -> Path:
    """Write a synthetic dataset of ``num`` poses from ``distribution`` to the new folder ``out``.

    With ``fps_pool``, ``fps_pool`` poses are drawn and the ``num`` most diverse of them kept
    (:func:`select_diverse`); the record sources name each pose's index in that pool. ``breaking_share``
    goes to :func:`~drpose.poses.sample_poses` (None: the default share of breaking moves in ``broad``).
    """
    if fps_pool is not None and (isinstance(fps_pool, bool) or not isinstance(fps_pool, int) or fps_pool < num):
        raise ValueError(f"fps_pool: expected an int >= num ({num}) (the pool to select from), got {fps_pool!r}")
    rig = CameraRig() if rig is None else rig
    if fps_pool is None:
        params = sample_poses(distribution, num, seed, breaking_share=breaking_share)  # checks the share
        indices = list(range(num))
    else:
        pool = sample_poses(distribution, fps_pool, seed, breaking_share=breaking_share)
        chosen = select_diverse(pool, num, seed)
        params = pool.select(chosen)
        indices = chosen.tolist()
    prefix = source_prefix(distribution, seed, fps_pool, breaking_share)
    origin = [f"{prefix}{index}" for index in indices]
    params = SMPLXParams(params.global_orient, params.body_pose,
                         betas=torch.zeros(num, NUM_BETAS), transl=torch.zeros(num, 3))
    with DatasetWriter(out) as writer:
        write_rendered_records(
            writer, params, [f"{index:06d}" for index in range(num)], rig=rig, resolution=resolution,
            with_renders=True, progress=progress, sources=origin,
        )
    return Path(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m drpose.data.synthesize",
        description="Write a synthetic DrPose15K-style dataset of rendered capsule bodies.",
    )
    parser.add_argument("--out", required=True, type=Path, help="new (or empty) dataset folder")
    parser.add_argument("--num", required=True, type=int, help="number of samples")
    parser.add_argument("--distribution", required=True, choices=DISTRIBUTIONS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=72, help="image side in pixels (the tiny world's: 72)")
    parser.add_argument("--fps-pool", type=int, default=None, metavar="M",
                        help="draw M poses and keep the --num most diverse (farthest-point sampling), as DrPose15K does")
    parser.add_argument("--breaking-share", type=float, default=None, metavar="S",
                        help=f"share of `broad` poses in breaking moves, in [0, 1] (default {BREAKING_SHARE:g})")
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error("--num must be at least 1")
    if args.resolution < 1:
        parser.error("--resolution must be at least 1")
    if args.fps_pool is not None and args.fps_pool < args.num:
        parser.error(f"--fps-pool must be at least --num ({args.num}), got {args.fps_pool}")
    if args.breaking_share is not None and args.distribution != "broad":
        parser.error(f"--breaking-share: only --distribution broad has breaking moves, got {args.distribution}")
    if args.breaking_share is not None and not 0.0 <= args.breaking_share <= 1.0:
        parser.error(f"--breaking-share must be in [0, 1], got {args.breaking_share:g}")
    try:
        synthesize(args.out, args.num, args.distribution, args.seed, args.resolution, fps_pool=args.fps_pool,
                   breaking_share=args.breaking_share)
    except FileExistsError as error:
        parser.error(str(error))
    print(f"wrote {args.num} {args.distribution} samples to {args.out}")


if __name__ == "__main__":
    main()
