"""Prior preservation (drpose.training.preserve): the pool, the per-position draws, and the loss."""

from __future__ import annotations

import pytest
import torch

from drpose.models.diffusion import add_noise, training_target
from drpose.training.config import ConfigError, LoraSettings, PreserveConfig, load_config
from drpose.training.lora import add_lora, adapters_disabled
from drpose.training.preserve import PreservationSet
from drpose.world.assets import load_world
from drpose.world.views import FRONT_VIEW, RGB, flatten_views


@pytest.fixture(scope="module")
def world():
    return load_world()


@pytest.fixture(scope="module")
def pool(world) -> PreservationSet:
    unet = world.unet
    latent_shape = (unet.latent_channels, world.settings.latent_size, world.settings.latent_size)
    return PreservationSet.render(world, PreserveConfig(weight=1.0, num=8, seed=500), unet.config.images_per_sample,
                                  latent_shape, torch.device("cpu"), torch.float32)


def test_pool_holds_every_view_and_domain_of_fresh_poses(world, pool):
    assert len(pool) == 8
    domains, views = pool.latents.shape[1:3]
    assert domains * views == world.unet.config.images_per_sample
    # distinct poses: no two samples share their front latent
    fronts = pool.latents[:, RGB, FRONT_VIEW].flatten(1)
    assert torch.cdist(fronts, fronts).add(torch.eye(8) * 1e9).min() > 1e-3


def test_draws_depend_only_on_seed_step_and_position(pool):
    """One process drawing positions [4, 5] sees what two processes drawing [4] and [5] see."""
    together = pool.draw(seed=0, step=3, positions=[4, 5])
    first, second = pool.draw(0, 3, [4]), pool.draw(0, 3, [5])
    for both, a, b in zip(together, first, second):
        assert torch.equal(both, torch.cat([a, b]))
    again = pool.draw(0, 3, [4, 5])
    assert all(torch.equal(a, b) for a, b in zip(together, again))
    other_step = pool.draw(0, 4, [4, 5])
    assert not torch.equal(other_step[1], together[1]), "each step draws fresh noise"


def test_draw_pairs_a_sample_with_its_own_front_view_condition(pool):
    x0, noise, timesteps, cond = pool.draw(0, 0, [0, 1, 2])
    images = pool.latents.shape[1] * pool.latents.shape[2]
    samples = x0.reshape(3, images, *x0.shape[1:])
    for sample, condition in zip(samples, cond):
        match = [i for i in range(len(pool)) if torch.equal(flatten_views(pool.latents[i:i + 1]), sample)]
        assert len(match) == 1
        assert torch.equal(condition, pool.latents[match[0], RGB, FRONT_VIEW])
    assert noise.shape == x0.shape and timesteps.shape == (3 * images,)
    assert all((timesteps[i * images:(i + 1) * images] == timesteps[i * images]).all() for i in range(3))


def test_loss_is_the_pretraining_objective_and_reaches_the_adapters(world, pool):
    unet = world.unet
    x0, noise, timesteps, cond = pool.draw(0, 7, [0, 1])
    with torch.no_grad():
        expected = (unet(add_noise(world.scheduler, x0, noise, timesteps), timesteps, cond)
                    - training_target(world.scheduler, x0, noise, timesteps)).pow(2).mean()
        got = pool.loss(unet, world.scheduler, 0, 7, [0, 1], checkpointing=False)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)

    unet = load_world().unet  # a fresh copy: adapters stay off the shared world's model
    params = add_lora(unet, LoraSettings(rank=4, alpha=4.0, target_modules=["to_q", "to_v", "conv1"]))
    loss = pool.loss(unet, world.scheduler, 0, 7, [0, 1], checkpointing=True)
    loss.backward()
    assert sum(p.grad.abs().sum().item() for p in params if p.grad is not None) > 0


def test_base_model_is_near_its_optimum_on_the_pool_and_a_drifted_one_is_not(world, pool):
    """The base model was pretrained on narrow poses: perturbing its weights raises the loss."""
    positions = list(range(8))
    with torch.no_grad():
        base = torch.stack([pool.loss(world.unet, world.scheduler, 0, s, positions, False) for s in range(4)]).mean()
        drifted = load_world().unet
        generator = torch.Generator().manual_seed(0)
        for param in drifted.parameters():
            param.add_(0.3 * param.std().nan_to_num(0) * torch.randn(param.shape, generator=generator))
        worse = torch.stack([pool.loss(drifted, world.scheduler, 0, s, positions, False) for s in range(4)]).mean()
    assert worse > 1.5 * base, (worse, base)


def test_pool_of_the_wrong_shape_is_refused_by_name(world):
    with pytest.raises(ConfigError, match="preserve.weight"):
        PreservationSet.render(world, PreserveConfig(weight=1.0, num=2), 4, (4, 16, 16), torch.device("cpu"),
                               torch.float32)


@pytest.mark.parametrize("override, message", [
    ("preserve.weight=-1", "preserve.weight must be >= 0"),
    ("preserve.distribution=hard", "hard is held out"),
    ("preserve.num=0", "preserve.num must be >= 1"),
    ("preserve.wieght=1", "did you mean 'preserve.weight'"),
])
def test_bad_preservation_settings_are_refused_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_base_target_is_zero_until_the_adapters_move_and_then_pulls_them_back(pool):
    world = load_world()
    unet = world.unet
    params = add_lora(unet, LoraSettings(rank=4, alpha=4.0, target_modules=["to_q", "to_v", "conv1"]))

    def frozen(x, t, cond, mask):
        with adapters_disabled(unet):
            return unet(x, t, cond, mask)

    loss = pool.loss(unet, world.scheduler, 0, 2, [0, 1], checkpointing=True, frozen_model=frozen)
    assert loss.item() == 0.0, "fresh adapters are the identity"
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in params:
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    moved = pool.loss(unet, world.scheduler, 0, 2, [0, 1], checkpointing=True, frozen_model=frozen)
    assert moved.item() > 0
    moved.backward()
    with torch.no_grad():  # one small step against the gradient brings the adapters back towards the base
        for param in params:
            param.sub_(1e-2 * param.grad / max(p.grad.abs().max().item() for p in params))
        closer = pool.loss(unet, world.scheduler, 0, 2, [0, 1], checkpointing=False, frozen_model=frozen)
    assert closer.item() < moved.item()
