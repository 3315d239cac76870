"""Dataset format: synthesize -> load round trip, validation errors, motion builder, preview."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from smplx.lbs import batch_rodrigues
from synthetic_smplx import write_model

from drpose.body import SMPLXBody, SMPLXParams, joints_from_params
from drpose.cameras import CameraRig
from drpose.data.dataset import MANIFEST, DatasetError, DatasetWriter, DrPoseDataset
from drpose.data.motion import MotionFormatError, build_motion_dataset, load_motion
from drpose.data.motion import main as motion_main
from drpose.data.preview import contact_sheet
from drpose.data.preview import main as preview_main
from drpose.data.synthesize import main as synthesize_main
from drpose.data.synthesize import synthesize
from drpose.poses import remove_heading, sample_poses
from drpose.render import render_bodies
from drpose.skeleton import BODY22_NAMES, convert_joints

NUM = 5


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "hard"
    synthesize_main(["--out", str(out), "--num", str(NUM), "--distribution", "hard", "--seed", "3",
                     "--resolution", "32"])
    return out


def test_synthesize_then_load_round_trip(synthetic):
    dataset = DrPoseDataset(synthetic, load_renders=True)
    assert len(dataset) == NUM
    params = sample_poses("hard", NUM, seed=3)
    expected_joints = joints_from_params(params)
    renders = render_bodies(expected_joints, CameraRig(), 32)
    for index in range(NUM):
        item = dataset[index]
        record = dataset.records[index]
        assert item["id"] == f"{index:06d}" and record.source == f"synthetic:hard:seed=3:index={index}"
        assert record.camera == CameraRig() and record.pose_format == "smplx"
        torch.testing.assert_close(record.params.body_pose[0], params.body_pose[index])
        assert torch.equal(record.params.betas, torch.zeros(1, 10))
        torch.testing.assert_close(item["joints"], expected_joints[index])
        assert item["image"].shape == (3, 32, 32)
        # The image is the front view; the stored renders are every view (8-bit quantised).
        assert torch.equal(item["image"], item["renders"]["rgb"][0])
        torch.testing.assert_close(item["renders"]["rgb"], renders.rgb[index], atol=1 / 255, rtol=0)
        torch.testing.assert_close(item["renders"]["normal"], renders.normal[index], atol=1 / 255, rtol=0)
        assert torch.equal(item["renders"]["mask"], renders.mask[index])
        assert torch.equal(item["renders"]["part_id"], renders.part_id[index])
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=NUM)))
    assert batch["image"].shape == (NUM, 3, 32, 32) and batch["renders"]["rgb"].shape == (NUM, 6, 3, 32, 32)
    coco = DrPoseDataset(synthetic, joint_set="coco17")
    torch.testing.assert_close(coco.joints, convert_joints(expected_joints, "body22", "coco17"))


def test_synthesize_is_deterministic_and_refuses_a_used_folder(synthetic, tmp_path, capsys):
    again = tmp_path / "again"
    synthesize_main(["--out", str(again), "--num", str(NUM), "--distribution", "hard", "--seed", "3",
                     "--resolution", "32"])
    assert (again / MANIFEST).read_text() == (synthetic / MANIFEST).read_text()
    for index in range(NUM):
        name = f"poses/{index:06d}.npz"
        with np.load(again / name) as a, np.load(synthetic / name) as b:
            assert all(np.array_equal(a[key], b[key]) for key in b.files)
    with pytest.raises(SystemExit):
        synthesize_main(["--out", str(again), "--num", "1", "--distribution", "narrow"])
    assert "is not empty; choose a new folder" in capsys.readouterr().err


def test_the_share_of_breaking_moves_reaches_the_poses_and_is_named_in_the_sources(tmp_path, capsys):
    # broad's poses that are not breaking moves tilt at most 25 degrees about each of two axes
    upright_within = math.acos(math.cos(math.radians(25)) ** 2) + 1e-4

    def tilts(out):
        params = DrPoseDataset(out).records
        rotation = batch_rodrigues(torch.cat([record.params.global_orient for record in params]))
        return torch.arccos(rotation[:, 1, 1].clamp(-1, 1))  # angle between the body's up axis and the world's

    for share, name in ((1.0, "breaking=1:"), (0.0, "breaking=0:"), (0.25, "")):
        out = tmp_path / f"share{share}"
        synthesize_main(["--out", str(out), "--num", "8", "--distribution", "broad", "--seed", "5", "--resolution",
                         "16", "--fps-pool", "16", "--breaking-share", str(share)])
        assert all(record.source.startswith(f"synthetic:broad:seed=5:{name}pool=16:index=")
                   for record in DrPoseDataset(out).records)
    assert (tilts(tmp_path / "share0.0") <= upright_within).all()
    assert (tilts(tmp_path / "share1.0") > upright_within).sum() >= 4  # uniform orientations: most lean far
    # the default share, named or not, draws the same poses as before the option existed
    default = tmp_path / "default"
    synthesize(default, 8, "broad", 5, 16, progress=False, fps_pool=16)
    for a, b in zip(DrPoseDataset(default).records, DrPoseDataset(tmp_path / "share0.25").records):
        assert a.source == b.source
        torch.testing.assert_close(a.params.global_orient, b.params.global_orient)
    for argv, message in ((["--distribution", "narrow", "--breaking-share", "0.5"], "only --distribution broad"),
                          (["--distribution", "broad", "--breaking-share", "1.5"], r"must be in \[0, 1\], got 1.5")):
        with pytest.raises(SystemExit):
            synthesize_main(["--out", str(tmp_path / "bad"), "--num", "2", *argv])
        assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "bad").exists()


def test_synthesize_keeps_the_most_diverse_of_a_pool(tmp_path, capsys):
    out = tmp_path / "fps"
    synthesize_main(["--out", str(out), "--num", "6", "--distribution", "broad", "--seed", "4", "--resolution", "16",
                     "--fps-pool", "40"])
    dataset = DrPoseDataset(out)
    pool = sample_poses("broad", 40, seed=4)
    chosen = [int(record.source.rsplit("index=", 1)[1]) for record in dataset.records]
    assert all(r.source.startswith("synthetic:broad:seed=4:pool=40:index=") for r in dataset.records)
    assert chosen == sorted(chosen) and len(set(chosen)) == 6  # pool order, no repeats
    for record, index in zip(dataset.records, chosen):
        torch.testing.assert_close(record.params.body_pose[0], pool.body_pose[index])
        torch.testing.assert_close(record.params.global_orient[0], pool.global_orient[index])

    def min_pairwise(indices):
        joints = remove_heading(joints_from_params(pool.select(indices)))
        joints = joints - joints[:, :1]
        distance = (joints[:, None] - joints[None]).norm(dim=-1).mean(-1)
        return float(distance[~torch.eye(len(indices), dtype=torch.bool)].min())

    assert min_pairwise(chosen) > min_pairwise(list(range(6)))  # more spread out than the pool's first six
    with pytest.raises(SystemExit):
        synthesize_main(["--out", str(tmp_path / "small"), "--num", "6", "--distribution", "broad", "--fps-pool", "5"])
    assert "--fps-pool must be at least --num (6), got 5" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"fps_pool: expected an int >= num \(6\)"):
        synthesize(tmp_path / "small", 6, "broad", seed=0, fps_pool=3)
    assert not (tmp_path / "small").exists()


# --- every kind of corrupted record -------------------------------------------------------------------

def _edit_record(root, index, change):
    lines = (root / MANIFEST).read_text().splitlines()
    record = json.loads(lines[index])
    change(record)
    lines[index] = json.dumps(record)
    (root / MANIFEST).write_text("\n".join(lines) + "\n")


def _edit_npz(path, change):
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    change(arrays)
    np.savez(path, **arrays)


# Corruptions: functions of the dataset folder, built by these helpers and combined with ``_both``.

def _set_fields(index, **values):
    return lambda root: _edit_record(root, index, lambda record: record.update(values))


def _drop_field(index, name):
    return lambda root: _edit_record(root, index, lambda record: record.pop(name))


def _set_camera(index, **values):
    return lambda root: _edit_record(root, index, lambda record: record["camera"].update(values))


def _set_array(file, key, value):
    return lambda root: _edit_npz(root / file, lambda arrays: arrays.update({key: value}))


def _poison(file, key, index, value):
    return lambda root: _edit_npz(root / file, lambda arrays: arrays[key].__setitem__(index, value))


def _drop_array(file, key):
    return lambda root: _edit_npz(root / file, lambda arrays: arrays.pop(key))


def _delete(file):
    return lambda root: (root / file).unlink()


def _overwrite(file, content: bytes):
    return lambda root: (root / file).write_bytes(content)


def _truncate(file, keep: int):
    return lambda root: (root / file).write_bytes((root / file).read_bytes()[:keep])


def _both(*corruptions):
    return lambda root: [corrupt(root) for corrupt in corruptions]


def _as_joints_record(joint_set="body22", count=22):
    """Record 000002 becomes a 'joints' record holding the body's joints (the first ``count``)."""
    def corrupt(root):
        np.savez(root / "poses/000002.npz", joints=DrPoseDataset(root).joints[2].numpy()[:count])
        _set_fields(2, pose_format="joints", joint_set=joint_set)(root)
    return corrupt


def _grey_image(file):
    return lambda root: Image.open(root / file).convert("L").save(root / file)


def _image_of_size(file, size):
    return lambda root: Image.new("RGB", size).save(root / file)


def _invalid_json(root):
    text = (root / MANIFEST).read_text()
    (root / MANIFEST).write_text(text.replace('"id": "000002"', '"id": 000002,,'))


POSE_1, POSE_2 = "poses/000001.npz", "poses/000002.npz"
CORRUPTIONS = {
    "missing image": (_delete("images/000001.png"), [
        "line 2", "record '000001'", "file 'images/000001.png'", "field 'image'", "file does not exist"]),
    "missing pose file": (_delete("poses/000003.npz"), [
        "record '000003'", "file 'poses/000003.npz'", "field 'pose'", "does not exist"]),
    "wrong body_pose shape": (_set_array(POSE_1, "body_pose", np.zeros((20, 3), np.float32)), [
        "record '000001'", "file 'poses/000001.npz'", "field 'body_pose'",
        "expected shape (21, 3) or (63,), got (20, 3)"]),
    "NaN global_orient": (_poison("poses/000004.npz", "global_orient", 0, math.nan), [
        "record '000004'", "field 'global_orient'", "NaN or inf"]),
    "inf transl": (_poison("poses/000000.npz", "transl", 1, np.inf), [
        "record '000000'", "field 'transl'", "NaN or inf"]),
    "missing betas": (_drop_array(POSE_2, "betas"), [
        "record '000002'", "file 'poses/000002.npz'", "field 'betas'", "missing array"]),
    "integer pose": (_set_array(POSE_2, "transl", np.zeros(3, np.int64)), [
        "field 'transl'", "expected a floating-point array"]),
    "unknown pose array": (_set_array(POSE_2, "expression", np.zeros(10, np.float32)), [
        "field 'expression'", "unknown arrays ['expression']"]),
    "unreadable pose file": (_overwrite(POSE_2, b"garbage"), [
        "file 'poses/000002.npz'", "cannot be read as a .npz"]),
    "unknown joint set": (_as_joints_record(joint_set="h36m"), [
        "record '000002'", "field 'joint_set'", "unknown joint set 'h36m'"]),
    "joints of the wrong count": (_as_joints_record(joint_set="smpl24"), [
        "record '000002'", "field 'joints'", "expected shape (24, 3), got (22, 3)"]),
    "NaN joints": (_both(_as_joints_record(), _poison(POSE_2, "joints", 3, math.nan)), [
        "record '000002'", "field 'joints'", "NaN or inf"]),
    "unconvertible joint set": (_as_joints_record(joint_set="coco17", count=17), [
        "record '000002'", "field 'joint_set'",
        "'coco17' cannot be converted to the dataset's joint set 'body22'"]),
    "missing field": (_drop_field(3, "pose_format"), [
        "line 4", "record '000003'", "field 'pose_format'", "missing required field"]),
    "unknown pose format": (_set_fields(3, pose_format="bvh"), [
        "field 'pose_format'", "expected one of ('smplx', 'joints'), got 'bvh'"]),
    "unknown field": (_set_fields(0, caption="a dancer"), [
        "record '000000'", "unknown fields ['caption']"]),
    "duplicate id": (_set_fields(4, id="000001"), [
        "line 5", "record '000001'", "field 'id'", "duplicate id (first used on line 2)"]),
    "bad id": (_set_fields(4, id="../escape"), ["field 'id'", "letters, digits"]),
    "invalid JSON": (_invalid_json, ["line 3", "not valid JSON"]),
    "bad camera": (_set_camera(1, fov=30), ["record '000001'", "field 'camera'", "unknown keys ['fov']"]),
    "renders without camera": (_drop_field(1, "camera"), [
        "record '000001'", "field 'camera'", "needs the 'camera'"]),
    "renders with too few views": (_set_camera(1, azimuths_deg=[0, 90, 180]), [
        "record '000001'", "file 'renders/000001.npz'", "field 'rgb'", "expected shape (3, 32, 32, 3)"]),
    "part ids disagree with mask": (_poison("renders/000002.npz", "mask", (0, 0, 0), 1), [
        "record '000002'", "file 'renders/000002.npz'", "field 'part_id'", "-1 exactly where mask is 0"]),
    "wrong render dtype": (_set_array("renders/000002.npz", "rgb", np.zeros((6, 32, 32, 3), np.float32)), [
        "field 'rgb'", "expected dtype uint8, got float32"]),
    "grey image": (_grey_image("images/000003.png"), [
        "record '000003'", "file 'images/000003.png'", "field 'image'", "expected an RGB image"]),
    "truncated image": (_truncate("images/000003.png", 60), [
        "record '000003'", "file 'images/000003.png'", "cannot be read as an image"]),
    "image of another size": (_image_of_size("images/000004.png", (40, 32)), [
        "record '000004'", "field 'image'", "image size (40, 32) differs from the dataset's (32, 32)"]),
    "bad frame": (_set_fields(0, frame=-3), ["record '000000'", "field 'frame'", "expected an int >= 0"]),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_each_corruption_gives_a_named_dataset_error(synthetic, tmp_path, kind):
    root = tmp_path / "copy"
    shutil.copytree(synthetic, root)
    DrPoseDataset(root)  # intact before the corruption
    corrupt, expected = CORRUPTIONS[kind]
    corrupt(root)
    with pytest.raises(DatasetError) as error:
        DrPoseDataset(root)
    assert isinstance(error.value, ValueError)
    for fragment in expected:
        assert fragment in str(error.value), (fragment, str(error.value))


def test_missing_manifest_and_renders_demanded(tmp_path, synthetic):
    with pytest.raises(DatasetError, match="no manifest.jsonl"):
        DrPoseDataset(tmp_path)
    root = tmp_path / "copy"
    shutil.copytree(synthetic, root)
    _both(_drop_field(2, "renders"), _drop_field(2, "camera"))(root)
    DrPoseDataset(root)
    with pytest.raises(DatasetError, match="record '000002'.*load_renders=True but the record has no renders"):
        DrPoseDataset(root, load_renders=True)


def test_joints_records_and_writer_checks(tmp_path):
    root = tmp_path / "joints"
    smpl24 = torch.randn(2, 24, 3)
    image = torch.rand(3, 16, 16)
    with DatasetWriter(root) as writer:
        for index in range(2):
            writer.add(f"j{index}", image, joints=smpl24[index], joint_set="smpl24", source="mocap")
        with pytest.raises(ValueError, match="record_id: 'j1' was already written"):
            writer.add("j1", image, joints=smpl24[0], joint_set="smpl24")
        with pytest.raises(ValueError, match="exactly one of params"):
            writer.add("j2", image)
        with pytest.raises(ValueError, match=r"joints: expected shape \(22, 3\) for body22"):
            writer.add("j2", image, joints=smpl24[0], joint_set="body22")
        with pytest.raises(ValueError, match="a SMPL-X record needs betas and transl"):
            writer.add("j2", image, params=SMPLXParams(torch.zeros(1, 3), torch.zeros(1, 21, 3)))
    dataset = DrPoseDataset(root)
    torch.testing.assert_close(dataset.joints, smpl24[:, :22])
    assert torch.equal(dataset[1]["image"], (image * 255).round() / 255)
    with pytest.raises(FileExistsError):
        DatasetWriter(root)


def test_smplx_records_through_a_body_model(synthetic, tmp_path):
    body = SMPLXBody(write_model(tmp_path / "model" / "SMPLX_NEUTRAL.npz"))
    with_model = DrPoseDataset(synthetic, body_model=body)
    # The synthetic model's skeleton is the built-in one, so both paths agree at betas 0.
    torch.testing.assert_close(with_model.joints, DrPoseDataset(synthetic).joints, atol=1e-5, rtol=0)
    root = tmp_path / "copy"
    shutil.copytree(synthetic, root)
    _set_array("poses/000003.npz", "betas", np.zeros(16, np.float32))(root)
    DrPoseDataset(root)  # without a model betas are unused, any length is valid
    with pytest.raises(DatasetError, match="record '000003'.*'betas'.*16 betas where record '000000' has 10"):
        DrPoseDataset(root, body_model=body)


# --- motion builder -----------------------------------------------------------------------------------

def _write_sequence(path, seed, frames=24, z_up=True, layout="poses"):
    """A smooth AMASS-style sequence between two scan-like poses, upright in its own world."""
    ends = sample_poses("narrow", 2, seed)
    blend = torch.linspace(0, 1, frames)[:, None]
    body = ends.body_pose[0].reshape(-1) * (1 - blend) + ends.body_pose[1].reshape(-1) * blend
    orient = torch.zeros(frames, 3)
    if z_up:
        orient[:, 0] = math.pi / 2  # stands along +z
    arrays = {"trans": np.zeros((frames, 3), np.float32), "betas": np.zeros(16, np.float32),
              "mocap_frame_rate": np.array(30.0), "gender": np.array("neutral")}
    if layout == "poses":
        full = torch.zeros(frames, 165)
        full[:, :3], full[:, 3:66] = orient, body
        arrays["poses"] = full.numpy()
    else:
        arrays.update(root_orient=orient.numpy(), pose_body=body.numpy())
    np.savez(path, **arrays)


def test_motion_builder_selects_windows_of_neighbours(tmp_path):
    motion = tmp_path / "motion"
    motion.mkdir()
    for seed in range(3):
        _write_sequence(motion / f"dance{seed}.npz", seed, layout="poses" if seed else "root_orient")
    _write_sequence(motion / "short.npz", 9, frames=4)
    np.savez(motion / "shape.npz", betas=np.zeros(16))
    out = tmp_path / "built"
    summary = build_motion_dataset([motion], out, 4, neighbours=4, stride=2, seed=0, resolution=32,
                                   progress=False)
    assert (summary.num_groups, summary.num_records, summary.sequences_used) == (4, 20, 3)
    assert any("short.npz: 4 frames, shorter than one window of 9" in note for note in summary.not_used)
    assert any("shape.npz: not a pose sequence" in note for note in summary.not_used)
    dataset = DrPoseDataset(out)
    groups = {}
    for record in dataset.records:
        groups.setdefault(record.group, []).append(record)
    assert len(groups) == 4
    for group, records in groups.items():
        frames = [r.frame for r in records]
        assert [r.id for r in records] == [f"{group}_{i:02d}" for i in range(5)]
        assert frames == list(range(frames[0], frames[0] + 10, 2)) and len({r.source for r in records}) == 1
        # Key frame (position 2) and its neighbours hold the sequence's poses at those frames.
        sequence = load_motion(records[0].source)
        for record in records:
            torch.testing.assert_close(record.params.body_pose[0], sequence.params.body_pose[record.frame])
    # z-up motion comes out upright in the project's y-up frame.
    joints = dataset.joints
    assert bool((joints[:, BODY22_NAMES.index("head"), 1] > joints[:, 0, 1] + 0.3).all())
    with pytest.raises(ValueError, match="num_poses: 49 requested but only 48 frames can be key frames"):
        build_motion_dataset([motion], tmp_path / "too_many", 49, neighbours=4, stride=2, progress=False)


def test_motion_cli_and_format_errors(tmp_path, capsys):
    motion = tmp_path / "take.npz"
    _write_sequence(motion, 1, frames=12, z_up=False)
    motion_main([str(motion), "--out", str(tmp_path / "cli"), "--num-poses", "2", "--neighbours", "2",
                 "--up-axis", "y", "--resolution", "16"])
    assert "wrote 6 records (2 key poses x 3 frames)" in capsys.readouterr().out
    assert len(DrPoseDataset(tmp_path / "cli")) == 6
    bad = tmp_path / "bad.npz"
    np.savez(bad, poses=np.zeros((10, 100), np.float32), trans=np.zeros((10, 3)), betas=np.zeros(10))
    with pytest.raises(MotionFormatError, match=r"bad.npz.*array 'poses' has shape \(10, 100\)"):
        load_motion(bad)
    np.savez(bad, poses=np.zeros((10, 165), np.float32), betas=np.zeros(10))
    with pytest.raises(MotionFormatError, match="bad.npz.*missing array 'trans'"):
        load_motion(bad)


# --- preview ------------------------------------------------------------------------------------------

def test_preview_draws_samples_by_views_with_the_skeleton(synthetic, tmp_path, capsys):
    out = tmp_path / "sheet.png"
    preview_main([str(synthetic), "--out", str(out), "--samples", "3", "--scale", "2"])
    assert str(out) in capsys.readouterr().out
    sheet = np.asarray(Image.open(out).convert("RGB"))
    cell = 32 * 2
    assert sheet.shape[1] == 7 * cell and sheet.shape[0] > 3 * cell  # image + 6 views, 3 rows
    # Overlay lines are pure black; renders never are (shading keeps colours above 35 %).
    rows = sheet[sheet.shape[0] - 3 * cell:]
    black = (rows == 0).all(-1)
    assert black.sum() > 3 * 7 * 20
    # Without stored renders, views are rendered from the pose: the same picture.
    root = tmp_path / "no_renders"
    shutil.copytree(synthetic, root)
    for index in range(NUM):
        _drop_field(index, "renders")(root)
    again = np.asarray(Image.open(contact_sheet(root, tmp_path / "again.png", 3, 2)).convert("RGB"))
    assert (again != sheet).any(-1).mean() < 0.01
