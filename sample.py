"""Sampling: noise levels, PF-ODE solvers with classifier-free guidance, and the image -> video CLI.

Every sampler takes a denoiser D(x, sigma) -> x0_hat (k-diffusion's interface; `guided` and
`functools.partial` bind the conditioning) and a decreasing list of noise levels ending at 0, and
returns the sample and the number of denoiser calls. NFE = calls x network passes per call (2 with
CFG: one conditional, one unconditional, batched together).

Read first: `sample_heun` (EDM Algorithm 2, line by line) and `guided` (SVD's per-frame CFG ramp).

    python sample.py --ckpt runs/default/teacher.pt --index 3 --steps 25 --cfg 2.5 --out video.mp4
    python sample.py --ckpt runs/default/teacher.pt --image frame.png --num 4 --out grid.gif
"""
import argparse
import os
import sys
import time

import torch

from autoencoder import AEConfig, AutoEncoder
from data import SyntheticVideos, UserError, load_image, write_video
from unet import Denoiser, UNetConfig, condition


def karras_sigmas(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """n noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho), then 0
    (EDM Eq. 5; EDM's defaults sigma_min 0.002, sigma_max 80, rho 7)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


def to_d(x, sigma, x0_hat):
    """The PF-ODE's derivative dx/dsigma = (x - D(x; sigma)) / sigma (EDM Eq. 4 with sigma(t) = t)."""
    return (x - x0_hat) / sigma


@torch.no_grad()
def sample_euler(D, x, sigmas):
    """First-order Euler steps of the PF-ODE (SVD's default sampler, EulerEDMSampler with no churn)."""
    for i in range(len(sigmas) - 1):
        d = to_d(x, sigmas[i], D(x, sigmas[i]))
        x = x + (sigmas[i + 1] - sigmas[i]) * d
    return x, len(sigmas) - 1


@torch.no_grad()
def sample_heun(D, x, sigmas):
    """EDM Algorithm 2 without churn: an Euler step, then Heun's correction with the derivative at the
    new point; no correction on the final step to sigma = 0, where the derivative is undefined.
    n steps cost 2n - 1 denoiser calls."""
    calls = 0
    for i in range(len(sigmas) - 1):
        d = to_d(x, sigmas[i], D(x, sigmas[i]))
        x_next = x + (sigmas[i + 1] - sigmas[i]) * d                                 # Euler step
        calls += 1
        if sigmas[i + 1] > 0:
            d_next = to_d(x_next, sigmas[i + 1], D(x_next, sigmas[i + 1]))
            x_next = x + (sigmas[i + 1] - sigmas[i]) * (d + d_next) / 2             # trapezoidal rule
            calls += 1
        x = x_next
    return x, calls


SAMPLERS = {"euler": sample_euler, "heun": sample_heun}


def cfg_scale(scale_min, scale_max, num_frames):
    """SVD's LinearPredictionGuider: the guidance scale ramps linearly over the frames, from min on the
    first frame (which copies the conditioning image anyway) to max on the last. Shape (1, T, 1, 1, 1)."""
    return torch.linspace(scale_min, scale_max, num_frames).view(1, num_frames, 1, 1, 1)


def guided(denoiser, cond, scale=1.0):
    """Bind the conditioning and classifier-free guidance: D(x, sigma) = D_u + w (D_c - D_u), with the
    unconditional branch zeroing both image conditionings. w is a number or a per-frame ramp
    (`cfg_scale`). Returns the bound denoiser and its network passes per call."""
    if not torch.is_tensor(scale) and scale == 1.0:        # w = 1 is the conditional prediction: 1 pass
        return (lambda x, sigma: denoiser(x, sigma.expand(len(x)).to(x.device), cond)), 1
    both = {k: torch.cat([v, v]) for k, v in cond.items()}

    def D(x, sigma):
        B = len(x)
        keep = torch.cat([torch.ones(B), torch.zeros(B)]).to(x.device)
        x0_c, x0_u = denoiser(torch.cat([x, x]), sigma.expand(2 * B).to(x.device), both, keep).chunk(2)
        w = scale.to(x.device) if torch.is_tensor(scale) else scale
        return x0_u + w * (x0_c - x0_u)
    return D, 2


@torch.no_grad()
def generate(denoiser, cond, num_frames, steps, scale=1.0, sampler="heun", sigma_min=0.002,
             sigma_max=80.0, seed=0):
    """Latent videos (B, T, c, h, w) from the conditioning, and the NFE per video."""
    B, c, h, w = cond["concat"].shape
    dev = cond["concat"].device
    g = torch.Generator(device="cpu").manual_seed(seed)
    sigmas = karras_sigmas(steps, sigma_min, sigma_max).to(dev, torch.float32)
    x = (torch.randn(B, num_frames, c, h, w, generator=g) * sigmas[0].item()).to(dev)   # EDM: x_0 = sigma_max z
    D, passes = guided(denoiser, cond, scale)
    x, calls = SAMPLERS[sampler](D, x, sigmas)
    return x, calls * passes


# ----------------------------------------------------------------------------------------------
# Loading a trained model and the CLI

def load_model(path, device="cpu"):
    """A finished checkpoint of a video model (teacher, stage 1, stage 2) -> (denoiser with EMA weights,
    autoencoder, config dict, stage name). One-line errors for anything else."""
    from train import load_checkpoint          # here, not at the top: train.py imports this file
    ckpt = load_checkpoint(path, ("teacher", "1", "2"))
    D = Denoiser(UNetConfig(**ckpt["unet_config"]), ckpt["ae_config"]["latent_channels"])
    D.load_state_dict(ckpt["ema"]["denoiser"])
    ae = AutoEncoder(AEConfig(**ckpt["ae_config"]))
    ae.load_state_dict(ckpt["ae_state"])
    return D.to(device).eval(), ae.to(device).eval(), ckpt["config"], ckpt["stage"]


def main(argv=None):
    p = argparse.ArgumentParser(description="Image -> video with a trained model.")
    p.add_argument("--ckpt", default="runs/default/teacher.pt")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", help="conditioning frame (PNG or JPEG)")
    src.add_argument("--index", type=int, help="take the conditioning frame from synthetic test clip N")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--sampler", choices=list(SAMPLERS), default="heun")
    p.add_argument("--cfg", type=float, default=2.5, help="guidance scale on the last frame (1 = none)")
    p.add_argument("--cfg-min", type=float, default=1.0, help="guidance scale on the first frame (SVD's ramp)")
    p.add_argument("--fps", type=float, default=12.0, help="micro-condition for --image (synthetic: 8, 12, 24)")
    p.add_argument("--motion", type=float, default=5.0, help="micro-condition for --image (synthetic: 1-12)")
    p.add_argument("--cond-aug", type=float, default=0.02, help="SVD's default noise augmentation")
    p.add_argument("--num", type=int, default=1, help="videos from this frame (different noise), as a grid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="video.mp4", help=".mp4 or .gif")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    try:
        if not a.out.lower().endswith((".mp4", ".gif")):
            raise UserError(f"--out {a.out}: use .mp4 or .gif")
        D, ae, cfg, stage = load_model(a.ckpt, a.device)
        size, T = cfg["image_size"], cfg["num_frames"]
        if a.image:
            frame = load_image(a.image, size)[None]
            fps, motion = torch.tensor([a.fps]), torch.tensor([a.motion])
        else:
            b = SyntheticVideos(size, T, "test").batch([a.index or 0])
            frame, fps, motion = b["video"][:, 0], b["fps"], b["motion"]
        torch.manual_seed(a.seed)
        rep = lambda t: t.repeat_interleave(a.num, 0).to(a.device)          # noqa: E731
        cond = condition(ae, rep(frame), rep(fps), rep(motion), torch.full((a.num,), a.cond_aug, device=a.device))
        scale = cfg_scale(a.cfg_min, a.cfg, T) if a.cfg != 1 or a.cfg_min != 1 else 1.0
        t0 = time.perf_counter()
        z, nfe = generate(D, cond, T, a.steps, scale, a.sampler, cfg["sigma_min"], cfg["sigma_max"], a.seed)
        video = ae.decode_video(z)
        sec = (time.perf_counter() - t0) / a.num
        write_video(a.out, video if a.num > 1 else video[0], fps=8)
        print(f"{stage}: {a.steps} steps, {nfe} NFE, {sec:.2f} s per video on {a.device}; wrote {a.out}")
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
