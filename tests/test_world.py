"""The tiny world: the shipped miniature PSHuman and the command that builds it."""

import json
import subprocess
import sys

import pytest
import torch

from drpose.models.layout import COLOR
from drpose.models.pipeline import MultiViewPipeline
from drpose.models.sampling import DDIMSampler, generate_views
from drpose.world.assets import DEFAULT_WORLD, load_world
from drpose.world.views import sample_views


def test_shipped_world_is_a_pshuman_format_bundle_that_generates_all_views():
    world = load_world()
    manifest = world.manifest
    assert not manifest["quick"], "the shipped world must be a full build"
    assert manifest["quality"]["g_skel_on_true_latents"]["narrow"]["pck@0.1"] >= 0.9
    assert sum(manifest["bytes"].values()) < 30 * 2**20, "small enough to ship"
    config = json.loads((DEFAULT_WORLD / "pipeline" / "unet" / "config.json").read_text())
    assert config["_class_name"] == "UNetMV2DConditionModel" and config["num_views"] == 7
    pipeline = MultiViewPipeline.from_pretrained(DEFAULT_WORLD / "pipeline")  # the loader a PSHuman folder goes through
    views = sample_views("narrow", 1, 0, world.rig, pipeline.image_size)
    cond = pipeline.condition(views.condition, generator=torch.Generator().manual_seed(0))
    latents = generate_views(pipeline, DDIMSampler(pipeline.scheduler, 2, pipeline.num_views), cond, seed=0)
    assert latents.shape == (1, 2, 7, 4, 18, 18) and torch.isfinite(latents).all()
    assert views.images.shape == (1, 2, 7, 3, 72, 72) and torch.equal(views.condition, views.images[:, COLOR, 0])


@pytest.mark.slow
def test_build_command_writes_a_loadable_world(tmp_path):
    out = tmp_path / "world"
    result = subprocess.run([sys.executable, "-m", "drpose.world.build", "--out", str(out), "--work",
                             str(tmp_path / "work"), "--quick", "--vae-steps", "4", "--g-skel-steps", "8", "--base-steps", "4"],
                            capture_output=True, text=True, timeout=900)  # every stage, in fewer steps than --quick's
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("seeds", "build_seconds", "quality", "bytes", "parameters", "training", "settings"):
        assert key in manifest, key
    assert set(manifest["quality"]["base_model_generated"]) == {"narrow", "hard"}
    assert all({"wall_s", "cpu_s"} <= set(t) for t in manifest["build_seconds"].values())
    world = load_world(out)
    assert world.settings == load_world(DEFAULT_WORLD).settings


def test_missing_world_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        load_world(tmp_path)


def test_readers_probe_reads_true_views_well_and_redraws_worse(tmp_path, capsys):
    import json

    from drpose.world.readers import main as readers_main

    readers_main(["--num", "3", "--t", "0", "449", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "readers.json").read_text())
    truth, redrawn = report["timesteps"]["0"], report["timesteps"]["449"]
    # both readers find the true views' poses (the world's ceilings: about 0.87 and 0.96 on 48 bodies)
    assert truth["estimator"]["pck@0.1"] > 0.75 and truth["g_skel"]["pck@0.1"] > 0.85
    # a re-draw from t = 449 is the model's own drawing: further from the truth by the reward's own measure
    assert redrawn["g_skel"]["pose_score"] < truth["g_skel"]["pose_score"]
    assert redrawn["estimator"]["mpjpe"] > truth["estimator"]["mpjpe"]
    assert (tmp_path / "views_t0.png").is_file() and (tmp_path / "views_t449.png").is_file()
    assert "t= 449  PCK@0.1 estimator" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        readers_main(["--t", "1000", "--out", str(tmp_path / "bad")])
    assert "--t must be in [0, 1000), got [1000]" in capsys.readouterr().err
