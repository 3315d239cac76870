"""Typed training configuration: one YAML file -> nested dataclasses, plus ``section.key=value`` overrides.

Unknown keys and values of the wrong type are errors that name the key (with a suggestion for typos).
``resolved_yaml`` gives the fully resolved configuration that is saved next to every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
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


@dataclass
class DataConfig:
    path: str = "data/broad"
    batch_size: int = 2  # per process and micro-step
    grad_accum: int = 1
    synthesize_distribution: str | None = None  # when set and ``path`` is missing, rank 0 synthesizes it
    synthesize_num: int = 256
    synthesize_seed: int = 300
    synthesize_fps_pool: int | None = None  # draw this many and keep the synthesize_num most diverse (DrPose15K's FPS)


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


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0


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


def _apply(target, values: dict, prefix: str) -> None:
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
            _apply(current, value, f"{key}.")
        else:
            setattr(target, name, _coerce(value, hints[name], key))


def parse_override(text: str) -> tuple[list[str], object]:
    """``a.b=value`` -> (["a", "b"], parsed value); values are read as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key part")
    return parts, yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    config = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        _apply(config, values, "")
    for text in overrides:
        parts, value = parse_override(text)
        nested: dict = value
        for part in reversed(parts):
            nested = {part: nested}
        _apply(config, nested, "")
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    from drpose.models.sampling import POLICIES

    checks = [
        (config.sampling.policy in POLICIES, f"sampling.policy must be one of {POLICIES}, got {config.sampling.policy!r}"),
        (config.sampling.num_steps >= 1, "sampling.num_steps must be >= 1"),
        (0 <= config.sampling.early_stop_max < config.sampling.num_steps,
         "sampling.early_stop_max must be in [0, sampling.num_steps)"),
        (config.run.precision in ("auto", "fp32", "bf16"), "run.precision must be auto, fp32 or bf16"),
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
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def resolved_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def from_dict(values: dict) -> TrainConfig:
    config = TrainConfig()
    _apply(config, values, "")
    return config
