"""Export: a student distilled from the published SVD, out of this repository and into the layouts that
people run: a diffusers `StableVideoDiffusionPipeline` folder, or SVD's original single-file checkpoint.

A student's checkpoint holds only what trained (LoRA adapters, the blend deltas) and names its base,
SVD's pipeline folder. Export folds the adapters into the base (`lora.unwrap`: W + (alpha / r) B A,
mix_factor + delta), which gives a plain `unet.VideoUNet`, then renames its weights with svd.py's naming
table run backwards:
- diffusers: every key of diffusers' UNet, built from the base's own config.json, is mapped to ours by
  `svd.ours_from_diffusers`, and the map is inverted (each of ours must have exactly one partner);
- the single file: `svd.sgm_from_ours`, checked on every key against `svd.ours_from_sgm`.

How to run the result (README, "Distil the real SVD"): diffusers' pipeline with num_inference_steps=1
and guidance 1 (min_guidance_scale = max_guidance_scale = 1) is OSV's one step without TTS. They agree
because one Euler step from the top level to 0 returns the denoiser's x0 estimate, which is the
student's output but for two terms of O(sigma_min / sigma_max), here 3e-6: diffusers applies EDM's
c_skip and c_out where the student was trained with the consistency form (`unet.scalings`, sigma -
sigma_min in place of sigma), and it starts from sqrt(1 + sigma^2) z where the student's sampler starts
from sigma z. The Time Travel Sampler and k-step consistency sampling stay in sample.py.

An offline student (our autoencoder and teacher) is refused: its image conditioning is our learned
encoder, not CLIP, and its latents are our autoencoder's, so no pipeline outside this repository can
run its UNet.

    python export.py --ckpt runs/svd/stage2.pt --out osv-svd-xt                 # a diffusers pipeline folder
    python export.py --ckpt runs/svd/stage2.pt --out osv_svd_xt.safetensors --format single-file

Read first: `merged_unet`, then `export_diffusers`.
"""
import glob
import json
import os
import shutil
import sys

import torch

import svd
from data import Parser, UserError, optional
from lora import unwrap
from sample import load_checkpoint, student_on
from unet import VideoUNet

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PARTS = ("vae", "image_encoder", "feature_extractor", "scheduler")       # taken from the base as they are


def student_checkpoint(path, base=None):
    """A finished Stage 1 or 2 checkpoint of a --svd student, and its base pipeline folder (`base`, or
    the one it names); one-line errors for an unfinished, offline or base-less checkpoint."""
    ckpt = load_checkpoint(path, ("1", "2"))
    if not ckpt["config"].get("svd"):
        raise UserError(f"{path} is a student of the offline teacher (our autoencoder and image encoder, not "
                        f"SVD's VAE and CLIP): no pipeline outside this repository can run it; export takes "
                        f"students trained with --svd")
    base = base or ckpt["config"]["svd"]
    if not os.path.isdir(os.path.join(base, "unet")):
        raise UserError(f"the base pipeline folder {base} (named by {path}) is missing or has no unet/: give "
                        f"its place with --base")
    return ckpt, base


def merged_unet(ckpt, base):
    """The student's network as a plain VideoUNet in float32: the base's weights with the adapters folded
    in. It computes what `sample.load_model` samples with."""
    D = svd.load_denoiser(base)
    return unwrap(student_on(D, ckpt)).unet.eval()


def diffusers_names(unet_config):
    """{our key: diffusers' key} for the UNet that `unet_config` (diffusers' config.json) builds: the naming
    table run backwards. Every key of ours must have exactly one partner."""
    diffusers = optional("diffusers")
    cfg = svd.config_from_diffusers(unet_config)
    with torch.device("meta"):
        theirs = diffusers.UNetSpatioTemporalConditionModel.from_config(unet_config).state_dict()
        ours = VideoUNet(cfg).state_dict()
    names = {}
    for k in theirs:
        names.setdefault(svd.ours_from_diffusers(k, cfg), []).append(k)
    bad = [k for k in ours if len(names.get(k, ())) != 1] + [k for k in names if k not in ours]
    if bad:
        raise UserError(f"diffusers' UNet and ours do not pair one to one at {bad[:3]}")
    return {k: v[0] for k, v in names.items()}, {k: tuple(v.shape) for k, v in theirs.items()}


def place(src, dst):
    """A base file in the exported folder: a hard link (no second copy on disk, and the folder stands
    alone even if the base is deleted), or a copy where the two folders are on different filesystems."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)
        return "linked"
    except OSError:
        shutil.copy2(src, dst)
        return "copied"


def export_diffusers(unet, base, out, dtype):
    """A complete StableVideoDiffusionPipeline folder: unet/ holds the merged student in diffusers' names
    (safetensors, `dtype`) with the base's config.json; vae/, image_encoder/, feature_extractor/,
    scheduler/ and model_index.json are the base's own files (`place`)."""
    save_file = optional("safetensors.torch").save_file
    with open(os.path.join(base, "unet", "config.json")) as f:
        config = json.load(f)
    names, shapes = diffusers_names(config)
    sd = {names[k]: v.detach().to(dtype).reshape(shapes[names[k]]).contiguous() for k, v in unet.state_dict().items()}
    os.makedirs(os.path.join(out, "unet"))
    save_file(sd, os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    shutil.copy2(os.path.join(base, "unet", "config.json"), os.path.join(out, "unet", "config.json"))
    how = set()
    for part in PARTS:
        if not os.path.isdir(os.path.join(base, part)):
            raise UserError(f"the base {base} has no {part}/: not a diffusers SVD pipeline folder")
        for src in glob.glob(os.path.join(base, part, "**", "*"), recursive=True):
            if os.path.isfile(src):
                how.add(place(src, os.path.join(out, os.path.relpath(src, base))))
    how.add(place(os.path.join(base, "model_index.json"), os.path.join(out, "model_index.json")))
    return sorted(how)


def originals(base):
    """The original single-file checkpoints at the top of a pipeline folder (SVD's Hugging Face folders
    ship one or two, e.g. svd_xt.safetensors beside the diffusers parts): those with UNet keys."""
    safe_open = optional("safetensors").safe_open
    found = []
    for f in sorted(glob.glob(os.path.join(base, "*.safetensors"))):
        with safe_open(f, "pt") as h:
            if any(k.startswith(svd.SGM_PREFIX) for k in h.keys()):
                found.append(f)
    return found


def export_single_file(unet, base, out, dtype, original=None):
    """SVD's original layout (`model.diffusion_model.*`). With an original single file (`original`, or the
    one the base folder holds), the export is that file with its UNet replaced by the student; otherwise
    the UNet alone, with the base's UNet config.json beside it (what `svd.from_pretrained(FILE)` reads)."""
    st = optional("safetensors.torch")
    sd = {}
    for k, v in unet.state_dict().items():
        name = svd.sgm_from_ours(k)
        if svd.ours_from_sgm(name) != k:                           # the table, run back and forth
            raise UserError(f"the single-file name of {k} does not map back to it ({name})")
        sd[name] = v.detach().to(dtype).reshape((1,) if k.endswith("mix_factor") else v.shape).contiguous()
    if original is None:
        found = originals(base)
        if len(found) > 1:
            raise UserError(f"{base} holds several original single files ({', '.join(map(os.path.basename, found))}): "
                            f"name the one to build on with --original")
        original = found[0] if found else None
    metadata = None
    if original:
        with optional("safetensors").safe_open(original, "pt") as h:
            metadata = h.metadata()
            theirs = {k for k in h.keys() if k.startswith(svd.SGM_PREFIX)}
        if theirs != set(sd):
            raise UserError(f"{original} is not this UNet's original file: its UNet keys differ at "
                            f"{sorted(theirs ^ set(sd))[:2]}")
        rest = {k: v for k, v in st.load_file(original).items() if k not in sd}
        sd.update(rest)
    config = os.path.join(os.path.dirname(os.path.abspath(out)), "config.json")
    with open(os.path.join(base, "unet", "config.json")) as f:
        unet_config = f.read()
    if os.path.isfile(config) and open(config).read() != unet_config:
        raise UserError(f"{config} exists and is not the base's UNet config: export into another folder")
    st.save_file(sd, out, metadata=metadata)
    if not os.path.isfile(config):
        with open(config, "w") as f:
            f.write(unet_config)
    return original


def main(argv=None):
    p = Parser(description="Export a student trained with --svd: a diffusers StableVideoDiffusionPipeline "
               "folder (default) or SVD's original single-file checkpoint.")
    p.add_argument("--ckpt", required=True, help="a finished Stage 1 or Stage 2 checkpoint (stage2.pt)")
    p.add_argument("--out", required=True, help="diffusers: a new folder; single-file: a .safetensors file")
    p.add_argument("--format", default="diffusers", choices=["diffusers", "single-file"],
                   help="diffusers' pipeline folder, or SVD's original single file (default: %(default)s)")
    p.add_argument("--dtype", default="float16", choices=list(DTYPES), help="the UNet's weights (default: "
                   "%(default)s, as the published fp16 variants)")
    p.add_argument("--base", help="the base pipeline folder, where it is not where the checkpoint says")
    p.add_argument("--original", help="single-file: the original file to put the student in (default: the one "
                   "at the top of the base folder, if any)")
    a = p.parse_args(argv)
    try:
        if a.format == "diffusers" and os.path.exists(a.out) and (not os.path.isdir(a.out) or os.listdir(a.out)):
            raise UserError(f"--out {a.out} exists and is not an empty folder: nothing is overwritten")
        if a.format == "single-file" and (not a.out.endswith(".safetensors") or os.path.exists(a.out)):
            raise UserError(f"--out {a.out}: give a new .safetensors file for --format single-file")
        if a.original and not os.path.isfile(a.original):
            raise UserError(f"--original {a.original}: file not found")
        ckpt, base = student_checkpoint(a.ckpt, a.base)
        unet = merged_unet(ckpt, base)
        n = sum(v.numel() for v in unet.state_dict().values())
        if a.format == "diffusers":
            how = export_diffusers(unet, base, a.out, DTYPES[a.dtype])
            print(f"wrote {a.out}: unet/ holds the merged student ({n:,} weights, {a.dtype}); vae/, image_encoder/, "
                  f"feature_extractor/, scheduler/ {' or '.join(how)} from {base}.\nRun it: "
                  f"StableVideoDiffusionPipeline.from_pretrained({a.out!r})(image, num_inference_steps=1, "
                  f"min_guidance_scale=1.0, max_guidance_scale=1.0): OSV's one step (no TTS).")
        else:
            original = export_single_file(unet, base, a.out, DTYPES[a.dtype], a.original)
            print(f"wrote {a.out}: " + (f"{original} with its UNet replaced by the merged student ({a.dtype})"
                                        if original else
                                        f"the merged student's UNet alone ({n:,} weights, {a.dtype}), in SVD's "
                                        f"original names; no original single file was found in {base}, so the "
                                        f"VAE and conditioner are not in it (--original FILE adds them)"))
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
