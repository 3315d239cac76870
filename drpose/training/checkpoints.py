"""Checkpoints: DeepSpeed ``save_checkpoint`` on all ranks every N steps, rotation, and resume.

Layout: ``<output_dir>/checkpoints/checkpoint-<step>/`` (DeepSpeed's files, with the frozen base
weights left out, plus ``config.yaml``, the resolved configuration) and DeepSpeed's ``latest`` file.
Resuming checks that the checkpoint was made with a compatible configuration and says what to do when
it was not.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml

from .config import ConfigError, TrainConfig, resolved_yaml, to_dict

PREFIX = "checkpoint-"
# Settings that change what a checkpoint's weights mean or how the run continues; a resume must keep them.
MUST_MATCH = {
    "run": ("seed", "deepspeed_config"),
    "model": ("world", "unet", "codec", "g_skel", "unet_config"),
    "lora": ("rank", "alpha", "dropout", "target_modules"),
    "data": ("path", "batch_size", "grad_accum"),
}


def checkpoint_root(config: TrainConfig) -> Path:
    return Path(config.run.output_dir) / "checkpoints"


def existing(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint under ``root``, oldest first."""
    found = []
    if root.is_dir():
        for folder in root.iterdir():
            match = re.fullmatch(rf"{PREFIX}(\d+)", folder.name)
            if match and folder.is_dir():
                found.append((int(match.group(1)), folder))
    return sorted(found)


def rotate(root: Path, keep: int) -> None:
    """Delete the oldest checkpoints so that ``keep - 1`` remain before a new one is written (rank 0)."""
    for _, folder in existing(root)[: max(0, len(existing(root)) - (keep - 1))]:
        shutil.rmtree(folder, ignore_errors=True)


def save(engine, config: TrainConfig, step: int, client_state: dict, is_main: bool, barrier) -> Path:
    root = checkpoint_root(config)
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        rotate(root, config.run.keep_checkpoints)
    barrier()
    tag = f"{PREFIX}{step}"
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, exclude_frozen_parameters=True)
    if is_main:
        (root / tag / "config.yaml").write_text(resolved_yaml(config))
    barrier()
    return root / tag


def resolve_resume(config: TrainConfig, resume: str) -> tuple[Path, str]:
    """The checkpoint folder and tag that ``--resume`` names ("latest", a step, or a folder)."""
    root = checkpoint_root(config)
    if resume == "latest":
        found = existing(root)
        if not found:
            raise ConfigError(f"--resume latest: no checkpoint in {root}; start without --resume, or point "
                              f"run.output_dir at the run to continue")
        return root, found[-1][1].name
    if resume.isdigit():
        tag = f"{PREFIX}{int(resume)}"
        if not (root / tag).is_dir():
            steps = [s for s, _ in existing(root)]
            raise ConfigError(f"--resume {resume}: no {root / tag}; available steps: {steps or 'none'}")
        return root, tag
    folder = Path(resume)
    if not folder.is_dir() or not re.fullmatch(rf"{PREFIX}\d+", folder.name):
        raise ConfigError(f"--resume {resume}: expected 'latest', a step number or a {PREFIX}<step> folder")
    return folder.parent, folder.name


def check_compatible(config: TrainConfig, folder: Path) -> None:
    """Refuse to resume with settings that differ from the checkpoint's in ways that matter."""
    saved_path = folder / "config.yaml"
    if not saved_path.exists():
        raise ConfigError(f"{folder} has no config.yaml; it was not written by this trainer (or is incomplete: "
                          f"resume from an earlier checkpoint)")
    saved, current = yaml.safe_load(saved_path.read_text()), to_dict(config)
    differences = [
        f"{section}.{key}: checkpoint {saved[section][key]!r}, now {current[section][key]!r}"
        for section, keys in MUST_MATCH.items() for key in keys
        if saved.get(section, {}).get(key) != current[section][key]
    ]
    if differences:
        raise ConfigError(f"cannot resume from {folder}: the configuration changed ({'; '.join(differences)}). "
                          f"Resume with the checkpoint's settings (see {saved_path}), or start a new run.output_dir")
