"""Videos in and out: the synthetic bouncing-shapes dataset, a folder-of-videos loader, image loading
for the conditioning frame, and mp4/gif writing.

OSV trains on OpenVid-1M and conditions on a real first frame. Neither can be downloaded here, so the
default data is synthetic (docs/paper.md, "Data"): one to three shapes moving at constant velocity
with elastic bounces off the walls. The first frame shows where the objects are but not where they
go, so the future is uncertain, as in real image-to-video.

Read first: `SyntheticVideos.batch` (the whole generator, vectorised over clips, objects, frames and
pixels) and `bounce` (the closed-form physics). Conventions: videos are `(T, 3, H, W)` per clip and
`(B, T, 3, H, W)` per batch, floats in [-1, 1]. Every dataset is a pure function of an integer clip
index, which is what makes training runs resumable on the same trajectory (see train.py).
"""
import argparse
import copy
import hashlib
import importlib
import inspect
import json
import math
import os
import sys
import time
import warnings

import av
import numpy as np
import torch
from tqdm import tqdm


class UserError(Exception):
    """A mistake in the user's input (a missing file, a folder without videos). Printed as one line."""


def optional(name, what="the real-SVD path", install="pip install -r requirements-svd.txt"):
    """Import a package that only one path needs (the real SVD: diffusers, transformers, safetensors;
    plots: matplotlib), or a one-line error that says how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"{what} needs {name.split('.')[0]}: {install}") from None


def check_numbers(*checks):
    """(flag, value, lowest) triples of a command line: a one-line error for a value that is not a finite
    number >= lowest (None: not given)."""
    for flag, v, low in checks:
        if v is not None and not (math.isfinite(v) and v >= low):
            raise UserError(f"{flag} {v}: must be a finite number >= {low:g}")


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (its default prints the whole usage first)."""

    def error(self, message):
        print(f"error: {message} (`{self.prog} --help` lists the flags)", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------
# Synthetic bouncing shapes

BASE_FPS = 24.0          # our choice: the simulator's native frame rate; a clip keeps every stride-th frame
STRIDES = (1, 2, 3)      # our choice: frame strides, so fps in {24, 12, 8} (SVD conditions on fps too)
MAX_OBJECTS = 3          # our choice: one to three objects
SHAPES = ("circle", "square", "triangle")
SPLITS = {"train": 0, "test": 1}   # the split is part of every clip's seed, so the splits are disjoint


def _uniform(split, index, n):
    """Counter-based uniforms in [0, 1): a splitmix64 hash of (split, clip index, draw number).
    Vectorised over clips; clip i's numbers do not depend on which other clips share its batch."""
    idx = np.asarray(index, dtype=np.uint64)[:, None]                                  # (B, 1)
    z = (np.uint64(split) << np.uint64(56)) ^ (idx * np.uint64(n)) + np.arange(n, dtype=np.uint64)  # (B, n)
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)                    # (B, n)


def bounce(p0, v, t, lo, hi):
    """Elastic bounce in closed form. A point starting at p0 with velocity v between walls lo and hi is
    at the triangle-wave fold of the free path p0 + v t; its velocity flips sign on every other lap.
    All arguments broadcast. Returns (position, velocity) at times t."""
    span = hi - lo
    y = torch.remainder(p0 + v * t - lo, 2 * span)           # position on the unfolded 2*span loop
    pos = lo + span - (y - span).abs()                       # fold the loop back into [lo, hi]
    vel = torch.where(y < span, v, -v)
    return pos, vel


class SyntheticVideos:
    """Bouncing shapes, deterministic from (split, index). `batch(indices)` returns a dict with
    video (B, T, 3, H, W) in [-1, 1] and its ground truth: pos and vel (B, T, K, 2) in pixels and pixels
    per output frame (x, y), shape (B, K) with -1 for an absent object, color (B, K, 3) in [0, 1],
    size (B, K) half-extent in pixels, motion (B,) and fps (B,), with K = MAX_OBJECTS."""

    N_DRAWS = 12 + MAX_OBJECTS * 9

    def __init__(self, image_size=32, num_frames=8, split="train", device="cpu"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        self.H, self.W = (image_size, image_size) if isinstance(image_size, int) else image_size  # S or (H, W)
        self.T, self.split, self.device = num_frames, split, torch.device(device)

    def __getitem__(self, index):
        return {k: v[0] for k, v in self.batch([index]).items()}

    def batch(self, indices):
        indices = list(indices)
        if len(indices) > 64 and self.device.type == "cpu":   # chunks stay in cache: faster on CPU
            parts = [self.batch(indices[i:i + 64]) for i in range(0, len(indices), 64)]
            return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        H, W, T, K = self.H, self.W, self.T, MAX_OBJECTS
        S = min(H, W)                                            # objects and speeds scale with the short side
        dev = self.device      # generated where it is used: on the GPU, data never limits training
        u = torch.from_numpy(_uniform(SPLITS[self.split], indices, self.N_DRAWS)).float().to(dev)  # (B, n)
        B = u.shape[0]
        clip, obj = u[:, :12], u[:, 12:].view(B, K, 9)                                   # (B, 12), (B, K, 9)

        num_objects = 1 + (clip[:, 0] * K).long()                                        # 1..3
        stride = torch.tensor(STRIDES, device=dev)[(clip[:, 1] * len(STRIDES)).long()]        # (B,)
        valid = torch.arange(K, device=dev)[None] < num_objects[:, None]                # (B, K)
        shape = torch.where(valid, (obj[..., 0] * len(SHAPES)).long(), -1)               # (B, K)
        size = S * (0.10 + 0.08 * obj[..., 1])                   # half-extent: 10-18% of the frame
        # bright, saturated objects on a darker background, so every object is visible
        color = 0.35 + 0.65 * obj[..., 2:5]                                              # (B, K, 3)
        color.scatter_(-1, (obj[..., 5, None] * 3).long(), 1.0)                          # one channel at 1
        wall = torch.tensor([W, H], device=dev).float()                                 # (x, y)
        p0 = size[..., None] + (wall - 2 * size[..., None]) * obj[..., 6:8]              # (B, K, 2)
        angle = 2 * math.pi * obj[..., 8]
        speed = S * (0.010 + 0.025 * clip[:, 2:2 + K]) * stride[:, None]  # px per output frame
        v = speed[..., None] * torch.stack([angle.cos(), angle.sin()], -1)               # (B, K, 2)

        t = torch.arange(T, device=dev).float().view(1, T, 1, 1)
        lo = size[:, None, :, None]                       # the wall is hit when the extent touches it
        pos, vel = bounce(p0[:, None], v[:, None], t, lo, wall - lo)                    # (B, T, K, 2)

        # Render: signed distance (pixels, > 0 inside) from each pixel centre to each object, at each
        # frame; a one-pixel ramp at the edge anti-aliases. Separable in x and y, so the (H, W) grid
        # only appears in the final broadcast.
        gx, gy = torch.arange(W, device=dev).float() + 0.5, torch.arange(H, device=dev).float() + 0.5
        dx = gx.view(1, 1, 1, 1, W) - pos[..., 0, None, None]                           # (B, T, K, 1, W)
        dy = gy.view(1, 1, 1, H, 1) - pos[..., 1, None, None]                           # (B, T, K, H, 1)
        r = size[:, None, :, None, None]                                                # (B, 1, K, 1, 1)
        sd_circle = r - (dx * dx + dy * dy).sqrt()
        sd_square = r - torch.maximum(dx.abs(), dy.abs())
        # triangle: apex at (0, -r), base from (-r, r) to (r, r); edges 2|x| - y - r = 0 and y = r
        sd_tri = torch.minimum((r + dy - 2 * dx.abs()) / math.sqrt(5.0), r - dy)
        s = shape[:, None, :, None, None]
        sd = torch.where(s == 0, sd_circle, torch.where(s == 1, sd_square, sd_tri))     # (B, T, K, H, W)
        alpha = (sd + 0.5).clamp(0, 1) * valid[:, None, :, None, None]

        # Background: a dark colour, half of them with a soft static sinusoidal texture.
        base = 0.05 + 0.25 * clip[:, 5:8]                                               # (B, 3)
        freq = 2 * math.pi * (1 + 2 * clip[:, 8:10]) / S                               # (B, 2)
        amp = 0.06 * (clip[:, 10] < 0.5) * (0.5 + clip[:, 10] * 2)                      # (B,)
        wave = torch.sin(freq[:, 0, None, None] * gx[None, None] + freq[:, 1, None, None]
                         * gy[None, :, None] + 2 * math.pi * clip[:, 11, None, None])    # (B, H, W)
        bg = base[:, :, None, None] + amp[:, None, None, None] * wave[:, None]          # (B, 3, H, W)

        img = bg[:, None].expand(B, T, 3, H, W)
        for k in range(K):       # painter's order: later objects in front
            a = alpha[:, :, k, None]                                                     # (B, T, 1, H, W)
            img = img * (1 - a) + color[:, None, k, :, None, None] * a
        return {
            "video": img * 2 - 1,
            "pos": pos, "vel": vel, "shape": shape, "color": color, "size": size,
            "num_objects": num_objects,
            # motion score (our stand-in for SVD's motion bucket): mean true speed of the objects, in
            # percent of the frame width per output frame; fps from the stride
            "motion": 100 * (speed * valid).sum(1) / num_objects / S,
            "fps": BASE_FPS / stride,
        }


# ----------------------------------------------------------------------------------------------
# Resizing shared by video frames and images

def parse_size(text):
    """"320x576" -> (320, 576): height x width."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        assert h > 0 and w > 0
        return h, w
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not HxW (for example 576x1024)") from None


def frame_size(size, image_size):
    """A run's frames (H, W): its --size "HxW", else image_size (a side, or the published SVD's (H, W))."""
    if size:
        try:
            return parse_size(size)
        except argparse.ArgumentTypeError as e:
            raise UserError(f"--size {e}") from None
    return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)



def _fit(w, h, size):
    """Scaled (w, h) that covers size = (H, W) with the least scaling (the short side for a square)."""
    s = max(size[0] / h, size[1] / w)
    return max(size[1], round(w * s)), max(size[0], round(h * s))


def _frame_to_array(frame, size):
    """A decoded PyAV frame -> uint8 (H, W, 3) RGB for size = S (square) or (H, W): resize to cover,
    centre crop. PyAV's rgb24 conversion turns grayscale into RGB and drops an alpha channel."""
    H, W = (size, size) if isinstance(size, int) else size
    w, h = _fit(frame.width, frame.height, (H, W))
    a = frame.to_ndarray(width=w, height=h, format="rgb24", interpolation="AREA")   # (h, w, 3)
    y, x = (h - H) // 2, (w - W) // 2
    return a[y:y + H, x:x + W]


def _to_tensor(frames):
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).movedim(-1, -3).float() / 127.5 - 1


def load_image(path, size):
    """The conditioning frame: PNG or JPEG (anything FFmpeg reads) -> (3, H, W) in [-1, 1], size = S
    (square) or (H, W)."""
    if not os.path.isfile(path):
        raise UserError(f"image not found: {path}")
    try:
        with av.open(path) as c:
            frame = next(c.decode(video=0))
    except (av.FFmpegError, StopIteration, IndexError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    H, W = (size, size) if isinstance(size, int) else size
    if (frame.height, frame.width) != (H, W):
        print(f"note: {path} is {frame.width}x{frame.height}; resized and centre-cropped to {W}x{H}")
    return _to_tensor(_frame_to_array(frame, size))


# ----------------------------------------------------------------------------------------------
# A folder of videos

VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".mpg", ".mpeg", ".gif")


# containers with an index, where a seek and the frames' timestamps are exact. Elsewhere (MPEG-PS/TS,
# AVI, GIF) timestamps after a seek can be off by frames, so a clip decodes from the file's start
SEEKABLE = {"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"}


def _probe(path):
    """Frame count, frame rate and first-frame time of a video file; raises if it cannot be decoded."""
    with av.open(path) as c:
        if not c.streams.video:
            raise ValueError("no video stream")
        st = c.streams.video[0]
        n = sum(1 for p in c.demux(st) if p.size > 0)        # packets, not decoded frames: cheap
        c.seek(0)
        first = next(c.decode(st))                           # proves that the codec can decode it
        rate = st.average_rate or st.guessed_rate or 25
        return {"frames": n, "fps": float(rate), "t0": float(first.time or 0.0), "width": first.width,
                "height": first.height, "seek": c.format.name in SEEKABLE}


class VideoFolder:
    """Every video under `root` (recursive). `batch(indices)` gives one clip per index: a file and a start
    frame chosen from the index's hash, num_frames frames at `frame_stride`, short side resized to
    image_size and centre-cropped. The index of usable files is built once and, given `cache`, kept in
    a JSON file so a resumed run does not probe the folder again."""

    def __init__(self, root, image_size=32, num_frames=8, frame_stride=1, cache=None, seed=0):
        if not os.path.isdir(root):
            raise UserError(f"{root} is not a folder")
        self.root, self.S, self.T, self.stride, self.seed = root, image_size, num_frames, frame_stride, seed
        self.need = (num_frames - 1) * frame_stride + 1
        old = {}
        if cache and os.path.isfile(cache):
            with open(cache) as f:
                old = json.load(f)
        index, self.skipped = {}, 0
        for path in sorted(self._scan(root)):
            st = os.stat(path)
            key = f"{st.st_size}:{st.st_mtime_ns}"
            info = old.get(path) if old.get(path, {}).get("key") == key else None
            if info is None:
                try:
                    info = {"key": key, **_probe(path)}
                except Exception as e:         # any decoder failure means: not usable
                    info = {"key": key, "error": f"cannot decode ({str(e).splitlines()[0][:120]})"}
            index[path] = info
            why = info.get("error") or (f"too short ({info['frames']} frames, a clip needs {self.need})"
                                        if info["frames"] < self.need else None)
            if why:
                warnings.warn(f"skipping {path}: {why}", stacklevel=2)
                self.skipped += 1
        if cache:
            _atomic_json(cache, index)
        self.files = [(p, i) for p, i in index.items() if "error" not in i and i["frames"] >= self.need]
        if not self.files:
            raise UserError(f"no usable video in {root} ({self.skipped} files skipped)")
        self.failed = 0

    @staticmethod
    def _scan(root):
        for d, _, names in os.walk(root, followlinks=True):
            for n in names:
                if n.lower().endswith(VIDEO_EXTS):
                    yield os.path.join(d, n)

    def __len__(self):
        return len(self.files)

    def clip(self, index):
        """(T, 3, H, W) in [-1, 1] and the fps after striding. Falls back to the next file on failure."""
        u = _uniform(2 + self.seed, [index], 2)[0]
        for attempt in range(len(self.files)):
            path, info = self.files[(int(u[0] * len(self.files)) + attempt) % len(self.files)]
            start = int(u[1] * (info["frames"] - self.need + 1))
            try:
                return self._decode(path, info, start), info["fps"] / self.stride
            except Exception as e:
                self.failed += 1
                warnings.warn(f"skipping a clip of {path}: {str(e).splitlines()[0][:120]}", stacklevel=2)
        raise UserError(f"no video in {self.root} could be decoded")

    def _decode(self, path, info, start):
        fps, out, n = info["fps"], [], None
        with av.open(path) as c:
            st = c.streams.video[0]
            st.thread_type = "AUTO"
            seek = info.get("seek") and start / fps > 2.0 and st.time_base is not None
            if seek:     # jump to the keyframe before the clip instead of decoding everything before it
                c.seek(int((info["t0"] + start / fps) / st.time_base), stream=st, backward=True)
            for frame in c.decode(st):
                # frames are counted in decode order; after a seek, the first one is placed by its
                # timestamp (timestamps alone are not exact: a GIF's 8 fps is stored as 12/13 cs delays)
                n = n + 1 if n is not None else round((frame.time - info["t0"]) * fps) if seek else 0
                if n >= start and (n - start) % self.stride == 0:
                    out.append(_frame_to_array(frame, self.S))
                    if len(out) == self.T:
                        return _to_tensor(np.stack(out))                   # (T, 3, H, W)
        raise ValueError(f"only {len(out)} of {self.T} frames decoded from frame {start}")

    def names(self):
        """The usable files' paths relative to the root (what the held-out split is made of)."""
        return [os.path.relpath(path, self.root) for path, _ in self.files]

    def only(self, names, keep=True):
        """This folder with only the files in `names` (keep=False: all but them): a split of it."""
        part = copy.copy(self)
        names = set(names)
        part.files = [(p, i) for p, i in self.files if (os.path.relpath(p, self.root) in names) == keep]
        if not part.files:
            raise UserError(f"no usable video of {self.root} is left in this split")
        return part

    def first_clips(self, n=None):
        """The first n usable files' first clips, (N, T, 3, H, W), and the files' paths relative to the
        root without extension (so generated videos can be paired with real ones by name)."""
        files = self.files[:n]
        clips = torch.stack([self._decode(path, info, 0) for path, info in tqdm(
            files, desc="reading first clips", disable=len(files) < 100, dynamic_ncols=True)])
        names = [os.path.splitext(os.path.relpath(path, self.root))[0] for path, _ in files]
        return clips, names

    def first_batch(self, n=None):
        """batch() of the first n files' first clips: the same clips on every call (a report's)."""
        video, _ = self.first_clips(n)
        return {"video": video, "motion": motion_score(video),
                "fps": torch.tensor([i["fps"] / self.stride for _, i in self.files[:n]])}

    def batch(self, indices):
        clips = [self.clip(i) for i in indices]
        video = torch.stack([v for v, _ in clips])                                     # (B, T, 3, H, W)
        return {"video": video, "motion": motion_score(video), "fps": torch.tensor([f for _, f in clips])}


def motion_score(video):
    """The motion score of real clips, where no true speed exists: mean absolute frame difference (pixels
    in [0, 1]) x 100. A proxy: comparable across clips of one dataset, not with synthetic ones."""
    return 50 * (video[:, 1:] - video[:, :-1]).abs().mean((1, 2, 3, 4))


SPLIT = "split.json"             # a run folder's record of its held-out split (held_out)


def held_out(folder, share, record=None):
    """The held-out test files of a video folder, by file: the ceil(share x N) files (at least 2) whose
    relative paths hash lowest, so the split depends on the names alone, not on their order or on the
    machine. `record` (the run folder's split.json) keeps the first split: a later command reads it, so
    a file added to the folder later only ever joins the training side. share 0: no split (empty set).
    A split is by file, never within one, so a folder of one long video is refused: cut it into files."""
    if record and os.path.isfile(record):
        with open(record) as f:
            kept = json.load(f)
        if kept["test_share"] != share:
            raise UserError(f"{record} holds the split of --test-share {kept['test_share']}, not {share}")
        return set(kept["test"])
    if share == 0:
        return set()
    names = folder.names()
    n = max(2, math.ceil(share * len(names)))
    if len(names) - n < 1:
        raise UserError(f"{len(names)} usable video(s) in {folder.root}: too few for a held-out split by file (at "
                        f"least 2 test videos and 1 training video; --test-share {share}). Add videos (one long "
                        f"video: cut it into files, e.g. ffmpeg -i in.mp4 -f segment -segment_time 10 -c copy "
                        f"part%03d.mp4), or give --test-share 0 to train on every file with no held-out report")
    rank = lambda name: hashlib.sha256(name.encode()).hexdigest()                       # noqa: E731
    test = sorted(sorted(names, key=rank)[:n])
    if record:
        _atomic_json(record, {"test_share": share, "test": test, "train": sorted(set(names) - set(test))})
    return set(test)


class StepBatches(torch.utils.data.Dataset):
    """The batches of a training run, item s being this rank's share of the batch of step s: clips
    s*B + rank*b ... (b = B / world). A pure function of s, so a resumed run reads the same batches."""

    def __init__(self, dataset, batch_size, rank, world):
        self.dataset, self.B, self.b, self.rank = dataset, batch_size, batch_size // world, rank

    def __getitem__(self, s):
        first = s * self.B + self.rank * self.b
        return self.dataset.batch(range(first, first + self.b))


class FixedMotion:
    """A dataset whose clips all carry one motion micro-condition (SVD's motion bucket id, for clips whose
    own motion score is not on SVD's scale)."""

    def __init__(self, dataset, value):
        self.dataset, self.value = dataset, float(value)

    def batch(self, indices):
        b = self.dataset.batch(indices)
        return {**b, "motion": torch.full_like(b["motion"], self.value)}


def save_atomic(obj, path, text=False):
    """torch.save(obj) (or a string, text=True) to path through a temporary file and a rename: a crash
    mid-write never leaves a half-written file, and the name is unique to this process."""
    tmp = f"{path}.{os.getpid()}.tmp"
    if text:
        with open(tmp, "w") as f:
            f.write(obj)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def source_hash(*parts):
    """12 hex digits of a hash of the source code of `parts` (functions, classes, modules): a cache's
    code version (the latent cache's entries, the report's rows), so nothing is read by newer code."""
    return hashlib.sha256("".join(inspect.getsource(p) for p in parts).encode()).hexdigest()[:12]


def _atomic_json(path, obj):
    save_atomic(json.dumps(obj), path, text=True)


# ----------------------------------------------------------------------------------------------
# Writing videos

def make_grid(videos, ncol=None, pad=1):
    """(N, T, 3, H, W) -> (T, 3, H', W'): tiles in rows of ncol (default: near-square), pad pixels apart."""
    N, T, C, H, W = videos.shape
    ncol = ncol or math.ceil(math.sqrt(N))
    nrow = math.ceil(N / ncol)
    grid = videos.new_full((T, C, nrow * (H + pad) + pad, ncol * (W + pad) + pad), 1.0)   # white gaps
    for i in range(N):
        y, x = pad + (i // ncol) * (H + pad), pad + (i % ncol) * (W + pad)
        grid[:, :, y:y + H, x:x + W] = videos[i]
    return grid


def _palette(pixels, n=256, iters=8):
    """A 256-colour GIF palette by k-means over the video's pixels (uint8 (P, 3) -> (256, 3))."""
    x = torch.from_numpy(pixels).float()
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:20000]]
    centres = x[torch.linspace(0, len(x) - 1, n).long()].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=n)[:, None]
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    return centres


def write_video(path, video, fps=8, ncol=None, scale=None):
    """Write (T, 3, H, W) or a grid of (N, T, 3, H, W), values in [-1, 1], as .mp4 (H.264) or .gif.
    Small videos are enlarged (nearest neighbour) to at least 128 pixels high, unless `scale` says."""
    video = video.detach().float().cpu()
    if video.dim() == 5:
        video = make_grid(video, ncol)
    scale = scale or max(1, math.ceil(128 / video.shape[-2]))
    video = video.repeat_interleave(scale, -2).repeat_interleave(scale, -1)            # (T, 3, H, W)
    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()  # (T, H, W, 3)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".mp4", ".gif"):
        raise UserError(f"cannot write {path}: use .mp4 or .gif")
    if ext == ".mp4":     # yuv420p needs even sizes
        frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(path, "w") as c:
        if ext == ".mp4":
            st = c.add_stream("libx264", rate=round(fps), options={"crf": "18"})
            st.pix_fmt = "yuv420p"
        else:
            st = c.add_stream("gif", rate=round(fps))
            st.pix_fmt = "pal8"
            centres = _palette(frames.reshape(-1, 3))
            argb = np.zeros((256, 4), np.uint8)
            argb[:, 0], argb[:, 1:] = 255, centres.round().byte().numpy()
        st.width, st.height = frames.shape[2], frames.shape[1]
        for f in frames:
            if ext == ".mp4":
                frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            else:
                idx = torch.cdist(torch.from_numpy(f).reshape(-1, 3).float(), centres).argmin(1)
                frame = av.VideoFrame.from_ndarray((idx.byte().view(f.shape[:2]).numpy(), argb), format="pal8")
            c.mux(st.encode(frame))
        c.mux(st.encode())


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Preview or benchmark the synthetic dataset.")
    p.add_argument("--bench", action="store_true", help="clips per second on one CPU core")
    p.add_argument("--preview", metavar="OUT.gif", help="write a grid of 16 training clips")
    p.add_argument("--size", type=int, default=32, help="frame size in pixels (default: %(default)s)")
    p.add_argument("--frames", type=int, default=8, help="frames per clip (default: %(default)s)")
    a = p.parse_args()
    ds = SyntheticVideos(a.size, a.frames)
    if a.preview:
        write_video(a.preview, ds.batch(range(16))["video"], fps=8)
        print(f"wrote {a.preview}")
    if a.bench:
        torch.set_num_threads(1)
        for B in (16, 64, 256):
            ds.batch(range(B))                                            # warm-up
            t, n = time.perf_counter(), 0
            while time.perf_counter() - t < 3:
                ds.batch(range(n, n + B))
                n += B
            print(f"{a.size}x{a.size}, {a.frames} frames, batches of {B}: "
                  f"{n / (time.perf_counter() - t):.0f} clips/s on one core")
