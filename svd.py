"""The published Stable Video Diffusion in one place: its UNet's weights in our VideoUNet, its frozen VAE
and CLIP image encoder, and the conventions of its pipeline.

OSV distils SVD (Blattmann et al. 2023). The offline path trains small stand-ins for all of it; this
file is the real path. `from_pretrained` loads SVD / SVD-XT's UNet, from a diffusers model folder or the
original single-file checkpoint, into our own `unet.VideoUNet` (the nanoGPT pattern: our model, their
weights), and tests/test_svd.py proves it computes what the reference implementation computes.
`SVDEncoders` puts SVD's VAE (diffusers' AutoencoderKLTemporalDecoder) and CLIP image encoder behind
the interface of our autoencoder (`encode_video`, `decode_video`, `condition`), so the stages, the
samplers and the report are the same code on both paths. SVD's conventions are silent when wrong, which
is why they are all here, each with its source:

- the image embedding: CLIP ViT-H/14's projected `image_embeds` (1024-d, one context token) of the clean
  first frame, resized with SVD's anti-aliasing and normalised with CLIP's mean and std;
- the concatenated latent: the VAE's mode of the noise-augmented first frame, *not* multiplied by the
  scaling factor 0.18215 (the generated latents are);
- the micro-conditioning: [fps - 1, motion bucket id, noise-augmentation strength];
- the sampler: Karras levels from 700 to 0.002 (rho 7), Euler steps, initial noise sqrt(1 + sigma^2) z,
  and the SVD-XT pipeline's guidance ramp 1.0 -> 3.0 over the frames.

diffusers, transformers and safetensors are needed here only, and imported when a function needs them.
Read first: the naming table above `ours_from_sgm`, then `SVDEncoders.condition`.
"""
import argparse
import glob
import json
import os
import re
from contextlib import contextmanager
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import UserError, optional
from unet import SVD_REFERENCE_PARAMS, Denoiser, UNetConfig, VideoUNet

# The pipeline's conventions (diffusers' StableVideoDiffusionPipeline call defaults and the models'
# scheduler_config.json; sgm's scripts/sampling/simple_video_sample.py agrees but for the XT ramp)
SIGMA_MIN, SIGMA_MAX = 0.002, 700.0
FPS, MOTION_BUCKET, NOISE_AUG = 7, 127, 0.02      # fps is conditioned as fps - 1
CFG_MIN, CFG_MAX = 1.0, 3.0
STEPS, SIZE = 25, (576, 1024)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def init_noise_scale(sigma_max):
    """SVD starts from sqrt(1 + sigma_max^2) z (sgm's sampler; diffusers' init_noise_sigma for its
    "leading" timestep spacing), where EDM starts from sigma_max z."""
    return (1 + sigma_max ** 2) ** 0.5


# ----------------------------------------------------------------------------------------------
# The UNet's weights in our network
#
# The same 1,428 tensors ship under two names: diffusers' (the model folder's unet/) and the original
# code's (the single file svd_xt.safetensors, prefix model.diffusion_model.). Ours are the original's
# but for these (L = num_res_blocks; i counts diffusers' down/up blocks, j a block within one):
#
#   ours                              original (sgm)                     diffusers
#   conv_in                           input_blocks.0.0                   conv_in
#   input_blocks.{n}                  input_blocks.{n + 1}               down_blocks.i.resnets.j (.0), .attentions.j (.1),
#                                                                        .downsamplers.0.conv (.0.op); n = i (L + 1) + j
#   middle_block.{0, 1, 2}            middle_block.{0, 1, 2}             mid_block.resnets.0, .attentions.0, .resnets.1
#   output_blocks.{n}                 output_blocks.{n}                  up_blocks.i.resnets.j, .attentions.j, .upsamplers.0
#   time_embed.{0, 2}                 time_embed.{0, 2}                  time_embedding.linear_{1, 2}
#   label_emb.{0, 2}                  label_emb.0.{0, 2}                 add_embedding.linear_{1, 2}
#   out.{0, 2}                        out.{0, 2}                         conv_norm_out, conv_out
#   <resblock>.spatial.<layer>        <resblock>.<layer>                 <resblock>.spatial_res_block.<layer'>
#   <resblock>.time_stack.<layer>     <resblock>.time_stack.<layer>      <resblock>.temporal_res_block.<layer'>
#       in_layers.{0, 2}, emb_layers.1, out_layers.{0, 3}, skip     <->  norm1, conv1, time_emb_proj, norm2, conv2,
#       (sgm: skip_connection)                                           conv_shortcut
#   <transformer>.time_stack          <transformer>.time_stack           <transformer>.temporal_transformer_blocks
#   time_pos_embed.{0, 2}             time_pos_embed.{0, 2}              time_pos_embed.linear_{1, 2}
#   attn.to_out                       attn.to_out.0                      attn.to_out.0
#   ff.proj, ff.out (and ff_in.)      ff.net.0.proj, ff.net.2            ff.net.0.proj, ff.net.2
#
# The blend scalars mix_factor are 0-d here and of shape (1,) in both. Nothing else differs but one
# number: diffusers' GroupNorms in the cross-attention down blocks and all up blocks use eps 1e-6, the
# original's (which trained the weights) 1e-5 everywhere; UNetConfig.norm_eps is the original's.

SGM_PREFIX = "model.diffusion_model."
RESBLOCK = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
            "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip"}
INSIDE = [(r"\.to_out\.0\.", ".to_out."), (r"\.net\.0\.proj\.", ".proj."), (r"\.net\.2\.", ".out.")]


def ours_from_sgm(key):
    """An original checkpoint's key -> ours; None for keys outside the UNet (conditioner, first stage)."""
    if not key.startswith(SGM_PREFIX):
        return None
    key = re.sub(r"^input_blocks\.0\.0\.", "conv_in.", key[len(SGM_PREFIX):])
    key = re.sub(r"^input_blocks\.(\d+)\.", lambda m: f"input_blocks.{int(m[1]) - 1}.", key)
    key = re.sub(r"^label_emb\.0\.", "label_emb.", key)
    key = re.sub(r"^((?:input|output)_blocks\.\d+\.0|middle_block\.[02])\.(in_layers|emb_layers|out_layers|skip_connection)\.",
                 r"\1.spatial.\2.", key)                                   # a VideoResBlock's spatial half
    key = key.replace(".skip_connection.", ".skip.")
    for pattern, new in INSIDE:
        key = re.sub(pattern, new, key)
    return key


def sgm_from_ours(key):
    """Our key -> the original checkpoint's: `ours_from_sgm` run backwards, step by step in reverse
    order (export.py; it checks the round trip on every key)."""
    for theirs, ours in reversed(INSIDE):             # .to_out. -> .to_out.0., the feed-forwards' names
        key = key.replace(ours, theirs.replace("\\", ""))            # the pattern, unescaped
    key = key.replace(".skip.", ".skip_connection.").replace(".spatial.", ".")
    key = re.sub(r"^label_emb\.", "label_emb.0.", key)
    key = re.sub(r"^input_blocks\.(\d+)\.", lambda m: f"input_blocks.{int(m[1]) + 1}.", key)
    key = re.sub(r"^conv_in\.", "input_blocks.0.0.", key)
    return SGM_PREFIX + key


def ours_from_diffusers(key, cfg):
    """A diffusers UNetSpatioTemporalConditionModel key -> ours, for our UNetConfig cfg."""
    L, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    n = lambda i, j: int(i) * (L + 1) + int(j)                                         # noqa: E731
    upsampler = lambda i: 2 if levels - 1 - int(i) in cfg.attention_levels else 1      # noqa: E731  after attention
    where = [(r"^time_embedding\.linear_([12])\.", lambda m: f"time_embed.{2 * int(m[1]) - 2}."),
             (r"^add_embedding\.linear_([12])\.", lambda m: f"label_emb.{2 * int(m[1]) - 2}."),
             (r"^conv_norm_out\.", "out.0."), (r"^conv_out\.", "out.2."),
             (r"^down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"input_blocks.{n(m[1], m[2])}.0."),
             (r"^down_blocks\.(\d+)\.attentions\.(\d+)\.", lambda m: f"input_blocks.{n(m[1], m[2])}.1."),
             (r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.", lambda m: f"input_blocks.{n(m[1], L)}.0.op."),
             (r"^mid_block\.resnets\.(\d)\.", lambda m: f"middle_block.{2 * int(m[1])}."),
             (r"^mid_block\.attentions\.0\.", "middle_block.1."),
             (r"^up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"output_blocks.{n(m[1], m[2])}.0."),
             (r"^up_blocks\.(\d+)\.attentions\.(\d+)\.", lambda m: f"output_blocks.{n(m[1], m[2])}.1."),
             (r"^up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"output_blocks.{n(m[1], L)}.{upsampler(m[1])}.")]
    for pattern, new in where:
        key, hit = re.subn(pattern, new, key)
        if hit:
            break
    key = re.sub(r"\.spatial_res_block\.(\w+)\.", lambda m: f".spatial.{RESBLOCK.get(m[1], m[1])}.", key)
    key = re.sub(r"\.temporal_res_block\.(\w+)\.", lambda m: f".time_stack.{RESBLOCK.get(m[1], m[1])}.", key)
    key = key.replace(".temporal_transformer_blocks.", ".time_stack.")
    key = re.sub(r"\.time_pos_embed\.linear_([12])\.", lambda m: f".time_pos_embed.{2 * int(m[1]) - 2}.", key)
    for pattern, new in INSIDE:
        key = re.sub(pattern, new, key)
    return key


def config_from_diffusers(c):
    """Our UNetConfig from a diffusers UNet config.json (dict); a one-line error for what ours cannot build."""
    chans, levels = tuple(c["block_out_channels"]), len(c["block_out_channels"])
    heads = c["num_attention_heads"]
    heads = (heads,) * levels if isinstance(heads, int) else tuple(heads)
    attention = tuple(i for i, t in enumerate(c["down_block_types"]) if t.startswith("CrossAttn"))
    ups = tuple(levels - 1 - i for i, t in enumerate(c["up_block_types"]) if t.startswith("CrossAttn"))
    head_channels = [h for h in {ch // n for ch, n in zip(chans, heads)}    # heads = ch // head_channels at every level
                     if all(max(1, ch // h) == n for ch, n in zip(chans, heads))]
    problems = [(not all(isinstance(c[k], int) for k in ("layers_per_block", "transformer_layers_per_block",
                                                          "cross_attention_dim")), "per-level layer counts"),
                (sorted(ups) != list(attention), "up blocks that do not mirror the down blocks"),
                (any(ch % chans[0] for ch in chans), "widths that are not multiples of the first"),
                (not head_channels, f"attention heads {heads} that are not width // a fixed head size"),
                (c["projection_class_embeddings_input_dim"] != 3 * c["addition_time_embed_dim"],
                 "other than three micro-conditions")]
    for bad, what in problems:
        if bad:
            raise UserError(f"this UNet config has {what}: our VideoUNet cannot build it")
    return UNetConfig(in_channels=c["in_channels"], out_channels=c["out_channels"], model_channels=chans[0],
                      channel_mult=tuple(ch // chans[0] for ch in chans), num_res_blocks=c["layers_per_block"],
                      attention_levels=attention, head_channels=head_channels[0],
                      transformer_depth=c["transformer_layers_per_block"], context_dim=c["cross_attention_dim"],
                      micro_dim=c["addition_time_embed_dim"])


def ours_from(sd, cfg, scheme):
    """A whole state dict renamed to ours. Every key must be used in both directions: a one-line error
    names the first keys that found no partner."""
    rename = ours_from_sgm if scheme == "sgm" else (lambda k: ours_from_diffusers(k, cfg))
    with torch.device("meta"):
        want = VideoUNet(cfg).state_dict()
    out, theirs_left = {}, []
    for k, v in sd.items():
        ours = rename(k)
        if ours is None:                                   # the single file's VAE and conditioner
            continue
        v = v.reshape(()) if ours.endswith("mix_factor") else v
        if ours in want and ours not in out and want[ours].shape == v.shape:
            out[ours] = v
        else:
            theirs_left.append(k)
    ours_left = [k for k in want if k not in out]
    if theirs_left or ours_left:
        raise UserError(f"the {scheme} weights do not match our VideoUNet: theirs without a place "
                        f"{theirs_left[:3]}, ours without weights {ours_left[:3]}")
    return out


def from_pretrained(path, dtype=torch.float32, device="cpu"):
    """SVD's published UNet as our VideoUNet. path: a diffusers UNet folder (config.json and
    diffusion_pytorch_model[.fp16].safetensors, sharded or not), a whole pipeline folder (its unet/), or
    the original single-file checkpoint (.safetensors, keys model.diffusion_model.*) in the model folder,
    whose unet/config.json gives its config. The config always comes from the files, never a preset."""
    load_file = optional("safetensors.torch").load_file
    if os.path.isdir(os.path.join(path, "unet")):
        path = os.path.join(path, "unet")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"{path} has no config.json: not a diffusers UNet or pipeline folder")
        with open(os.path.join(path, "config.json")) as f:
            cfg = config_from_diffusers(json.load(f))
        files = []
        for variant in ("", ".fp16"):                      # full precision first
            index = os.path.join(path, f"diffusion_pytorch_model{variant}.safetensors.index.json")
            if os.path.isfile(index):                      # sharded: the index names the files
                with open(index) as f:
                    files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
            files = files or glob.glob(os.path.join(path, f"diffusion_pytorch_model{variant}.safetensors"))
            if files:
                break
        if not files:
            raise UserError(f"{path} has no diffusion_pytorch_model[.fp16].safetensors")
        sd = {k: v for f in files for k, v in load_file(f).items()}
        sd = ours_from(sd, cfg, "diffusers")
    elif os.path.isfile(path) and path.endswith(".safetensors"):     # its config: the folder's, beside it
        folder = os.path.dirname(os.path.abspath(path))
        found = [c for c in (os.path.join(folder, "config.json"), os.path.join(folder, "unet", "config.json"))
                 if os.path.isfile(c)]
        if not found:
            raise UserError(f"{path} carries no config: put the model folder's unet/config.json beside it")
        with open(found[0]) as f:
            cfg = config_from_diffusers(json.load(f))
        sd = ours_from(load_file(path), cfg, "sgm")
    else:
        raise UserError(f"{path}: not a diffusers UNet or pipeline folder, nor a .safetensors file")
    with torch.device("meta"):
        unet = VideoUNet(cfg)
    unet.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, assign=True)
    return unet.to(device).eval()


def load_denoiser(path, dtype=torch.float32, device="cpu"):
    """SVD as a denoiser: the published UNet in our preconditioning (SVD's own: v-prediction with
    sigma_data = 1), with no learned image embedding (CLIP's comes with the conditioning)."""
    return Denoiser(from_pretrained(path, dtype, device)).to(device)


def scheduler_levels(path):
    """sigma_min, sigma_max of a pipeline folder's scheduler (SVD's when it has none)."""
    f = os.path.join(path, "scheduler", "scheduler_config.json")
    if not os.path.isfile(f):
        return SIGMA_MIN, SIGMA_MAX
    with open(f) as fh:
        c = json.load(fh)
    return c.get("sigma_min", SIGMA_MIN), c.get("sigma_max", SIGMA_MAX)


def num_frames(path):
    """The frame count the UNet was trained for (SVD 14, SVD-XT 25): its config's num_frames."""
    f = os.path.join(path, "unet", "config.json") if os.path.isdir(os.path.join(path, "unet")) else \
        os.path.join(path, "config.json")
    with open(f) as fh:
        return json.load(fh).get("num_frames", 14)


# ----------------------------------------------------------------------------------------------
# The frozen encoders: SVD's VAE and CLIP image encoder behind our autoencoder's interface

def resize_antialiased(x, size):
    """(N, C, H, W) -> (N, C, *size): a Gaussian blur against aliasing, then bicubic interpolation with
    align_corners=True: the resize SVD gives CLIP's input (sgm: kornia's resize with antialias;
    diffusers: _resize_with_antialiasing). Per axis, sigma = max((factor - 1) / 2, 0.001) (scikit-image's
    rule), a kernel of about 2 sigma each side (at least 3 taps, odd), reflected borders; width first."""
    C = x.shape[1]
    for axis, (n, m) in reversed(list(enumerate(zip(x.shape[-2:], size)))):     # width, then height
        sigma = max((n / m - 1) / 2, 0.001)
        k = int(max(4 * sigma, 3))
        k += 1 - k % 2
        t = torch.arange(k, dtype=x.dtype, device=x.device) - k // 2
        w = torch.exp(-t ** 2 / (2 * torch.tensor(sigma, dtype=x.dtype) ** 2))
        w = (w / w.sum()).view(1, 1, *((1, k) if axis == 1 else (k, 1))).expand(C, 1, -1, -1)
        pad = (k // 2, k // 2, 0, 0) if axis == 1 else (0, 0, k // 2, k // 2)
        x = F.conv2d(F.pad(x, pad, mode="reflect"), w, groups=C)
    return F.interpolate(x, size=size, mode="bicubic", align_corners=True)


class SVDEncoders(nn.Module):
    """SVD's frozen VAE and CLIP image encoder with our autoencoder's interface: latents are scaled by
    the VAE's scaling factor (ours divides by `scale_factor`, so it is 1 / 0.18215); videos decode with
    the temporal decoder, one video at a time, in chunks that never cross a video."""

    def __init__(self, vae, clip, mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        self.vae, self.clip = vae.eval().requires_grad_(False), clip.eval().requires_grad_(False)
        self.register_buffer("scale_factor", torch.tensor(1 / vae.config.scaling_factor))
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)           # SVD's: 8
        self.cfg = SimpleNamespace(latent_channels=vae.config.latent_channels)
        self.chunk = 0                                             # decode_video's default: all frames at once
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """The vae/, image_encoder/ and feature_extractor/ of a diffusers SVD pipeline folder."""
        diffusers, transformers = optional("diffusers"), optional("transformers")
        for part in ("vae", "image_encoder"):
            if not os.path.isdir(os.path.join(path, part)):
                raise UserError(f"{path} has no {part}/: not a diffusers SVD pipeline folder")
        vae = load_part(diffusers.AutoencoderKLTemporalDecoder, path, "vae")
        clip = load_part(transformers.CLIPVisionModelWithProjection, path, "image_encoder")
        processor = os.path.join(path, "feature_extractor", "preprocessor_config.json")
        stats = {}
        if os.path.isfile(processor):
            with open(processor) as f:
                p = json.load(f)
            stats = {"mean": tuple(p.get("image_mean", CLIP_MEAN)), "std": tuple(p.get("image_std", CLIP_STD))}
        return cls(vae, clip, **stats).to(device, dtype)

    @torch.no_grad()
    def encode_raw(self, frames):
        """Frames (N, 3, H, W) in [-1, 1] -> the VAE posterior's mode, unscaled (N, c, H/f, W/f)."""
        return self.vae.encode(frames.to(self.vae.dtype)).latent_dist.mode()

    @torch.no_grad()
    def encode_video(self, video, chunk=64):
        """(B, T, 3, H, W) pixels -> (B, T, c, h, w) latents scaled as SVD's generated latents."""
        frames = video.flatten(0, 1)
        z = torch.cat([self.encode_raw(f) for f in frames.split(chunk)])                # (B*T, c, h, w)
        return (z / self.scale_factor).unflatten(0, video.shape[:2]).float()

    @torch.no_grad()
    def decode_video(self, z, chunk=None):
        """(B, T, c, h, w) latents -> (B, T, 3, H, W) pixels. The temporal decoder mixes the frames of a
        call, so each call decodes frames of one video (all T, or `chunk` at a time, as SVD's
        decode_chunk_size; default self.chunk, the run's --decode-chunk)."""
        T = z.shape[1]
        out = []
        for video in z * self.scale_factor:                                             # (T, c, h, w)
            parts = video.split(chunk or self.chunk or T)
            out.append(torch.cat([self.vae.decode(p.to(self.vae.dtype), num_frames=len(p)).sample for p in parts]))
        return torch.stack(out).float()                                                 # (B, T, 3, H, W)

    @torch.no_grad()
    def embed(self, frame):
        """SVD's image embedding of clean first frames (B, 3, H, W) in [-1, 1]: (B, 1, d)."""
        size = self.clip.config.image_size
        x = frame if frame.shape[-2:] == (size, size) else resize_antialiased(frame, (size, size))
        x = ((x + 1) / 2 - self.mean) / self.std
        return self.clip(pixel_values=x.to(self.clip.dtype)).image_embeds[:, None].float()

    @torch.no_grad()
    def condition(self, frame, fps, motion, cond_aug, noise=None):
        """SVD's conditioning from first frames (B, 3, H, W) in pixels: the VAE's mode of the frame plus
        cond_aug Gaussian noise, unscaled ("concat"); CLIP's embedding of the clean frame ("image", the
        context itself); [fps - 1, motion bucket id, cond_aug] ("micro"). noise: the augmentation's unit
        noise (default: drawn)."""
        noise = torch.randn_like(frame) if noise is None else noise
        z_aug = self.encode_raw(frame + cond_aug.view(-1, 1, 1, 1).to(frame) * noise).float()
        micro = torch.stack([fps.float() - 1, motion.float(), cond_aug.float()], 1)
        return {"concat": z_aug, "image": self.embed(frame), "micro": micro}


@contextmanager
def resident(module, device):
    """`module` on `device` for the block, and back where it was after: SVD's encoders (2.7 GiB in fp32)
    stay on the CPU while a stage reads the latent cache, and visit the GPU for samples and checks."""
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)
        if home != torch.device(device) and torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_part(cls, path, part):
    """A diffusers or transformers model from a pipeline folder's subfolder, the full-precision weights
    if the folder has them, else its fp16 variant."""
    try:
        return cls.from_pretrained(path, subfolder=part)
    except (OSError, EnvironmentError):
        return cls.from_pretrained(path, subfolder=part, variant="fp16")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Load published SVD UNet weights into our VideoUNet.")
    p.add_argument("--from-pretrained", metavar="PATH", required=True,
                   help="a diffusers UNet or pipeline folder, or the original single-file .safetensors")
    a = p.parse_args()
    try:
        unet = from_pretrained(a.from_pretrained)
    except UserError as e:
        raise SystemExit(f"error: {e}")
    n = sum(q.numel() for q in unet.parameters())
    print(f"{a.from_pretrained}: {unet.cfg}")
    print(f"VideoUNet: {n:,} parameters" + (f" (the reference SVD UNet: {SVD_REFERENCE_PARAMS:,})"
                                              if n == SVD_REFERENCE_PARAMS else ""))
