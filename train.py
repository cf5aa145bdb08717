"""Training: the command line, the presets, and the one loop that every stage of the pipeline shares.

    python train.py --stage ae           # the latent autoencoder (autoencoder.py); also teacher, 1, 2
    python train.py --stage all          # ae, teacher, 1, 2 in order (finished ones kept), then the report
    torchrun --nproc_per_node=2 train.py --stage ae     # DistributedDataParallel, gloo on CPU

The paper's "implementation details" live here: Adam, mixed precision (bf16 autocast on CUDA by
default; fp16 with a GradScaler; fp32 on CPU), an EMA of the weights, gradient clipping, DDP, logging
and checkpoints. A stage hands the loop its networks, optimisers and a `step` function (`Stage`; the
student stages build theirs in gan.py and distill.py); the loop owns everything else.

Read first: `train_stage`. Two design decisions make runs resumable on the same trajectory:
- data is a pure function of (step, rank): step s reads clips s*B .. s*B+B-1 of the dataset, split
  across ranks, so the same batches come back after a restart with no data-loader state to save;
- the global RNG is re-seeded from (seed, rank, step) before every step, so the RNG state at a step is
  a function of the step number that the checkpoint stores; no generator state needs saving.
Checkpoints are one dict per stage (`runs/<name>/<stage>.pt`), written atomically (temp file, rename);
sample.py reads them.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import distill
import gan
import svd
import unet
from autoencoder import AEConfig, AutoEncoder, ae_loss, measure_scale_factor, psnr
from data import FixedMotion, StepBatches, SyntheticVideos, UserError, VideoFolder, write_video
from evaluate import diagnostics, write_report
from sample import cfg_scale, generate, load_ae, load_checkpoint, load_teacher


@dataclass
class Config:
    # data
    image_size: int = 32
    num_frames: int = 8
    data: str = ""                  # a folder of videos; empty: the synthetic bouncing shapes
    frame_stride: int = 1           # folder videos: keep every n-th frame
    workers: int = 4                # folder videos: decoding processes (at most the CPU count; 0: main thread)
    svd: str = ""                   # the published SVD's pipeline folder (svd.py): teacher, VAE, CLIP; no ae, teacher
    motion_bucket: int = 127        # SVD's motion micro-condition for every training clip (AnimateLCM's)
    dinov2: str = ""                # a transformers Dinov2Model folder for the discriminator (else torch.hub)
    # autoencoder (autoencoder.py); ours: small enough to train in minutes on a CPU
    ae_channels: tuple = (16, 32, 64)
    ae_latent_channels: int = 4
    ae_kl_weight: float = 1e-6      # SD's first-stage kl_weight
    ae_steps: int = 2000
    ae_batch_size: int = 32         # clips; the autoencoder sees one random frame of each
    ae_lr: float = 2e-3
    # teacher (unet.py): SVD's video UNet trained with EDM's denoising loss
    unet: str = "tiny"              # VideoUNet preset in unet.py: tiny, small, svd
    unet_channels: int = 0          # overrides the preset's model_channels when > 0
    grad_checkpoint: bool = False   # gradient checkpointing per UNet block
    teacher_steps: int = 1200
    teacher_batch_size: int = 8
    teacher_lr: float = 5e-4
    # ln sigma ~ N(p_mean, p_std). Ours: between EDM's image default (-1.2, 1.2) and SVD fine-tuners' (0.7, 1.6)
    p_mean: float = 0.0
    p_std: float = 1.2
    cond_drop: float = 0.1          # conditioning dropout so that CFG works (ours, as SD's 0.1)
    sigma_min: float = 0.002        # EDM and SVD
    # the top noise level of every sampler and of the students' grid. Ours: EDM's 80 (SVD: 700) lies far
    # outside what our teacher trains on (docs/experiments.md, "The top noise level")
    sigma_max: float = 8.0
    cfg_min: float = 1.0            # SVD's per-frame guidance ramp, first to last frame (svd.yaml: 1.0 -> 2.5)
    cfg_max: float = 2.5
    sample_steps: int = 25          # SVD: 25 steps
    # Stage 1, latent GAN pretraining (gan.py, discriminator.py); "ours" = not given by the paper
    stage1_steps: int = 400         # the paper: 2K iterations
    stage1_batch_size: int = 8      # the paper: 1 per GPU x 8 GPUs
    stage1_lr: float = 2e-4         # LoRA's Adam; the paper's 5e-6 is for SVD at 2K steps, far too slow here
    disc_lr: float = 2e-4           # ours
    lora_rank: int = 8              # ours; 0 = full fine-tuning (the paper's negative result)
    lora_convs: bool = True         # LoRA on the convolutions too, not only attention (ours)
    grid_size: int = 100            # OSV: 100 timesteps
    # Stage 1's levels (gan.LGP.draw_levels; the paper: "from the grid"). Ours: half at the top level,
    # where one-step sampling starts, half uniform (docs/experiments.md)
    stage1_top: float = 0.5
    # ours: only fakes from levels >= this meet the discriminator (gan.LGP.meets_disc); 0 is the paper's
    # form, every fake (docs/experiments.md)
    adv_min_sigma: float = 1.0
    lambda_adv: float = 0.1         # OSV: the adversarial weight in both stages
    huber_c: float = 0.001          # OSV (from LCM): pseudo-Huber c
    disc_backbone: str = "ae"       # ae | vit | dinov2 (discriminator.py; the offline default is measured)
    disc_input: str = "latent"      # latent (OSV) | decoded (the paper's Table 2e ablation)
    disc_r: int = 0                 # PixelShuffle factor; 0 = autoencoder downsampling / 2 (OSV: 4 on 1/8)
    # Stage 2, adversarial consistency distillation (distill.py)
    stage2_steps: int = 200         # the paper: 20K iterations
    stage2_batch_size: int = 8      # the paper: 1 per GPU x 2 GPUs
    stage2_lr: float = 1e-4         # ours (the paper: 5e-6 at SVD scale)
    m: int = 5                      # OSV: the teacher walks 5 grid steps per target
    # Stage 2's jumps (distill.jump_levels; the paper: n "from the grid"). Ours: half from the top level, a
    # quarter from direct_sigma straight to the teacher's solution, the rest uniform (docs/experiments.md)
    stage2_top: float = 0.5
    stage2_direct: float = 0.25
    direct_sigma: float = 1.0
    teacher_cfg: str = "ramp"       # CFG in the teacher's steps: SVD's ramp cfg_min -> cfg_max, or a number
    target_decay: float = 0.95      # EMA of the target network (Song et al. 2023's fixed mu)
    from_teacher: bool = False      # the ablation "no Stage 1": ACD from the teacher, LoRA and disc from scratch
    # the loop
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    warmup: int = 100               # steps of linear learning-rate warm-up
    log_every: int = 50
    sample_every: int = 500
    ckpt_every: int = 500
    eval_clips: int = 256           # held-out clips for the end-of-stage measurement
    report_clips: int = 200         # held-out clips per row of the report that ends --stage all
    feature_steps: int = 1500       # training steps of the FVD-syn feature network (evaluate.py)
    seed: int = 0
    device: str = ""                # empty: cuda if available, else cpu
    dtype: str = ""                 # empty: bfloat16 on CUDA, float32 on CPU
    compile: bool = False


PRESETS = {
    "tiny": {},                     # CPU, minutes: the defaults above
    "small": dict(image_size=64, num_frames=16, ae_channels=(32, 64, 128), ae_steps=20000,
                  ae_batch_size=64, ae_lr=1e-3, unet="small", teacher_steps=50000, teacher_batch_size=32,
                  teacher_lr=2e-4, sample_every=2000, ckpt_every=2000),
}
STAGES = ["ae", "teacher", "1", "2"]                    # the pipeline, in order
PREFIX = {"ae": "ae", "teacher": "teacher", "1": "stage1", "2": "stage2"}   # config-field prefixes
# fields that may change when a run is resumed; anything else must match the checkpoint
RUN_FIELDS = {"device", "dtype", "compile", "grad_checkpoint", "workers", "log_every", "sample_every", "ckpt_every",
              "eval_clips", "report_clips", "feature_steps"} | {f"{p}_steps" for p in PREFIX.values()}


class NonFiniteLoss(Exception):
    pass


@dataclass
class Stage:
    """What a stage gives the loop. `step(nets, batch, update)` runs one training step: nets are the
    (DDP-wrapped, compiled) versions of `models`; `update(loss, name)` backpropagates `loss` alone into
    optimiser `name`'s parameters and steps it. It returns a dict of scalar tensors to log, which must
    include "loss"."""
    models: dict
    opts: dict
    step: object
    ema: dict = field(default_factory=dict)
    sample: object = None           # sample(path): write a video with the EMA weights
    finish: object = None           # finish() -> dict: end-of-stage measurement, kept in the checkpoint
    extra: dict = field(default_factory=dict)     # kept in the checkpoint (model configs)
    cosine: bool = True             # learning rate: cosine decay to 10% after warm-up, else constant


# ----------------------------------------------------------------------------------------------
# The stages

def setup_ae(cfg, run):
    torch.manual_seed(cfg.seed)
    ae_cfg = AEConfig(channels=tuple(cfg.ae_channels), latent_channels=cfg.ae_latent_channels)
    model = AutoEncoder(ae_cfg).to(run.device)
    ema = unet.EMA(model, cfg.ema_decay)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.ae_lr)

    def step(nets, batch, update):
        video = batch["video"]                                                     # (B, T, 3, H, W)
        B, T = video.shape[:2]
        # one random frame per clip: many clips per batch beat many frames of few clips
        x = video[torch.arange(B), torch.randint(T, (B,))][:, None]               # (B, 1, 3, H, W)
        out = ae_loss(nets["ae"], x, cfg.ae_kl_weight)
        update(out["loss"], "ae")
        return out

    def sample(path):
        v = run.eval_batch(8)["video"]
        write_video(path, torch.cat([v, ema.model.decode_video(ema.model.encode_video(v))]),
                    fps=8, ncol=8)          # top row: input; bottom row: reconstruction

    def finish():
        sf = measure_scale_factor(ema.model, run.dataset.batch(range(256))["video"].to(run.device))
        db = psnr(ema.model, run.eval_batch(cfg.eval_clips)["video"])
        if run.master:
            print(f"ae: reconstruction PSNR {db:.2f} dB on {cfg.eval_clips} {run.eval_name}; "
                  f"scale_factor {sf:.4f}")
        return {"psnr": db, "scale_factor": sf}

    return Stage({"ae": model}, {"ae": opt}, step, {"ae": ema}, sample, finish,
                 extra={"ae_config": dataclasses.asdict(ae_cfg)})


def finished(run, name):
    """This run's finished autoencoder (frozen) or teacher (EMA weights) and its config; --svd: SVD's."""
    path, make = os.path.join(run.out, f"{name}.pt"), f"python train.py --stage {name} --out {run.out}"
    if name == "ae":
        enc = svd.SVDEncoders.from_pretrained(run.cfg.svd, device=run.device) if run.cfg.svd else None
        return (enc, {"latent_channels": enc.cfg.latent_channels}) if enc else load_ae(path, run.device, make)
    D = svd.load_denoiser(run.cfg.svd, device=run.device) if run.cfg.svd else load_teacher(path, run.device, make)[0]
    D.unet.cfg.checkpoint = run.cfg.grad_checkpoint      # this stage's flag, whatever the teacher trained with
    return D, dataclasses.asdict(D.unet.cfg)


def setup_teacher(cfg, run):
    ae, ae_config = finished(run, "ae")
    parts = unet.setup_teacher(cfg, ae_config["latent_channels"], ae, run.device)
    label = f"teacher, {cfg.sample_steps} Euler steps with CFG {cfg.cfg_min}->{cfg.cfg_max}"
    sample, finish = checks(label, parts["ema"]["denoiser"].model, ae, run, cfg, cfg.sample_steps,
                            cfg_scale(cfg.cfg_min, cfg.cfg_max, cfg.num_frames), "euler")
    return Stage(parts["models"], parts["opts"], parts["step"], parts["ema"], sample, finish,
                 extra={**parts["extra"], "ae_config": ae_config, "ae_state": ae.state_dict()})


def checks(label, D, ae, run, cfg, steps, scale, sampler):
    """sample(path) and finish() of a video model's stage: held-out clips above the model's videos
    from their first frames (as the report samples them); the diagnostics on up to 64 of them."""
    def videos(n):
        b = run.eval_batch(n)
        cond = ae.condition(b["video"][:, 0], b["fps"], b["motion"], torch.full((n,), 0.02, device=run.device))
        z, _ = generate(D, cond, cfg.num_frames, steps, scale, sampler, cfg.sigma_min, cfg.sigma_max,
                        seed=cfg.seed, grid_size=cfg.grid_size)
        return b["video"], ae.decode_video(z).clamp(-1, 1)

    def sample(path):
        write_video(path, torch.cat(videos(4)), fps=8, ncol=4)          # top: real; bottom: generated

    def finish():
        n = min(64, cfg.eval_clips)
        real, fake = videos(n)
        d = diagnostics(fake, real, real[:, 0])
        if run.master:
            print(f"{label} on {n} {run.eval_name}: first-frame PSNR {d['first_frame_psnr']:.2f} dB, static-video "
                  f"rate {d['static_rate']:.3f}, motion relative to real {d['motion_ratio']:.3f}")
        return {"diagnostics": d}
    return sample, finish


def student_stage(name, parts, ae, ae_config, ucfg, run, cfg, **extra):
    """The Stage of a student (Stage 1 or 2) from the parts gan.py / distill.py return: one-step videos
    of the EMA student, the end-of-stage check, and what loading the checkpoint needs."""
    sample, finish = checks(f"{name}, 1 step (NFE 1)", parts["ema"]["student"].model, ae, run, cfg, 1, 1.0,
                            "consistency")
    own_ae = {} if cfg.svd else {"ae_state": ae.state_dict()}          # SVD's encoders stay in its folder
    return Stage(parts["models"], parts["opts"], parts["step"], parts["ema"], sample, finish, cosine=False,
                 extra={"unet_config": ucfg, "ae_config": ae_config, **own_ae, "sigma_min": cfg.sigma_min,
                        **parts["extra"], **extra})


def setup_stage1(cfg, run):
    ae, ae_config = finished(run, "ae")
    teacher, ucfg = finished(run, "teacher")
    return student_stage("stage 1", gan.setup_stage1(cfg, ae, teacher, run.device), ae, ae_config, ucfg, run, cfg)


def setup_stage2(cfg, run):
    ae, ae_config = finished(run, "ae")
    teacher, ucfg = finished(run, "teacher")
    stage1, init = None, "teacher"
    if not cfg.from_teacher:
        path = ckpt_path(run, "1")
        path = path if os.path.isfile(path) else ckpt_path(run, "1", tag="")     # a tag's own Stage 1, if any
        stage1 = load_checkpoint(path, "1", f"python train.py --stage 1 --out {run.out}")
        init = os.path.basename(path)
    parts = distill.setup_stage2(cfg, ae, teacher, stage1, run.device)
    return student_stage("stage 2", parts, ae, ae_config, ucfg, run, cfg, init=init)


SETUP = {"ae": setup_ae, "teacher": setup_teacher, "1": setup_stage1, "2": setup_stage2}


# ----------------------------------------------------------------------------------------------
# The run: device, precision, distributed context, data, run folder

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
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        if cfg.data:
            self.dataset = VideoFolder(cfg.data, cfg.image_size, cfg.num_frames, cfg.frame_stride,
                                       cache=os.path.join(out, "data_index.json") if self.master else None)
            self.eval_set, self.eval_name = self.dataset, f"clips of {cfg.data} (not held out)"
        else:
            self.dataset = SyntheticVideos(cfg.image_size, cfg.num_frames, "train", self.device)
            self.eval_set = SyntheticVideos(cfg.image_size, cfg.num_frames, "test", self.device)
            self.eval_name = "held-out synthetic clips"
        if cfg.svd:         # our motion scores are not on the scale of SVD's motion bucket
            same = self.eval_set is self.dataset
            self.dataset = FixedMotion(self.dataset, cfg.motion_bucket)
            self.eval_set = self.dataset if same else FixedMotion(self.eval_set, cfg.motion_bucket)
        self._eval = None

    def eval_batch(self, n):
        """The first n clips of the evaluation set (the synthetic test split): video, fps, motion."""
        if self._eval is None or len(self._eval["video"]) < n:
            first = 10 ** 9 if self.eval_set is self.dataset else 0   # folder: clip indices no step reads
            b = self.eval_set.batch(range(first, first + n))
            self._eval = {k: b[k].to(self.device) for k in ("video", "fps", "motion")}
        return {k: v[:n] for k, v in self._eval.items()}

    def log(self, record):
        record = {**record, "tag": self.tag} if self.tag else record
        if self.master:
            with open(os.path.join(self.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")


def ckpt_path(run, name, tag=None):
    """ae.pt, teacher.pt, stage1.pt, stage2.pt in the run folder. A --tag names the student stages'
    files of an ablation (stage1_<tag>.pt, stage2_<tag>.pt) beside the main run's, which share its
    autoencoder and teacher; evaluate.py --run reports every tagged file as a row."""
    tag = run.tag if tag is None else tag
    return os.path.join(run.out, PREFIX[name] + (f"_{tag}" if tag and name in ("1", "2") else "") + ".pt")


# ----------------------------------------------------------------------------------------------
# The loop

def step_seed(*xs):
    return int(np.random.SeedSequence(list(xs)).generate_state(1)[0])


def save_atomic(obj, path):
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)            # a crash mid-write never leaves a half-written checkpoint


def open_checkpoint(path, cfg, mode, steps):
    """The checkpoint a stage continues from: None to start fresh, "kept" when --stage all finds it
    finished. mode: "new" (refuses an existing checkpoint), "resume", "fresh" or "keep" (for --stage
    all: keep a finished stage, resume an unfinished one). Resuming with another config is refused."""
    if not os.path.isfile(path) or mode == "fresh":
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({e}); use --fresh to start over") from None
    if mode == "new":
        state = "finished" if ckpt.get("done") else "unfinished"
        raise UserError(f"{path} exists (step {ckpt['step']}, {state}): pass --resume to continue "
                        f"it or --fresh to start over")
    if mode == "keep" and ckpt.get("done") and ckpt["step"] >= steps:
        return "kept"
    changed = [k for k, v in dataclasses.asdict(cfg).items() if k not in RUN_FIELDS and ckpt["config"].get(k) != v]
    if changed:
        k = changed[0]
        raise UserError(f"cannot resume {path}: it was trained with {k}={ckpt['config'][k]}, "
                        f"this run asks for {getattr(cfg, k)}; use --fresh to start over")
    return ckpt


def restore(spec, scaler, ckpt):
    """Load a checkpoint's weights, EMAs, optimiser and scaler states into the stage; its step."""
    for k, m in spec.models.items():
        m.load_state_dict(ckpt["models"][k])
    for k, e in spec.ema.items():
        e.model.load_state_dict(ckpt["ema"][k])
    for k, o in spec.opts.items():
        o.load_state_dict(ckpt["opts"][k])
    scaler.load_state_dict(ckpt["scaler"])
    return ckpt["step"]


def train_stage(name, cfg, run, mode):
    """Train one stage (see `open_checkpoint` for mode)."""
    steps, B, lr = (getattr(cfg, f"{PREFIX[name]}_{k}") for k in ("steps", "batch_size", "lr"))
    if B % run.world:
        raise UserError(f"batch size {B} does not split over {run.world} processes")
    path = ckpt_path(run, name)
    ckpt = open_checkpoint(path, cfg, mode, steps)
    if ckpt == "kept":
        if run.master:
            print(f"stage {name}: kept the finished {path}")
        return
    spec = SETUP[name](cfg, run)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.scaler_enabled)
    start = restore(spec, scaler, ckpt) if ckpt is not None else 0
    last_good = f"{path} (step {start})" if ckpt is not None else "none: no checkpoint was written yet"
    for o in spec.opts.values():             # each optimiser keeps its own base rate (Stage 1: student and disc)
        for g in o.param_groups:
            g["initial_lr"] = g.get("initial_lr", g["lr"])
    nets = {}
    for k, m in spec.models.items():
        net = DDP(m, device_ids=[run.device.index] if run.device.type == "cuda" else None) if run.ddp else m
        nets[k] = torch.compile(net) if cfg.compile else net
        m.train()

    def lr_at(s):
        """The learning-rate factor of step s: linear warm-up, then constant or a cosine decay to 10%."""
        warm = min(1.0, (s + 1) / max(1, cfg.warmup))
        if not spec.cosine:
            return warm
        return warm * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))

    def update(loss, k):
        """Zero, backward, unscale, clip, step: the same lines for every optimiser of every stage. Zeroing
        first drops what another loss left in these parameters (the generator's loss in disc's)."""
        opt = spec.opts[k]
        opt.zero_grad(set_to_none=True)
        with torch.autocast(run.device.type, enabled=False):
            scaler.scale(loss).backward()
        scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
        scaler.step(opt)
        opt.zero_grad(set_to_none=True)
        return gnorm

    def save(step, done, results=None):
        if run.master:
            save_atomic({
                "stage": name, "step": step, "done": done, "config": dataclasses.asdict(cfg),
                "models": {k: m.state_dict() for k, m in spec.models.items()},
                "ema": {k: e.model.state_dict() for k, e in spec.ema.items()},
                "opts": {k: o.state_dict() for k, o in spec.opts.items()},
                "scaler": scaler.state_dict(), **spec.extra, **(results or {}),
            }, path)
        if run.ddp:
            dist.barrier()

    if run.master:
        print(f"stage {name}: steps {start}..{steps}, batch {B} over {run.world} process(es), "
              f"{run.device} {run.ptdtype}, params "
              + ", ".join(f"{k} {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M" for k, m in spec.models.items()))
    workers = min(cfg.workers, os.cpu_count() or 1) if cfg.data else 0         # synthetic clips: main thread
    loader = torch.utils.data.DataLoader(StepBatches(run.dataset, B, run.rank, run.world), batch_size=None,
                                         sampler=range(start, steps), num_workers=workers,
                                         pin_memory=run.device.type == "cuda" and bool(cfg.data))
    sums, n, t0 = {}, 0, time.time()
    with tqdm(total=steps, initial=start, desc=f"stage {name}", disable=not run.master, dynamic_ncols=True) as bar:
        for step, batch in enumerate(loader, start):
            torch.manual_seed(step_seed(cfg.seed, run.rank, step))
            batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
            for o in spec.opts.values():
                for g in o.param_groups:
                    g["lr"] = g["initial_lr"] * lr_at(step)
            with run.autocast:
                stats = spec.step(nets, batch, update)
            scaler.update()
            for k, e in spec.ema.items():
                e.update(spec.models[k], step)
            vals = mean_over_ranks(stats, run)
            bad = [k for k, v in vals.items() if not math.isfinite(v)]
            if bad:
                raise NonFiniteLoss(f"stage {name}: non-finite {bad[0]} ({vals[bad[0]]}) at step {step + 1}; "
                                    f"stopped. Last good checkpoint: {last_good}")
            sums, n = {k: sums.get(k, 0.0) + v for k, v in vals.items()}, n + 1
            bar.update(1)
            done = step + 1
            if done % cfg.log_every == 0 or done == steps:
                means = {k: v / n for k, v in sums.items()}
                bar.set_postfix(loss=f"{means['loss']:.4f}")
                run.log({"stage": name, "step": done, **means, "lr": lr * lr_at(step), "it_s": n / (time.time() - t0)})
                sums, n, t0 = {}, 0, time.time()
            if run.master and spec.sample and (done % cfg.sample_every == 0 or done == steps):
                spec.sample(os.path.join(run.out, "samples", f"{name}_{done:06d}.mp4"))
            if done % cfg.ckpt_every == 0 and done < steps:
                save(done, False)
                last_good = f"{path} (step {done})"
    if run.ddp:
        check_replicas(spec.models)
    results = spec.finish() if spec.finish else {}
    save(max(start, steps), True, results)
    run.log({"stage": name, "event": "done", "step": max(start, steps), **results})
    if run.master:
        print(f"stage {name}: done, {path}")


def mean_over_ranks(stats, run):
    """The step's statistics as floats, averaged over ranks: every rank sees the same values, so all
    stop together on a non-finite loss."""
    keys = sorted(stats)
    vals = torch.stack([stats[k].detach().float() for k in keys])
    if run.ddp:
        dist.all_reduce(vals)
        vals /= run.world
    return dict(zip(keys, vals.tolist()))


@torch.no_grad()
def check_replicas(models):
    """DDP's promise, checked: every process ends with the same weights."""
    for k, m in models.items():
        local = torch.cat([p.detach().float().flatten() for p in m.parameters()]).sum().reshape(1)
        every = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(every, local)
        if not all(torch.equal(every[0], e) for e in every):
            raise RuntimeError(f"DDP replicas of {k} diverged: {[e.item() for e in every]}")


# ----------------------------------------------------------------------------------------------
# CLI

def parse(argv):
    p = argparse.ArgumentParser(description="Train a stage of OSV (see README.md).")
    p.add_argument("--stage", required=True, choices=STAGES + ["all"])
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--out", default="runs/default", help="run folder (default runs/default)")
    p.add_argument("--tag", default="", help="an ablation's name: stage 1/2 write stage1_TAG.pt, stage2_TAG.pt")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the stage from its checkpoint")
    g.add_argument("--fresh", action="store_true", help="start over, overwriting checkpoints")
    p.add_argument("--steps", type=int, help="training steps of each stage run by this command")
    p.add_argument("--batch-size", type=int, help="global batch size (clips) of each stage run")
    p.add_argument("--lr", type=float, help="learning rate of each stage run")
    for f in dataclasses.fields(Config):       # every preset field can be overridden: --ae-steps 500
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif f.type is tuple:
            p.add_argument(flag, type=lambda s: tuple(int(x) for x in s.split(",")), metavar="A,B,C")
        else:
            p.add_argument(flag, type=f.type)
    return p.parse_args(argv)


def make_config(args, stages):
    cfg = Config(**PRESETS[args.preset])
    if args.svd:            # SVD's schedule, the SVD-XT pipeline's guidance ramp, the paper's DINOv2; flags override
        cfg.sigma_min, cfg.sigma_max = svd.scheduler_levels(args.svd)
        cfg.cfg_min, cfg.cfg_max, cfg.disc_backbone = svd.CFG_MIN, svd.CFG_MAX, "dinov2"
    for f in dataclasses.fields(Config):
        v = getattr(args, f.name)
        if v is not None:
            setattr(cfg, f.name, v)
    for s in stages:
        for k in ("steps", "batch_size", "lr"):
            if getattr(args, k) is not None:
                setattr(cfg, f"{PREFIX[s]}_{k}", getattr(args, k))
    return cfg


def main(argv=None):
    # user-facing warnings (a skipped video file) as one line each, without the source line
    warnings.formatwarning = lambda msg, category, *a, **k: f"warning: {msg}\n"
    args = parse(argv)
    stages = (["1", "2"] if args.svd else STAGES) if args.stage == "all" else [args.stage]
    cfg = make_config(args, stages)
    run = None
    try:
        if args.tag and not args.tag.replace("-", "").isalnum():
            raise UserError(f"--tag {args.tag!r}: use letters, digits and dashes")
        if args.svd and args.stage in ("ae", "teacher"):
            raise UserError("with --svd the autoencoder and the teacher are SVD's: train --stage 1 and 2")
        run = Run(cfg, args.out, args.tag)
        mode = "fresh" if args.fresh else "resume" if args.resume else "keep" if args.stage == "all" else "new"
        for s in stages:
            train_stage(s, cfg, run, mode)
        if args.stage == "all" and run.master and not cfg.data:
            write_report(args.out, cfg.report_clips, str(run.device), cfg.feature_steps)
        elif args.stage == "all" and run.master:
            print("report: the replication report measures against the synthetic test split; for a folder of "
                  "videos compare samples with `python evaluate.py --real FOLDER --fake SAMPLES`")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if run is not None and run.ddp and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
