"""PoseReward's use of the fused op: value checks once, then three launches per call."""

from __future__ import annotations

import torch

import drpose.reward as reward_module
from drpose.models.g_skel import GSkel, GSkelConfig
from drpose.models.rig import ViewRig


def small_reward(**kwargs) -> reward_module.PoseReward:
    rig = ViewRig()
    torch.manual_seed(0)
    g_skel = GSkel(GSkelConfig(in_channels=8, out_channels=43, widths=(8, 8), sigma=1.0, latent_size=8,
                               rig=rig.to_dict()))
    return reward_module.PoseReward(g_skel, rig, num_views=7, sigma=1.0, backend="reference", **kwargs)


def test_values_are_checked_on_the_first_call_only(monkeypatch):
    calls = []
    real = reward_module.pose_score

    def recording(*args, **kwargs):
        calls.append(kwargs["validate"])
        return real(*args, **kwargs)

    monkeypatch.setattr(reward_module, "pose_score", recording)
    joints = torch.randn(2, 22, 3, generator=torch.Generator().manual_seed(1)) * 0.3
    x0 = torch.randn(2 * 2 * 7, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    for reward in (small_reward(), small_reward(validate_every_call=True)):
        for _ in range(3):
            score = reward(x0, joints, reward.rig.frame(joints))
            assert score.shape == (2,) and torch.isfinite(score).all()
    assert calls == [True, False, False, True, True, True]
