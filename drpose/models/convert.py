"""Convert a plain Stable Diffusion 2.x / 2.1-unclip UNet folder into a PSHuman-format multi-view UNet folder.

    python -m drpose.models.convert --sd-unet /ckpt/stable-diffusion-2-1-unclip/unet --out /ckpt/mv_unet

The converted model computes what the source does until trained, except that self-attention now joins
each view's normal and RGB tokens (PSHuman's cross-domain attention): the new row-wise multi-view
attention starts with a zero output projection, the condition-latent input channels start at zero,
and a source without a class embedding gets a zero-output unCLIP projection (see ``convert_sd_unet``).
"""

from __future__ import annotations

import argparse
import sys

from .pshuman_unet import convert_sd_unet


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd-unet", required=True, help="diffusers UNet2DConditionModel folder (or pipeline folder)")
    parser.add_argument("--out", required=True, help="where to write the UNetMV2DConditionModel folder")
    parser.add_argument("--num-views", type=int, default=7)
    parser.add_argument("--class-embed-input-dim", type=int, default=2048,
                        help="input size of an added unCLIP class embedding (2 x the CLIP image embedding size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new attn_mv projections")
    args = parser.parse_args(argv)
    model = convert_sd_unet(args.sd_unet, args.num_views, args.class_embed_input_dim, args.seed)
    model.save_pretrained(args.out)
    print(f"[drpose] wrote {args.out} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
