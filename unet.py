"""The video UNet of Stable Video Diffusion, at any size, and its EDM preconditioning.

OSV distils SVD's image-to-video UNet (Blattmann et al. 2023, `sgm/modules/diffusionmodules/
video_model.py` in Stability-AI/generative-models). We cannot download SVD, so this file rebuilds its
architecture from the published structure (docs/paper.md, "The base model") and trains small ones
(`python train.py --stage teacher`). `python unet.py --preset svd` builds
the full-size network on the meta device and counts its parameters against the reference
1,524,623,082: the check that this is SVD's architecture and not merely SVD-like.

Read first: `VideoResBlock` and `SpatialVideoTransformer` (how a 2-D image UNet becomes a video UNet:
frames folded into the batch for spatial layers, space folded into the batch for temporal layers,
the two blended by a learned alpha), then `Denoiser` (c_skip, c_out, c_in, c_noise) and `edm_loss`.
Shapes: videos are (B, T, C, H, W) outside; inside the UNet frames are folded, (B*T, C, H, W).

Beside the network live what every training stage shares about it: the training batch's latents and
conditioning (`latents_and_condition`), the students' consistency parametrisation (`scalings(...,
sigma_min)`; their LoRA on the shared base is lora.py) and the weight `EMA`. The published SVD's
weights load into this network in svd.py.
"""
import argparse
import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from torch.utils.checkpoint import checkpoint

from data import UserError


@dataclass
class UNetConfig:
    in_channels: int = 8              # 4 noisy-latent channels + 4 of the conditioning frame's latent
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)   # SVD: attention_resolutions [4, 2, 1] = the first three levels
    head_channels: int = 64
    transformer_depth: int = 1
    context_dim: int = 1024           # SVD: the OpenCLIP ViT-H image embedding
    micro_dim: int = 256              # each micro-condition (fps, motion, cond_aug): 3 x 256 = SVD's 768
    dropout: float = 0.0
    checkpoint: bool = False          # gradient checkpointing per block (SVD trains with it)
    norm_eps: float = 1e-5            # the ResBlocks' GroupNorm epsilon: the original code's (sgm's GroupNorm32)


PRESETS = {
    # our sizes: minutes on a CPU (tiny), an hour on a GPU (small)
    "tiny": UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                       head_channels=32, context_dim=128, micro_dim=64),
    "small": UNetConfig(model_channels=128, channel_mult=(1, 2, 2), num_res_blocks=2,
                        attention_levels=(0, 1, 2), head_channels=64, context_dim=256, micro_dim=128),
    "svd": UNetConfig(),              # configs/inference/svd.yaml
}
SVD_REFERENCE_PARAMS = 1_524_623_082


def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal embedding of a float (noise level, frame index, fps...), cos half first as in sgm.
    Computed in float32 as sgm and diffusers do; callers cast it to their weights' dtype."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], -1)                                     # (N, dim)


def norm(c, eps=1e-5):
    return nn.GroupNorm(32 if c % 32 == 0 else 8, c, eps=eps)


def zero(module):
    """Zero-initialised, as SVD's output convolutions and projections: a new block starts as identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# ----------------------------------------------------------------------------------------------
# Residual blocks

class ResBlock(nn.Module):
    """SD's ResBlock: GroupNorm -> SiLU -> conv, plus the time embedding (added, no scale-shift),
    GroupNorm -> SiLU -> dropout -> zero conv, plus a skip. `conv` is 2-D (3x3) for the spatial block
    and 3-D with a (3, 1, 1) kernel for the temporal one, which therefore mixes only the time axis."""

    def __init__(self, c_in, c_out, emb_dim, dropout=0.0, temporal=False, eps=1e-5):
        super().__init__()
        conv = (lambda a, b: nn.Conv3d(a, b, (3, 1, 1), padding=(1, 0, 0))) if temporal else \
            (lambda a, b: nn.Conv2d(a, b, 3, padding=1))
        self.temporal = temporal
        self.in_layers = nn.Sequential(norm(c_in, eps), nn.SiLU(), conv(c_in, c_out))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))
        self.out_layers = nn.Sequential(norm(c_out, eps), nn.SiLU(), nn.Dropout(dropout), zero(conv(c_out, c_out)))
        self.skip = nn.Identity() if c_in == c_out else (nn.Conv3d if temporal else nn.Conv2d)(c_in, c_out, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        e = self.emb_layers(emb)                                                       # (N, C) or (B, T, C)
        # temporal: each frame gets its own embedding row (sgm's exchange_temb_dims)
        h = h + (rearrange(e, "b t c -> b c t 1 1") if self.temporal else e[..., None, None])
        return self.skip(x) + self.out_layers(h)


class AlphaBlender(nn.Module):
    """out = alpha * spatial + (1 - alpha) * temporal, alpha = sigmoid(mix_factor), learned, init 0.5
    (sgm's "learned_with_images"). image_only forces alpha = 1: the video layers switch off. A student
    trains a `delta` on the base's mix_factor (`to_student`), so the base's own value stays shared."""

    def __init__(self, merge_factor=0.5):
        super().__init__()
        self.mix_factor = nn.Parameter(torch.tensor(merge_factor))
        self.register_parameter("delta", None)
        self.off = False

    def forward(self, x_spatial, x_temporal, image_only=False):
        mix = self.mix_factor if self.delta is None or self.off else self.mix_factor + self.delta
        alpha = torch.ones_like(mix) if image_only else torch.sigmoid(mix)
        return alpha * x_spatial + (1 - alpha) * x_temporal


class VideoResBlock(nn.Module):
    """SVD's VideoResBlock: a spatial ResBlock on every frame, then a temporal ResBlock on its output,
    blended. The temporal path is serial: the blend is between "spatial" and "spatial then temporal"."""

    def __init__(self, c_in, c_out, emb_dim, dropout=0.0, eps=1e-5):
        super().__init__()
        self.spatial = ResBlock(c_in, c_out, emb_dim, dropout, eps=eps)
        self.time_stack = ResBlock(c_out, c_out, emb_dim, dropout, temporal=True, eps=eps)
        self.time_mixer = AlphaBlender()

    def forward(self, x, emb, T, image_only=False):
        x = self.spatial(x, emb)                                                       # (B*T, C, H, W)
        x_t = rearrange(x, "(b t) c h w -> b c t h w", t=T)
        x_t = self.time_stack(x_t, rearrange(emb, "(b t) c -> b t c", t=T))
        x_t = rearrange(x_t, "b c t h w -> (b t) c h w")
        return self.time_mixer(x, x_t, image_only)


# ----------------------------------------------------------------------------------------------
# Attention

class Attention(nn.Module):
    """Multi-head attention (self when context is None, else cross), SDPA kernels. q, k, v carry no
    bias and the output projection does, as in SD's CrossAttention."""

    def __init__(self, dim, heads, dim_head, context_dim=None):
        super().__init__()
        inner, context_dim = heads * dim_head, context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = (rearrange(f(a), "n s (h d) -> n h s d", h=self.heads)
                   for f, a in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        out = F.scaled_dot_product_attention(q, k, v)                                 # (N, heads, S, d)
        return self.to_out(rearrange(out, "n h s d -> n s (h d)"))


class FeedForward(nn.Module):
    """GEGLU feed-forward, width x4 (SD's FeedForward with glu=True)."""

    def __init__(self, dim, dim_out=None, mult=4):
        super().__init__()
        inner = dim * mult
        self.proj = nn.Linear(dim, 2 * inner)
        self.out = nn.Linear(inner, dim_out or dim)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate))


class BasicTransformerBlock(nn.Module):
    """Spatial: self-attention over the H*W tokens of a frame, cross-attention to the image embedding,
    feed-forward; pre-LayerNorm and residuals everywhere."""

    def __init__(self, dim, heads, dim_head, context_dim):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads, dim_head)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, heads, dim_head, context_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class VideoTransformerBlock(nn.Module):
    """Temporal: each spatial location attends across its T frames. An extra feed-forward first
    (ff_in), temporal self-attention, cross-attention to the image embedding, feed-forward."""

    def __init__(self, dim, heads, dim_head, context_dim):
        super().__init__()
        self.norm_in, self.ff_in = nn.LayerNorm(dim), FeedForward(dim)
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads, dim_head)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, heads, dim_head, context_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x, context):
        x = x + self.ff_in(self.norm_in(x))
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialVideoTransformer(nn.Module):
    """SVD's SpatialVideoTransformer: a spatial transformer on every frame, then a temporal one on
    (its output + a frame-position embedding), blended by a learned alpha, projected, plus the input."""

    def __init__(self, ch, heads, dim_head, depth, context_dim):
        super().__init__()
        self.norm = nn.GroupNorm(32 if ch % 32 == 0 else 8, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, heads * dim_head)
        inner = heads * dim_head
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth))
        self.time_stack = nn.ModuleList(
            VideoTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth))
        self.time_pos_embed = nn.Sequential(nn.Linear(ch, 4 * ch), nn.SiLU(), nn.Linear(4 * ch, ch))
        self.time_mixer = AlphaBlender()
        self.proj_out = zero(nn.Linear(inner, ch))

    def forward(self, x, context, T, image_only=False):
        BT, C, H, W = x.shape
        x_in = x
        x = rearrange(self.norm(x), "n c h w -> n (h w) c")
        x = self.proj_in(x)                                                            # (B*T, H*W, C)
        spatial_ctx = repeat(context, "b s d -> (b t) s d", t=T)                       # the same for every frame
        temporal_ctx = repeat(context, "b s d -> (b hw) s d", hw=H * W)                # and every location
        pos = timestep_embedding(torch.arange(T, device=x.device), C).to(self.time_pos_embed[0].weight.dtype)
        frame_emb = self.time_pos_embed(pos)                                          # (T, C)
        for block, time_block in zip(self.transformer_blocks, self.time_stack):
            x = block(x, spatial_ctx)
            x_mix = x + repeat(frame_emb, "t c -> (b t) 1 c", b=BT // T).to(x.dtype)
            x_mix = rearrange(x_mix, "(b t) s c -> (b s) t c", t=T)                    # attend across time
            x_mix = time_block(x_mix, temporal_ctx)
            x_mix = rearrange(x_mix, "(b s) t c -> (b t) s c", s=H * W)
            x = self.time_mixer(x, x_mix, image_only)
        x = rearrange(self.proj_out(x), "n (h w) c -> n c h w", h=H)
        return x + x_in


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)             # space only: time is never downsampled

    def forward(self, x, *_):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to the next skip's size (twice the input's, unless a size was odd
    on the way down, as diffusers does), then a conv."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


# ----------------------------------------------------------------------------------------------
# The UNet

class VideoUNet(nn.Module):
    """SVD's VideoUNet. forward(x (B, T, in_channels, h, w), c_noise (B,), context (B, S, context_dim),
    micro (B, 3) = [fps, motion, cond_aug]) -> (B, T, out_channels, h, w)."""

    def __init__(self, cfg=UNetConfig()):
        super().__init__()
        self.cfg = cfg
        mc, E = cfg.model_channels, 4 * cfg.model_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, E), nn.SiLU(), nn.Linear(E, E))
        self.label_emb = nn.Sequential(nn.Linear(3 * cfg.micro_dim, E), nn.SiLU(), nn.Linear(E, E))

        def transformer(ch):            # SVD: heads = ch / 64, 64 channels each
            heads = max(1, ch // cfg.head_channels)
            return SpatialVideoTransformer(ch, heads, ch // heads, cfg.transformer_depth, cfg.context_dim)

        self.conv_in = nn.Conv2d(cfg.in_channels, mc, 3, padding=1)
        self.input_blocks, chans, ch = nn.ModuleList(), [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [VideoResBlock(ch, mult * mc, E, cfg.dropout, cfg.norm_eps)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(transformer(ch))
                self.input_blocks.append(nn.ModuleList(layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(nn.ModuleList([Downsample(ch)]))
                chans.append(ch)
        self.middle_block = nn.ModuleList([VideoResBlock(ch, ch, E, cfg.dropout, cfg.norm_eps), transformer(ch),
                                           VideoResBlock(ch, ch, E, cfg.dropout, cfg.norm_eps)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [VideoResBlock(ch + chans.pop(), mult * mc, E, cfg.dropout, cfg.norm_eps)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(transformer(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(nn.ModuleList(layers))
        self.out = nn.Sequential(norm(ch, cfg.norm_eps), nn.SiLU(), zero(nn.Conv2d(mc, cfg.out_channels, 3, padding=1)))

    @property
    def dtype(self):
        """The weights' dtype (of a layer LoRA never wraps)."""
        return self.time_embed[0].weight.dtype

    def _run(self, layers, x, emb, context, T, image_only, size=None):
        for layer in layers:
            if isinstance(layer, VideoResBlock):
                args = (x, emb, T, image_only)
            elif isinstance(layer, SpatialVideoTransformer):
                args = (x, context, T, image_only)
            else:
                args = (x, size)                   # Downsample ignores the size, Upsample goes to it
            if self.cfg.checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        return x

    def forward(self, x, c_noise, context, micro, image_only=False):
        B, T = x.shape[:2]
        mc, md, dt = self.cfg.model_channels, self.cfg.micro_dim, self.dtype
        micro_emb = torch.cat([timestep_embedding(micro[:, i], md) for i in range(3)], 1).to(dt)   # (B, 3*md)
        emb = self.time_embed(timestep_embedding(c_noise, mc).to(dt)) + self.label_emb(micro_emb)  # (B, E)
        emb = repeat(emb, "b e -> (b t) e", t=T).to(x.dtype)
        h = self.conv_in(rearrange(x, "b t c h w -> (b t) c h w"))                    # (B*T, mc, h, w)
        skips = [h]
        for layers in self.input_blocks:
            h = self._run(layers, h, emb, context, T, image_only)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context, T, image_only)
        for layers in self.output_blocks:
            h = torch.cat([h, skips.pop()], 1)
            h = self._run(layers, h, emb, context, T, image_only, skips[-1].shape[-2:] if skips else None)
        return rearrange(self.out(h), "(b t) c h w -> b t c h w", t=T)


class ImageEmbedder(nn.Module):
    """Our stand-in for SVD's CLIP image embedding: a small conv net over the clean conditioning
    frame's latent -> one context token (B, 1, context_dim), trained with the UNet."""

    def __init__(self, latent_channels, context_dim, width=64):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(latent_channels, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
                                 nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU())
        self.proj = nn.Linear(2 * width, context_dim)

    def forward(self, z):
        return self.proj(self.net(z).mean((2, 3)))[:, None]                            # (B, 1, context_dim)


# ----------------------------------------------------------------------------------------------
# Preconditioning and the denoising loss

def scalings(sigma, sigma_data, sigma_min=None):
    """c_skip, c_out, c_in, c_noise of SVD's denoiser (`VScalingWithEDMcNoise`): EDM's formulas
    (Karras et al. 2022, Table 1) with sigma_data = 1 and a negative c_out, i.e. v-prediction.
    Why this form and not EDM's sigma_data = 0.5: our latents are divided by a scale_factor measured
    to give unit std, so sigma_data = 1 is the value that makes the network's input and training
    target unit-variance; the sign is SVD's, so that the network's output means what SVD's means.

    With sigma_min given: the consistency parametrisation f_theta of OSV's students (Stages 1 and 2).
    OSV does not give c_skip, c_out; we take the consistency models' boundary form (Song et al. 2023,
    `get_scalings_for_boundary_condition`: sigma - sigma_min in place of sigma in c_skip and c_out's
    numerator), with SVD's sigma_data = 1 and sign. Then f(x, sigma_min) = x exactly, and above
    sigma_min f differs from the teacher's denoiser by O(sigma_min): the student starts as the teacher."""
    s = sigma if sigma_min is None else sigma - sigma_min
    c_skip = sigma_data ** 2 / (s ** 2 + sigma_data ** 2)
    c_out = -s * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_noise = 0.25 * sigma.log()
    return c_skip, c_out, c_in, c_noise


class Denoiser(nn.Module):
    """D(x, sigma, cond) -> x0_hat = c_skip x + c_out F(c_in x; c_noise, cond): the one interface every
    sampler and loss uses. cond: "concat" (B, c, h, w) latent of the noise-augmented first frame,
    put on every frame's channels; "image": what the context comes from, the clean first frame's latent
    (B, c, h, w) that `embedder` embeds, or, without an embedder, the context itself (SVD's CLIP image
    embedding, (B, 1, d)); "micro" (B, 3) the three micro-conditions. keep (B,): 1 conditional,
    0 unconditional (both image conditionings zeroed, as SVD's CFG and conditioning dropout do)."""

    def __init__(self, unet, embedder=None, sigma_data=1.0):
        super().__init__()
        self.unet, self.embedder = unet, embedder
        self.sigma_data = sigma_data
        self.sigma_min = None          # set to the grid's lowest level: a consistency function f_theta

    @classmethod
    def new(cls, unet_cfg, latent_channels=4):
        """A fresh denoiser: a random VideoUNet and our learned image embedding (the offline teacher)."""
        return cls(VideoUNet(unet_cfg), ImageEmbedder(latent_channels, unet_cfg.context_dim))

    def forward(self, x, sigma, cond, keep=None, image_only=False):
        B, T = x.shape[:2]
        dt = torch.promote_types(x.dtype, torch.float32)                 # scalings and output: fp32 or finer
        x, sigma = x.to(dt), sigma.to(dt).reshape(B, 1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = scalings(sigma, self.sigma_data, self.sigma_min)
        keep = torch.ones(B, device=x.device) if keep is None else keep.float()
        concat = cond["concat"] * keep.view(B, 1, 1, 1)
        context = cond["image"] if self.embedder is None else self.embedder(cond["image"].to(self.unet.dtype))
        context = (context * keep.view(B, 1, 1)).to(self.unet.dtype)
        net_in = torch.cat([c_in * x, repeat(concat, "b c h w -> b t c h w", t=T)], 2)  # (B, T, 2c, h, w)
        F_x = self.unet(net_in.to(self.unet.dtype), c_noise.flatten(), context, cond["micro"], image_only)
        return c_skip * x + c_out * F_x.to(dt)


def edm_loss(D, x0, cond, P_mean, P_std, keep=None):
    """EDM's denoising loss (Karras et al. 2022, Eq. 8 and `training/loss.py`): ln sigma ~ N(P_mean,
    P_std), weight lambda(sigma) = 1 / c_out^2 = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, so
    that the loss is the network's unit-variance regression error. Per-element mean."""
    B = x0.shape[0]
    sigma = (torch.randn(B, device=x0.device) * P_std + P_mean).exp()
    noise = torch.randn_like(x0) * sigma.view(B, 1, 1, 1, 1)
    x0_hat = D(x0 + noise, sigma, cond, keep)
    sd = getattr(D, "module", D).sigma_data             # D may be wrapped by DDP
    weight = ((sigma ** 2 + sd ** 2) / (sigma * sd) ** 2).view(B, 1, 1, 1, 1)
    return (weight * (x0_hat - x0.float()) ** 2).mean()


def latents_and_condition(ae, batch):
    """A training batch -> its latents x0 (B, T, c, h, w) and the conditioning from its first frames
    (`ae.condition`: ours, or SVD's conventions), with SVD's noise augmentation of the conditioning
    frame, cond_aug ~ LogNormal(-3, 0.5) (AnimateLCM). Every diffusion stage (teacher, 1, 2) trains on this.
    A batch of the latent cache (latents.py) holds both already: x0 and the conditioning's parts."""
    if "x0" in batch:
        return batch["x0"].float(), {k: batch[k] for k in ("concat", "image", "micro")}
    video = batch["video"]                                                         # (B, T, 3, H, W)
    x0 = ae.encode_video(video).float()
    cond_aug = (torch.randn(len(video), device=video.device) * 0.5 - 3.0).exp()
    return x0, ae.condition(video[:, 0], batch["fps"], batch["motion"], cond_aug)


# ----------------------------------------------------------------------------------------------
# The weight average

class EMA:
    """Exponential moving average of a network's trainable parameters, kept beside it (`shadow`) and
    swapped in for its forward passes (`swapped`); a LoRA student's average is its adapters' only, over
    the one shared base. With warmup the decay ramps up as (1 + step) / (10 + step), so early averages
    are not dominated by the initialisation; without it, it is fixed (Stage 2's target network theta-)."""

    def __init__(self, model, decay, warmup=True):
        self.model, self.decay, self.warmup = model, decay, warmup
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self._live()]

    def _live(self):
        params = dict(self.model.named_parameters())
        return [params[n] for n in self.names]

    @torch.no_grad()
    def update(self, step):
        d = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
        torch._foreach_lerp_(self.shadow, self._live(), 1 - d)

    @contextmanager
    def swapped(self):
        """The model with the averaged weights in place of its own, in eval mode, for forward passes
        without gradient; its own weights and mode come back after. Copies, not pointer swaps: a pending
        backward through these weights fails loudly instead of computing a wrong gradient."""
        live, mode = self._live(), self.model.training
        own = [p.detach().clone() for p in live]
        with torch.no_grad():
            torch._foreach_copy_(live, self.shadow)
        self.model.eval()
        try:
            yield self.model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, own)
            self.model.train(mode)

    def state_dict(self):
        """The averaged parameters and the model's buffers: for a network trained whole, its full state."""
        return {**dict(zip(self.names, self.shadow)), **dict(self.model.named_buffers())}

    @torch.no_grad()
    def load_state_dict(self, state):
        for n, s in zip(self.names, self.shadow):
            s.copy_(state[n])


def setup_teacher(cfg, latent_channels, ae, device):
    """`python train.py --stage teacher`: a fresh video UNet of the preset `cfg.unet`, trained with EDM's
    denoising loss and conditioning dropout (so that CFG works); its EMA samples. Returns the parts
    train.py's loop assembles."""
    if cfg.unet not in PRESETS:
        raise UserError(f"--unet must be one of {list(PRESETS)}")
    ucfg = dataclasses.replace(PRESETS[cfg.unet], checkpoint=cfg.grad_checkpoint,
                               model_channels=cfg.unet_channels or PRESETS[cfg.unet].model_channels)
    torch.manual_seed(cfg.seed)
    D = Denoiser.new(ucfg, latent_channels).to(device)

    def step(nets, batch, update):
        x0, cond = latents_and_condition(ae, batch)
        keep = (torch.rand(len(x0), device=x0.device) >= cfg.cond_drop).float()    # conditioning dropout
        loss = edm_loss(nets["denoiser"], x0, cond, cfg.p_mean, cfg.p_std, keep)
        update(loss, "denoiser")
        return {"loss": loss}

    return {"models": {"denoiser": D}, "opts": {"denoiser": torch.optim.Adam(D.parameters(), lr=cfg.teacher_lr)},
            "ema": {"denoiser": EMA(D, cfg.ema_decay)}, "step": step,
            "extra": {"unet_config": dataclasses.asdict(ucfg)}}


def count_parameters(preset):
    with torch.device("meta"):
        unet = VideoUNet(PRESETS[preset])
    return sum(p.numel() for p in unet.parameters())


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Count the parameters of a VideoUNet preset (built on the meta device).")
    p.add_argument("--preset", default="svd", choices=list(PRESETS), help="UNet size (default: %(default)s)")
    preset = p.parse_args().preset
    n = count_parameters(preset)
    print(f"VideoUNet {preset}: {n:,} parameters")
    if preset == "svd":
        print(f"reference SVD UNet: {SVD_REFERENCE_PARAMS:,}; ratio {n / SVD_REFERENCE_PARAMS:.6f}")
