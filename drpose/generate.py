"""Generate the multi-view images of one photo and write them as PSHuman's inference does, plus our mesh.

    python -m drpose.generate --bundle DIR [--lora DIR] --image PNG --out DIR [--seed 0] [--steps 40] [--guidance 3.0]

``--bundle``: a folder holding ``pipeline/`` (PSHuman-format) and ``g_skel/`` (whose config names the rig),
e.g. the tiny world's; ``--lora``: adapters of a DrPose run (a run folder or its ``lora/``). The image is
composited on white and resized to the model's input size. Written to ``--out``:

* ``color_{view}_masked.png`` and ``normals_{view}_masked.png`` for the six body views (front, front_right,
  right, back, left, front_left) at the model's full resolution, RGBA with the silhouette as alpha, in
  PSHuman's reconstruction-input layout: the back and left views flipped back (the model generates them
  mirrored), the front colour is the input photo, and the generated face normal, shrunk to a third, is
  pasted over the front normal's top-centre third (rows [0, R/3), columns [R/3, 2R/3)), where the face view
  was cropped from;
* ``color_face.png`` / ``normals_face.png``: the face view as generated; ``input.png``: the model's input;
* for an orthographic rig, our mesh (:mod:`drpose.reconstruction`) from the generated views: ``mesh.ply``,
  ``mesh.obj`` and ``mesh_preview.png`` (turntable). Its unit is the frame's half-extent about the frame's
  centre (a single photo does not tell the body's size in metres).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from drpose.models.layout import COLOR, FACE_VIEW, NORMAL, NUM_BODY_VIEWS, VIEW_NAMES
from drpose.models.rig import ViewRig


def load_image(path: Path, size: int) -> torch.Tensor:
    """An image file -> (3, size, size) in [0, 1], transparency composited on white."""
    if not path.is_file():
        raise FileNotFoundError(f"--image {path}: no such file")
    image = Image.open(path)
    if image.width != image.height:
        raise ValueError(f"--image {path}: {image.width}x{image.height}; the model takes a square image (pad or crop "
                         f"it around the person first)")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float() / 255.0


def pshuman_layout(views: torch.Tensor, image: torch.Tensor, rig: ViewRig) -> dict[str, torch.Tensor]:
    """Generated views (2, 7, 3, R, R) of one object (domain 0 normals) and its input (3, R, R) -> the images
    PSHuman's reconstruction reads, keyed ``"color_<view>"`` / ``"normals_<view>"`` (see the module docstring)."""
    size = views.shape[-1]
    body = rig.unmirror(views[:, :NUM_BODY_VIEWS])  # (2, 6, 3, R, R): flip back the mirrored views
    normals, colours = body[NORMAL].clone(), body[COLOR].clone()
    colours[0] = image
    third = size // 3
    face = F.interpolate(views[NORMAL, FACE_VIEW][None], size=(third, third), mode="bilinear", align_corners=False)[0]
    normals[0][:, :third, third : third + third] = face
    out = {}
    for view in range(NUM_BODY_VIEWS):
        out[f"color_{VIEW_NAMES[view]}"] = colours[view]
        out[f"normals_{VIEW_NAMES[view]}"] = normals[view]
    return out


def to_png(image: torch.Tensor, path: Path, alpha: np.ndarray | None = None) -> None:
    pixels = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    if alpha is not None:
        pixels = np.concatenate([pixels, (np.clip(alpha, 0, 1) * 255 + 0.5).astype(np.uint8)[..., None]], -1)
    Image.fromarray(pixels).save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="folder with pipeline/ and g_skel/")
    parser.add_argument("--lora", default=None, help="LoRA adapters: a DrPose run folder or its lora/ folder")
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=40, help="DDIM steps (PSHuman: 40)")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (PSHuman: 3.0)")
    parser.add_argument("--prompt-embeds", type=Path, default=None, help="PSHuman's prompt-embedding folder")
    parser.add_argument("--no-mesh", action="store_true", help="write the views only")
    args = parser.parse_args(argv)

    from drpose.evaluate import load_model
    from drpose.models.bundle import ModelBundle
    from drpose.models.sampling import DDIMSampler, generate_views

    for part in ("pipeline", "g_skel"):
        if not (args.bundle / part).is_dir():
            raise SystemExit(f"--bundle {args.bundle}: no {part}/ folder (a bundle holds pipeline/ and g_skel/)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    bundle = ModelBundle.load(args.bundle / "pipeline", args.bundle / "g_skel", args.prompt_embeds, dtype=dtype,
                              device=device)
    unet = load_model(bundle, args.lora) if args.lora else bundle.pipeline.unet
    pipeline, rig = bundle.pipeline, bundle.rig
    image = load_image(args.image, pipeline.image_size)
    cond = pipeline.condition(image[None].to(device, dtype), generator=torch.Generator().manual_seed(args.seed))
    sampler = DDIMSampler(pipeline.scheduler, args.steps, pipeline.num_views, guidance_scale=args.guidance)
    latents = generate_views(pipeline, sampler, cond, seed=args.seed, unet=unet)[0]  # (2, V, c, h, w)
    views = pipeline.decode_latents(latents.flatten(0, 1)).view(2, pipeline.num_views, 3, *([pipeline.image_size] * 2))
    views = views.float().cpu()

    from drpose.reconstruction.silhouette import soft_silhouettes

    args.out.mkdir(parents=True, exist_ok=True)
    images = pshuman_layout(views, image, rig)
    camera_rgb = torch.stack([images[f"color_{VIEW_NAMES[v]}"] for v in range(NUM_BODY_VIEWS)])
    camera_normal = torch.stack([images[f"normals_{VIEW_NAMES[v]}"] for v in range(NUM_BODY_VIEWS)])
    masks, _ = soft_silhouettes(camera_rgb.permute(0, 2, 3, 1).double().numpy(),
                                camera_normal.permute(0, 2, 3, 1).double().numpy())
    for view in range(NUM_BODY_VIEWS):
        name = VIEW_NAMES[view]
        to_png(images[f"color_{name}"], args.out / f"color_{name}_masked.png", masks[view])
        to_png(images[f"normals_{name}"], args.out / f"normals_{name}_masked.png", masks[view])
    to_png(views[COLOR, FACE_VIEW], args.out / "color_face.png")
    to_png(views[NORMAL, FACE_VIEW], args.out / "normals_face.png")
    to_png(image, args.out / "input.png")
    written = {"views": list(VIEW_NAMES[:NUM_BODY_VIEWS]), "rig": rig.to_dict(), "seed": args.seed, "steps": args.steps,
               "guidance": args.guidance, "lora": args.lora, "mesh": None}
    result = None
    if not args.no_mesh and rig.cameras.projection == "orthographic":
        from drpose.reconstruction import reconstruct
        from drpose.reconstruction.mesh import export_mesh, turntable

        # The generated views as the model made them (mirrored, normals in its frame); the front colour too.
        try:
            [result] = reconstruct(views[COLOR, None, :NUM_BODY_VIEWS], views[NORMAL, None, :NUM_BODY_VIEWS], rig)
        except ValueError as error:  # e.g. views without a body: the views are still worth having
            written["mesh"] = {"error": str(error)}
            print(f"[generate] no mesh: {error}")
            result = None
    if result is not None:
        export_mesh(result.mesh, args.out / "mesh.ply")
        export_mesh(result.mesh, args.out / "mesh.obj")
        turntable({"mesh": result.mesh}, args.out / "mesh_preview.png", title="reconstruction (turntable)")
        written["mesh"] = {"files": ["mesh.ply", "mesh.obj", "mesh_preview.png"], "unit": "frame half-extent",
                           "vertices": len(result.mesh.vertices), "watertight": bool(result.mesh.is_watertight),
                           "seconds": result.seconds}
    elif not args.no_mesh and rig.cameras.projection != "orthographic":
        print(f"[generate] no mesh: the rig's projection is {rig.cameras.projection!r}; our reconstruction reads "
              f"orthographic views (PSHuman's reconstruction can run on the written views)")
    (args.out / "generate.json").write_text(json.dumps(written, indent=2) + "\n")
    print(f"[generate] wrote {args.out}: {NUM_BODY_VIEWS} colour + {NUM_BODY_VIEWS} normal views"
          + (", mesh.ply, mesh.obj, mesh_preview.png" if result is not None else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
