"""g_skel training's hard negatives: limbs cut out of true views, and the targets that say what is still drawn."""

import pytest
import torch

from drpose.g_skel_train import LIMB_BONE_CHILDREN, GSkelTraining, apply_cuts, cut_limbs, with_limb_cuts
from drpose.skeleton import NUM_BODY_JOINTS
from drpose.world.assets import WorldSettings
from drpose.world.views import sample_views

RADIUS = 0.08


@pytest.fixture(scope="module")
def views():
    settings = WorldSettings()
    rig = settings.view_rig()
    batch = sample_views("hard", 4, 11, rig, settings.resolution)
    return (batch.images[:, :, :6] * 255).round().to(torch.uint8), batch.joints, rig


def test_apply_cuts_shortens_only_the_cut_bone_to_its_drawn_part():
    segments = torch.randn(2, 6, 43, 2, 2)
    cuts = torch.full((2, 6, 3), -1.0)
    cuts[1, 4] = torch.tensor([30.0, 0.25, 1.0])
    cuts[0, 0] = torch.tensor([25.0, 0.0, 0.4])
    out = apply_cuts(segments, cuts)
    a, b = segments[1, 4, 30, 0], segments[1, 4, 30, 1]
    torch.testing.assert_close(out[1, 4, 30], torch.stack([a + 0.25 * (b - a), b]))
    a, b = segments[0, 0, 25, 0], segments[0, 0, 25, 1]
    torch.testing.assert_close(out[0, 0, 25], torch.stack([a, a + 0.4 * (b - a)]))
    untouched = torch.ones(2, 6, 43, dtype=torch.bool)
    untouched[1, 4, 30] = untouched[0, 0, 25] = False
    assert torch.equal(out[untouched], segments[untouched])


def test_cut_limbs_erases_a_stretch_of_one_limb_per_view_and_keeps_the_drawn_part(views):
    images, joints, rig = views
    cut_images, cut_joints, cuts = cut_limbs(images, joints, rig, 1.0, RADIUS, seed=3)
    order = [int(torch.nonzero((joints == j).all(-1).all(-1))[0]) for j in cut_joints]  # the copies' sources
    assert sorted(order) == list(range(len(joints)))
    size = images.shape[-1]
    framing = rig.frame(cut_joints)
    segments, _ = rig.segments_and_weights(cut_joints, size, include_bones=True, framing=framing)
    # an orthographic rig: pixels per metre from the framing, independently of cut_limbs' own estimate
    radius_px = RADIUS * size / (2 * framing.half_extent)
    limb_channels = {NUM_BODY_JOINTS + child - 1 for child in LIMB_BONE_CHILDREN}
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    erased_views = 0
    for m, source in enumerate(order):
        for v in range(6):
            channel, start, end = cuts[m, v].tolist()
            assert int(channel) in limb_channels
            assert (start == 0.0 or end == 1.0) and 0.15 - 1e-6 <= end - start <= 0.6 + 1e-6
            a, b = segments[m, v, int(channel)]
            direction = b - a
            length = direction.norm()
            changed = (cut_images[m, :, v] != images[source, :, v]).any(1)  # (2, R, R)
            for domain in range(2):
                original, cut = images[source, domain, v], cut_images[m, domain, v]
                mask = changed[domain]
                assert torch.equal(cut[:, mask], original[:, 0, 0][:, None].expand(3, int(mask.sum())))
                px = torch.stack([xs[mask], ys[mask]], -1)
                t = ((px - a) @ direction) / length**2
                nearest = a + t.clamp(0, 1)[:, None] * direction
                assert ((px - nearest).norm(dim=-1) <= radius_px[m] + 1e-3).all(), "erased off the limb"
                inside_drawn = (t > start + radius_px[m] / length) & (t < end - radius_px[m] / length)
                assert not inside_drawn.any(), "erased the part the target keeps"
            erased_views += bool(changed.any())
            # everything not erased is the original view
            assert torch.equal(cut_images[m, :, v][~changed[:, None].expand(2, 3, size, size)],
                               images[source, :, v][~changed[:, None].expand(2, 3, size, size)])
    assert erased_views >= 0.9 * cuts.shape[0] * 6


def test_with_limb_cuts_adds_copies_and_keeps_the_whole_views(views):
    images, joints, rig = views
    same = with_limb_cuts(images, joints, rig, GSkelTraining(limb_cut_share=0.0))
    assert same[0] is images and same[2] is None
    all_images, all_joints, cuts = with_limb_cuts(images, joints, rig, GSkelTraining(limb_cut_share=0.5))
    assert all_images.shape[0] == 6 and torch.equal(all_images[:4], images) and torch.equal(all_joints[:4], joints)
    assert (cuts[:4] == -1).all() and (cuts[4:, :, 0] >= NUM_BODY_JOINTS).all()


@pytest.mark.parametrize("share, radius, match", [(1.5, RADIUS, "share"), (-0.1, RADIUS, "share"),
                                                   (0.5, 0.0, "radius")])
def test_cut_limbs_refuses_bad_settings(views, share, radius, match):
    images, joints, rig = views
    with pytest.raises(ValueError, match=match):
        cut_limbs(images, joints, rig, share, radius, seed=0)
