"""The camera rig of a PSHuman-style model's views: where each generated image looks from, as generated.

PSHuman generates 6 orthographic body views (azimuths 0, 45, 90, 180, 270, 315 degrees, elevation 0)
plus a face close-up, in each of two domains. Two things make its images differ from plain camera
images, and both live here, so that the reward, g_skel training and evaluation agree on them:

* the back and left views (3 and 4) come out mirrored left-right (PSHuman's training data stores them
  flipped; its inference flips them back): a keypoint at pixel ``x`` of the camera image is at
  ``S - 1 - x`` in the generated one (pixel centres at integer ``x``);
* normal maps are expressed in the input (front) camera's frame, not in each view's own.

The face view is the top-centre third of the front image, upsampled 3x (``pipeline.face_crop``); it is
generated but never scored. ``ViewRig`` wraps the body views' :class:`~drpose.cameras.CameraRig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from drpose.cameras import CameraRig, Framing

from .layout import BODY_VIEW_AZIMUTHS, NUM_BODY_VIEWS

PSHUMAN_MIRRORED_VIEWS = (3, 4)


@dataclass(frozen=True)
class ViewRig:
    cameras: CameraRig = field(default_factory=lambda: CameraRig(azimuths_deg=BODY_VIEW_AZIMUTHS))
    mirrored_views: tuple[int, ...] = PSHUMAN_MIRRORED_VIEWS
    normals_in_input_frame: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "mirrored_views", tuple(int(v) for v in self.mirrored_views))
        if self.cameras.num_views != NUM_BODY_VIEWS:
            raise ValueError(f"rig: PSHuman-style models have {NUM_BODY_VIEWS} body views, the cameras have "
                             f"{self.cameras.num_views}")
        bad = [v for v in self.mirrored_views if not 0 <= v < NUM_BODY_VIEWS]
        if bad:
            raise ValueError(f"rig.mirrored_views: {bad} are not body views (0..{NUM_BODY_VIEWS - 1})")

    @property
    def num_views(self) -> int:
        return self.cameras.num_views

    @property
    def view_names(self) -> tuple[str, ...]:
        return self.cameras.view_names

    def frame(self, joints: torch.Tensor) -> Framing:
        return self.cameras.frame(joints)

    def to_dict(self) -> dict:
        return {"cameras": self.cameras.to_dict(), "mirrored_views": list(self.mirrored_views),
                "normals_in_input_frame": self.normals_in_input_frame}

    @classmethod
    def from_dict(cls, settings: dict) -> "ViewRig":
        unknown = sorted(set(settings) - {"cameras", "mirrored_views", "normals_in_input_frame"})
        if unknown:
            raise ValueError(f"rig: unknown keys {unknown}")
        cameras = CameraRig.from_dict(settings["cameras"]) if "cameras" in settings else ViewRig().cameras
        return cls(cameras, tuple(settings.get("mirrored_views", PSHUMAN_MIRRORED_VIEWS)),
                   bool(settings.get("normals_in_input_frame", True)))

    # ------------------------------------------------------------------------------------- geometry

    def mirror_mask(self, device=None) -> torch.Tensor:
        mask = torch.zeros(NUM_BODY_VIEWS, dtype=torch.bool, device=device)
        mask[list(self.mirrored_views)] = True
        return mask

    def as_generated(self, pixels: torch.Tensor, size: int) -> torch.Tensor:
        """Camera-image pixel coordinates (B, 6, ..., 2) -> where the model draws them (mirrored views flipped)."""
        shape = (1, NUM_BODY_VIEWS) + (1,) * (pixels.dim() - 2)
        mirrored = self.mirror_mask(pixels.device).view(shape)
        return torch.cat([torch.where(mirrored, size - 1 - pixels[..., :1], pixels[..., :1]), pixels[..., 1:]], -1)

    def as_camera(self, pixels: torch.Tensor, size: int) -> torch.Tensor:
        """Generated-view pixel coordinates -> camera-image ones (the flip is its own inverse)."""
        return self.as_generated(pixels, size)

    def segments_and_weights(self, joints: torch.Tensor, size: int, include_bones: bool = True,
                             framing: Framing | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """PoseScore targets in the generated body views: segments (B, 6, C, 2, 2), weights (B, 6, C)."""
        segments, weights = self.cameras.segments_and_weights(joints, size, include_bones, framing)
        return self.as_generated(segments, size), weights

    def unmirror(self, images: torch.Tensor) -> torch.Tensor:
        """Generated body views (B, 6, ..., W) -> camera images (mirrored views flipped back); its own inverse."""
        views = list(images.unbind(1))
        for v in self.mirrored_views:
            views[v] = views[v].flip(-1)
        return torch.stack(views, 1)

    mirror = unmirror  # flipping is its own inverse: camera images -> the generated layout

    def normals_to_model_frame(self, normal_maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-view camera-space normal maps (B, 6, 3, R, R) in [0, 1] -> the model's frame (the input camera's
        when ``normals_in_input_frame``); background (``mask`` 0) stays black."""
        if not self.normals_in_input_frame:
            return normal_maps
        rotations = self.cameras.rotations(torch.float32, normal_maps.device)  # world -> camera, (6, 3, 3)
        to_input = rotations[0] @ rotations.transpose(-1, -2)  # camera v -> camera 0
        normals = normal_maps.float() * 2 - 1
        turned = torch.einsum("vij,bvjhw->bvihw", to_input, normals)
        return torch.where(mask.bool(), (turned + 1) / 2, torch.zeros_like(turned)).clamp(0, 1)

    def body_views(self, rgb: torch.Tensor, normal: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Camera renders (B, 6, 3, R, R) RGB and per-view normals in [0, 1], mask (B, 6, 1, R, R) -> the
        body views as the model generates them: (B, 2, 6, 3, R, R), domain 0 normals, 1 RGB."""
        normal = self.normals_to_model_frame(normal, mask)
        return torch.stack([self.mirror(normal), self.mirror(rgb)], dim=1)

    def true_keypoints(self, joints: torch.Tensor, size: int, framing: Framing | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """True joint pixels (B, 6, J, 2) where the model draws them, and in-frame flags (B, 6, J)."""
        pixels, depth = self.cameras.project(joints, size, framing)
        return self.as_generated(pixels, size), self.cameras.visible_in_frame(pixels, depth, size)

    def model_views(self, rgb: torch.Tensor, normal: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Camera renders of the 6 body views -> all 7 views as the model generates them, (B, 2, 7, 3, R, R):
        the body views plus the face view, the head crop of the front view in both domains."""
        from .pipeline import face_crop

        body = self.body_views(rgb, normal, mask)
        face = face_crop(body[:, :, 0].flatten(0, 1)).view(body.shape[0], 2, 1, *body.shape[3:])
        return torch.cat([body, face], dim=2)
