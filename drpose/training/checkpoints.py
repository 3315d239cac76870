"""Checkpoints: atomic DeepSpeed saves every N steps, rotation, and resume.

Layout: ``<output_dir>/checkpoints/checkpoint-<step>/`` (DeepSpeed's files, with the frozen base weights
left out, plus ``config.yaml``, the resolved configuration, and ``drpose_checkpoint.json``: the step, the
size of every file, whether the weights are finite, and whether the next step's loss was) and DeepSpeed's
``latest`` file.

A save is atomic: every rank writes into ``.saving-checkpoint-<step>/``, rank 0 then adds the two files
above, syncs them to disk and renames the folder into place; ``latest`` is updated after that, and only
then are old checkpoints rotated out (renamed to ``.deleting-...`` before they are deleted). A process
killed at any moment leaves complete ``checkpoint-<step>`` folders only; leftover dot-folders are never
taken for checkpoints and are cleared by the next save. A checkpoint is *good* when its weights are finite
and the step after it had a finite loss; rotation always keeps the newest good one.

Resuming checks the checkpoint (complete, undamaged, good) and that it was made with a compatible
configuration; settings that may change (learning rate, schedule, max_steps, sampling, ...) are taken
from the config and listed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import yaml

from .config import ConfigError, TrainConfig, resolved_yaml, to_dict

PREFIX = "checkpoint-"
SAVING = ".saving-"
DELETING = ".deleting-"
INFO = "drpose_checkpoint.json"
LATEST = "latest"
# Settings that change what a checkpoint's weights mean or how the run continues; a resume must keep them.
MUST_MATCH = {
    "run": ("seed", "deepspeed_config"),
    "model": ("pipeline", "g_skel", "prompt_embeds", "unet"),
    "lora": ("rank", "alpha", "dropout", "target_modules"),
    "data": ("path", "batch_size", "grad_accum"),
}


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from; the message names it and the one to use instead."""


def checkpoint_root(config: TrainConfig) -> Path:
    return Path(config.run.output_dir) / "checkpoints"


def read_info(folder: Path) -> dict:
    return json.loads((folder / INFO).read_text())


def _step_of(folder: Path) -> int | None:
    match = re.fullmatch(rf"{PREFIX}(\d+)", folder.name)
    return int(match.group(1)) if match else None


def existing(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under ``root`` (its info file written), oldest first."""
    found = []
    if root.is_dir():
        for folder in root.iterdir():
            step = _step_of(folder)
            if step is not None and folder.is_dir() and (folder / INFO).is_file():
                found.append((step, folder))
    return sorted(found)


def is_good(folder: Path) -> bool:
    """Finite weights, and the step after them had a finite loss."""
    info = read_info(folder)
    return bool(info.get("weights_finite")) and info.get("next_loss_finite") is True


def last_good(root: Path, before: int | None = None) -> Path | None:
    """The newest good checkpoint (at a step below ``before``, when given)."""
    for step, folder in reversed(existing(root)):
        if (before is None or step < before) and is_good(folder):
            return folder
    return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text)
    _fsync(temp)
    os.replace(temp, path)
    _fsync(path.parent)


def _delete(folder: Path) -> None:
    """Delete a checkpoint folder so that no half-deleted ``checkpoint-<step>`` is ever seen: rename, then delete."""
    doomed = folder.with_name(f"{DELETING}{folder.name}")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def clear_leftovers(root: Path) -> None:
    """Remove what a killed save or rotation left behind (rank 0, under the run's lock)."""
    if root.is_dir():
        for folder in root.iterdir():
            if folder.name.startswith((SAVING, DELETING)):
                shutil.rmtree(folder, ignore_errors=True)


def rotate(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints and the newest good one (rank 0, after a save)."""
    found = existing(root)
    protected = {folder for _, folder in found[-keep:]}
    good = last_good(root)
    if good is not None:
        protected.add(good)
    for _, folder in found:
        if folder not in protected:
            _delete(folder)


def save(engine, config: TrainConfig, step: int, client_state: dict, weights_finite: bool, is_main: bool,
         barrier, write_more=None) -> Path:
    """Save checkpoint ``step`` atomically (call on every rank), then update ``latest`` and rotate.
    ``write_more(folder)``, called on every rank, adds the trainer's own files (e.g. the adapters' average);
    they are recorded and checked like DeepSpeed's."""
    root = checkpoint_root(config)
    tag = f"{PREFIX}{step}"
    temp, final = root / f"{SAVING}{tag}", root / tag
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        clear_leftovers(root)
    barrier()
    engine.save_checkpoint(str(root), tag=temp.name, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=True)  # ends with a barrier: every rank's files are written
    if write_more is not None:
        write_more(temp)
        barrier()
    if is_main:
        (temp / "config.yaml").write_text(resolved_yaml(config))
        files = {p.name: p.stat().st_size for p in sorted(temp.iterdir()) if p.is_file()}
        for name in files:
            _fsync(temp / name)
        info = {"step": step, "weights_finite": weights_finite, "next_loss_finite": None, "files": files}
        (temp / INFO).write_text(json.dumps(info, indent=2) + "\n")
        _fsync(temp / INFO)
        _fsync(temp)
        if final.exists():  # a step saved again (a run resumed from an earlier step)
            _delete(final)
        os.replace(temp, final)
        _fsync(root)
        _write_atomic(root / LATEST, tag)
        rotate(root, config.run.keep_checkpoints)
    barrier()
    return final


def record_next_loss(folder: Path, finite: bool) -> None:
    """Record in checkpoint ``folder`` whether the step after it had a finite loss (rank 0)."""
    info = read_info(folder)
    info["next_loss_finite"] = finite
    _write_atomic(folder / INFO, json.dumps(info, indent=2) + "\n")


def _instead(root: Path, step: int | None) -> str:
    good = last_good(root, before=step)
    if good is not None:
        return f"resume from the last good checkpoint with --resume {_step_of(good)} ({good})"
    earlier = [s for s, _ in existing(root) if step is None or s < step]
    if earlier:
        return f"resume from an earlier checkpoint with --resume {earlier[-1]}"
    return "no earlier checkpoint is left: start again (with --overwrite)"


def resolve_resume(config: TrainConfig, resume: str, run_started: bool = False) -> Path | None:
    """The checkpoint folder that ``--resume`` names ("latest", a step, or a folder), checked to be complete,
    undamaged and good. ``latest`` is the newest complete checkpoint; with none yet, a started run
    (``run_started``) starts again from step 0 (None), anything else is an error."""
    root = checkpoint_root(config)
    if resume == "latest":
        found = existing(root)
        if not found:
            if run_started:
                return None
            raise ConfigError(f"--resume latest: no run to resume in {config.run.output_dir}; start without --resume, "
                              f"or point run.output_dir at the run to continue")
        folder = found[-1][1]
    elif resume.isdigit():
        folder = root / f"{PREFIX}{int(resume)}"
        if not folder.is_dir():
            steps = [s for s, _ in existing(root)]
            raise ConfigError(f"--resume {resume}: no {folder}; available steps: {steps or 'none'}")
    else:
        folder = Path(resume)
        if not folder.is_dir() or _step_of(folder) is None:
            raise ConfigError(f"--resume {resume}: expected 'latest', a step number or a {PREFIX}<step> folder")
    verify(folder)
    return folder


def verify(folder: Path) -> dict:
    """The info of a checkpoint that is complete, undamaged (every file at its recorded size) and good."""
    root, step = folder.parent, _step_of(folder)
    if not (folder / INFO).is_file():
        raise CheckpointError(f"{folder} is incomplete (no {INFO}: its save did not finish); {_instead(root, step)}")
    try:
        info = read_info(folder)
        files = dict(info["files"])
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{folder} is damaged ({INFO} unreadable: {error}); {_instead(root, step)}") from error
    for name, size in files.items():
        path = folder / name
        actual = path.stat().st_size if path.is_file() else None
        if actual != size:
            what = "missing" if actual is None else f"{actual} bytes, written as {size}"
            raise CheckpointError(f"{folder} is damaged ({name}: {what}); {_instead(root, step)}")
    if not info.get("weights_finite", False):
        raise CheckpointError(f"{folder} holds non-finite weights; {_instead(root, step)}")
    if info.get("next_loss_finite") is False:
        raise CheckpointError(f"{folder} is not good: the step after it (step {step + 1}) had a non-finite loss; "
                              f"{_instead(root, step)} and change what made the run diverge (e.g. a smaller optim.lr)")
    return info


def load(engine, folder: Path) -> dict:
    """Load checkpoint ``folder`` into ``engine`` (every rank); returns its client state. A file that does not
    load is reported with the checkpoint and the one to use instead."""
    try:
        _, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=False)
    except Exception as error:  # noqa: BLE001 - torch/DeepSpeed raise many kinds for a damaged file
        raise CheckpointError(f"{folder} is damaged ({type(error).__name__}: {error}); "
                              f"{_instead(folder.parent, _step_of(folder))}") from error
    if client_state is None:
        raise CheckpointError(f"could not load {folder}; {_instead(folder.parent, _step_of(folder))}")
    return client_state


def _flat(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(config: TrainConfig, folder: Path) -> dict[str, tuple]:
    """Settings that differ from the checkpoint's, {key: (checkpoint's, now)}; refuses the ones that must match."""
    saved_path = folder / "config.yaml"
    if not saved_path.exists():
        raise CheckpointError(f"{folder} has no config.yaml; it was not written by this trainer")
    saved = _flat(yaml.safe_load(saved_path.read_text()) or {})
    current = _flat(to_dict(config))
    must = {f"{section}.{key}" for section, keys in MUST_MATCH.items() for key in keys}
    differences = {key: (saved.get(key), value) for key, value in current.items()
                   if saved.get(key) != value and key != "run.output_dir"}  # the run's folder, possibly moved
    refused = [f"{key}: checkpoint {old!r}, now {new!r}" for key, (old, new) in differences.items() if key in must]
    if refused:
        raise ConfigError(f"cannot resume from {folder}: the configuration changed ({'; '.join(refused)}). "
                          f"Resume with the checkpoint's settings (see {saved_path}), or start a new run.output_dir")
    return differences


def apply_optimizer_settings(scheduler, config: TrainConfig) -> None:
    """Put the config's learning rate, warm-up and weight decay into the optimizer and scheduler that a
    checkpoint restored (theirs are the checkpoint's otherwise)."""
    optimizer = scheduler.optimizer
    for group in optimizer.param_groups:
        group["initial_lr"] = config.optim.lr
        group["weight_decay"] = config.optim.weight_decay
    scheduler.base_lrs = [config.optim.lr] * len(optimizer.param_groups)
    values = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, value in zip(optimizer.param_groups, values):
        group["lr"] = value
    scheduler._last_lr = values


def supersede_later(root: Path, step: int) -> list[Path]:
    """Move checkpoints after ``step`` (from the run being resumed's later, abandoned steps) to
    ``checkpoints/superseded/``, so that rotation and ``latest`` only see this run's (rank 0)."""
    moved = []
    for later_step, folder in existing(root):
        if later_step > step:
            target = root / "superseded" / folder.name
            suffix = 1
            while target.exists():
                target, suffix = root / "superseded" / f"{folder.name}.{suffix}", suffix + 1
            target.parent.mkdir(exist_ok=True)
            os.replace(folder, target)
            moved.append(target)
    return moved
