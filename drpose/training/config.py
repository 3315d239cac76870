"""Typed training configuration: one YAML file -> nested dataclasses, plus ``section.key=value`` overrides.

Unknown keys, values of the wrong type and values out of range are errors that name the key (with a
suggestion for typos); a file that is not valid YAML is named with the line and column. Paths written in a
config file are relative to that file's folder; paths given on the command line, and the defaults, are
relative to the working folder. Both are made absolute when the config is read, so a run behaves the same
from any folder. :func:`check_files` checks what the paths point to (the DeepSpeed JSON, model folders,
datasets) before a run does any work. ``resolved_yaml`` gives the fully resolved configuration that is
saved next to every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and says what to do."""


@dataclass
class RunConfig:
    name: str = "drpose"
    output_dir: str = "runs/drpose"
    seed: int = 0
    max_steps: int = 200  # optimizer steps
    log_every: int = 1
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    deepspeed_config: str = "configs/ds_zero2.json"
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16


@dataclass
class ModelConfig:
    pipeline: str | None = None  # PSHuman-style pipeline folder; None = the tiny world's
    g_skel: str | None = None  # g_skel folder (heatmap width and rig in its config); None = the tiny world's
    prompt_embeds: str | None = None  # folder with PSHuman's normal_embeds.pt + clr_embeds.pt (if not in pipeline)
    unet: str | None = None  # UNetMV2DConditionModel folder replacing the pipeline's (e.g. converted from SD)


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class SamplingConfig:
    num_steps: int = 20  # T
    guidance_scale: float = 1.0
    policy: str = "drtune"
    num_grad_steps: int = 2  # K
    early_stop_max: int = 8  # m
    checkpointing: bool = True  # activation checkpointing of every gradient-carrying UNet call
    unet_checkpointing: bool = False  # also checkpoint inside the UNet (diffusers' enable_gradient_checkpointing)
    offload_activations: bool = False  # saved activations of gradient-carrying calls go to host memory
    groups_per_call: int = 0  # split UNet calls into this many groups (0: all); the backward then goes per chunk


@dataclass
class RewardConfig:
    sigma: float | None = None  # heatmap width in latent pixels; None = the one g_skel was trained with
    backend: str = "auto"
    kl_weight: float = 0.01
    include_bones: bool = True
    bone_weight: float = 1.0  # weight of each bone channel against a joint's (1: all 43 channels alike)


@dataclass
class DataConfig:
    path: str = "data/broad"
    batch_size: int = 2  # per process and micro-step
    grad_accum: int = 1
    synthesize_distribution: str | None = None  # when set and ``path`` is missing, rank 0 synthesizes it
    synthesize_num: int = 256
    synthesize_seed: int = 300
    synthesize_fps_pool: int | None = None  # draw this many and keep the synthesize_num most diverse (DrPose15K's FPS)
    synthesize_breaking_share: float | None = None  # share of `broad` poses in breaking moves (None: the default 0.25)


@dataclass
class PreserveConfig:
    """Prior preservation (drpose.training.preserve): on poses the base model draws well, keep the fine-tuned
    prediction at the base model's (``target: base``) or at the pretraining target (``target: data``)."""

    weight: float = 0.0  # 0 = off
    target: str = "base"  # base: the frozen base model's prediction (a KL on these poses) | data: the pretraining loss
    path: str = "data/preserve"  # dataset folder with multi-view renders of pretraining-distribution poses
    distribution: str | None = "narrow"  # when set and ``path`` is missing, rank 0 synthesizes it ("hard" is held out)
    num: int = 256  # pool size (synthesized)
    seed: int = 500
    max_timestep: int | None = None  # draw the noise level from [0, max_timestep) (None: every training timestep)
    cache: bool = True  # keep the pool's encoded latents in <path>/encoded/ for later runs (drpose/training/preserve.py)


LR_SCHEDULES = ("constant", "cosine")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"  # after the warm-up: constant | cosine (to min_lr_ratio * lr at run.max_steps)
    min_lr_ratio: float = 0.0  # the cosine schedule's last learning rate, as a fraction of optim.lr
    ema_decay: float | None = None  # exponential moving average of the adapters, exported as lora/ (null: off)


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preserve: PreserveConfig = field(default_factory=PreserveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


def _describe(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """``value`` as type ``tp`` (dataclass field annotation), or a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{key}: got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_describe(item)}, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_describe(tp)}")


PATH_KEYS = ("run.output_dir", "run.deepspeed_config", "model.pipeline", "model.g_skel", "model.prompt_embeds",
             "model.unet", "data.path", "preserve.path")
"""Settings that are paths: made absolute when read (against the config file's folder or the working folder)."""


def _absolute(value: str, base: Path) -> str:
    path = Path(value).expanduser()
    return os.path.normpath(path if path.is_absolute() else base / path)


def _apply(target, values: dict, prefix: str, base: Path | None = None) -> None:
    """Set ``values`` on the dataclass ``target``; paths among them are made absolute against ``base``."""
    hints = typing.get_type_hints(type(target))
    names = [f.name for f in dataclasses.fields(target)]
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(prefix + n for n in names)}"
            raise ConfigError(f"unknown config key '{key}'{hint}")
        current = getattr(target, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
            _apply(current, value, f"{key}.", base)
        else:
            value = _coerce(value, hints[name], key)
            if key in PATH_KEYS and isinstance(value, str) and base is not None:
                if not value.strip():
                    raise ConfigError(f"{key}: expected a path, got an empty string")
                value = _absolute(value, base)
            setattr(target, name, value)


def parse_override(text: str) -> tuple[list[str], object]:
    """``a.b=value`` -> (["a", "b"], parsed value); values are read as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key part")
    if not raw.strip():
        return parts, ""
    try:
        return parts, yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(error)})") from error


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def read_yaml(path: Path):
    """The YAML document in ``path``; a syntax error names the file, line and column."""
    try:
        text = path.read_text()
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a text file ({error})") from error
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(error)}") from error


def read_json(path: Path, key: str):
    """The JSON document in ``path`` (the setting ``key``); a syntax error names the file, line and column."""
    try:
        return json.loads(path.read_text())
    except UnicodeDecodeError as error:
        raise ConfigError(f"{key}: {path} is not a text file ({error})") from error
    except json.JSONDecodeError as error:
        raise ConfigError(f"{key}: {path} is not valid JSON: line {error.lineno}, column {error.colno}: "
                          f"{error.msg}") from error


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults, then the file's settings (paths relative to the file), then the overrides (paths relative to
    the working folder), validated."""
    config = TrainConfig()
    cwd = Path.cwd()
    for key in PATH_KEYS:
        section, name = key.split(".")
        default = getattr(getattr(config, section), name)
        if default is not None:
            setattr(getattr(config, section), name, _absolute(default, cwd))
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        values = read_yaml(path) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        try:
            _apply(config, values, "", path.resolve().parent)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from error
    for text in overrides:
        parts, value = parse_override(text)
        nested: dict = value
        for part in reversed(parts):
            nested = {part: nested}
        _apply(config, nested, "", cwd)
    validate(config)
    return config


TRAINING_POLICIES = ("drtune", "draft", "alignprop")


def _non_finite(target, prefix: str = "") -> str | None:
    """The first number setting that is NaN or infinite, by key."""
    for f in dataclasses.fields(target):
        value = getattr(target, f.name)
        if dataclasses.is_dataclass(value):
            found = _non_finite(value, f"{prefix}{f.name}.")
            if found:
                return found
        elif isinstance(value, float) and not math.isfinite(value):
            return f"{prefix}{f.name}"
    return None


def validate(config: TrainConfig) -> None:
    """Refuse settings that cannot train, by key: ranges, enums and combinations."""
    from drpose.poses import DISTRIBUTIONS

    bad = _non_finite(config)
    if bad:
        raise ConfigError(f"{bad} must be a finite number")
    run, sampling, optim, lora = config.run, config.sampling, config.optim, config.lora
    if sampling.policy == "none":
        raise ConfigError("sampling.policy none carries no gradient through any sampling step, so nothing would "
                          f"train; use one of {TRAINING_POLICIES} (none is for sampling and benchmarks only)")
    checks = [
        (sampling.policy in TRAINING_POLICIES,
         f"sampling.policy must be one of {TRAINING_POLICIES}, got {sampling.policy!r}"),
        (sampling.num_steps >= 1, "sampling.num_steps must be >= 1"),
        (0 <= sampling.early_stop_max < sampling.num_steps,
         "sampling.early_stop_max must be in [0, sampling.num_steps)"),
        (sampling.num_grad_steps >= 1,
         f"sampling.num_grad_steps (K) must be >= 1 (the steps that carry a gradient), got {sampling.num_grad_steps}"),
        (sampling.policy == "drtune" or sampling.num_grad_steps <= sampling.num_steps,
         f"sampling.num_grad_steps (K={sampling.num_grad_steps}) must be <= sampling.num_steps "
         f"(T={sampling.num_steps})"),
        (sampling.policy != "drtune" or sampling.num_grad_steps <= sampling.num_steps - sampling.early_stop_max,
         f"sampling.num_grad_steps (K={sampling.num_grad_steps}) must be <= sampling.num_steps - "
         f"sampling.early_stop_max (T - m = {sampling.num_steps - sampling.early_stop_max}): DRTune runs as few as "
         f"T - m steps and trains K of them"),
        (sampling.guidance_scale >= 0, f"sampling.guidance_scale must be >= 0, got {sampling.guidance_scale}"),
        (run.log_every >= 1, f"run.log_every must be >= 1, got {run.log_every}"),
        (run.seed >= 0, f"run.seed must be >= 0, got {run.seed}"),
        (optim.lr > 0, f"optim.lr must be > 0, got {optim.lr}"),
        (optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {optim.weight_decay}"),
        (optim.max_grad_norm >= 0, f"optim.max_grad_norm must be >= 0 (0: no clipping), got {optim.max_grad_norm}"),
        (optim.warmup_steps >= 0, f"optim.warmup_steps must be >= 0 (0: no warm-up), got {optim.warmup_steps}"),
        (optim.schedule in LR_SCHEDULES, f"optim.schedule must be one of {LR_SCHEDULES}, got {optim.schedule!r}"),
        (0 <= optim.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {optim.min_lr_ratio}"),
        (optim.ema_decay is None or 0 < optim.ema_decay < 1,
         f"optim.ema_decay must be in (0, 1) or null, got {optim.ema_decay}"),
        (lora.alpha > 0, f"lora.alpha must be > 0 (the adapters' scale is alpha / rank), got {lora.alpha}"),
        (0 <= lora.dropout < 1, f"lora.dropout must be in [0, 1), got {lora.dropout}"),
        (len(lora.target_modules) >= 1, "lora.target_modules must name at least one module"),
        (config.reward.sigma is None or config.reward.sigma > 0,
         f"reward.sigma must be > 0 (the heatmap width in latent pixels) or null (g_skel's), got "
         f"{config.reward.sigma}"),
        (config.data.synthesize_distribution in (None, *DISTRIBUTIONS),
         f"data.synthesize_distribution must be one of {DISTRIBUTIONS} or null, got "
         f"{config.data.synthesize_distribution!r}"),
        (config.data.synthesize_num >= 1, f"data.synthesize_num must be >= 1, got {config.data.synthesize_num}"),
        (config.run.precision in ("auto", "fp32", "bf16"), "run.precision must be auto, fp32 or bf16"),
        (config.reward.bone_weight >= 0, f"reward.bone_weight must be >= 0, got {config.reward.bone_weight}"),
        (config.reward.backend in ("auto", "triton", "reference"), "reward.backend must be auto, triton or reference"),
        (config.data.batch_size >= 1 and config.data.grad_accum >= 1, "data.batch_size and data.grad_accum must be >= 1"),
        (config.run.max_steps >= 1, "run.max_steps must be >= 1"),
        (config.run.checkpoint_every >= 1 and config.run.keep_checkpoints >= 1,
         "run.checkpoint_every and run.keep_checkpoints must be >= 1"),
        (config.lora.rank >= 1, "lora.rank must be >= 1"),
        (config.reward.kl_weight >= 0, f"reward.kl_weight must be >= 0, got {config.reward.kl_weight}"),
        (config.preserve.weight >= 0, f"preserve.weight must be >= 0, got {config.preserve.weight}"),
        (config.preserve.distribution in (None, "narrow", "broad"),
         f"preserve.distribution must be narrow, broad or null (hard is held out for evaluation), "
         f"got {config.preserve.distribution!r}"),
        (config.sampling.groups_per_call >= 0,
         f"sampling.groups_per_call must be >= 0 (0: all groups in one call), got {config.sampling.groups_per_call}"),
        (config.preserve.target in ("base", "data"),
         f"preserve.target must be base or data, got {config.preserve.target!r}"),
        (config.data.synthesize_fps_pool is None or config.data.synthesize_fps_pool >= config.data.synthesize_num,
         f"data.synthesize_fps_pool must be >= data.synthesize_num ({config.data.synthesize_num}) or null, "
         f"got {config.data.synthesize_fps_pool}"),
        (config.preserve.num >= 1, f"preserve.num must be >= 1, got {config.preserve.num}"),
        (config.preserve.max_timestep is None or config.preserve.max_timestep >= 1,
         f"preserve.max_timestep must be >= 1 or null, got {config.preserve.max_timestep}"),
        (config.data.synthesize_breaking_share is None
         or (isinstance(config.data.synthesize_breaking_share, (int, float))
             and not isinstance(config.data.synthesize_breaking_share, bool)
             and 0.0 <= config.data.synthesize_breaking_share <= 1.0),
         f"data.synthesize_breaking_share must be in [0, 1] or null, got {config.data.synthesize_breaking_share!r}"),
        (config.data.synthesize_breaking_share is None or config.data.synthesize_distribution == "broad",
         f"data.synthesize_breaking_share: only `broad` has breaking moves, but data.synthesize_distribution is "
         f"{config.data.synthesize_distribution!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


DEEPSPEED_OWNED = {
    "optimizer": "the trainer builds the optimizer (AdamW with optim.lr and optim.weight_decay)",
    "scheduler": "the trainer builds the schedule (linear warm-up over optim.warmup_steps, then optim.schedule)",
    "train_batch_size": "set by data.batch_size x data.grad_accum x the number of processes",
    "train_micro_batch_size_per_gpu": "set by data.batch_size",
    "gradient_accumulation_steps": "set by data.grad_accum",
    "gradient_clipping": "set by optim.max_grad_norm",
    "torch_autocast": "set from run.precision (the engine keeps the step's autocast in the run dtype)",
}
"""Sections of a DeepSpeed JSON that the trainer sets itself; a JSON that holds them is refused."""


def read_deepspeed_config(path: str | Path) -> dict:
    """The DeepSpeed JSON of ``run.deepspeed_config``, refused by name when it holds settings the trainer owns."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"run.deepspeed_config: {path} does not exist (see configs/ds_*.json)")
    ds = read_json(path, "run.deepspeed_config")
    if not isinstance(ds, dict):
        raise ConfigError(f"run.deepspeed_config: {path} must hold a JSON object")
    for key, why in DEEPSPEED_OWNED.items():
        if key in ds:
            raise ConfigError(f"run.deepspeed_config: {path} has a '{key}' section; {why}, so leave it out of the "
                              f"DeepSpeed JSON")
    for key in ("fp16", "bf16"):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled"):
            raise ConfigError(f"run.deepspeed_config: {path}: '{key}' is enabled; precision is set by run.precision "
                              f"(frozen weights in the run dtype, LoRA weights in fp32, autocast), so leave it out of "
                              f"the DeepSpeed JSON")
    stage = ds.get("zero_optimization", {}).get("stage", 0) if isinstance(ds.get("zero_optimization"), dict) else None
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"run.deepspeed_config: {path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return ds


def check_files(config: TrainConfig) -> None:
    """Check what the config's paths point to, before a run does any work: the DeepSpeed JSON, the model
    folders, the datasets (or their synthesis settings) and the output folder."""
    read_deepspeed_config(config.run.deepspeed_config)
    for key in ("pipeline", "g_skel", "prompt_embeds", "unet"):
        value = getattr(config.model, key)
        if value is not None and not Path(value).is_dir():
            raise ConfigError(f"model.{key}: {value} is not a folder")
    data = config.data
    if not (Path(data.path) / "manifest.jsonl").is_file() and data.synthesize_distribution is None:
        raise ConfigError(f"data.path: no dataset at {data.path} (no manifest.jsonl); create one with `python -m "
                          f"drpose.data.synthesize --out {data.path} --num 256 --distribution broad --seed 300`, or "
                          f"set data.synthesize_distribution to have the trainer create it")
    preserve = config.preserve
    if preserve.weight > 0 and preserve.distribution is None and not (Path(preserve.path) / "manifest.jsonl").is_file():
        raise ConfigError(f"preserve.path: no dataset at {preserve.path} (no manifest.jsonl); set "
                          f"preserve.distribution to have the trainer create it, or preserve.weight=0")
    output = Path(config.run.output_dir)
    if output.exists() and not output.is_dir():
        raise ConfigError(f"run.output_dir: {output} exists and is not a folder")


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def resolved_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def from_dict(values: dict) -> TrainConfig:
    config = TrainConfig()
    _apply(config, values, "", Path.cwd())
    return config
