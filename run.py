"""A run folder, and what every stage of a run shares: device, precision, the distributed context,
the data (the clips, or the latent cache a stage reads: `Run.stage_data`), the lock that keeps one
command per folder, the log, and what the folder was made from.

`python train.py --stage ...` opens a `Run` on `--out`. Its first command stores the flags that define
the run (data, frame size and count, preset, autoencoder) in run.json; later commands inherit them
(`inherit`). `stage_checks` is the end-of-stage measurement of a video model on the run's held-out
clips. Read first: `Run.__init__`.
"""
import json
import os
import shutil
import warnings
from contextlib import ExitStack, contextmanager, nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

import latents
import svd
from autoencoder import AutoEncoder
from data import (SPLIT, FixedMotion, SyntheticVideos, UserError, VideoFolder, frame_size, held_out, save_atomic,
                  write_video)
from metric import diagnostics
from sample import generate


MIN_FREE = 512 * 2 ** 20                 # bytes a run folder must have free at start-up


class Run:
    """What every stage shares: device, precision, distributed context, data, run folder."""

    def __init__(self, cfg, out, tag=""):
        self.cfg, self.out, self.tag = cfg, out, tag
        self.ddp = "RANK" in os.environ
        cuda = torch.cuda.is_available() and cfg.device != "cpu"
        if self.ddp:
            dist.init_process_group("nccl" if cuda else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            local = int(os.environ.get("LOCAL_RANK", 0))
            self.device = torch.device(f"cuda:{local}" if cuda else "cpu")
            if cuda:
                torch.cuda.set_device(self.device)
            else:   # share the cores instead of oversubscribing them
                torch.set_num_threads(max(1, os.cpu_count() // int(os.environ["LOCAL_WORLD_SIZE"])))
        else:
            self.rank, self.world = 0, 1
            self.device = torch.device(cfg.device or ("cuda" if cuda else "cpu"))
        self.master = self.rank == 0
        dtype = cfg.dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"--dtype must be float32, bfloat16 or float16, not {dtype}")
        # mixed precision in three lines: autocast for the forward, a GradScaler only for fp16
        self.ptdtype = getattr(torch, dtype)
        self.autocast = (nullcontext() if dtype == "float32"
                         else torch.autocast(self.device.type, dtype=self.ptdtype))
        self.scaler_enabled = dtype == "float16"
        try:                      # a read-only or missing-permission folder fails here, not at the first log
            os.makedirs(os.path.join(out, "samples"), exist_ok=True)
            free = shutil.disk_usage(out).free
            if free < MIN_FREE:
                raise UserError(f"the run folder {out} has {free / 2 ** 20:.0f} MiB free; a stage's checkpoints "
                                f"need at least {MIN_FREE / 2 ** 20:.0f} MiB")
            if self.master:
                self.lock()
        except OSError as e:
            raise UserError(f"cannot write to the run folder {out}: {e.strerror or e}") from None
        try:
            self.open_data(cfg, out)
        except BaseException:               # the lock goes with the failed start
            self.close()
            raise
        self._eval = None

    def open_data(self, cfg, out):
        """The training and evaluation clips: a folder of videos, or the synthetic train and test splits."""
        hw = frame_size(cfg.size, cfg.image_size)                                    # (H, W)
        if cfg.data:
            folder = VideoFolder(cfg.data, hw, cfg.num_frames, cfg.frame_stride,
                                 cache=os.path.join(out, "data_index.json") if self.master else None)
            # the held-out split by file, recorded in split.json: no training stage reads a test file
            test = held_out(folder, cfg.test_share, os.path.join(out, SPLIT))
            self.dataset = folder.only(test, keep=False) if test else folder
            self.eval_set = folder.only(test) if test else folder
            self.eval_name = (f"held-out clips of {cfg.data} (the test split, {len(self.eval_set)} files)" if test
                              else f"clips of {cfg.data} (not held out: --test-share 0)")
        else:
            self.dataset = SyntheticVideos(hw, cfg.num_frames, "train", self.device)
            self.eval_set = SyntheticVideos(hw, cfg.num_frames, "test", self.device)
            self.eval_name = "held-out synthetic clips"
        if cfg.svd:         # our motion scores are not on the scale of SVD's motion bucket
            same = self.eval_set is self.dataset
            self.dataset = FixedMotion(self.dataset, cfg.motion_bucket)
            self.eval_set = self.dataset if same else FixedMotion(self.eval_set, cfg.motion_bucket)

    def stage_data(self, name, cfg, reads):
        """What a stage reads: the run's clips, or for the student and teacher stages the latent cache when
        it fits the run (latents.py), which must hold the `reads` clips the stage reads (`check_covers`)."""
        if name == "ae":
            return self.dataset
        key = latents.cache_key(cfg, self.out, self.ptdtype, svd.SVDEncoders if cfg.svd else AutoEncoder)
        cache = latents.open_cache(os.path.join(self.out, "latents"), key)
        if cache is None:
            return self.dataset
        inner = getattr(self.dataset, "dataset", self.dataset)                       # FixedMotion's clips
        note = latents.check_covers(cache, reads, name, len(inner) if cfg.data else None)
        if self.master:
            print(f"stage {name}: reading the latent cache {cache.folder} ({len(cache)} clips)")
            if note:
                print(note)
                self.log({"stage": name, "event": "cache passes", "note": note})
        return cache

    @contextmanager
    def in_sync(self, nets, skip):
        """DDP all-reduces the gradients in every backward pass; with --grad-accum only the last micro-batch
        needs it (the earlier ones add up locally): skip=True runs one under each net's no_sync."""
        with ExitStack() as stack:
            for net in nets.values() if skip and self.ddp else ():
                stack.enter_context(getattr(net, "_orig_mod", net).no_sync())   # a compiled net: its DDP inside
            yield

    def eval_batch(self, n):
        """The first n clips of the evaluation set (the test split, synthetic or held-out files): video, fps,
        motion."""
        if self._eval is None or len(self._eval["video"]) < n:
            first = 10 ** 9 if self.eval_set is self.dataset else 0   # folder: clip indices no step reads
            b = self.eval_set.batch(range(first, first + n))
            self._eval = {k: b[k].to(self.device) for k in ("video", "fps", "motion")}
        return {k: v[:n] for k, v in self._eval.items()}

    def micro_median(self):
        """The medians of fps and motion over (up to) 64 evaluation clips: sample.py's defaults for a
        model of this run, so an --image is conditioned like the clips the model saw."""
        b = self.eval_batch(min(64, self.cfg.eval_clips))
        return {k: float(b[k].float().median()) for k in ("fps", "motion")}

    def log(self, record):
        record = {**record, "tag": self.tag} if self.tag else record
        if self.master:
            with open(os.path.join(self.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def forget_log(self, stage, step):
        """On resume: drop this stage's (and tag's) records after `step`; those steps are logged again."""
        path = os.path.join(self.out, "log.jsonl")
        if not self.master or not os.path.isfile(path):
            return
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        keep = [r for r in records if not (r.get("stage") == stage and r.get("tag", "") == self.tag
                                           and r.get("step", 0) > step)]
        save_atomic("".join(json.dumps(r) + "\n" for r in keep), path, text=True)

    def lock(self):
        """One command per run folder: `.lock` holds the PID of the process that uses it. A live holder
        is a one-line error; a lock whose process is gone is taken over with a warning."""
        path = os.path.join(self.out, ".lock")
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with open(path) as f:
                pid = int(f.read().strip() or 0)
            try:
                os.kill(pid, 0)                                   # signal 0: is it alive?
                alive = pid > 0
            except ProcessLookupError:
                alive = False
            except PermissionError:                               # alive, another user's
                alive = True
            if alive:
                raise UserError(f"{self.out} is in use by process {pid}: one command per run folder "
                                f"(wait for it, or stop it)") from None
            warnings.warn(f"{self.out}: taking over the lock of process {pid}, which is gone")
            os.remove(path)
            return self.lock()
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        self.locked = path

    def close(self):
        if getattr(self, "locked", None) and os.path.isfile(self.locked):
            os.remove(self.locked)


# what a run folder is made from: its first command stores these in run.json, later commands inherit them
RUN_DEFINING = ("preset", "data", "image_size", "size", "num_frames", "frame_stride", "test_share", "svd",
                "ae_channels", "ae_latent_channels")


def inherit(args):
    """Fill the flags a run folder was made with (run.json) that this command does not give; a given
    value that differs is a one-line error unless --override says it is meant."""
    path = os.path.join(args.out, "run.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        stored = json.load(f)
    for k, v in stored.items():
        v, given = tuple(v) if isinstance(v, list) else v, getattr(args, k, None)
        if given is None:
            setattr(args, k, v)
        elif given != v and not args.override:
            flag = "--" + k.replace("_", "-")
            raise UserError(f"{args.out} was made with {flag} {v!r}, this command gives {given!r}: leave the "
                            f"flag out to keep the run's, or add --override to mean it")


def stage_checks(label, ema, ae, run, cfg, steps, scale, sampler):
    """sample(path) and finish() of a video model's training stage (train.py), with its EMA weights:
    held-out clips above the model's videos from their first frames (as the report samples them); the
    diagnostics on up to 64 of them. run: train.py's Run (eval_batch, device, eval_name, master)."""
    def videos(n, progress=False):
        b = run.eval_batch(n)
        with svd.resident(ae, run.device):          # SVD's CLIP and VAE for the condition, the VAE for the decodes
            cond = ae.condition(b["video"][:, 0], b["fps"], b["motion"], torch.full((n,), 0.02, device=run.device))
        with svd.resident(getattr(ae, "vae", ae), run.device):
            return b["video"], made(cond, n, cfg.check_batch, progress)

    def made(cond, n, chunk, progress):
        fake = []
        c, h, w = cond["concat"].shape[1:]                 # each clip's noise its own, whatever --check-batch
        noise = torch.randn(n, cfg.num_frames, c, h, w, generator=torch.Generator().manual_seed(cfg.seed))
        with ema.swapped() as D:                    # --check-batch clips per call: a progress bar
            for i in tqdm(range(0, n, chunk), desc=f"{label}: check", disable=not (progress and run.master),
                          dynamic_ncols=True):
                z, _ = generate(D, {k: v[i:i + chunk] for k, v in cond.items()}, cfg.num_frames, steps, scale,
                                sampler, cfg.sigma_min, cfg.sigma_max, seed=cfg.seed + i, grid_size=cfg.grid_size,
                                noise=noise[i:i + chunk])
                fake.append(ae.decode_video(z).clamp(-1, 1))
        return torch.cat(fake)

    def sample(path):
        write_video(path, torch.cat(videos(4)), fps=8, ncol=4)          # top: real; bottom: generated

    def finish():
        n = min(64, cfg.eval_clips)
        real, fake = videos(n, progress=True)
        d = diagnostics(fake, real, real[:, 0])
        if run.master:
            print(f"{label} on {n} {run.eval_name}: first-frame PSNR {d['first_frame_psnr']:.2f} dB, static-video "
                  f"rate {d['static_rate']:.3f}, motion relative to real {d['motion_ratio']:.3f}")
        return {"diagnostics": d}
    return sample, finish
