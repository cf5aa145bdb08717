"""The ruler: the Fréchet video distance, its bootstrap intervals (single and paired), and the networks
whose features it compares (FVD-syn's offline network, or I3D for published-style FVD).

The paper reports FVD: the Fréchet distance between Gaussians fitted to I3D features of real and of
generated videos. I3D's weights cannot be downloaded here, and I3D-FVD is known to barely notice
temporal corruption (Ge et al. 2024, "On the Content Bias in FVD"). So, besides the I3D path for
users who have its TorchScript file, this file trains a small video network on labels that cost
nothing and measures the same Fréchet distance in its features: **FVD-syn**, a different ruler, never
comparable with published FVD numbers.

Read first: `frechet_distance` (the formula), `paired_fd` (how two models are told apart),
`FeatureNet` and `make_labels` (what the offline network learns, and therefore what the ruler sees).
At the end: the diagnostics beside the distance (first-frame PSNR, static rate, motion) and the
corruptions the ruler must notice (`evaluate.py --sanity`). evaluate.py uses this file for its report
and command line.
"""
import math
import os
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

from data import SyntheticVideos, UserError, VideoFolder, save_atomic

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


def fd_boot(f_real, f_fake, n_boot=100, seed=0):
    """The distance between two feature sets and n_boot bootstrap replicates of it (both sets resampled
    on their own draws)."""
    f_real, f_fake = torch.as_tensor(f_real, dtype=torch.float64), torch.as_tensor(f_fake, dtype=torch.float64)
    fd = frechet_distance(*gaussian_stats(f_real), *gaussian_stats(f_fake))
    g = torch.Generator().manual_seed(seed)
    boot = []
    for _ in range(n_boot):
        a = f_real[torch.randint(len(f_real), (len(f_real),), generator=g)]
        b = f_fake[torch.randint(len(f_fake), (len(f_fake),), generator=g)]
        boot.append(frechet_distance(*gaussian_stats(a), *gaussian_stats(b)))
    return fd, np.array(boot)


def fd_interval(f_real, f_fake, n_boot=100, seed=0):
    """The distance between two feature sets and a 95% interval, estimate +- 1.96 bootstrap standard
    errors (both sets resampled). Not the bootstrap percentiles: resampling with replacement repeats
    videos, which adds to the distance's small-sample bias, so those sit above the estimate."""
    fd, boot = fd_boot(f_real, f_fake, n_boot, seed)
    half = 1.96 * float(np.std(boot, ddof=1))
    return fd, max(0.0, fd - half), fd + half


def paired_fd(f_real, fakes, n_boot=200, seed=0, paired_real=True):
    """The paired bootstrap: each generated set's distance to the real set, and n_boot replicates of all
    of them in which ONE draw of indices resamples every generated set alike, and the real set too where
    video i of every set starts from real clip i's first frame (paired_real; the report's rows do; else
    the real set gets its own draw). A difference between two sets then varies only with what differs
    between the models, not with which clips were drawn, so its interval is far narrower than the two
    single intervals suggest. f_real (N, D), fakes: K feature sets (N, D) in the same order.
    Returns fd (K,) and the replicates (n_boot, K)."""
    f_real = torch.as_tensor(f_real, dtype=torch.float64)
    fakes = [torch.as_tensor(f, dtype=torch.float64) for f in fakes]
    n = len(fakes[0])
    if any(len(f) != n for f in fakes) or (paired_real and len(f_real) != n):
        raise UserError(f"a paired comparison needs one video per clip in every set: the real set has "
                        f"{len(f_real)}, the generated {', '.join(str(len(f)) for f in fakes)}")
    real = gaussian_stats(f_real)
    fd = np.array([frechet_distance(*real, *gaussian_stats(f)) for f in fakes])
    g = torch.Generator().manual_seed(seed)
    boot = np.empty((n_boot, len(fakes)))
    for b in range(n_boot):
        idx = torch.randint(n, (n,), generator=g)                                        # one draw for all
        r = idx if paired_real else torch.randint(len(f_real), (len(f_real),), generator=g)
        real = gaussian_stats(f_real[r])
        boot[b] = [frechet_distance(*real, *gaussian_stats(f[idx])) for f in fakes]
    return fd, boot


def interval(estimate, replicates):
    """estimate +- 1.96 bootstrap standard errors (as fd_interval, for any statistic of the replicates)."""
    half = 1.96 * float(np.std(replicates, ddof=1))
    return estimate - half, estimate + half


def verdict(lo, hi):
    """Of a difference in distance (lower is better): said only where its interval excludes 0."""
    return "better" if hi < 0 else "worse" if lo > 0 else "not resolved"


def bias_corrected(fd, boot):
    """The bootstrap's bias correction of each estimate: 2 fd - (mean of its replicates) (Efron and
    Tibshirani 1993, ch. 10). A resampled set repeats videos, so a replicate carries about twice the
    Fréchet distance's small-sample bias; the correction removes about one estimate's worth of it."""
    return 2 * np.asarray(fd) - np.asarray(boot).mean(0)


def compare(fd, boot, k, ref):
    """Set k against set ref of one paired_fd: the difference fd_k - fd_ref with its paired 95% interval
    and verdict, and the ratio fd_k / fd_ref with the difference's interval divided by fd_ref (treated
    as fixed), so the ratio's interval excludes 1 exactly where the difference's excludes 0. (The
    bootstrap ratios themselves are pulled toward 1, each replicate carrying about twice the estimate's
    small-sample bias, which made their interval too narrow.) "corrected": the same difference with
    both distances bias-corrected (`bias_corrected`), its interval of the same width, and its verdict."""
    diff = fd[k] - fd[ref]
    d_lo, d_hi = interval(diff, boot[:, k] - boot[:, ref])
    ratio = (fd[k] / fd[ref], 1 + d_lo / fd[ref], 1 + d_hi / fd[ref])
    bc = bias_corrected(fd, boot)
    shift = (bc[k] - bc[ref]) - diff
    return {"diff": (diff, d_lo, d_hi), "ratio": ratio, "verdict": verdict(d_lo, d_hi),
            "corrected": {"diff": (diff + shift, d_lo + shift, d_hi + shift), "ratio": bc[k] / bc[ref],
                          "verdict": verdict(d_lo + shift, d_hi + shift)}}


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


def width_of(image_size):
    """The FVD-syn network takes frames of any size; `extract` resizes videos whose width is not its
    `image_size`, so a network trained on H x W frames is told W (a square side: itself)."""
    return image_size if isinstance(image_size, int) else image_size[1]


def train_feature_net(source, image_size, num_frames, path, steps=1500, batch_size=32, device="cpu",
                      frame_stride=1, seed=0, exclude=()):
    """Train the FVD-syn network on `source` ("synthetic" or a folder of videos, without the files named
    in `exclude`: a run's held-out test files) and save it to `path`."""
    if steps < 3:
        raise UserError(f"the FVD-syn network needs at least 3 training steps, not {steps}")
    torch.manual_seed(seed)
    synthetic = source == "synthetic"
    if synthetic:
        data = SyntheticVideos(image_size, 2 * num_frames, "train", device)
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data = VideoFolder(source, image_size, 2 * num_frames, frame_stride)
                data = data.only(exclude, keep=False) if exclude else data
        except UserError as e:
            raise UserError(f"{e}: the FVD-syn network trains on clips of {2 * num_frames} frames (twice the "
                            f"clip length, for its speed labels); use I3D (--i3d FILE) for shorter videos") from None
    net = FeatureNet(width_of(image_size), num_frames).to(device)
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
    save_atomic({"source": source, "image_size": image_size, "num_frames": num_frames, "steps": steps,
                 "excluded": sorted(exclude), "model": net.state_dict()}, path)
    return net


def load_feature_net(path, source, image_size, num_frames, device="cpu", **train_kw):
    """The cached FVD-syn network for this data and size; trained (and cached) if there is none."""
    if os.path.isfile(path):
        ck = torch.load(path, map_location="cpu", weights_only=False)
        if (ck["source"], ck["image_size"], ck["num_frames"], ck.get("excluded", [])) == (
                source, image_size, num_frames, sorted(train_kw.get("exclude", ()))):
            net = FeatureNet(width_of(image_size), num_frames)
            net.load_state_dict(ck["model"])
            return net.to(device).eval().requires_grad_(False)
        print(f"note: {path} was trained for {ck['source']} at {ck['image_size']}px x {ck['num_frames']} "
              f"frames; training one for {source} at {image_size}px x {num_frames}")
    print(f"training the FVD-syn feature network on {source}"
          + (f" without its {len(train_kw['exclude'])} held-out files" if train_kw.get("exclude") else "")
          + f"; cached in {path}")
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
            if not out:
                warnings.warn(f"videos of {tuple(v.shape[-2:])} px resized to the FVD-syn network's "
                              f"{features.image_size} px")
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
