"""OSV's latent discriminator: a trainable upsampler, a frozen feature backbone, spatial and temporal heads.

The paper's main architectural change to adversarial distillation (docs/paper.md, "The
discriminator"; OSV App. D): the discriminator never decodes latents with the VAE. Each frame's latent
goes through `Conv2d(c -> C_hat r^2)` and `PixelShuffle(r)` to an RGB-like image (r = 4 on SVD's 1/8
latents: the backbone sees half the video's resolution), a frozen backbone (DINOv2 in the paper)
gives features at several depths (StyleGAN-T), and light trainable heads read each depth: 2-D heads on
every frame (frames folded into the batch) and 1-D heads along time (space folded into the batch).
All the logits feed the hinge losses at the end of this file, which both stages use.

Read first: `Discriminator.forward` (the data path and its shapes), then the backbones. The ablation
of the paper's Table 2e is `input="decoded"`: decode with the autoencoder and give the full-resolution
pixels to the same backbone. `python discriminator.py --bench` measures the two side by side.

Backbones (`--disc-backbone`): `dinov2` (torch.hub, when its code and weights are available), and two
offline ones that need no download: `ae` (the frozen encoder of our autoencoder) and `vit` (a frozen
randomly initialised ViT). Which is the default is a measurement (docs/experiments.md).
"""
import argparse
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.profiler import ProfilerActivity, profile

from autoencoder import AEConfig, AutoEncoder
from data import UserError, optional


# ----------------------------------------------------------------------------------------------
# Frozen backbones: images (N, 3, H, W) in [-1, 1] -> a list of feature maps (N, C_i, H_i, W_i)

class AEEncoderBackbone(nn.Module):
    """The frozen encoder of our autoencoder, cut after each resolution level (3 levels for the tiny AE):
    a small conv net that has learned what our frames look like, free once the ae stage has run."""

    def __init__(self, ae):
        super().__init__()
        layers, cuts = list(ae.encoder.net.children()), []
        for i, m in enumerate(layers):          # cut before each downsampling conv and after the last ResBlock
            if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
                cuts.append(i)
        last = max(i for i, m in enumerate(layers) if type(m).__name__ == "ResBlock")
        bounds = [0] + cuts + [last + 1]
        self.stages = nn.ModuleList(nn.Sequential(*layers[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
        self.channels = [ae.cfg.channels[i] for i in range(len(cuts))] + [ae.cfg.channels[-1]]

    def forward(self, x):
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class ViTBackbone(nn.Module):
    """A frozen, randomly initialised ViT (patch 2, 4 blocks): a DINOv2-shaped network without its
    training. Random features are a classic discriminator backbone baseline (Projected GAN's ablations);
    features after every block, tokens reshaped back to their grid."""

    def __init__(self, dim=96, depth=4, heads=4, patch=2, max_tokens=1024):
        super().__init__()
        self.patch = patch
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, max_tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                                               batch_first=True, norm_first=True)
                                    for _ in range(depth))
        self.channels = [dim] * depth

    def forward(self, x):
        h = self.embed(x)                                                              # (N, dim, H/p, W/p)
        gh, gw = h.shape[2:]
        h = rearrange(h, "n c h w -> n (h w) c") + self.pos[:, :gh * gw]
        feats = []
        for blk in self.blocks:
            h = blk(h)
            feats.append(rearrange(h, "n (h w) c -> n c h w", h=gh))
        return feats


class DINOv2Backbone(nn.Module):
    """An adapter for DINOv2 (Oquab et al. 2023), the paper's backbone: [-1, 1] -> ImageNet-normalised,
    the short side resized to `size` and the long one in proportion (multiples of the patch size; a
    320x576 video keeps its aspect), features of 4 evenly spaced blocks via the hub
    model's `get_intermediate_layers(x, n, reshape=True)`. `model` is the hub module or any stand-in with
    that method and `embed_dim`, `patch_size`, `blocks` (the tests use a small one)."""

    MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, model, size=224):
        super().__init__()
        self.model, self.size = model, size
        depth = len(model.blocks)
        self.layers = [round(depth * k / 4) - 1 for k in (1, 2, 3, 4)]                # ViT-S/14: 2, 5, 8, 11
        self.channels = [model.embed_dim] * 4
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1))

    def forward(self, x):
        h, w = x.shape[-2:]                 # the short side to `size`, the long one kept in proportion
        p, s = self.model.patch_size, self.size / min(h, w)
        hw = (max(p, round(h * s / p) * p), max(p, round(w * s / p) * p))           # multiples of the patch
        x = F.interpolate((x + 1) / 2, size=hw, mode="bilinear", align_corners=False)
        return list(self.model.get_intermediate_layers((x - self.mean) / self.std, n=self.layers, reshape=True))


class TransformersDINOv2(nn.Module):
    """transformers' Dinov2Model with the torch.hub model's `get_intermediate_layers(x, n, reshape=True)`:
    the final LayerNorm applied to the output of blocks n (hidden state k + 1 is block k's), the CLS
    token dropped, the patch tokens back on their grid (B, D, H/p, W/p)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.embed_dim, self.patch_size = model.config.hidden_size, model.config.patch_size
        self.blocks = model.encoder.layer

    def get_intermediate_layers(self, x, n, reshape=True):
        states = self.model(pixel_values=x, output_hidden_states=True).hidden_states
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return tuple(rearrange(self.model.layernorm(states[k + 1])[:, 1:], "b (h w) d -> b d h w", h=h, w=w)
                     for k in n)


def load_dinov2(name="dinov2_vits14", path=""):
    """DINOv2 from a local transformers folder (`path`, a Dinov2Model's save_pretrained, e.g. a download
    of facebook/dinov2-small), else from torch.hub: its cache, or a download when the network allows.
    A one-line error otherwise (this project's machines have no network)."""
    if path:
        if not os.path.isdir(path):
            raise UserError(f"--dinov2 {path}: not a folder")
        return TransformersDINOv2(optional("transformers").Dinov2Model.from_pretrained(path))
    try:
        return torch.hub.load("facebookresearch/dinov2", name, trust_repo=True, verbose=False)
    except Exception as e:
        raise UserError(f"DINOv2 ({name}) is not available ({type(e).__name__}); give a local transformers folder "
                        f"with --dinov2 PATH, or get it once with `python -c \"import torch; torch.hub.load("
                        f"'facebookresearch/dinov2', '{name}')\"` on a machine with network (it is cached in "
                        f"{torch.hub.get_dir()}), or use --disc-backbone ae or vit") from None


def make_backbone(name, ae, dinov2=""):
    if isinstance(name, nn.Module):             # a backbone built by the caller (bench.py's random DINOv2)
        return name
    if name == "ae":
        return AEEncoderBackbone(ae)
    if name == "vit":
        g = torch.random.get_rng_state()
        torch.manual_seed(0)                    # the same random backbone in every run
        net = ViTBackbone()
        torch.random.set_rng_state(g)
        return net
    if name == "dinov2":
        return DINOv2Backbone(load_dinov2(path=dinov2))
    raise UserError(f"--disc-backbone must be ae, vit or dinov2, not {name!r}")


# ----------------------------------------------------------------------------------------------
# Heads: Conv -> ResBlock -> Conv, 2-D on frames, 1-D along time (OSV App. D; StyleGAN-T's heads)

class ResBlockNd(nn.Module):
    def __init__(self, ch, conv):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(8, ch), nn.LeakyReLU(0.2), conv(ch, ch, 3, padding=1),
                                  nn.GroupNorm(8, ch), nn.LeakyReLU(0.2), conv(ch, ch, 3, padding=1))

    def forward(self, x):
        return (x + self.body(x)) / math.sqrt(2)


def head(c_in, width, conv):
    return nn.Sequential(conv(c_in, width, 3, padding=1), ResBlockNd(width, conv), nn.LeakyReLU(0.2),
                         conv(width, 1, 1))


class Discriminator(nn.Module):
    """disc(latent video (B, T, c, h, w)) -> a list of logit tensors, two per backbone level (spatial,
    temporal). input="latent": OSV's upsampler, no decoding; input="decoded": the autoencoder's decoder
    (frozen, but differentiable, so the generator gets its gradient) and full-resolution pixels."""

    def __init__(self, ae, backbone="ae", input="latent", r=None, c_hat=3, width=64, dinov2=""):
        super().__init__()
        if input not in ("latent", "decoded"):
            raise UserError(f"--disc-input must be latent or decoded, not {input!r}")
        if not isinstance(ae, AutoEncoder) and (input == "decoded" or backbone == "ae"):
            raise UserError("--disc-input decoded and --disc-backbone ae need our autoencoder, not SVD's VAE")
        self.input = input
        # r = f / 2: the backbone sees half the video's resolution, as OSV's r = 4 on SVD's f = 8 latents
        self.r = r or max(1, ae.downsample // 2)
        c = ae.cfg.latent_channels
        self.upsample = (nn.Sequential(nn.Conv2d(c, c_hat * self.r ** 2, 3, padding=1), nn.PixelShuffle(self.r))
                         if input == "latent" else None)
        self.ae = ae.requires_grad_(False).eval() if input == "decoded" else None
        self.backbone = make_backbone(backbone, ae, dinov2).requires_grad_(False).eval()
        self.spatial = nn.ModuleList(head(ch, width, nn.Conv2d) for ch in self.backbone.channels)
        self.temporal = nn.ModuleList(head(ch, width, nn.Conv1d) for ch in self.backbone.channels)

    def train(self, mode=True):            # the frozen parts stay in eval mode
        super().train(mode)
        self.backbone.eval()
        if self.ae is not None:
            self.ae.eval()
        return self

    def images(self, z):
        """Latent video (B, T, c, h, w) -> what the backbone sees, (B*T, 3, H', W')."""
        if self.input == "decoded":
            return self.ae.decoder(rearrange(z, "b t c h w -> (b t) c h w") * self.ae.scale_factor)
        return self.upsample(rearrange(z, "b t c h w -> (b t) c h w"))                 # (B*T, 3, r h, r w)

    def forward(self, z):
        B, T = z.shape[:2]
        logits = []
        for f, sh, th in zip(self.backbone(self.images(z)), self.spatial, self.temporal):
            logits.append(sh(f))                                                        # (B*T, 1, h_i, w_i)
            h = f.shape[2]
            ft = rearrange(f, "(b t) c h w -> (b h w) c t", t=T)                        # space into the batch
            logits.append(rearrange(th(ft), "(b h w) 1 t -> b t h w", b=B, h=h))
        return logits


# ----------------------------------------------------------------------------------------------
# The hinge losses on the logits (OSV's Stage 1 and 2 losses; StyleGAN-T, PCM)

def mean0(x):
    """The mean, 0 for no elements (a batch with no judged fake; Stage 1 at batch 1)."""
    return x.mean() if x.numel() else x.sum()


def hinge_d(real_logits, fake_logits):
    """The discriminator's hinge loss, ReLU(1 - disc(real)) + ReLU(1 + disc(fake)), each head's logits
    averaged, then the heads averaged (StyleGAN-T, PCM). No fakes: the real term alone."""
    return torch.stack([F.relu(1 - r.float()).mean() + mean0(F.relu(1 + f.float()))
                        for r, f in zip(real_logits, fake_logits)]).mean()


def hinge_g(fake_logits):
    """OSV's generator term: the clipped hinge ReLU(1 - disc(fake)), averaged like hinge_d. Once disc
    scores a fake above 1 it stops pushing (not the usual -disc(fake))."""
    return torch.stack([F.relu(1 - f.float()).mean() for f in fake_logits]).mean()


def accuracy(logits, real):
    """Share of logits on the right side of 0 (real > 0, fake < 0), over all heads' outputs; nan for
    none (the loop's log averages over the steps that had some)."""
    flat = torch.cat([x.float().flatten() for x in logits])
    return ((flat > 0) if real else (flat < 0)).float().mean()


def split_logits(logits, n_a=1, n=2):
    """Logits of disc(cat([a, b])) for n clips -> (logits of a, logits of b), a the first n_a clips
    (default: half). Every head keeps the batch outermost, with the same number of rows for every clip."""
    return [x[:n_a * len(x) // n] for x in logits], [x[n_a * len(x) // n:] for x in logits]


# ----------------------------------------------------------------------------------------------
# The benchmark of the paper's claim: no decoding is cheaper (OSV: 2.61 s vs 4.29 s, 35.8 vs 73.5 GB)

class SavedBytes:
    """Bytes of the tensors autograd saves for backward: on the CPU, our measure of what a training
    step adds to memory (torch keeps no peak-allocation counter there). On CUDA we use the allocator's
    peak instead."""

    def __init__(self):
        self.bytes = 0

    def pack(self, t):
        self.bytes += t.numel() * t.element_size()
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *a):
        self.ctx.__exit__(*a)


def disc_train_step(disc, real, fake):
    """What one discriminator update costs: disc on real and fake latents, the hinge loss, backward into
    its heads and through it into the generator's output (fake is a leaf that requires grad)."""
    loss = hinge_d(disc(real), disc(fake))
    loss.backward()
    return loss


def gpu_kernel_time(fn, n=10):
    """Seconds of GPU kernel time per call of fn, summed by torch.profiler's CUDA activity: what a step
    costs the GPU itself, without the gaps while the CPU launches kernels, which dominate small steps."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / n / 1e6     # microseconds -> s


def bench(image_size=32, num_frames=8, ae_channels=(16, 32, 64), backbone="ae", batch=4, reps=5, device="cpu",
          seed=0):
    """Time per discriminator step and peak memory, latent vs decoded input, same batch, same run; on
    CUDA also the GPU kernel time per step (None on the CPU). {input: (s, bytes, kernel s or None)}.
    The autoencoder has random weights: the cost does not depend on them."""
    torch.manual_seed(seed)
    ae = AutoEncoder(AEConfig(channels=tuple(ae_channels))).to(device)
    h = image_size // ae.downsample
    real = torch.randn(batch, num_frames, ae.cfg.latent_channels, h, h, device=device)
    fake0 = torch.randn_like(real)
    out = {}
    for inp in ("latent", "decoded"):
        disc = Discriminator(ae, backbone, inp).to(device)
        times = []
        for i in range(reps + 1):                                                       # the first is warm-up
            fake = fake0.clone().requires_grad_(True)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            with nullcontext() if device == "cuda" else SavedBytes() as saved:   # CUDA: no per-tensor hooks
                disc_train_step(disc, real, fake)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            disc.zero_grad(set_to_none=True)
        mem = torch.cuda.max_memory_allocated() - base if device == "cuda" else saved.bytes

        def step():
            disc_train_step(disc, real, fake0.clone().requires_grad_(True))
            disc.zero_grad(set_to_none=True)
        kernel = gpu_kernel_time(step) if device == "cuda" else None
        out[inp] = (sorted(times[1:])[len(times[1:]) // 2], mem, kernel)                # median time
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Latent vs decoded discriminator input: step time and memory.")
    p.add_argument("--bench", action="store_true", required=True, help="run the benchmark")
    p.add_argument("--size", type=int, default=32, help="frame size in pixels (default: %(default)s, the tiny preset)")
    p.add_argument("--frames", type=int, default=8, help="frames per clip (default: %(default)s)")
    p.add_argument("--ae-channels", default="16,32,64", help="autoencoder widths (default: %(default)s, the tiny "
                   "preset; the small preset: 32,64,128)")
    p.add_argument("--backbone", default="ae", choices=["ae", "vit", "dinov2"], help="default: %(default)s")
    p.add_argument("--batch", type=int, default=4, help="clips per batch (default: %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="timed steps after one warm-up (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    channels = tuple(int(c) for c in a.ae_channels.split(","))
    res = bench(a.size, a.frames, channels, a.backbone, a.batch, a.reps, a.device)
    what = "peak CUDA memory above the inputs" if a.device == "cuda" else "activations saved for backward"
    print(f"discriminator step, {a.size}x{a.size}x{a.frames}, autoencoder {a.ae_channels}, backbone {a.backbone}, "
          f"batch {a.batch}, {a.device}:")
    for k, (t, m, g) in res.items():
        gpu = f", GPU kernel time {g * 1000:.1f} ms" if g is not None else ""
        print(f"  {k:8s} input: {t * 1000:8.1f} ms per step{gpu}, {m / 2 ** 20:8.1f} MiB {what}")
    (tl, ml, gl), (td, md, gd) = res["latent"], res["decoded"]
    gpu = f", GPU kernel time {gl / gd:.2f}" if gl is not None else ""
    print(f"latent / decoded: time {tl / td:.2f}{gpu}, memory {ml / md:.2f} (OSV: 2.61 / 4.29 s = 0.61, 35.8 / 73.5 GB = 0.49)")
