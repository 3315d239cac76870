"""PoseReward's use of the fused op: value checks once, then three launches per call."""

from __future__ import annotations

import pytest
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


def test_bone_weight_scales_the_bone_channels_against_the_joints():
    from drpose_kernels.reference import heatmap_divergence

    joints = torch.randn(2, 22, 3, generator=torch.Generator().manual_seed(3)) * 0.3
    x0 = torch.randn(2 * 2 * 7, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    plain = small_reward()
    framing = plain.rig.frame(joints)
    with torch.no_grad():
        logits = plain.logits(x0)
        segments, weights = plain.targets(joints, framing, 8)
        divergence = heatmap_divergence(logits, segments, 1.0).view(2, 6, 43)
        for w in (0.0, 1.0, 3.0):
            scaled = weights.clone()
            scaled[..., 22:] *= w
            expected = -(scaled * divergence).sum((1, 2)) / scaled.sum((1, 2))
            score = small_reward(bone_weight=w)(x0, joints, framing)
            torch.testing.assert_close(score, expected, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(small_reward(bone_weight=3.0)(x0, joints, framing), plain(x0, joints, framing))
    with pytest.raises(ValueError, match="bone_weight"):
        small_reward(bone_weight=-1.0)
