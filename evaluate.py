"""The ruler: a Fréchet video distance that runs offline, and diagnostics for generated videos.

The paper reports FVD: the Fréchet distance between Gaussians fitted to I3D features of real and of
generated videos. I3D's weights cannot be downloaded here, and I3D-FVD is known to barely notice
temporal corruption (Ge et al. 2024, "On the Content Bias in FVD"). So, besides the I3D path for
users who have its TorchScript file (`--i3d`), this file trains a small video network on labels that
cost nothing and measures the same Fréchet distance in its features. We call that distance
**FVD-syn**: it is a different ruler, never comparable with published FVD numbers.

Read first: `frechet_distance` (the formula), `FeatureNet` and `make_labels` (what the offline
network learns, and therefore what the ruler sees), `diagnostics`.

    python evaluate.py --sanity                                 # the ruler checked against corruptions
    python evaluate.py --real videos/ --fake samples/ [--i3d i3d_torchscript.pt]     # or --real synthetic
    python evaluate.py --run runs/default                       # the replication report of a run folder
"""
import glob
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

from data import Parser, SyntheticVideos, UserError, VideoFolder, check_numbers, optional, write_video
from sample import TTS_SIGMA, cfg_scale, generate, load_model


# ----------------------------------------------------------------------------------------------
# The Fréchet distance (Heusel et al. 2017 for images; Unterthiner et al. 2018 for video)

def gaussian_stats(feats):
    """Mean and covariance (float64) of features (N, D)."""
    f = torch.as_tensor(feats, dtype=torch.float64)
    return f.mean(0), torch.cov(f.T)


def frechet_distance(mu1, s1, mu2, s2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), in float64.
    tr((S1 S2)^1/2) is computed as the sum of square roots of the eigenvalues of the symmetric PSD
    matrix S1^1/2 S2 S1^1/2 (same eigenvalues as S1 S2), which avoids a general matrix square root."""
    mu1, s1, mu2, s2 = (torch.as_tensor(x, dtype=torch.float64) for x in (mu1, s1, mu2, s2))
    w, q = torch.linalg.eigh(s1)
    root1 = (q * w.clamp(min=0).sqrt()) @ q.T                                         # S1^1/2
    middle = root1 @ s2 @ root1
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_sqrt).item()


def fd_interval(f_real, f_fake, n_boot=100, seed=0):
    """The distance between two feature sets and a 95% interval, estimate +- 1.96 bootstrap standard
    errors (both sets resampled). Not the bootstrap percentiles: resampling with replacement repeats
    videos, which adds to the distance's small-sample bias, so those sit above the estimate."""
    f_real, f_fake = torch.as_tensor(f_real, dtype=torch.float64), torch.as_tensor(f_fake, dtype=torch.float64)
    fd = frechet_distance(*gaussian_stats(f_real), *gaussian_stats(f_fake))
    g = torch.Generator().manual_seed(seed)
    boot = []
    for _ in range(n_boot):
        a = f_real[torch.randint(len(f_real), (len(f_real),), generator=g)]
        b = f_fake[torch.randint(len(f_fake), (len(f_fake),), generator=g)]
        boot.append(frechet_distance(*gaussian_stats(a), *gaussian_stats(b)))
    half = 1.96 * float(np.std(boot, ddof=1))
    return fd, max(0.0, fd - half), fd + half


# ----------------------------------------------------------------------------------------------
# The offline feature network behind FVD-syn

class FeatureNet(nn.Module):
    """A small 3D CNN: (B, T, 3, H, W) in [-1, 1] -> (B, 160) features, with heads for the free labels.
    Kernels of 3 frames mix time from the first layer on, so frame order and motion reach the features.

    The features are the 128-d embedding that the heads read, plus the energy (std over space and
    time) of each of the 32 first-layer filters before normalisation. The embedding alone is nearly
    blind to blur: GroupNorm rescales weak edges back up and the labels do not depend on sharpness.
    The raw filter energies keep "how much detail at which orientation and speed" (our choice; the
    ruler's check is `python evaluate.py --sanity`). Every feature is standardised with statistics of
    training clips, so each dimension counts alike."""

    HEADS = {"count": 3, "shapes": 3, "speed": 1, "direction": 8,      # synthetic ground truth
             "shuffled": 1, "reversed": 1, "fast": 1}                  # self-supervised, any video

    def __init__(self, image_size, num_frames, width=32, dim=128):
        super().__init__()
        self.image_size, self.num_frames = image_size, num_frames

        def block(c_in, c_out, stride):
            return nn.Sequential(nn.Conv3d(c_in, c_out, 3, stride, padding=1), nn.GroupNorm(8, c_out), nn.SiLU())
        w = width
        self.conv_in = nn.Conv3d(3, w, 3, (1, 2, 2), padding=1)          # strides (t, h, w)
        self.trunk = nn.Sequential(nn.GroupNorm(8, w), nn.SiLU(), block(w, 2 * w, (1, 2, 2)),
                                   block(2 * w, 4 * w, (1, 2, 2)), block(4 * w, 4 * w, (2, 1, 1)))
        self.neck = nn.Sequential(nn.Linear(8 * w, dim), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in self.HEADS.items()})
        self.register_buffer("feat_mean", torch.zeros(dim + w))     # set by `standardise`
        self.register_buffer("feat_std", torch.ones(dim + w))

    def embed(self, video):
        """The embedding (B, dim) and the first-layer filter energies (B, width)."""
        x = rearrange(video, "b t c h w -> b c t h w")
        first = self.conv_in(x)                                            # (B, w, T, H/2, W/2)
        x = self.trunk(first)                                              # (B, C, T', H', W')
        # mean and std over space-time: the std keeps "how much varies", which pooling alone loses
        pooled = torch.cat([x.mean((2, 3, 4)), x.flatten(2).std(-1)], 1)  # (B, 2C)
        return self.neck(pooled), first.flatten(2).std(-1)

    def predict(self, video):
        emb, _ = self.embed(video)
        return {k: h(emb) for k, h in self.heads.items()}

    def forward(self, video):
        """The FVD-syn features (B, dim + width), standardised."""
        return (torch.cat(self.embed(video), 1) - self.feat_mean) / self.feat_std

    @torch.no_grad()
    def standardise(self, videos):
        self.feat_mean.zero_()
        self.feat_std.fill_(1.0)
        f = torch.cat([self(v) for v in videos.split(250)])
        self.feat_mean.copy_(f.mean(0))
        self.feat_std.copy_(f.std(0) + 1e-6)


def make_labels(batch, T, synthetic, gen):
    """Turn clips of 2T frames into training clips of T frames and their free labels. Each clip is
    played at normal or double speed, forwards or backwards, in order or shuffled, each with
    probability 1/2; on synthetic data the ground truth adds object count, which shapes are present,
    speed, and direction of the largest object (only where the clip is neither shuffled nor reversed)."""
    v = batch["video"]                                                      # (B, 2T, 3, H, W)
    B, dev = v.shape[0], v.device
    flip = lambda: torch.rand(B, generator=gen) < 0.5                       # noqa: E731
    fast, rev, shuf = flip().to(dev), flip().to(dev), flip().to(dev)
    clip = torch.where(fast[:, None, None, None, None], v[:, 0::2], v[:, :T])           # (B, T, 3, H, W)
    clip = torch.where(rev[:, None, None, None, None], clip.flip(1), clip)
    perm = torch.stack([torch.randperm(T, generator=gen) for _ in range(B)]).to(dev)    # (B, T)
    order = torch.where(shuf[:, None], perm, torch.arange(T, device=dev))
    clip = clip[torch.arange(B, device=dev)[:, None], order]
    labels = {"fast": fast.float(), "reversed": rev.float(), "shuffled": shuf.float()}
    if synthetic:
        valid = batch["shape"] >= 0                                                      # (B, K)
        labels["count"] = batch["num_objects"] - 1
        labels["shapes"] = torch.stack([((batch["shape"] == s) & valid).any(1) for s in range(3)], 1).float()
        labels["speed"] = batch["motion"] * (1 + fast.float()) / 10           # about unit scale
        big = torch.where(valid, batch["size"], -1.0).argmax(1)                          # (B,)
        v0 = batch["vel"][torch.arange(B, device=dev), 0, big]                           # (B, 2)
        labels["direction"] = (torch.atan2(v0[:, 1], v0[:, 0]) / (2 * math.pi) * 8).floor().long() % 8
        labels["ordered"] = ~(rev | shuf)
    return clip, labels


def feature_loss(net, clip, labels):
    out = net.predict(clip)
    loss = sum(F.binary_cross_entropy_with_logits(out[k][:, 0], labels[k]) for k in ("fast", "reversed", "shuffled"))
    if "count" in labels:
        ok = labels["ordered"].float()                  # speed and direction only where they are defined
        n_ok = ok.sum().clamp(min=1)
        loss = loss + F.cross_entropy(out["count"], labels["count"]) \
            + F.binary_cross_entropy_with_logits(out["shapes"], labels["shapes"]) \
            + (ok * (out["speed"][:, 0] - labels["speed"]).pow(2)).sum() / n_ok \
            + (ok * F.cross_entropy(out["direction"], labels["direction"], reduction="none")).sum() / n_ok
    return loss


def train_feature_net(source, image_size, num_frames, path, steps=1500, batch_size=32, device="cpu",
                      frame_stride=1, seed=0):
    """Train the FVD-syn network on `source` ("synthetic" or a folder of videos) and save it to `path`."""
    if steps < 3:
        raise UserError(f"the FVD-syn network needs at least 3 training steps, not {steps}")
    torch.manual_seed(seed)
    synthetic = source == "synthetic"
    if synthetic:
        data = SyntheticVideos(image_size, 2 * num_frames, "train", device)
    else:
        data = VideoFolder(source, image_size, 2 * num_frames, frame_stride)
    net = FeatureNet(image_size, num_frames).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    # a 5% warm-up, at least two steps (OneCycleLR divides by zero when its warm-up ends at step 0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps,
                                                pct_start=max(0.05, 2 / steps))
    gen = torch.Generator().manual_seed(seed)
    for step in tqdm(range(steps), desc="FVD-syn features", dynamic_ncols=True):
        batch = data.batch(range(step * batch_size, (step + 1) * batch_size))
        batch = {k: v.to(device) for k, v in batch.items()}
        clip, labels = make_labels(batch, num_frames, synthetic, gen)
        loss = feature_loss(net, clip, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval().requires_grad_(False)
    ref = data.batch(range(10 ** 9, 10 ** 9 + 2000))["video"][:, :num_frames]   # clips no step read
    net.standardise(ref.to(device))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"                      # unique: two commands never share it
    torch.save({"source": source, "image_size": image_size, "num_frames": num_frames, "steps": steps,
                "model": net.state_dict()}, tmp)
    os.replace(tmp, path)
    return net


def load_feature_net(path, source, image_size, num_frames, device="cpu", **train_kw):
    """The cached FVD-syn network for this data and size; trained (and cached) if there is none."""
    if os.path.isfile(path):
        ck = torch.load(path, map_location="cpu", weights_only=False)
        if (ck["source"], ck["image_size"], ck["num_frames"]) == (source, image_size, num_frames):
            net = FeatureNet(image_size, num_frames)
            net.load_state_dict(ck["model"])
            return net.to(device).eval().requires_grad_(False)
        print(f"note: {path} was trained for {ck['source']} at {ck['image_size']}px x {ck['num_frames']} "
              f"frames; training one for {source} at {image_size}px x {num_frames}")
    print(f"training the FVD-syn feature network on {source}; cached in {path}")
    return train_feature_net(source, image_size, num_frames, path, device=device, **train_kw)


class I3D:
    """FVD's feature network, the I3D TorchScript file of StyleGAN-V and most FVD code: 400-d features
    of each video's T frames (16 by convention, at least 9). "stylegan-v": StyleGAN-V's `compute_fvd`,
    as FVDs published with its code: uint8 values, the network's own rescale and 224x224 resize (the
    aspect is lost). "crop" (ours): the short side to exactly 224, centre crop, values in [-1, 1]."""

    def __init__(self, path, device="cpu", protocol="crop"):
        if protocol not in ("crop", "stylegan-v"):
            raise UserError(f"--i3d-protocol must be crop or stylegan-v, not {protocol!r}")
        self.protocol = protocol
        if not os.path.isfile(path):
            raise UserError(f"--i3d {path}: file not found (it is not downloadable from here; see README)")
        self.device = torch.device(device)
        try:
            with warnings.catch_warnings():     # TorchScript is deprecated, but it is what the file is
                warnings.simplefilter("ignore")
                self.net = torch.jit.load(path, map_location=device).eval()
        except Exception as e:
            raise UserError(f"--i3d {path}: not a TorchScript file ({str(e).splitlines()[0]})") from None

    @torch.no_grad()
    def __call__(self, video):
        B, T = video.shape[:2]
        x = rearrange(video, "b t c h w -> (b t) c h w")
        if self.protocol == "stylegan-v":                                  # uint8 values; the net resizes
            x = ((x + 1) * 127.5).round().clamp(0, 255)
            x = rearrange(x, "(b t) c h w -> b c t h w", b=B)
            return self.net(x, rescale=True, resize=True, return_features=True)
        h, w = x.shape[-2:]                  # an explicit size: a scale factor could round to 223
        size = (224, max(224, round(w * 224 / h))) if h <= w else (max(224, round(h * 224 / w)), 224)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False) if size != (h, w) else x
        top, left = (size[0] - 224) // 2, (size[1] - 224) // 2
        x = x[..., top:top + 224, left:left + 224]
        x = rearrange(x, "(b t) c h w -> b c t h w", b=B)                   # (B, 3, T, 224, 224)
        return self.net(x, rescale=False, resize=False, return_features=True)


@torch.no_grad()
def extract(features, videos, batch_size=64):
    """Features (N, D) float64 of videos (N, T, 3, H, W), in batches on the network's device."""
    dev = features.device if isinstance(features, I3D) else next(features.parameters()).device
    if isinstance(features, FeatureNet) and videos.shape[1] != features.num_frames:
        raise UserError(f"videos have {videos.shape[1]} frames; the FVD-syn network was trained on "
                        f"{features.num_frames}")
    out = []
    for v in videos.split(batch_size):
        if isinstance(features, FeatureNet) and v.shape[-1] != features.image_size:
            v = F.interpolate(v.flatten(0, 1), size=features.image_size, mode="bilinear",
                              antialias=True).unflatten(0, v.shape[:2])
        out.append(features(v.to(dev)).double().cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# Diagnostics

# our choice: mean |frame difference| (pixels in [0, 1]) below which a video counts as static, well
# below what the slowest real synthetic clips move (docs/experiments.md, "The ruler")
STATIC_THRESHOLD = 0.001


def motion_magnitude(videos):
    """Mean absolute difference between consecutive frames, pixels in [0, 1]: (N, T, 3, H, W) -> (N,)."""
    return (videos[:, 1:] - videos[:, :-1]).abs().mean((1, 2, 3, 4)) / 2


def first_frame_psnr(videos, cond, cap=100.0):
    """PSNR (dB, pixels in [0, 1]) of each video's first frame against its conditioning image; an
    exact copy would be infinite and is reported as `cap`."""
    mse = ((videos[:, 0] - cond) / 2).pow(2).mean((1, 2, 3))
    return (10 * torch.log10(1 / mse.clamp(min=1e-30))).clamp(max=cap)


def diagnostics(fake, real, cond=None):
    """Per set of generated videos: first-frame PSNR against the conditioning images (if given),
    static-video rate, and motion magnitude relative to the real videos."""
    m_fake, m_real = motion_magnitude(fake), motion_magnitude(real)
    d = {"static_rate": (m_fake < STATIC_THRESHOLD).float().mean().item(),
         "motion_ratio": (m_fake.mean() / m_real.mean()).item()}
    if cond is not None:
        d["first_frame_psnr"] = first_frame_psnr(fake, cond).mean().item()
    return d


# ----------------------------------------------------------------------------------------------
# Corruptions that a video metric must notice (used by --sanity and the tests)

def static(videos):
    return videos[:, :1].expand_as(videos).clone()                          # repeat the first frame


def shuffled(videos, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = videos.shape[1]
    perm = torch.stack([torch.randperm(T, generator=g) for _ in range(len(videos))])  # (N, T)
    return videos[torch.arange(len(videos))[:, None], perm]


def blurred(videos, sigma=1.0):
    """Gaussian blur of every frame (sigma in pixels)."""
    r = math.ceil(3 * sigma)
    k = torch.exp(-torch.arange(-r, r + 1).float() ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(videos)
    x = rearrange(videos, "n t c h w -> (n t c) 1 h w")
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return x.view(videos.shape)


# ----------------------------------------------------------------------------------------------
# The replication report: the analogue of the paper's Table 1 on held-out first frames

def sampler_rows(run_dir):
    """(table, label, checkpoint, steps, guidance, sampler) for every row whose checkpoint the run folder
    holds. Table 1: the teacher (Euler) with SVD's per-frame CFG ramp (guidance "ramp"), the students without
    CFG. Table 2 (ablations, 1 step + TTS unless noted, as the paper's): every tagged checkpoint
    (`train.py --tag NAME`), Stage 1 only with and without TTS, CFG at inference on OSV's student."""
    has = lambda name: os.path.isfile(os.path.join(run_dir, name))          # noqa: E731
    tagged = lambda stage: sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, f"stage{stage}_*.pt")))  # noqa: E731,E501
    rows = []
    if has("teacher.pt"):
        # SVD's own sampler, Euler: the paper's 25 steps = 50 NFE (Heun would cost twice the calls)
        rows += [(1, "teacher, Euler + CFG", "teacher.pt", n, "ramp", "euler") for n in (25, 8, 2, 1)]
    if has("stage1.pt"):
        rows += [(1, "Stage 1 only (LGP)", "stage1.pt", 1, None, "consistency")]
    if has("stage2.pt"):
        rows += [(1, "OSV", "stage2.pt", 1, None, "consistency"), (1, "OSV + TTS", "stage2.pt", 1, None, "tts"),
                 (1, "OSV", "stage2.pt", 2, None, "consistency"), (1, "OSV", "stage2.pt", 4, None, "consistency"),
                 (2, "full model (OSV + TTS)", "stage2.pt", 1, None, "tts")]
        rows += [(2, f"Stage 2 `--tag {n[7:-3]}`", n, 1, None, "tts") for n in tagged(2)]
    if has("stage1.pt"):
        rows += [(2, "no Stage 2 (Stage 1 only), without TTS", "stage1.pt", 1, None, "consistency"),
                 (2, "no Stage 2 (Stage 1 only), with TTS", "stage1.pt", 1, None, "tts")]
    rows += [(2, f"Stage 1 only `--tag {n[7:-3]}` (1 step, no TTS)", n, 1, None, "consistency") for n in tagged(1)]
    if has("stage2.pt"):
        rows += [(2, f"CFG {w} at inference (1 step, no TTS)", "stage2.pt", 1, w, "consistency") for w in (3.0, 1.5)]
        rows += [(2, "no CFG at inference (1 step, no TTS)", "stage2.pt", 1, None, "consistency")]
    return rows


@torch.no_grad()
def run_row(D, ae, cfg, real, steps, guidance, sampler="heun", batch_size=50, seed=0, tts_sigma=TTS_SIGMA):
    """Generate videos from the first frames of `real` (video, fps, motion); return them, the
    milliseconds per video (sampling and decoding, after a one-step warm-up batch of the same shapes)
    and the NFE per video. cfg["sigma_max"] is where every sampler starts."""
    T = cfg["num_frames"]
    scale = cfg_scale(cfg["cfg_min"], cfg["cfg_max"], T) if guidance == "ramp" else guidance or 1.0
    dev = real["video"].device
    out, seconds, nfe = [], 0.0, 0
    for i in range(-1, len(real["video"]) // batch_size + (len(real["video"]) % batch_size > 0)):
        sl = slice(max(i, 0) * batch_size, (max(i, 0) + 1) * batch_size)      # i = -1: warm-up batch
        torch.manual_seed(seed + max(i, 0))
        cond = ae.condition(real["video"][sl][:, 0], real["fps"][sl], real["motion"][sl],
                            torch.full((len(real["video"][sl]),), 0.02, device=dev))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        z, nfe = generate(D, cond, T, steps if i >= 0 else 1, scale, sampler, cfg["sigma_min"], cfg["sigma_max"],
                          seed + max(i, 0), cfg.get("grid_size", 100), tts_sigma)   # warm-up: one step suffices
        video = ae.decode_video(z).clamp(-1, 1)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= 0:
            seconds += time.perf_counter() - t0
            out.append(video.cpu())
    return torch.cat(out), 1000 * seconds / len(real["video"]), nfe


HEADER = ["| {} | steps | NFE | FVD-syn | first-frame PSNR (dB) | static rate | motion vs real | ms / video |",
          "|---|---|---|---|---|---|---|---|"]


def write_report(run_dir, num=500, device="cpu", feature_steps=1500, max_steps=0, tts_sigma=TTS_SIGMA,
                 sigma_max=None, name="report", checkpoints=None):
    """Evaluate every row the run folder supports (`sampler_rows`) and write run_dir/<name>.md and
    run_dir/<name>_grid.gif. Rows that share a model and sampler are computed once. Only rows of at
    most max_steps steps (0: all) and of the checkpoint files in `checkpoints` (None: all); tts_sigma: the
    Time Travel Sampler's level s; sigma_max: where every sampler starts (default: the run's)."""
    rows = [r for r in sampler_rows(run_dir) if (not max_steps or r[3] <= max_steps) and (not checkpoints or r[2] in checkpoints)]
    if not rows:
        raise UserError(f"{run_dir} holds no trained video model (teacher.pt)" +
                        (f" among {','.join(checkpoints)}" if checkpoints else ": train one first"))
    models = {}
    for row in rows:
        models.setdefault(row[2], load_model(os.path.join(run_dir, row[2]), device))
    if sigma_max is not None:
        for m in models.values():
            m[2]["sigma_max"] = sigma_max
    cfg = next(iter(models.values()))[2]
    if cfg.get("size"):
        raise UserError(f"{run_dir} trained at --size {cfg['size']}: the report measures square synthetic runs")
    S, T = cfg["image_size"], cfg["num_frames"]
    features = load_feature_net(os.path.join(run_dir, f"fvdsyn_synthetic_{S}x{T}.pt"), "synthetic", S, T,
                                device, steps=feature_steps)
    b = SyntheticVideos(S, T, "test").batch(range(num))
    real = {k: b[k].to(device) for k in ("video", "fps", "motion")}
    f_real = extract(features, real["video"])
    done, tables, grid, values = {}, {1: [], 2: []}, {}, {}
    for table, label, ck, steps, guidance, sampler in tqdm(rows, desc="report", dynamic_ncols=True):
        key = (ck, steps, guidance, sampler)
        if key not in done:
            D, ae, cfg, _ = models[ck]
            fake, ms, nfe = run_row(D, ae, cfg, real, steps, guidance, sampler, tts_sigma=tts_sigma)
            fd, lo, hi = fd_interval(f_real, extract(features, fake))
            d = diagnostics(fake, real["video"].cpu(), real["video"][:, 0].cpu())
            values[key] = (fd, ms, nfe)
            done[key] = (f"{steps} | {nfe} | {fd:.2f} [{lo:.2f}, {hi:.2f}] | {d['first_frame_psnr']:.2f} | "
                         f"{d['static_rate']:.3f} | {d['motion_ratio']:.2f} | {ms:.1f} |")
            if (ck, steps, sampler) in (("teacher.pt", 25, "euler"), ("teacher.pt", 1, "euler"), ("stage2.pt", 1, "tts")):
                grid[(ck, steps)] = fake[:4]
        tables[table].append(f"| {label} | {done[key]}")
    dev_name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    lines = [f"# Replication report: {run_dir}", "",
             f"{num} held-out synthetic test clips ({S}x{S}, {T} frames); each generated video starts from the "
             f"first frame of one of them. FVD-syn (our offline ruler, not comparable with published FVD) with a 95% "
             f"bootstrap interval; NFE = network evaluations per video (CFG counts two); ms = sampling + decoding "
             f"per video on {device} ({dev_name}), measured in this run, batches of 50.", "",
             *([f"Sampled from sigma_max = {cfg['sigma_max']}; TTS level s = {tts_sigma}.", ""]
               if sigma_max is not None or tts_sigma != TTS_SIGMA else []),
             "## Table 1: steps against quality", "", HEADER[0].format("model"), HEADER[1], *tables[1]]
    if tables[2]:
        lines += ["", "## Table 2: ablations (1 step + TTS unless noted)", "", HEADER[0].format("ablation"),
                  HEADER[1], *tables[2]]
    teacher = values.get(("teacher.pt", 25, "ramp", "euler"))
    if teacher:                                         # the headline: each student against the teacher's 25 steps
        lines += ["", "## Against the teacher's 25 steps (Euler + CFG, 50 NFE)", "",
                  "| model | steps | NFE | FVD-syn / teacher's | speed-up (ms / video) |", "|---|---|---|---|---|"]
        for table, label, ck, steps, guidance, sampler in rows:
            fd, ms, nfe = values[(ck, steps, guidance, sampler)]
            if ck != "teacher.pt" and table == 1:
                lines.append(f"| {label} | {steps} | {nfe} | {fd / teacher[0]:.2f}x | {teacher[1] / ms:.1f}x |")
    cols = [real["video"][:4, :1].expand(-1, T, -1, -1, -1).cpu()] + list(grid.values())
    write_video(os.path.join(run_dir, f"{name}_grid.gif"), torch.stack(cols, 1).flatten(0, 1), fps=8, ncol=len(cols))
    names = {("teacher.pt", 25): "teacher 25 steps", ("teacher.pt", 1): "teacher 1 step", ("stage2.pt", 1): "OSV 1 step + TTS"}
    lines += ["", f"`{name}_grid.gif`: each row one test clip; columns: the conditioning frame, "
              + ", ".join(names[k] for k in grid) + "."]
    with open(os.path.join(run_dir, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return lines


# ----------------------------------------------------------------------------------------------
# CLI

def load_set(src, n, image_size, num_frames, first=0):
    """Videos (N, T, 3, H, W) and their names: synthetic test indices, or file paths without extension."""
    if src == "synthetic":
        v = SyntheticVideos(image_size, num_frames, "test").batch(range(first, first + n))["video"]
        return v, [str(i) for i in range(first, first + n)]
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        folder = VideoFolder(src, image_size, num_frames)
    v, names = folder.first_clips()
    native = sorted({(i.get("width"), i.get("height"), i["frames"]) for _, i in folder.files[:n]})
    if any((w, h) != (image_size, image_size) or f != num_frames for w, h, f in native):
        print(f"note: {src}: each video's first {num_frames} frames, resized and centre-cropped to "
              f"{image_size}x{image_size} (--size, --frames); the files are "
              + ", ".join(f"{w}x{h}x{f}" for w, h, f in native[:3]) + (" ..." if len(native) > 3 else ""))
    return v[:n], names[:n]


def sanity(args, features):
    """The ruler against corruptions: two disjoint real sets, then static, shuffled and blurred."""
    a, _ = load_set("synthetic", args.num, args.size, args.frames, first=0)
    b, _ = load_set("synthetic", args.num, args.size, args.frames, first=args.num)
    fa = extract(features, a)
    rows = [("real vs real (disjoint test clips)", b), ("static (first frame repeated)", static(b)),
            ("frames shuffled", shuffled(b)), ("blurred (sigma 1 px)", blurred(b))]
    results = {}
    for name, v in rows:
        fd, lo, hi = fd_interval(fa, extract(features, v))
        results[name] = (fd, lo, hi)
        print(f"{args.metric_name:8s} {name:36s} {fd:10.3f}   [{lo:.3f}, {hi:.3f}]")
    return results


def plot_log(run_dir):
    """`--plot RUN`: each stage's losses and accuracies against the step, RUN/log.jsonl -> RUN/log.png."""
    plt = optional("matplotlib.pyplot", "--plot", "pip install matplotlib")
    path, out = os.path.join(run_dir, "log.jsonl"), os.path.join(run_dir, "log.png")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: train a stage first")
    with open(path) as f:
        recs = [r for r in map(json.loads, f) if "loss" in r and "event" not in r]
    stages = list(dict.fromkeys((r["stage"], r.get("tag", "")) for r in recs))          # in the run's order
    fig, axes = plt.subplots(len(stages), 1, figsize=(7, 2.6 * len(stages)), squeeze=False)
    for ax, (stage, tag) in zip(axes[:, 0], stages):
        rows = [r for r in recs if (r["stage"], r.get("tag", "")) == (stage, tag)]
        for k in sorted({k for r in rows for k in r} - {"stage", "tag", "step", "lr", "it_s"}):
            ax.plot(*zip(*[(r["step"], r[k]) for r in rows if k in r]), label=k, ls=":" if "acc" in k else "-")
        ax.set(title=f"stage {stage}" + (f" ({tag})" if tag else ""), xlabel="step")
        ax.legend(fontsize=7, ncol=3)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    print(f"wrote {out}: {len(stages)} stage(s), {len(recs)} records")
    return out


def main(argv=None):
    p = Parser(description="FVD-syn (offline) or FVD (I3D) between two sets of videos.")
    p.add_argument("--real", default="synthetic", help="a folder of videos, or 'synthetic' (the test split)")
    p.add_argument("--fake", help="a folder of generated videos")
    p.add_argument("--sanity", action="store_true", help="check the ruler on real and corrupted clips")
    p.add_argument("--run", metavar="DIR", help="evaluate the models of a run folder; writes DIR/report.md")
    p.add_argument("--plot", metavar="DIR", help="draw a run folder's losses and accuracies to DIR/log.png "
                   "(needs matplotlib)")
    p.add_argument("--size", type=int, default=32, help="frame size of the sets (default: %(default)s, the tiny preset)")
    p.add_argument("--frames", type=int, default=8, help="frames per video (default: %(default)s, the tiny preset)")
    p.add_argument("--num", type=int, help="videos per set (default 1000; 500 for --run)")
    p.add_argument("--i3d", metavar="FILE", help="use I3D (FVD) instead of the offline network (FVD-syn)")
    p.add_argument("--i3d-protocol", default="crop", choices=["crop", "stylegan-v"], help="I3D's input: see "
                   "evaluate.I3D (default: %(default)s; stylegan-v matches FVDs published with its code)")
    p.add_argument("--out", default="runs/default", help="run folder that caches the feature network")
    p.add_argument("--feature-steps", type=int, default=1500, help="training steps of the feature network")
    p.add_argument("--max-steps", type=int, default=0, help="--run: only rows of at most this many steps")
    p.add_argument("--tts-sigma", type=float, default=TTS_SIGMA, help="--run: the Time Travel Sampler's level s")
    p.add_argument("--sigma-max", type=float, help="--run: where every sampler starts (default: the run's)")
    p.add_argument("--name", default="report", help="--run: write DIR/NAME.md and DIR/NAME_grid.gif")
    p.add_argument("--models", help="--run: only these checkpoint files, comma-separated (teacher.pt,stage2.pt)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda if available")
    args = p.parse_args(argv)
    warnings.formatwarning = lambda msg, category, *a, **k: f"warning: {msg}\n"
    try:
        check_numbers(("--size", args.size, 1), ("--frames", args.frames, 1), ("--num", args.num, 2),
                      ("--feature-steps", args.feature_steps, 3), ("--max-steps", args.max_steps, 0),
                      ("--tts-sigma", args.tts_sigma, 1e-6), ("--sigma-max", args.sigma_max, 1e-6))
        if args.plot:
            return 0 if plot_log(args.plot) else 1
        if args.run:
            write_report(args.run, args.num or 500, args.device, args.feature_steps, args.max_steps, args.tts_sigma,
                         args.sigma_max, args.name, args.models.split(",") if args.models else None)
            return 0
        args.num = args.num or 1000
        if not args.sanity and not args.fake:
            raise UserError("give --fake PATH (a folder of generated videos), or --sanity")
        if args.i3d:
            features, args.metric_name = I3D(args.i3d, args.device, args.i3d_protocol), "FVD"
        else:
            args.metric_name = "FVD-syn"
            src = "synthetic" if args.sanity else args.real
            tag = "synthetic" if src == "synthetic" else os.path.basename(os.path.normpath(src))
            path = os.path.join(args.out, f"fvdsyn_{tag}_{args.size}x{args.frames}.pt")
            features = load_feature_net(path, src, args.size, args.frames, args.device, steps=args.feature_steps)
        if args.sanity:
            sanity(args, features)
            return 0
        real, real_names = load_set(args.real, args.num, args.size, args.frames)
        fake, fake_names = load_set(args.fake, args.num, args.size, args.frames)
        f_real, f_fake = extract(features, real), extract(features, fake)
        n, dim = min(len(f_real), len(f_fake)), f_real.shape[1]
        if n < 2:
            raise UserError(f"{len(real)} real and {len(fake)} generated videos: a Fréchet distance needs "
                            f"at least 2 of each (it compares covariances)")
        if n <= dim:
            print(f"note: {n} videos for {dim} features: the covariances are singular, so the distance is "
                  f"biased and its interval unreliable; use more than {dim} videos per set")
        fd, lo, hi = fd_interval(f_real, f_fake)
        # the conditioning frame of a generated video is the first frame of the real video of the same
        # name; numbers match numbers (000123.mp4 is synthetic test clip 123)
        key = lambda name: str(int(name)) if name.isdigit() else name         # noqa: E731
        by_name = {key(n): v[0] for n, v in zip(real_names, real)}
        cond = (torch.stack([by_name[key(n)] for n in fake_names])
                if all(key(n) in by_name for n in fake_names) else None)
        d = diagnostics(fake, real, cond)
        print(f"{args.metric_name} {fd:.3f}  95% bootstrap interval [{lo:.3f}, {hi:.3f}]  "
              f"({len(real)} real, {len(fake)} generated videos)")
        print(f"static-video rate {d['static_rate']:.3f}, motion relative to real {d['motion_ratio']:.3f}, "
              + (f"first-frame PSNR {d['first_frame_psnr']:.2f} dB" if cond is not None
                 else "first-frame PSNR n/a (generated files are not named after real ones)"))
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
