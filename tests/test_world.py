"""The tiny world: the shipped weights and the command that builds them."""

import json
import subprocess
import sys

import pytest
import torch

from drpose.world.assets import DEFAULT_WORLD, load_world
from drpose.world.quality import generate_views
from drpose.models.sampling import DDIMSampler


def test_shipped_world_loads_and_generates_all_views():
    world = load_world()
    manifest = world.manifest
    assert not manifest["quick"], "the shipped world must be a full build"
    assert manifest["quality"]["g_skel_on_renders"]["narrow"]["pck@0.1"] >= 0.9
    assert sum(manifest["bytes"].values()) < 12 * 2**20, "small enough to ship"
    cond = torch.zeros(1, world.settings.latent_channels, world.settings.latent_size, world.settings.latent_size)
    latents = generate_views(world.unet, DDIMSampler(world.scheduler, 2), cond, seed=0)
    assert latents.shape == (1, 2, 6, 4, 16, 16) and torch.isfinite(latents).all()


@pytest.mark.slow
def test_build_command_writes_a_loadable_world(tmp_path):
    out = tmp_path / "world"
    result = subprocess.run([sys.executable, "-m", "drpose.world.build", "--out", str(out), "--quick"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("seeds", "build_seconds", "quality", "bytes", "parameters", "training", "settings"):
        assert key in manifest, key
    assert set(manifest["quality"]["base_model_generated"]) == {"narrow", "hard"}
    world = load_world(out)
    assert world.settings == load_world(DEFAULT_WORLD).settings


def test_missing_world_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        load_world(tmp_path)
