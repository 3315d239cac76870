"""g_skel: a small U-Net from a view's latent(s) straight to keypoint heatmap logits.

Reading poses from latents (no VAE decoding) is what makes PoseScore cheap. The input is one view's
latent, or its normal and RGB latents stacked on channels; the output has one logit map per heatmap
channel (joints, then bones) at latent resolution, under the op's pixel-centre convention.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

CONFIG_FILE = "g_skel_config.json"
WEIGHTS_FILE = "g_skel.safetensors"


@dataclass
class GSkelConfig:
    in_channels: int = 8  # normal + RGB latents of one view
    out_channels: int = 43  # 22 joints + 21 bones
    widths: tuple[int, ...] = (48, 96, 128)
    background_bias: float = -4.0  # initial output bias: heatmaps start mostly "off"
    sigma: float = 1.0  # heatmap Gaussian width (latent pixels) it was trained with: the reward uses the same
    latent_size: int | None = None  # latent side it was trained at
    rig: dict | None = None  # ViewRig.to_dict() of the views it reads (None: PSHuman's rig)


def _block(cin: int, cout: int) -> nn.Sequential:
    groups = 8 if cout % 8 == 0 else 1
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU(),
    )  # fmt: skip


class GSkel(nn.Module):
    def __init__(self, config: GSkelConfig | None = None):
        super().__init__()
        self.config = config or GSkelConfig()
        widths = self.config.widths
        self.stem = _block(self.config.in_channels, widths[0])
        self.down = nn.ModuleList(_block(widths[i], widths[i + 1]) for i in range(len(widths) - 1))
        self.up = nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(len(widths) - 1)))
        self.head = nn.Conv2d(widths[0], self.config.out_channels, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, self.config.background_bias)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, h, w) -> (N, out_channels, h, w) heatmap logits; h and w divisible by 2**levels."""
        if latents.dim() != 4 or latents.shape[1] != self.config.in_channels:
            raise ValueError(f"g_skel expects (N, {self.config.in_channels}, h, w) latents, got {tuple(latents.shape)}")
        skips = [self.stem(latents)]
        for block in self.down:
            skips.append(block(F.avg_pool2d(skips[-1], 2)))
        x = skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = block(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], dim=1))
        return self.head(x)

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "GSkel":
        folder = Path(folder)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).exists():
                raise FileNotFoundError(f"g_skel folder {folder} lacks {name}")
        raw = json.loads((folder / CONFIG_FILE).read_text())
        known = set(GSkelConfig.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{folder / CONFIG_FILE}: unknown keys {unknown} (known: {sorted(known)})")
        raw["widths"] = tuple(raw["widths"])
        model = cls(GSkelConfig(**raw))
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        return model


def heatmap_keypoints(logits: torch.Tensor, window: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Keypoints (N, C, 2) as (x, y) pixels and confidences (N, C) from heatmap logits.

    The arg-max pixel refined by the probability-weighted centroid of its (2*window+1)^2 neighbourhood
    (sub-pixel accuracy on Gaussian heatmaps); confidence is the peak probability.
    """
    n, c, h, w = logits.shape
    prob = torch.sigmoid(logits.float())
    flat = prob.reshape(n, c, h * w)
    confidence, index = flat.max(dim=-1)
    peak_y, peak_x = (index // w).float(), (index % w).float()
    offsets = torch.arange(-window, window + 1, device=logits.device, dtype=torch.float32)
    ys = (peak_y[..., None, None] + offsets.view(-1, 1)).expand(n, c, 2 * window + 1, 2 * window + 1)
    xs = (peak_x[..., None, None] + offsets.view(1, -1)).expand(n, c, 2 * window + 1, 2 * window + 1)
    inside = ((ys >= 0) & (ys <= h - 1) & (xs >= 0) & (xs <= w - 1)).reshape(n, c, -1)
    gather = (ys.clamp(0, h - 1).long() * w + xs.clamp(0, w - 1).long()).reshape(n, c, -1)
    weights = torch.gather(flat, 2, gather) * inside  # neighbours off the map do not count
    total = weights.sum(-1).clamp_min(1e-12)
    x = (weights * xs.reshape(n, c, -1)).sum(-1) / total
    y = (weights * ys.reshape(n, c, -1)).sum(-1) / total
    return torch.stack([x, y], dim=-1), confidence
