"""Prior preservation: keep the model where it already draws poses well, while the reward moves it elsewhere.

The reward only says where the joints are; it is blind to everything else an image must get right (in
the tiny world: each body part's colour). Adapters shared by all inputs drift on those things on every
input, including the scan-like poses that the base model was pretrained on, and the KL term on the
training inputs cannot stop that drift without also holding back the pose change the reward asks for
there. The preservation loss anchors the model where nothing should change instead: on complete
multi-view samples of the pretraining distribution, noised at a random timestep, the fine-tuned
prediction is pulled towards

* ``target: base`` (default): the base model's prediction on the same input (the same UNet with the
  adapters switched off): a KL to the base model on those poses, zero until the adapters move;
* ``target: data``: the pretraining target (the noise, or v), i.e. the standard diffusion loss, which
  also carries that loss's own sampling noise into every step.

It is added to the DrPose loss with weight ``preserve.weight``. Every training sample brings one
preservation sample, chosen with its timestep and noise from (seed, step, stream position), so a
resumed run repeats them exactly and 1 process with micro-batch 2 computes the same loss as 2
processes with micro-batch 1. The pool is a DrPose15K-format folder whose records carry multi-view
renders of pretraining-distribution bodies (for a real checkpoint: renders of the scans it was trained
on), turned into the model's views and encoded with the run's VAE once at start-up.

Encoding the pool is most of a short run's start-up (256 samples x 14 views through the VAE), so the
latents are kept in ``<pool>/encoded/<key>.pt`` and read back by later runs. The key covers everything
the latents depend on: the pool's files (paths, sizes, modification times), the VAE's weights, the rig,
the image size, the dtype and the device type; a change to any of them encodes afresh. A pool folder
that cannot be written to is encoded on every run (with a note).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from drpose.models.diffusion import add_noise, training_target
from drpose.models.layout import grid_to_rows
from drpose.models.pipeline import Conditioning, MultiViewPipeline
from drpose.models.rig import ViewRig

from .config import ConfigError
from .data import seeded_generator

PRESERVE_STREAM = 2_000_003  # separates the preservation generators' seeds from the noise and plan streams
CACHE_FOLDER = "encoded"  # under the pool folder: encoded latents, one file per key


def encoding_key(folder: Path, pipeline: MultiViewPipeline, rig: ViewRig, dtype: torch.dtype,
                 device: torch.device) -> str:
    """A hex digest of everything the pool's encoded latents depend on (module docstring)."""
    digest = hashlib.sha256()
    settings = {"version": 1, "rig": rig.to_dict(), "size": pipeline.image_size, "dtype": str(dtype),
                "device": torch.device(device).type}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and CACHE_FOLDER not in p.relative_to(folder).parts):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    for name, tensor in sorted(pipeline.vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def _read_cached(path: Path, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    try:
        latents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable cache (truncated, not a tensor file) is encoded again
        print(f"[drpose] preserve: ignoring the unreadable cache {path} ({error}); encoding again", flush=True)
        return None
    if not isinstance(latents, torch.Tensor) or tuple(latents.shape[:3]) != shape or latents.dtype != dtype:
        print(f"[drpose] preserve: ignoring the cache {path} (holds {getattr(latents, 'shape', type(latents))}); "
              f"encoding again", flush=True)
        return None
    return latents


def _write_cached(path: Path, latents: torch.Tensor) -> None:
    """Write atomically (a partial file never carries the final name); a read-only pool is only noted."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(exist_ok=True)
        torch.save(latents.cpu(), partial)
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        print(f"[drpose] preserve: could not keep the encoded pool in {path.parent} ({error}); it is encoded on "
              f"every run", flush=True)


class PreservationSet:
    """Multi-view latents (N, 2, V, c, h, w) of pretraining-distribution poses, with their conditioning."""

    def __init__(self, latents: torch.Tensor, cond: Conditioning, num_train_timesteps: int,
                 max_timestep: int | None = None):
        if latents.ndim != 6 or latents.shape[0] < 1 or latents.shape[1] != 2:
            raise ValueError(f"latents: expected (N >= 1, 2, V, c, h, w), got {tuple(latents.shape)}")
        if len(cond) != latents.shape[0]:
            raise ValueError(f"cond: {len(cond)} entries for {latents.shape[0]} samples")
        self.latents = latents
        self.cond = cond
        self.num_train_timesteps = num_train_timesteps
        # timesteps are drawn from [0, max_timestep); None: every training timestep
        self.max_timestep = num_train_timesteps if max_timestep is None else int(max_timestep)
        if not 1 <= self.max_timestep <= num_train_timesteps:
            raise ConfigError(f"preserve.max_timestep must be in 1..{num_train_timesteps} (the scheduler's "
                              f"training timesteps) or null, got {max_timestep}")

    @classmethod
    @torch.no_grad()
    def from_folder(cls, folder: str | Path, pipeline: MultiViewPipeline, rig: ViewRig, seed: int,
                    device: torch.device, dtype: torch.dtype, chunk: int = 64, cache: bool = True,
                    max_timestep: int | None = None) -> "PreservationSet":
        """Read a dataset folder with renders, turn them into the model's views and encode them with
        ``pipeline`` (its VAE; the conditioning from each record's image, unCLIP noise seeded by ``seed``).
        With ``cache``, latents encoded by an earlier run with the same key are read instead (module docstring)."""
        from drpose.data.dataset import DrPoseDataset

        folder = Path(folder)
        dataset = DrPoseDataset(folder, load_renders=True)
        camera = dataset.records[0].camera
        if camera != rig.cameras:
            raise ConfigError(f"preserve.path: {folder} was rendered with cameras {camera.to_dict()}, not the "
                              f"model's rig {rig.cameras.to_dict()}")
        size = pipeline.image_size
        cache_path = cached = None
        if cache:
            cache_path = folder / CACHE_FOLDER / f"{encoding_key(folder, pipeline, rig, dtype, device)}.pt"
            if cache_path.is_file():
                cached = _read_cached(cache_path, (len(dataset), 2, pipeline.num_views), dtype)
        generator = torch.Generator().manual_seed(seed)
        latents, conds = [], []
        for start in range(0, len(dataset), chunk):
            indices = range(start, min(start + chunk, len(dataset)))
            if cached is None:
                items = [dataset[i] for i in indices]
                renders = {k: torch.stack([item["renders"][k] for item in items]) for k in ("rgb", "normal", "mask")}
                if renders["rgb"].shape[-1] != size:
                    raise ConfigError(f"preserve.path: {folder} holds {renders['rgb'].shape[-1]}px renders; the "
                                      f"model takes {size}px images")
                views = rig.model_views(renders["rgb"], renders["normal"], renders["mask"]).to(device, dtype)
                flat = pipeline.encode_images(views.flatten(0, 2))
                latents.append(flat.view(*views.shape[:3], *flat.shape[1:]))
                images = torch.stack([item["image"] for item in items])
            else:
                images = torch.stack([dataset.image(i) for i in indices])
            conds.append(pipeline.condition(images.to(device, dtype), generator=generator))
        if cached is None:
            encoded = torch.cat(latents)
            if cache_path is not None:
                _write_cached(cache_path, encoded)
        else:
            encoded = cached.to(device)
        return cls(encoded, Conditioning.cat(conds), pipeline.scheduler.config.num_train_timesteps, max_timestep)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def draw(self, seed: int, step: int, positions: list[int]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Conditioning]:
        """For each stream position: a pool sample, its noise and timestep. Returns clean latents as rows
        (2 * B * V, c, h, w), noise like them, timesteps (rows,) shared by a sample's rows, and the samples'
        conditioning."""
        indices, noises, timesteps = [], [], []
        views = self.latents.shape[2]
        for position in positions:
            generator = seeded_generator(seed, step, PRESERVE_STREAM, position)
            indices.append(int(torch.randint(len(self), (1,), generator=generator)))
            timesteps.append(int(torch.randint(self.max_timestep, (1,), generator=generator)))
            noises.append(torch.randn((2, views, *self.latents.shape[3:]), generator=generator))
        samples = self.latents[indices]  # (B, 2, V, ...)
        x0 = grid_to_rows(samples.transpose(0, 1))
        noise = grid_to_rows(torch.stack(noises, dim=1)).to(x0)
        t = torch.tensor(timesteps)[None, :, None].expand(2, len(positions), views).reshape(-1).to(x0.device)
        return x0, noise, t, self.cond.select(indices)

    def loss(self, model, scheduler, seed: int, step: int, positions: list[int], checkpointing: bool = True,
             frozen_model=None) -> torch.Tensor:
        """Mean squared error of ``model``'s prediction (a :data:`~drpose.models.sampling.Denoiser`) on the
        drawn samples (one per position).

        The target is the pretraining one (the noise, or v, that made the noisy input), or, with
        ``frozen_model`` (the base model: the same UNet with adapters disabled), that model's prediction
        on the same input: a KL to the base model on the pretraining distribution, zero until the
        adapters move and free of the denoising loss's own noise."""
        x0, noise, timesteps, cond = self.draw(seed, step, positions)
        noisy = add_noise(scheduler, x0, noise, timesteps)
        if frozen_model is not None:
            with torch.no_grad():
                target = frozen_model(noisy, timesteps, cond, None)
        else:
            target = training_target(scheduler, x0, noise, timesteps)
        if checkpointing:
            prediction = checkpoint(model, noisy, timesteps, cond, None, use_reentrant=False)
        else:
            prediction = model(noisy, timesteps, cond, None)
        return (prediction.float() - target.float()).pow(2).mean()
