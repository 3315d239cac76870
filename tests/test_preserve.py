"""Prior preservation (drpose.training.preserve): the pool, the per-position draws, and the loss."""

from __future__ import annotations

import os

import pytest
import torch

from drpose.data.synthesize import synthesize
from drpose.models.bundle import ModelBundle
from drpose.models.diffusion import add_noise, training_target
from drpose.models.layout import COLOR, rows_to_grid
from drpose.training.config import ConfigError, LoraSettings, load_config
from drpose.training.lora import add_lora, adapters_disabled
from drpose.training.preserve import PreservationSet, encoding_key


def fresh_bundle() -> ModelBundle:
    return ModelBundle.load()


@pytest.fixture(scope="module")
def bundle():
    return fresh_bundle()


@pytest.fixture(scope="module")
def pool(bundle, tmp_path_factory) -> PreservationSet:
    folder = tmp_path_factory.mktemp("preserve") / "narrow"
    synthesize(folder, 8, "narrow", 500, bundle.image_size, progress=False)
    return PreservationSet.from_folder(folder, bundle.pipeline, bundle.rig, 500, torch.device("cpu"), torch.float32)


def test_pool_holds_every_view_and_domain_of_fresh_poses(bundle, pool):
    assert len(pool) == 8
    assert pool.latents.shape[1:] == (2, bundle.num_views, *bundle.latent_shape)
    fronts = pool.latents[:, COLOR, 0].flatten(1)  # distinct poses: no two samples share their front latent
    assert torch.cdist(fronts, fronts).add(torch.eye(8) * 1e9).min() > 1e-3
    # the face view is the head crop of the front view, in both domains
    assert not torch.equal(pool.latents[:, :, 6], pool.latents[:, :, 0])


def test_draws_depend_only_on_seed_step_and_position(pool):
    """One process drawing positions [4, 5] sees what two processes drawing [4] and [5] see."""
    views = pool.latents.shape[2]
    together = pool.draw(seed=0, step=3, positions=[4, 5])
    first, second = pool.draw(0, 3, [4]), pool.draw(0, 3, [5])
    for index in range(3):
        both = rows_to_grid(together[index], views)
        assert torch.equal(both, torch.cat([rows_to_grid(first[index], views), rows_to_grid(second[index], views)], 1))
    assert torch.equal(together[3].latents, torch.cat([first[3].latents, second[3].latents]))
    again = pool.draw(0, 3, [4, 5])
    assert all(torch.equal(a, b) for a, b in zip(together[:3], again[:3]))
    assert not torch.equal(pool.draw(0, 4, [4, 5])[1], together[1]), "each step draws fresh noise"


def test_timesteps_are_drawn_below_the_limit_and_from_the_whole_range_without_one(pool):
    positions = list(range(64))

    def limited_to(max_timestep):
        return PreservationSet(pool.latents, pool.cond, pool.num_train_timesteps, max_timestep)

    full = pool.draw(0, 2, positions)[2].view(2, 64, -1)[0, :, 0]
    assert full.max() >= 500 and full.min() < 500  # uniform over the 1000 training timesteps
    limited = limited_to(400).draw(0, 2, positions)[2]
    assert limited.max() < 400 and limited.min() >= 0 and len(limited.unique()) > 20
    same = limited_to(None).draw(0, 2, positions)
    assert torch.equal(same[2].view(2, 64, -1)[0, :, 0], full)  # no limit: the draws of a pool never limited
    for bad in (0, 1001):
        with pytest.raises(ConfigError, match="preserve.max_timestep must be in 1..1000"):
            limited_to(bad)


def test_draw_pairs_a_sample_with_its_own_conditioning(pool):
    x0, noise, timesteps, cond = pool.draw(0, 0, [0, 1, 2])
    views = pool.latents.shape[2]
    grid = rows_to_grid(x0, views)  # (2, 3, V, ...)
    for b in range(3):
        match = [i for i in range(len(pool)) if torch.equal(pool.latents[i], grid[:, b])]
        assert len(match) == 1
        assert torch.equal(cond.latents[b], pool.cond.latents[match[0]])
    assert noise.shape == x0.shape
    per_object = rows_to_grid(timesteps, views)
    assert all((per_object[:, b] == per_object[0, b, 0]).all() for b in range(3))


def test_loss_is_the_pretraining_objective_and_reaches_the_adapters(bundle, pool):
    pipeline = bundle.pipeline
    x0, noise, timesteps, cond = pool.draw(0, 7, [0, 1])
    with torch.no_grad():
        noisy = add_noise(pipeline.scheduler, x0, noise, timesteps)
        expected = (pipeline.predict(noisy, timesteps, cond) - training_target(pipeline.scheduler, x0, noise, timesteps))
        got = pool.loss(pipeline.predict, pipeline.scheduler, 0, 7, [0, 1], checkpointing=False)
    assert got.item() == pytest.approx(expected.pow(2).mean().item(), rel=1e-5)

    fresh = fresh_bundle().pipeline  # adapters stay off the shared bundle's model
    params = add_lora(fresh.unet, LoraSettings(rank=4, alpha=4.0, target_modules=["to_q", "to_v", "conv1"]))
    loss = pool.loss(fresh.predict, fresh.scheduler, 0, 7, [0, 1], checkpointing=True)
    loss.backward()
    assert sum(p.grad.abs().sum().item() for p in params if p.grad is not None) > 0


def test_base_model_is_near_its_optimum_on_the_pool_and_a_drifted_one_is_not(bundle, pool):
    """The base model was pretrained on narrow poses: perturbing its weights raises the loss."""
    positions = list(range(8))
    pipeline = bundle.pipeline
    drifted = fresh_bundle().pipeline
    with torch.no_grad():
        base = torch.stack([pool.loss(pipeline.predict, pipeline.scheduler, 0, s, positions, False)
                            for s in range(4)]).mean()
        generator = torch.Generator().manual_seed(0)
        for param in drifted.unet.parameters():
            param.add_(0.3 * param.std().nan_to_num(0) * torch.randn(param.shape, generator=generator))
        worse = torch.stack([pool.loss(drifted.predict, drifted.scheduler, 0, s, positions, False)
                             for s in range(4)]).mean()
    assert worse > 1.5 * base, (worse, base)


def test_a_pool_rendered_for_another_model_is_refused_by_name(bundle, tmp_path):
    folder = tmp_path / "small"
    synthesize(folder, 2, "narrow", 1, resolution=48, progress=False)
    with pytest.raises(ConfigError, match="preserve.path: .* 48px renders; the model takes 72px"):
        PreservationSet.from_folder(folder, bundle.pipeline, bundle.rig, 0, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("override, message", [
    ("preserve.weight=-1", "preserve.weight must be >= 0"),
    ("preserve.distribution=hard", "hard is held out"),
    ("preserve.num=0", "preserve.num must be >= 1"),
    ("preserve.wieght=1", "did you mean 'preserve.weight'"),
    ("preserve.max_timestep=0", "preserve.max_timestep must be >= 1 or null"),
])
def test_bad_preservation_settings_are_refused_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_base_target_is_zero_until_the_adapters_move_and_then_pulls_them_back(pool):
    pipeline = fresh_bundle().pipeline
    unet = pipeline.unet
    params = add_lora(unet, LoraSettings(rank=4, alpha=4.0, target_modules=["to_q", "to_v", "conv1"]))

    def frozen(x, t, cond, keep):
        with adapters_disabled(unet):
            return pipeline.predict(x, t, cond, keep)

    def loss(checkpointing=True):
        return pool.loss(pipeline.predict, pipeline.scheduler, 0, 2, [0, 1], checkpointing, frozen_model=frozen)

    assert loss().item() == 0.0, "fresh adapters are the identity"
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in params:
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    moved = loss()
    assert moved.item() > 0
    moved.backward()
    with torch.no_grad():  # one small step against the gradient brings the adapters back towards the base
        for param in params:
            param.sub_(1e-2 * param.grad / max(p.grad.abs().max().item() for p in params))
        closer = loss(False)
    assert closer.item() < moved.item()


def test_the_encoded_pool_is_kept_and_read_back_until_its_inputs_change(bundle, tmp_path, capsys):
    folder = tmp_path / "narrow"
    synthesize(folder, 3, "narrow", 7, bundle.image_size, progress=False)

    def load(**kwargs):
        return PreservationSet.from_folder(folder, bundle.pipeline, bundle.rig, 500, torch.device("cpu"),
                                           torch.float32, **kwargs)

    fresh = load(cache=False)
    assert not (folder / "encoded").exists(), "cache=False writes nothing"
    first = load()
    (kept,) = (folder / "encoded").iterdir()
    marker = torch.full_like(first.latents, 7.0)
    torch.save(marker, kept)
    read = load()
    assert torch.equal(read.latents, marker), "the second run read the kept latents"
    assert torch.equal(first.latents, fresh.latents), "the first run encoded what an uncached run encodes"
    for a, b in zip((read.cond.latents, read.cond.class_labels), (fresh.cond.latents, fresh.cond.class_labels)):
        assert torch.equal(a, b), "the conditioning is computed from the images either way"
    # a changed pool file makes a new key: encoded again, the old file is left alone
    image = sorted((folder / "images").iterdir())[0]
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again = load()
    assert torch.equal(again.latents, fresh.latents)
    assert len(list((folder / "encoded").iterdir())) == 2
    # so does another VAE
    vae = bundle.pipeline.vae
    with torch.no_grad():
        weight = next(vae.parameters())
        saved = weight.clone()
        weight.add_(1e-3)
        try:
            changed = load()
        finally:
            weight.copy_(saved)
    assert not torch.equal(changed.latents, fresh.latents)
    assert len(list((folder / "encoded").iterdir())) == 3
    # a damaged cache file is ignored with a note, and replaced
    key = encoding_key(folder, bundle.pipeline, bundle.rig, torch.float32, torch.device("cpu"))
    current = folder / "encoded" / f"{key}.pt"
    current.write_bytes(b"not a tensor")
    capsys.readouterr()
    repaired = load()
    assert torch.equal(repaired.latents, fresh.latents)
    assert "ignoring the unreadable cache" in capsys.readouterr().out
    assert torch.equal(torch.load(current, weights_only=True), fresh.latents)


def test_a_pool_folder_that_cannot_be_written_is_encoded_with_a_note(bundle, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "narrow"
    synthesize(folder, 2, "narrow", 8, bundle.image_size, progress=False)

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(torch, "save", refuse)
    pool = PreservationSet.from_folder(folder, bundle.pipeline, bundle.rig, 500, torch.device("cpu"), torch.float32)
    assert len(pool) == 2
    assert "could not keep the encoded pool" in capsys.readouterr().out
    assert not [p for p in (folder / "encoded").iterdir()], "no partial file is left behind"
