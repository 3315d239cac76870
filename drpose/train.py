"""DrPose fine-tuning entry point.

    deepspeed [--num_gpus N] drpose/train.py --config configs/tiny.yaml [section.key=value ...]
    python drpose/train.py --config configs/tiny.yaml [--resume latest | --overwrite] [section.key=value ...]

The configuration is one YAML file plus ``section.key=value`` overrides; ``--deepspeed_config``,
``--resume`` (``latest``, a step, or a checkpoint folder) and ``--overwrite`` (delete the run in
``run.output_dir`` and start again) are flags. Paths in the YAML file are relative to its folder, paths
on the command line to the working folder. See ``configs/`` and the README.

Exit codes: 0 done; 2 a configuration, data or checkpoint error (one message, before any work where it
can be found then); 3 the run stopped on purpose (a non-finite loss: the message names the step and the
last good checkpoint).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Run as a script, this file's folder would come first on sys.path and its modules (data, models,
# metrics, ...) would shadow top-level packages of the same names: take it off.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from drpose.training.config import ConfigError, check_files, load_config  # noqa: E402


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="YAML run configuration")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                        help="DeepSpeed JSON (overrides run.deepspeed_config)")
    parser.add_argument("--resume", default=None, help="'latest', a step number, or a checkpoint folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the run in run.output_dir (its checkpoints, metrics, LoRA) and start again")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    unknown = [r for r in rest if r.startswith("-")]
    if unknown:
        parser.error(f"unknown flags {unknown}; settings go as section.key=value")
    return args, rest


def report(message: str) -> None:
    """An error, once: from rank 0 (every rank meets the same configuration, data and checkpoints)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    if args.deepspeed_config:
        overrides = [*overrides, f"run.deepspeed_config={args.deepspeed_config}"]
    try:
        config = load_config(args.config, overrides)
        check_files(config)
    except ConfigError as error:
        report(f"drpose: config error: {error}")
        return 2
    from drpose.data.dataset import DatasetError
    from drpose.training.trainer import TrainingStopped, train

    try:
        summary = train(config, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, DatasetError) as error:
        report(f"drpose: {error}")
        return 2
    except TrainingStopped as error:
        report(f"drpose: stopped: {error}")
        return 3
    print(f"[drpose] done: {summary['steps']} steps in {summary['wall_s']:.0f}s; LoRA in {summary['lora']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
