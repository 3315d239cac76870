"""An exponential moving average of the LoRA adapters (``optim.ema_decay``).

After optimizer step ``s`` (1, 2, ...) the average moves toward the adapters' new weights::

    decay_s = 0 at s = 1, else min(ema_decay, s / (s + 9))
    average = decay_s * average + (1 - decay_s) * weights

The warm-up (0 at the first step, so the average starts from the first step's weights, then 2/11, 3/12,
...) is the one diffusers' ``EMAModel`` uses without ``use_ema_warmup``; it lets the average follow a short
run instead of remembering the untrained adapters. Over the tiny world's 80 steps it stays below 0.9, so
there the average spans about the last tenth of the run whatever ``ema_decay`` is above that.

The average is kept in fp32 on the device, one tensor per adapter parameter: the whole parameter, or under
ZeRO-3 the rank's partition (``ds_tensor``). Checkpoints carry it (``ema.pt``, or ``ema_rank<r>.pt`` per
rank under ZeRO-3) so a resumed run continues the same average; at the end the trainer exports the
average as ``lora/`` and the last step's weights as ``lora_last/``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from drpose.training.checkpoints import CheckpointError
from drpose.training.config import ConfigError
from drpose.training.lora import local_tensor


class EMAStateError(CheckpointError):
    """A checkpoint's saved average is damaged or does not fit this run's adapters."""


def ema_decay_at(step: int, decay: float) -> float:
    """The decay applied after optimizer step ``step`` (counted from 1)."""
    if step < 1:
        raise ValueError(f"optimizer steps count from 1, got {step}")
    return 0.0 if step == 1 else min(decay, step / (step + 9))


class AdapterEMA:
    """The moving average of ``params`` (the adapters, in the order the trainer lists them)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        if not 0 < decay < 1:
            raise ConfigError(f"optim.ema_decay must be in (0, 1), got {decay}")
        self.params = list(params)
        self.decay = decay
        self.partitioned = any(hasattr(p, "ds_tensor") for p in self.params)
        self.shadow = [local_tensor(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step ``step``."""
        weight = 1.0 - ema_decay_at(step, self.decay)
        for average, param in zip(self.shadow, self.params):
            average.lerp_(local_tensor(param).detach().float(), weight)

    @contextlib.contextmanager
    def applied(self):
        """The adapters hold the average inside the block and their own weights again after it."""
        own = [local_tensor(p).detach().clone() for p in self.params]
        with torch.no_grad():
            for average, param in zip(self.shadow, self.params):
                local_tensor(param).copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for weights, param in zip(own, self.params):
                    local_tensor(param).copy_(weights)

    # --- checkpoints ---------------------------------------------------------------------------------------

    def file_name(self, rank: int) -> str:
        return f"ema_rank{rank}.pt" if self.partitioned else "ema.pt"

    def save(self, folder: Path, rank: int) -> None:
        """Write the average into checkpoint ``folder`` (every rank under ZeRO-3, rank 0 otherwise)."""
        if self.partitioned or rank == 0:
            torch.save({"decay": self.decay, "shadow": [t.cpu() for t in self.shadow]}, folder / self.file_name(rank))

    def load(self, folder: Path, rank: int) -> bool:
        """Continue the average saved in checkpoint ``folder``; False (the average starts from the current
        weights) if the checkpoint has none, i.e. its run did not average."""
        path = folder / self.file_name(rank)
        if not path.is_file():
            if any(folder.glob("ema*.pt")):  # an average saved in another layout
                raise EMAStateError(f"{folder} holds the adapters' average for another ZeRO stage or number of ranks "
                                    f"than this run's (no {path.name}); resume it as it was saved")
            return False
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            saved = state["shadow"]
        except Exception as error:  # noqa: BLE001 - a damaged file can fail in many ways
            raise EMAStateError(f"{path} is damaged ({type(error).__name__}: {error})") from error
        shapes = [tuple(t.shape) for t in saved]
        expected = [tuple(t.shape) for t in self.shadow]
        if shapes != expected:
            index = next((i for i, (a, b) in enumerate(zip(shapes, expected)) if a != b),
                         min(len(shapes), len(expected)))
            raise EMAStateError(
                f"{path} averages {len(shapes)} adapter tensors, this run has {len(expected)}; tensor {index} is "
                f"{shapes[index] if index < len(shapes) else 'missing'} there and "
                f"{expected[index] if index < len(expected) else 'missing'} here; resume with the run's own lora "
                f"settings")
        for average, values in zip(self.shadow, saved):
            average.copy_(values)
        return True
