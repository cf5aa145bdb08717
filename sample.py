"""Sampling: noise levels, PF-ODE solvers with classifier-free guidance, the consistency samplers of
OSV's students (k steps, and the Time Travel Sampler, OSV Eq. 13), reading checkpoints, and the
image -> video CLI.

Every sampler takes a denoiser D(x, sigma) -> x0_hat (k-diffusion's interface; `guided` binds the
conditioning; a student's consistency function f_theta has the same interface) and noise levels, and
returns the sample and the number of calls. NFE = calls x network passes per call (2 with CFG: one
conditional, one unconditional, batched together).

Read first: `sample_heun` (EDM Algorithm 2, line by line), `guided` (SVD's per-frame CFG ramp), then
`sample_tts` (one step for two calls).

    python sample.py --ckpt runs/default/teacher.pt --index 3 --steps 25 --cfg 2.5 --out video.mp4
    python sample.py --ckpt runs/default/teacher.pt --image frame.png --num 4 --out grid.gif
    python sample.py --ckpt runs/default/stage2.pt --image frame.png --steps 1 --tts --out video.mp4
"""
import os
import shlex
import sys
import time

import torch

import svd
from autoencoder import AEConfig, AutoEncoder
from data import (Parser, SyntheticVideos, UserError, check_numbers, frame_size, load_image, parse_size,
                  write_video)
from lora import load_trained, merge_lora, to_student
from unet import Denoiser, UNetConfig, scalings


def karras_sigmas(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """n noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho), then 0
    (EDM Eq. 5; EDM's defaults sigma_min 0.002, sigma_max 80, rho 7). sigma_min may be a float64 0-d
    tensor: no value is read from the device."""
    device = sigma_min.device if torch.is_tensor(sigma_min) else None
    ramp = torch.linspace(0, 1, n, dtype=torch.float64, device=device)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, ramp.new_zeros(1)])


def sigma_grid(n=100, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """The students' grid t_1 < ... < t_N of N = 100 levels (OSV "uniformly samples 100 timesteps"; the
    map to sigma is not given). Ours: Karras levels between the teacher's sigma_min and sigma_max, as
    AnimateLCM-SVD's N = 100 grid (rho 7), ascending, so index n and n + m read as in OSV Eq. (8)."""
    return karras_sigmas(n, sigma_min, sigma_max, rho)[:-1].flip(0).float()        # (N,), grid[0] = sigma_min


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


@torch.no_grad()
def sample_consistency(f, x, sigmas, generator=None):
    """The consistency models' multistep sampler (Song et al. 2023, Algorithm 1) for a consistency function
    f(x, sigma) -> x0_hat: predict x_0, re-noise to the next lower level with fresh noise, repeat; one
    call per level, so k steps cost k calls. (CM's code re-noises by sqrt(sigma_next^2 - sigma_min^2);
    with sigma_min = 0.002 that differs from sigma_next by under 1e-5 at every level we use.)"""
    for i in range(len(sigmas) - 1):
        x0 = f(x, sigmas[i])
        if sigmas[i + 1] == 0:
            return x0, i + 1
        z = torch.randn(x.shape, generator=generator).to(x.device)
        x = x0 + sigmas[i + 1] * z
    return x, len(sigmas) - 1


@torch.no_grad()
def sample_tts(f, x, sigma_T, sigma_s, generator=None, text_scalings=None):
    """The Time Travel Sampler: one step of quality for two calls (our reading of OSV Eq. 13; the text
    we have is garbled; docs/paper.md, "Sampling"). From x at the top level T:
      1. f_A = f(x, T)                                    call 1, the one-step prediction
      2. e_A = (x - f_A) / sigma_T                        the noise that prediction implies
      3. x_s = f_A + sigma_s (e_0 + e_A) / sqrt(2)        travel back in time to level s
      4. return f(x_s, s)                                 call 2
    Reusing e_A keeps the second call's start tied to the sample's own noise; the fresh e_0 lets it
    correct. Ours: / sqrt(2), not the text's / 2, keeps unit variance for independent e_0 and e_A, so
    x_s really is at level s. The text's last step re-reads the second call's raw output through the
    scalings at T; in SVD's v-parametrisation that equals f(x_s, s) up to O(1 / sigma_s^2) for large s
    and is no estimate of x_0 for small s, so we return f(x_s, s). With `text_scalings` (sigma -> c_skip,
    c_out of f): the text as written, `sample_tts_text`. s is ours (docs/experiments.md)."""
    f_A = f(x, sigma_T)
    e_A = (x - f_A) / sigma_T
    e_0 = torch.randn(x.shape, generator=generator).to(x.device)
    if text_scalings is not None:
        return sample_tts_text(f, sigma_T, sigma_s, f_A, e_A, e_0, text_scalings), 2
    x_s = f_A + sigma_s * (e_0 + e_A) / 2 ** 0.5
    return f(x_s, sigma_s), 2


def sample_tts_text(f, sigma_T, sigma_s, f_A, e_A, e_0, scalings):
    """Steps 2-4 of Eq. (13) as the text reads (docs/paper.md): x_s = f_A + s (e_0 + e_A) / 2; the
    second call's raw output F_B, recovered from f_B = c_skip(s) x_s + c_out(s) F_B; then re-read
    through the scalings at T: c_skip(T) (f_B + T e_B) + c_out(T) F_B, e_B = (e_0 + (x_s - f_B) / s) / 2."""
    x_s = f_A + sigma_s * (e_0 + e_A) / 2
    f_B = f(x_s, sigma_s)
    skip_s, out_s = scalings(sigma_s)
    F_B = (f_B - skip_s * x_s) / out_s
    e_B = (e_0 + (x_s - f_B) / sigma_s) / 2
    skip_T, out_T = scalings(sigma_T)
    return skip_T * (f_B + sigma_T * e_B) + out_T * F_B


def consistency_sigmas(steps, grid):
    """The levels of a k-step consistency sample, taken from the training grid (ascending, (N,)): the top
    level, then evenly spaced indices below it (LCM's evenly spaced timesteps), then 0."""
    N = len(grid)
    idx = [round((N - 1) * (1 - j / steps)) for j in range(steps)]
    return torch.cat([grid[idx], torch.zeros(1, dtype=grid.dtype, device=grid.device)])


SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "consistency": sample_consistency, "tts": sample_tts,
            "tts-text": sample_tts}
TTS_SIGMA = 0.5         # the Time Travel Sampler's level s (ours; 0.25 to 2 all help: docs/experiments.md)


def cfg_scale(scale_min, scale_max, num_frames):
    """SVD's LinearPredictionGuider: the guidance scale ramps linearly over the frames, from min on the
    first frame (which copies the conditioning image anyway) to max on the last. Shape (1, T, 1, 1, 1)."""
    return torch.linspace(scale_min, scale_max, num_frames).view(1, num_frames, 1, 1, 1)


def guided(denoiser, cond, scale=1.0):
    """Bind the conditioning and classifier-free guidance: D(x, sigma) = D_u + w (D_c - D_u), with the
    unconditional branch zeroing both image conditionings. w is a number or a per-frame ramp
    (`cfg_scale`). Returns the bound denoiser and its network passes per call."""
    if not torch.is_tensor(scale) and scale == 1.0:        # w = 1 is the conditional prediction: 1 pass
        return (lambda x, sigma: denoiser(x, sigma.reshape(-1).expand(len(x)).to(x.device), cond)), 1
    both = {k: torch.cat([v, v]) for k, v in cond.items()}

    def D(x, sigma):                                        # sigma: a scalar or one level per sample (B,)
        B = len(x)
        keep = torch.cat([torch.ones(B), torch.zeros(B)]).to(x.device)
        s = sigma.reshape(-1).expand(B).to(x.device)
        x0_c, x0_u = denoiser(torch.cat([x, x]), torch.cat([s, s]), both, keep).chunk(2)
        w = scale.to(x.device) if torch.is_tensor(scale) else scale
        return x0_u + w * (x0_c - x0_u)
    return D, 2


@torch.no_grad()
def generate(denoiser, cond, num_frames, steps, scale=1.0, sampler="heun", sigma_min=0.002,
             sigma_max=80.0, seed=0, grid_size=100, tts_sigma=TTS_SIGMA, noise=None, svd_init=False):
    """Latent videos (B, T, c, h, w) from the conditioning, and the NFE per video. The ODE samplers use
    Karras levels; the consistency samplers use levels of the students' training grid (`sigma_grid`).
    sampler "tts": the Time Travel Sampler (steps must be 1); "tts-text": Eq. (13) as the text reads. The start is unit noise (drawn from
    `seed`, or `noise`) times the top level (EDM), or sqrt(1 + top^2) with svd_init (SVD's sampler)."""
    B, c, h, w = cond["concat"].shape
    dev = cond["concat"].device
    g = torch.Generator(device="cpu").manual_seed(seed)
    if sampler in ("consistency", "tts", "tts-text"):
        sigmas = consistency_sigmas(steps, sigma_grid(grid_size, sigma_min, sigma_max)).to(dev)
    else:
        sigmas = karras_sigmas(steps, sigma_min, sigma_max).to(dev, torch.float32)
    z = torch.randn(B, num_frames, c, h, w, generator=g) if noise is None else noise.cpu()
    x = (z * (svd.init_noise_scale(sigmas[0].item()) if svd_init else sigmas[0].item())).to(dev)   # EDM: sigma_max z
    D, passes = guided(denoiser, cond, scale)
    if sampler in ("tts", "tts-text"):
        if steps != 1:
            raise UserError("the Time Travel Sampler is a one-step sampler: use --steps 1")
        text = (lambda s: scalings(s, denoiser.sigma_data, denoiser.sigma_min)[:2]) if sampler == "tts-text" else None  # noqa: E731,E501
        x, calls = sample_tts(D, x, sigmas[0], torch.tensor(tts_sigma, device=dev), g, text)
    elif sampler == "consistency":
        x, calls = sample_consistency(D, x, sigmas, g)
    else:
        x, calls = SAMPLERS[sampler](D, x, sigmas)
    return x, calls * passes


# ----------------------------------------------------------------------------------------------
# Reading checkpoints (train.py writes them: one dict per stage) and the CLI

def load_checkpoint(path, stages, make=None):
    """A finished checkpoint of one of `stages`, or a one-line error (naming `make`, the command that
    makes the file, when it is missing)."""
    stages = (stages,) if isinstance(stages, str) else tuple(stages)
    if not os.path.isfile(path):
        raise UserError(f"{path} not found" + (f": run `{make}` first" if make else ""))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} (truncated or not a checkpoint): "
                        f"{str(e).splitlines()[0]}") from None
    stage = ckpt.get("stage") if isinstance(ckpt, dict) else None
    if stage not in stages:
        raise UserError(f"{path} is a checkpoint of stage {stage!r}, not of {' or '.join(stages)}")
    if not ckpt.get("done"):
        raise UserError(f"{path} is unfinished (step {ckpt['step']}): finish it with "
                        f"`python train.py --stage {stage} --out {shlex.quote(os.path.dirname(path) or '.')} --resume`")
    return ckpt


def load_ae(path, device="cpu", make=None):
    """A finished autoencoder, frozen (EMA weights, with its scale_factor), and its config dict."""
    ck = load_checkpoint(path, "ae", make)
    ae = AutoEncoder(AEConfig(**ck["ae_config"]))
    ae.load_state_dict(ck["ema"]["ae"])
    return ae.to(device).eval().requires_grad_(False), ck["ae_config"]


def load_teacher(path, device="cpu", make=None):
    """A finished teacher (EMA weights) and its UNet config dict."""
    ck = load_checkpoint(path, "teacher", make)
    D = Denoiser.new(UNetConfig(**ck["unet_config"]), ck["ae_config"]["latent_channels"])
    D.load_state_dict(ck["ema"]["denoiser"])
    return D.to(device), ck["unet_config"]


def svd_config(path):
    """What sampling the published SVD needs to know, as a checkpoint's config dict: its levels, frame
    count and frame size, and the SVD-XT pipeline's guidance ramp."""
    sigma_min, sigma_max = svd.scheduler_levels(path)
    return {"svd": path, "sigma_min": sigma_min, "sigma_max": sigma_max, "num_frames": svd.num_frames(path),
            "image_size": svd.SIZE, "cfg_min": svd.CFG_MIN, "cfg_max": svd.CFG_MAX, "sample_steps": svd.STEPS,
            "grid_size": 100}


def load_svd(path, device="cpu"):
    """The published SVD as a teacher -> (denoiser, its VAE and CLIP encoders, config dict, "svd")."""
    return (svd.load_denoiser(path, device=device).eval(), svd.SVDEncoders.from_pretrained(path, device=device),
            svd_config(path), "svd")


def student_on(D, ckpt):
    """A student checkpoint's trained weights (its EMA) on its base D, in place, merged for speed."""
    to_student(D, ckpt["sigma_min"], ckpt["lora"])
    load_trained(D, ckpt["ema"]["student"])
    merge_lora(D)
    return D


def load_model(path, device="cpu"):
    """A finished checkpoint of a video model (teacher, stage 1, stage 2) -> (denoiser with EMA weights,
    autoencoder, config dict, stage name). One-line errors for anything else. A student holds only its
    adapters: it is rebuilt on the base its checkpoint names (the run's teacher.pt, or SVD's folder)."""
    ckpt = load_checkpoint(path, ("teacher", "1", "2"))
    if ckpt["config"].get("svd"):
        D, ae, cfg, _ = load_svd(ckpt["config"]["svd"])
        cfg = {**cfg, **ckpt["config"]}
    else:
        ae, cfg = AutoEncoder(AEConfig(**ckpt["ae_config"])), ckpt["config"]
        ae.load_state_dict(ckpt["ae_state"])
        if ckpt["stage"] == "teacher":
            D = Denoiser.new(UNetConfig(**ckpt["unet_config"]), ckpt["ae_config"]["latent_channels"])
            D.load_state_dict(ckpt["ema"]["denoiser"])
        else:
            base = os.path.join(os.path.dirname(path), ckpt["base"])
            if not os.path.isfile(base):
                raise UserError(f"{path} holds adapters on its teacher {base}, which is missing: "
                                f"keep a run folder's checkpoints together")
            D = load_teacher(base)[0]
    if ckpt["stage"] != "teacher":             # a student: its adapters on the base, merged for speed
        student_on(D, ckpt)
    cfg = {**cfg, "micro_median": ckpt.get("micro_median")}              # the training clips' fps, motion
    return D.to(device).eval(), ae.to(device).eval(), cfg, ckpt["stage"]


def main(argv=None):
    p = Parser(description="Image -> video with a trained model, or with the published SVD.")
    p.add_argument("--ckpt", default="runs/default/teacher.pt", help="a teacher, stage 1 or stage 2 checkpoint")
    p.add_argument("--svd", metavar="PATH", help="sample the published SVD / SVD-XT (a diffusers pipeline folder) "
                   "instead of a checkpoint")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", help="conditioning frame (PNG or JPEG)")
    src.add_argument("--index", type=int, help="take the conditioning frame from synthetic test clip N")
    p.add_argument("--steps", type=int, help="default: 25 for a teacher, 1 for a student (stage 1 or 2)")
    p.add_argument("--sampler", choices=list(SAMPLERS), help="default: euler for SVD, heun for our teacher, "
                   "consistency for a student")
    p.add_argument("--tts", action="store_true", help="a student's one step with the Time Travel Sampler (2 NFE)")
    p.add_argument("--tts-sigma", type=float, default=TTS_SIGMA, help="the Time Travel Sampler's level s")
    p.add_argument("--cfg", type=float, help="guidance scale on the last frame (1 = none); default: the "
                   "teacher's (SVD-XT: 3.0), 1 for a student (OSV: CFG is distilled in, applying it again "
                   "over-exposes)")
    p.add_argument("--cfg-min", type=float, default=1.0, help="guidance scale on the first frame (SVD's ramp)")
    p.add_argument("--fps", type=float, help="micro-condition for --image (default: the median of the model's "
                   "training clips; the published SVD: 7)")
    p.add_argument("--motion", type=float, help="micro-condition for --image (default: the median of the model's "
                   "training clips; the published SVD: motion bucket 127)")
    p.add_argument("--cond-aug", type=float, default=0.02, help="SVD's default noise augmentation")
    p.add_argument("--size", type=parse_size, help="HxW of the video (default: the model's; SVD: 576x1024)")
    p.add_argument("--frames", type=int, help="frames of the video (default: the model's; SVD 14, SVD-XT 25)")
    p.add_argument("--num", type=int, default=1, help="videos from this frame (different noise), as a grid")
    p.add_argument("--seed", type=int, default=0, help="the noise of every video follows from it (default: 0)")
    p.add_argument("--out", default="video.mp4", help=".mp4 or .gif")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda if available")
    a = p.parse_args(argv)
    try:
        check_numbers(("--steps", a.steps, 1), ("--index", a.index, 0), ("--num", a.num, 1),   # 0 steps: an error
                      ("--frames", a.frames, 1), ("--seed", a.seed, 0), ("--tts-sigma", a.tts_sigma, 1e-6),
                      ("--cfg", a.cfg, 0), ("--cfg-min", a.cfg_min, 0), ("--fps", a.fps, 0),
                      ("--motion", a.motion, 0), ("--cond-aug", a.cond_aug, 0))
        if not a.out.lower().endswith((".mp4", ".gif")):
            raise UserError(f"--out {a.out}: use .mp4 or .gif")
        D, ae, cfg, stage = load_svd(a.svd, a.device) if a.svd else load_model(a.ckpt, a.device)
        real_svd = bool(cfg.get("svd"))
        teacher = stage in ("teacher", "svd")
        a.steps = a.steps or (cfg["sample_steps"] if teacher else 1)
        a.sampler = "tts" if a.tts else a.sampler or ("consistency" if not teacher else "euler" if real_svd else "heun")
        a.cfg = a.cfg if a.cfg is not None else (cfg["cfg_max"] if teacher else 1.0)
        if a.sampler in ("consistency", "tts", "tts-text") and teacher:
            raise UserError(f"the {a.sampler} sampler needs a student (stage 1 or 2 checkpoint), not the teacher")
        size, T = a.size or frame_size(cfg.get("size"), cfg["image_size"]), a.frames or cfg["num_frames"]
        if a.image:
            frame = load_image(a.image, size)[None]
            seen = cfg.get("micro_median") or {}          # a trained model: its training clips' medians
            fps = torch.tensor([a.fps if a.fps is not None else seen.get("fps", svd.FPS if real_svd else 12.0)])
            motion = torch.tensor([a.motion if a.motion is not None else
                                   seen.get("motion", svd.MOTION_BUCKET if real_svd else 5.0)])
        elif real_svd:
            raise UserError("the published SVD samples from an --image")
        else:
            b = SyntheticVideos(size, T, "test").batch([a.index or 0])
            frame, fps, motion = b["video"][:, 0], b["fps"], b["motion"]
        rep = lambda t: t.repeat_interleave(a.num, 0).to(a.device)          # noqa: E731
        aug = torch.full((a.num,), a.cond_aug, device=a.device)
        if real_svd:        # SVD pipeline's draws: the augmentation noise, then the initial noise, one generator
            g = torch.Generator().manual_seed(a.seed)
            aug_noise = torch.randn(rep(frame).shape, generator=g).to(a.device)
            h, w = (s // ae.downsample for s in frame.shape[-2:])
            noise = torch.randn(a.num, T, ae.cfg.latent_channels, h, w, generator=g)
            cond = ae.condition(rep(frame), rep(fps), rep(motion), aug, noise=aug_noise)
        else:
            torch.manual_seed(a.seed)
            cond, noise = ae.condition(rep(frame), rep(fps), rep(motion), aug), None
        scale = cfg_scale(a.cfg_min, a.cfg, T) if a.cfg != 1 or a.cfg_min != 1 else 1.0
        t0 = time.perf_counter()
        z, nfe = generate(D, cond, T, a.steps, scale, a.sampler, cfg["sigma_min"], cfg["sigma_max"], a.seed,
                          cfg.get("grid_size", 100), a.tts_sigma, noise, svd_init=real_svd and teacher)
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
