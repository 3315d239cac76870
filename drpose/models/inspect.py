"""Print a multi-view UNet's state-dict layout and parameter counts without loading or allocating weights.

    python -m drpose.models.inspect --config pshuman [--keys]     # PSHuman's released architecture
    python -m drpose.models.inspect --folder /ckpt/PSHuman_Unclip_768_6views [--keys]

The model is built on the meta device, so the real size is inspected in seconds on any machine.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from .pshuman_unet import build_on_meta, pshuman_unet_config, read_config, unet_folder

CONFIGS = {"pshuman": pshuman_unet_config}
MULTIVIEW_MARKERS = (".norm_mv.", ".attn_mv.")


def describe(config: dict, show_keys: bool) -> str:
    state = build_on_meta(config).state_dict()
    total = sum(t.numel() for t in state.values())
    extra = {k: t for k, t in state.items() if any(m in k for m in MULTIVIEW_MARKERS)}
    blocks = Counter(k.split(".transformer_blocks.")[0] for k in extra)
    lines = [
        f"UNetMV2DConditionModel: {len(state)} state-dict keys, {total:,} parameters "
        f"({total * 2 / 1e9:.2f} GB in fp16/bf16)",
        f"  multi-view additions: {len(extra)} keys (norm_mv + attn_mv in {len(blocks)} transformer blocks), "
        f"{sum(t.numel() for t in extra.values()):,} parameters",
        f"  Stable-Diffusion-2.1-unclip keys: {len(state) - len(extra)}, "
        f"{total - sum(t.numel() for t in extra.values()):,} parameters",
        f"  conv_in: {tuple(state['conv_in.weight'].shape)} (noisy latent + condition latent)",
    ]
    if show_keys:
        lines.append("keys:")
        lines += [f"  {k} {tuple(t.shape)}" for k, t in state.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", choices=sorted(CONFIGS), help="a built-in architecture")
    source.add_argument("--folder", help="a UNet folder (or a pipeline folder with unet/)")
    parser.add_argument("--keys", action="store_true", help="list every key with its shape")
    args = parser.parse_args(argv)
    config = CONFIGS[args.config]() if args.config else read_config(unet_folder(args.folder))
    print(describe(config, args.keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
