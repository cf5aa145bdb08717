"""Training: the command line, and the one loop that every stage of the pipeline shares.

    python train.py --stage ae           # the latent autoencoder (autoencoder.py); also teacher, 1, 2
    python train.py --stage all          # ae, teacher, 1, 2 in order (finished ones kept), then the report
    python train.py --stage ablations    # the paper's Table 2: each ablation a tagged run, then the report
    python train.py --stage latents      # encode the training clips once (latents.py); the stages read them
    python train.py --bench --svd random:svd-xt --size 320x576 --frames 14      # memory and time (bench.py)
    torchrun --nproc_per_node=2 train.py --stage ae     # DistributedDataParallel, gloo on CPU

The paper's "implementation details" live here: Adam, mixed precision (bf16 autocast on CUDA by
default; fp16 with a GradScaler; fp32 on CPU), gradient accumulation, an EMA of the weights, gradient
clipping, DDP, logging and checkpoints (config.py holds every hyperparameter; run.py the run folder:
device, data, lock, log). Ctrl-C or SIGTERM stops after the current step with a checkpoint. A stage
hands the loop its networks, optimisers and a `step` function (`Stage`; the student stages build theirs
in gan.py and distill.py); the loop owns everything else.

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
import shlex
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

# CUDA's caching allocator grows one segment per pool instead of caching fixed segments: less memory lost to
# fragmentation (estimate.Allocator models both); read when CUDA first allocates
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import torch  # noqa: E402
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import bench
import distill
import gan
import latents
import lora
import svd
import unet
from autoencoder import AEConfig, AutoEncoder, ae_loss, measure_scale_factor, psnr
from config import ABLATIONS, PREFIX, PRESETS, RUN_FIELDS, STAGES, Config, check, flag_help
from data import Parser, StepBatches, UserError, write_video
from report import SVD_NUM, write_report
from run import RUN_DEFINING, Run, inherit, save_atomic, stage_checks
from sample import cfg_scale, load_ae, load_checkpoint, load_teacher


class NonFiniteLoss(Exception):
    pass


class Interrupted(Exception):
    """SIGINT or SIGTERM during a stage's steps: the step finished and a checkpoint was written."""


@contextmanager
def stop_requests():
    """While training: Ctrl-C (SIGINT) and SIGTERM ask the loop to stop after the current step instead of
    killing it mid-step. Yields the list the handler appends to. Outside the main thread: no handler."""
    asked = []
    if threading.current_thread() is not threading.main_thread():
        yield asked
        return
    old = {s: signal.signal(s, lambda signum, frame: asked.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield asked
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@dataclass
class Stage:
    """What a stage gives the loop. `step(nets, batch, update)` runs one training step: nets are the
    (DDP-wrapped, compiled) versions of `models`; `update(loss, name)` backpropagates `loss` alone into
    optimiser `name`'s parameters; the loop steps every optimiser after the step (after all its
    micro-batches, --grad-accum). It returns a dict of scalar tensors to log, which must include "loss"."""
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
        with ema.swapped() as ae, torch.no_grad():
            write_video(path, torch.cat([v, ae.decode_video(ae.encode_video(v))]),
                        fps=8, ncol=8)          # top row: input; bottom row: reconstruction

    def finish():
        with ema.swapped() as ae, torch.no_grad():
            sf = measure_scale_factor(ae, run.dataset.batch(range(256))["video"].to(run.device))
            db = psnr(ae, run.eval_batch(cfg.eval_clips)["video"])
        if run.master:
            print(f"ae: reconstruction PSNR {db:.2f} dB on {cfg.eval_clips} {run.eval_name}; "
                  f"scale_factor {sf:.4f}")
        return {"psnr": db, "scale_factor": sf}

    return Stage({"ae": model}, {"ae": opt}, step, {"ae": ema}, sample, finish,
                 extra={"ae_config": dataclasses.asdict(ae_cfg)})


def finished(run, name):
    """This run's finished autoencoder (frozen) or teacher (EMA weights) and its config; --svd: SVD's."""
    path, make = os.path.join(run.out, f"{name}.pt"), f"python train.py --stage {name} --out {shlex.quote(run.out)}"
    if name == "ae":              # SVD's encoders stay on the CPU while a stage reads the latent cache
        home = "cpu" if getattr(run, "cached", False) else run.device          # (svd.resident: for checks)
        enc = svd.SVDEncoders.from_pretrained(run.cfg.svd, device=home) if run.cfg.svd else None
        if enc:
            enc.chunk = run.cfg.decode_chunk
        return (enc, {"latent_channels": enc.cfg.latent_channels}) if enc else load_ae(path, run.device, make)
    D = svd.load_denoiser(run.cfg.svd, device=run.device) if run.cfg.svd else load_teacher(path, run.device, make)[0]
    D.unet.cfg.checkpoint = run.cfg.grad_checkpoint      # this stage's flag, whatever the teacher trained with
    return D, dataclasses.asdict(D.unet.cfg)


def setup_teacher(cfg, run):
    ae, ae_config = finished(run, "ae")
    parts = unet.setup_teacher(cfg, ae_config["latent_channels"], ae, run.device)
    label = f"teacher, {cfg.sample_steps} Euler steps with CFG {cfg.cfg_min}->{cfg.cfg_max}"
    sample, finish = stage_checks(label, parts["ema"]["denoiser"], ae, run, cfg, cfg.sample_steps,
                                  cfg_scale(cfg.cfg_min, cfg.cfg_max, cfg.num_frames), "euler")
    return Stage(parts["models"], parts["opts"], parts["step"], parts["ema"], sample, finish,
                 extra={**parts["extra"], "ae_config": ae_config, "ae_state": ae.state_dict(),
                        "micro_median": run.micro_median()})


def student_stage(name, parts, ae, ae_config, ucfg, run, cfg, **extra):
    """The Stage of a student (Stage 1 or 2) from the parts gan.py / distill.py return: one-step videos
    of the EMA student, the end-of-stage check, and what loading the checkpoint needs."""
    sample, finish = stage_checks(f"{name}, 1 step (NFE 1)", parts["ema"]["student"], ae, run, cfg, 1, 1.0,
                                  "consistency")
    own_ae = {} if cfg.svd else {"ae_state": ae.state_dict()}          # SVD's encoders stay in its folder
    return Stage(parts["models"], parts["opts"], parts["step"], parts["ema"], sample, finish, cosine=False,
                 extra={"unet_config": ucfg, "ae_config": ae_config, **own_ae, "sigma_min": cfg.sigma_min,
                        "micro_median": run.micro_median(),                 # sample.py's default fps, motion
                        "base": cfg.svd or "teacher.pt",                # the frozen weights the adapters sit on
                        **parts["extra"], **extra})


def setup_stage1(cfg, run):
    ae, ae_config = finished(run, "ae")
    teacher, ucfg = finished(run, "teacher")
    parts = gan.setup_stage1(cfg, ae, teacher, run.device, run.ptdtype)
    return student_stage("stage 1", parts, ae, ae_config, ucfg, run, cfg)


def setup_stage2(cfg, run):
    ae, ae_config = finished(run, "ae")
    teacher, ucfg = finished(run, "teacher")
    stage1, init = None, "teacher"
    if not cfg.from_teacher:
        path = ckpt_path(run, "1")          # a tag's own Stage 1, if any, else the run's (or the seed's)
        path = path if os.path.isfile(path) else ckpt_path(run, "1", tag=getattr(run, "stage1_tag", ""))
        stage1 = load_checkpoint(path, "1", f"python train.py --stage 1 --out {shlex.quote(run.out)}")
        init = os.path.basename(path)
    parts = distill.setup_stage2(cfg, ae, teacher, stage1, run.device, run.ptdtype)
    return student_stage("stage 2", parts, ae, ae_config, ucfg, run, cfg, init=init)


SETUP = {"ae": setup_ae, "teacher": setup_teacher, "1": setup_stage1, "2": setup_stage2}


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


def is_student(m):
    """A student keeps only its trained weights in checkpoints; its base is named beside them."""
    return isinstance(m, unet.Denoiser) and m.sigma_min is not None


def restore(spec, scaler, ckpt):
    """Load a checkpoint's weights, EMAs, optimiser and scaler states into the stage; its step."""
    for k, m in spec.models.items():
        lora.load_trained(m, ckpt["models"][k]) if is_student(m) else m.load_state_dict(ckpt["models"][k])
    for k, e in spec.ema.items():
        e.load_state_dict(ckpt["ema"][k])
    for k, o in spec.opts.items():
        o.load_state_dict(ckpt["opts"][k])
    scaler.load_state_dict(ckpt["scaler"])
    return ckpt["step"]


def train_stage(name, cfg, run, mode):
    """Train one stage (see `open_checkpoint` for mode)."""
    steps, B, lr = (getattr(cfg, f"{PREFIX[name]}_{k}") for k in ("steps", "batch_size", "lr"))
    if cfg.grad_accum < 1 or B % (run.world * cfg.grad_accum):
        raise UserError(f"batch size {B} does not split over {run.world} process(es) x {cfg.grad_accum} "
                        f"micro-batches (--grad-accum)")
    path = ckpt_path(run, name)
    ckpt = open_checkpoint(path, cfg, mode, steps)
    if ckpt == "kept":
        if run.master:
            print(f"stage {name}: kept the finished {path}")
        return
    data = run.stage_data(name, cfg, steps * B)                  # before any network is built: it may refuse
    run.cached = isinstance(data, latents.LatentCache)
    spec = SETUP[name](cfg, run)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.scaler_enabled)
    start = restore(spec, scaler, ckpt) if ckpt is not None else 0
    if ckpt is not None:
        run.forget_log(name, start)                # the records of steps after the checkpoint come again
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

    params = {k: [p for g in o.param_groups for p in g["params"]] for k, o in spec.opts.items()}

    def update(loss, k):
        """Backpropagate a micro-batch's `loss` into optimiser k's parameters alone (so the generator's
        loss leaves disc's gradients alone), 1 / grad_accum of it: the gradients add up over the step."""
        with torch.autocast(run.device.type, enabled=False):
            scaler.scale(loss / cfg.grad_accum).backward(inputs=params[k])

    def step_optimisers():
        """Unscale, clip, step, zero: the same lines for every optimiser of every stage, once per step.
        Deferring the generator's step to here changes nothing: disc's loss sees only detached fakes."""
        for k, opt in spec.opts.items():
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params[k], cfg.grad_clip)
            scaler.step(opt)
            opt.zero_grad(set_to_none=True)
        scaler.update()

    def save(step, done, results=None):
        if run.master:
            save_atomic({
                "stage": name, "step": step, "done": done, "config": dataclasses.asdict(cfg),
                "models": {k: lora.trained_state(m) if is_student(m) else m.state_dict()
                           for k, m in spec.models.items()},
                "ema": {k: e.state_dict() for k, e in spec.ema.items()},
                "opts": {k: o.state_dict() for k, o in spec.opts.items()},
                "scaler": scaler.state_dict(), **spec.extra, **(results or {}),
            }, path)
        if run.ddp:
            dist.barrier()

    if run.master:
        print(f"stage {name}: steps {start}..{steps}, batch {B} over {run.world} process(es), "
              f"{run.device} {run.ptdtype}, params "
              + ", ".join(f"{k} {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M" for k, m in spec.models.items()))
    loader = step_loader(cfg, run, data, B, start, steps)
    sums, counts, n, t0 = {}, {}, 0, time.time()
    with stop_requests() as asked, tqdm(total=steps, initial=start, desc=f"stage {name}", disable=not run.master,
                                        dynamic_ncols=True) as bar:
        for step, batch in enumerate(loader, start):
            torch.manual_seed(step_seed(cfg.seed, run.rank, step))
            batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
            for o in spec.opts.values():
                for g in o.param_groups:
                    g["lr"] = g["initial_lr"] * lr_at(step)
            micro = [dict(zip(batch, vs)) for vs in zip(*(v.chunk(cfg.grad_accum) for v in batch.values()))]
            stats = []
            for i, mb in enumerate(micro):
                with run.autocast, run.in_sync(nets, i < len(micro) - 1):
                    stats.append(spec.step(nets, mb, update))
            step_optimisers()
            stats = {k: torch.stack([s[k].detach().float() for s in stats]).mean() for k in stats[0]}
            for e in spec.ema.values():
                e.update(step)
            stats["_stop"] = torch.tensor(float(bool(asked)))      # every rank stops at the same step
            vals = mean_over_ranks(stats, run)
            stop = vals.pop("_stop") > 0
            bad = [k for k, v in vals.items() if not math.isfinite(v) and not k.startswith("acc_")]
            if bad:
                raise NonFiniteLoss(f"stage {name}: non-finite {bad[0]} ({vals[bad[0]]}) at step {step + 1}; "
                                    f"stopped. Last good checkpoint: {last_good}")
            for k, v in vals.items():     # an accuracy is nan where nothing was judged: left out
                if math.isfinite(v):
                    sums[k], counts[k] = sums.get(k, 0.0) + v, counts.get(k, 0) + 1
            n += 1
            bar.update(1)
            done = step + 1
            if done % cfg.log_every == 0 or done == steps:
                means = {k: v / counts[k] for k, v in sums.items()}
                bar.set_postfix(loss=f"{means['loss']:.4f}")
                run.log({"stage": name, "step": done, **means, "lr": lr * lr_at(step), "it_s": n / (time.time() - t0)})
                sums, counts, n, t0 = {}, {}, 0, time.time()
            if run.master and spec.sample and (done % cfg.sample_every == 0 or done == steps):
                spec.sample(os.path.join(run.out, "samples", f"{name}_{done:06d}.mp4"))
            if done % cfg.ckpt_every == 0 and done < steps or stop and done < steps:
                save(done, False)
                last_good = f"{path} (step {done})"
            if stop and done < steps:
                raise Interrupted(f"stage {name}: stopped at step {done} of {steps}; saved {path}")
    if run.ddp:
        check_replicas(spec.models)
    save(max(start, steps), True)                 # the stage is safe before its check, which takes minutes
    if run.master and spec.finish:
        print(f"stage {name}: trained, saved {path}; the end-of-stage check follows")
    if asked:
        raise Interrupted(f"stage {name}: finished and saved {path}; its end-of-stage check was skipped")
    results = spec.finish() if spec.finish else {}
    if results:
        save(max(start, steps), True, results)
    run.log({"stage": name, "event": "done", "step": max(start, steps), **results})
    if run.master:
        print(f"stage {name}: done, {path}")


def train_ablations(cfg, run, mode):
    """`python train.py --stage ablations`: the paper's Table 2. The full model's Stage 1 and 2 (kept when
    finished), then each ablation of config.ABLATIONS as a tagged run on the same autoencoder and teacher;
    a Stage 2 ablation starts from the full model's Stage 1. With --seed S (not 0), the second seed of
    both arms: the full model as tag seedS, every ablation as TAG-seedS starting from seedS's Stage 1."""
    if run.ddp:
        raise UserError("--stage ablations runs in one process: start it with python, not torchrun")
    full = f"seed{cfg.seed}" if cfg.seed else ""
    run.stage1_tag = full
    for tag, stages, change in [(full, ("1", "2"), {})] + [
            (t + (f"-{full}" if full else ""), st, ch) for t, (_, st, ch) in ABLATIONS.items()]:
        run.tag = tag
        if run.master:
            print(f"ablations: {'the full model' if not change else tag}"
                  + (f" ({', '.join(f'{k}={v}' for k, v in change.items())})" if change else "")
                  + f", stage {' and '.join(stages)}" + (f", tag {tag}" if tag else ""))
        for s in stages:
            train_stage(s, dataclasses.replace(cfg, **change), run, mode)
    run.tag = ""


def step_loader(cfg, run, data, B, first, last):
    """Batches first .. last - 1 of `data` (batch s: clips s*B .. s*B+B-1, this rank's share), read in
    worker processes (folder videos, the latent cache; pinned for CUDA) or, for the synthetic clips
    that are made on the device, on the main thread."""
    workers = min(cfg.workers, os.cpu_count() or 1) if cfg.data or isinstance(data, latents.LatentCache) else 0
    return torch.utils.data.DataLoader(StepBatches(data, B, run.rank, run.world), batch_size=None,
                                       sampler=range(first, last), num_workers=workers,
                                       pin_memory=run.device.type == "cuda" and workers > 0)


def encode_latents(cfg, run, fresh):
    """`python train.py --stage latents`: the clips the stages will read, encoded once (latents.py); as
    many as the longest of them reads (steps x batch) unless --cache-clips."""
    if run.ddp:
        raise UserError("--stage latents runs in one process: start it with python, not torchrun")
    ae = finished(run, "ae")[0]
    stages = ["1", "2"] if cfg.svd else ["teacher", "1", "2"]
    clips = cfg.cache_clips or max(getattr(cfg, f"{PREFIX[s]}_steps") * getattr(cfg, f"{PREFIX[s]}_batch_size")
                                   for s in stages)
    B = 4                                                                  # clips per encoder pass

    def batches(first):
        for s, batch in enumerate(step_loader(cfg, run, run.dataset, B, first // B, -(-clips // B)), first // B):
            torch.manual_seed(step_seed(cfg.seed, s, 1))                  # the augmentation noise of batch s
            with torch.no_grad(), run.autocast:
                yield unet.latents_and_condition(ae, {k: v.to(run.device) for k, v in batch.items()})
    key = latents.cache_key(cfg, run.out, run.ptdtype, svd.SVDEncoders if cfg.svd else AutoEncoder)
    latents.write_cache(os.path.join(run.out, "latents"), key, clips, batches, fresh)


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

def make_parser():
    p = Parser(description="Train a stage of OSV (see README.md). Every flag below the first group is a field "
               "of config.py, whose comments say where each default comes from.")
    p.add_argument("--stage", choices=STAGES + ["all", "ablations", "latents"], help="ae, teacher, 1 or 2: that "
                   "stage; all: every stage (finished ones kept), then the report; ablations: the paper's Table 2, "
                   "each ablation a tagged run (finished ones kept), then the report; latents: encode the clips "
                   "once (latents.py)")
    p.add_argument("--bench", action="store_true", help="time Stage 1 and 2 on a random SVD (bench.py): "
                   "--svd random:svd-xt --size 320x576 --frames 14")
    p.add_argument("--bench-steps", type=int, default=3, help="--bench: timed steps per stage (0: the weights held)")
    p.add_argument("--estimate", action="store_true", help="--bench on any machine: the peak GPU memory of each "
                   "stage predicted on a fake CUDA device (estimate.py), no time measured")
    p.add_argument("--frames", dest="num_frames", type=int, help="frames per clip (the same as --num-frames)")
    p.add_argument("--preset", choices=list(PRESETS), help="a set of defaults (config.py; default: tiny): "
                   "tiny (CPU, minutes; the defaults below) or small (64x64, 16 frames, one GPU)")
    p.add_argument("--out", default="runs/default", help="run folder (default runs/default)")
    p.add_argument("--tag", default="", help="an ablation's name: stage 1/2 write stage1_TAG.pt, stage2_TAG.pt")
    p.add_argument("--override", action="store_true", help="give a run folder's data, sizes, preset or "
                   "autoencoder a value other than the one it was made with (run.json)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the stage from its checkpoint")
    g.add_argument("--fresh", action="store_true", help="start over, overwriting checkpoints")
    p.add_argument("--steps", type=int, help="training steps of each stage run by this command")
    p.add_argument("--batch-size", type=int, help="global batch size (clips) of each stage run")
    p.add_argument("--lr", type=float, help="learning rate of each stage run")
    groups, helps = {}, flag_help()              # config.py's comments are the help, grouped by stage
    for f in dataclasses.fields(Config):       # every preset field can be overridden: --ae-steps 500
        flag, (group, text) = "--" + f.name.replace("_", "-"), helps[f.name]
        g = groups.get(group) or groups.setdefault(group, p.add_argument_group(group))
        default = ",".join(map(str, f.default)) if f.type is tuple else f.default
        text = f"{text} (default: {default!r})" if f.type is str else f"{text} (default: {default})"
        if f.type is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif f.type is tuple:
            g.add_argument(flag, type=lambda s: tuple(int(x) for x in s.split(",")), metavar="A,B,C", help=text)
        else:
            g.add_argument(flag, type=f.type, help=text, metavar=f.type.__name__.upper())
    return p


def parse(argv):
    p = make_parser()
    args = p.parse_args(argv)
    if not args.stage and not args.bench:
        p.error("--stage is required")
    return args


def make_config(args, stages):
    cfg = Config(**PRESETS[args.preset or "tiny"])
    if args.svd:            # SVD's schedule, the SVD-XT pipeline's guidance ramp, the paper's DINOv2; flags override
        # (a folder; or random:NAME, SVD's architecture with random weights for --bench: SVD's schedule)
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


def resume_command(argv, keep):
    """The command that continues this one, quoted for the shell: the same flags, without --fresh, with
    --resume (for --stage all, `keep` mode already resumes an unfinished stage)."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--fresh"]
    return shlex.join(["python", "train.py", *args, *([] if keep or "--resume" in args else ["--resume"])])


def main(argv=None):
    # user-facing warnings (a skipped video file) as one line each, without the source line
    warnings.formatwarning = lambda msg, category, *a, **k: f"warning: {msg}\n"
    try:
        args = parse(argv)
    except SystemExit as e:                    # --help, or a flag argparse cannot read (one line)
        return e.code
    run, term = None, None
    try:
        if not args.bench:
            inherit(args)                       # the run folder's data, sizes, preset and autoencoder
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stages = ((["1", "2"] if args.svd else STAGES) if args.stage == "all" else ["1", "2"] if args.stage == "ablations"
              else [args.stage])
    cfg = make_config(args, [s for s in stages if s in PREFIX])
    if threading.current_thread() is threading.main_thread():    # SIGTERM outside the steps: as Ctrl-C
        term = signal.signal(signal.SIGTERM, lambda signum, frame: signal.default_int_handler(signum, frame))
    try:
        check(cfg)                              # every impossible value, before any work
        if args.estimate and not args.bench:
            raise UserError("--estimate predicts the bench's peaks: give it with --bench")
        if args.bench:
            return bench.main(cfg, args.bench_steps, args.estimate)
        if args.tag and args.stage == "ablations":
            raise UserError("--stage ablations names its own tags (config.ABLATIONS): leave out --tag")
        if args.tag and not args.tag.replace("-", "").isalnum():
            raise UserError(f"--tag {args.tag!r}: use letters, digits and dashes")
        if args.svd and args.stage in ("ae", "teacher"):
            raise UserError("with --svd the autoencoder and the teacher are SVD's: train --stage 1 and 2")
        run = Run(cfg, args.out, args.tag)
        if run.master and not os.path.isfile(os.path.join(args.out, "run.json")):
            made = {k: args.preset or "tiny" if k == "preset" else getattr(cfg, k) for k in RUN_DEFINING}
            save_atomic(json.dumps(made, indent=1), os.path.join(args.out, "run.json"), text=True)
        keep = args.stage in ("all", "ablations")       # these keep finished stages, resume unfinished ones
        mode = "fresh" if args.fresh else "resume" if args.resume else "keep" if keep else "new"
        if args.stage == "ablations":
            train_ablations(cfg, run, mode)
        else:
            for s in stages:
                encode_latents(cfg, run, args.fresh) if s == "latents" else train_stage(s, cfg, run, mode)
        if keep and run.master and cfg.data and not cfg.test_share:
            print("report: none, this run holds no clip out (--test-share 0); compare samples with "
                  "`python evaluate.py --real FOLDER --fake SAMPLES`")
        elif keep and run.master:
            write_report(args.out, cfg.report_clips or (SVD_NUM if cfg.svd else 1000), str(run.device),
                         cfg.feature_steps)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (Interrupted, KeyboardInterrupt) as e:
        what = str(e) if isinstance(e, Interrupted) else "interrupted; finished stages and the last checkpoint are kept"
        print(f"{what}. Resume with: {resume_command(argv, args.stage in ('all', 'ablations'))}", file=sys.stderr)
        return 130
    finally:
        if term is not None:
            signal.signal(signal.SIGTERM, term)
        if run is not None:
            run.close()
        if run is not None and run.ddp and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
