"""The latent space: a small KL-regularised convolutional autoencoder in the role of SVD's VAE.

OSV (like SVD) never diffuses pixels: every network works on 4-channel latents of each frame. The
paper takes SVD's pretrained VAE as given; we train a small one (`python train.py --stage ae`) with
the recipe of Stable Diffusion's first stage, minus its perceptual and GAN terms: a reconstruction
loss plus a KL term with a tiny weight, so the latent space is smooth but the reconstructions sharp.

Read first: `AutoEncoder.encode_video` / `decode_video` (what every later stage calls), `condition` (how
the first frame conditions the video model) and `ae_loss`.
Frames are encoded independently, folded into the batch: `(B, T, C, H, W) -> (B*T, C, H, W)`.
Latents are divided by `scale_factor`, measured on data after training so that they have about unit
standard deviation (SD writes its 0.18215 as a multiplier, ours divides).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
from einops import rearrange


@dataclass
class AEConfig:
    channels: tuple = (32, 64, 64)   # width at each resolution; len - 1 downsamplings (3 -> 1/4)
    latent_channels: int = 4          # SVD's VAE: 4
    num_res_blocks: int = 1


def norm(c):
    return nn.GroupNorm(min(32, c // 4), c, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus a (1x1-projected) skip: SD's VAE block without dropout."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.body = nn.Sequential(norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
                                  norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.body(x)


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch = cfg.channels
        layers = [nn.Conv2d(3, ch[0], 3, padding=1)]
        for i, c in enumerate(ch):
            c_prev = ch[max(i - 1, 0)]
            layers += [ResBlock(c_prev if j == 0 else c, c) for j in range(cfg.num_res_blocks)]
            if i < len(ch) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))       # halve H and W
        layers += [ResBlock(ch[-1], ch[-1]), norm(ch[-1]), nn.SiLU(),
                   nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)]  # mean and log-variance
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch = cfg.channels[::-1]
        layers = [nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1), ResBlock(ch[0], ch[0])]
        for i, c in enumerate(ch):
            c_prev = ch[max(i - 1, 0)]
            layers += [ResBlock(c_prev if j == 0 else c, c) for j in range(cfg.num_res_blocks)]
            if i < len(ch) - 1:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        layers += [norm(ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


class AutoEncoder(nn.Module):
    def __init__(self, cfg=AEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.downsample = 2 ** (len(cfg.channels) - 1)
        # measured on data after training (see measure_scale_factor); 1 until then
        self.register_buffer("scale_factor", torch.ones(()))

    def posterior(self, x):
        """Frames (N, 3, H, W) -> mean and log-variance of the diagonal Gaussian q(z | x)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)             # SD's DiagonalGaussianDistribution clamp

    def forward(self, x):
        """Training pass on frames: sample z ~ q(z | x), decode. Returns (recon, mean, logvar)."""
        mean, logvar = self.posterior(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        return self.decoder(z), mean, logvar

    @torch.no_grad()
    def encode_video(self, video, chunk=64):
        """(B, T, 3, H, W) pixels -> (B, T, c, H/f, W/f) scaled latents, `chunk` frames at a time.
        Deterministic: the posterior mean (SVD encodes its conditioning frame with the mode too)."""
        B = video.shape[0]
        frames = rearrange(video, "b t c h w -> (b t) c h w")
        z = torch.cat([self.posterior(f)[0] for f in frames.split(chunk)])            # (B*T, c, h, w)
        return rearrange(z / self.scale_factor, "(b t) c h w -> b t c h w", b=B)

    @torch.no_grad()
    def condition(self, frame, fps, motion, cond_aug, noise=None):
        """SVD's conditioning from first frames (B, 3, H, W) in pixels, with our conventions: the frame
        plus cond_aug Gaussian noise in pixel space, encoded ("concat"); the clean frame, encoded
        ("image", for the denoiser's learned embedding); and the micro-conditions [fps, motion,
        cond_aug]. Latents are scaled like every latent here (SVD leaves its concat latent unscaled;
        with unit-std latents we keep one convention), fps is passed as is (SVD: fps - 1). svd.py holds
        the real SVD's own conventions. noise: the augmentation's unit noise (default: drawn)."""
        noise = torch.randn_like(frame) if noise is None else noise
        z_aug = self.encode_video((frame + cond_aug.view(-1, 1, 1, 1) * noise)[:, None])[:, 0]
        z = self.encode_video(frame[:, None])[:, 0]
        micro = torch.stack([fps.float(), motion.float(), cond_aug.float()], 1)
        return {"concat": z_aug, "image": z, "micro": micro}

    @torch.no_grad()
    def decode_video(self, z, chunk=64):
        """(B, T, c, h, w) scaled latents -> (B, T, 3, H, W) pixels, `chunk` frames at a time (SVD
        decodes 14 frames at a time for the same reason: memory)."""
        B = z.shape[0]
        frames = rearrange(z * self.scale_factor, "b t c h w -> (b t) c h w")
        x = torch.cat([self.decoder(f) for f in frames.split(chunk)])                  # (B*T, 3, H, W)
        return rearrange(x, "(b t) c h w -> b t c h w", b=B)


def ae_loss(model, video, kl_weight):
    """SD first-stage loss without LPIPS and GAN: per frame, reconstruction summed over pixels plus
    kl_weight x KL(q(z|x) || N(0, I)) summed over latent elements (SD's kl_weight: 1e-6). The
    reconstruction term is L1 + L2: L1 keeps edges sharp, L2 is what PSNR measures (our choice).
    Returned as means over frames and divided by the pixel count, so the numbers read as per-pixel."""
    x = rearrange(video, "b t c h w -> (b t) c h w")
    recon, mean, logvar = model(x)
    n_pix = x[0].numel()
    l1 = (recon - x).abs().mean()
    l2 = (recon - x).pow(2).mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum((1, 2, 3)).mean() / n_pix
    return {"loss": l1 + l2 + kl_weight * kl, "l1": l1, "l2": l2, "kl": kl}


@torch.no_grad()
def measure_scale_factor(model, videos):
    """Std of the unscaled latents of `videos` (B, T, 3, H, W): the divisor that gives unit std."""
    model.scale_factor.fill_(1.0)
    z = model.encode_video(videos)
    model.scale_factor.fill_(z.float().std())
    return model.scale_factor.item()


@torch.no_grad()
def psnr(model, videos):
    """Reconstruction PSNR in dB on pixels in [0, 1], from the mean squared error over all frames."""
    recon = model.decode_video(model.encode_video(videos)).clamp(-1, 1)
    mse = ((recon - videos) / 2).pow(2).mean()
    return (10 * torch.log10(1 / mse)).item()
