"""Every hyperparameter of the pipeline in one place, with where its value comes from.

Each field is a command-line flag of train.py (`--stage1-steps 400`); a comment names the source of
its value: the paper (OSV), SVD, EDM, another cited work, or "ours" where the paper is silent and the
value was chosen here (docs/experiments.md measures the choices that matter). A checkpoint keeps the
config it was trained with; resuming with other values is refused, except for RUN_FIELDS.
"""
import inspect
import math
from dataclasses import dataclass, fields

from data import UserError


@dataclass
class Config:
    # -- data
    image_size: int = 32            # square frames of this side, unless --size
    size: str = ""                  # HxW frames (SVD: 576x1024; short side resized, centre-cropped)
    num_frames: int = 8             # frames per clip (--frames)
    data: str = ""                  # a folder of videos; empty: the synthetic bouncing shapes
    frame_stride: int = 1           # folder videos: keep every n-th frame
    test_share: float = 0.1         # folder videos: the held-out share of files (data.held_out); 0: none
    workers: int = 4                # folder videos, latent cache: reading processes (at most the CPU count)
    svd: str = ""                   # the published SVD's pipeline folder (svd.py): teacher, VAE, CLIP; no ae, teacher
    motion_bucket: int = 127        # SVD's motion micro-condition for every training clip (AnimateLCM's)
    dinov2: str = ""                # a transformers Dinov2Model folder for the discriminator (else torch.hub)
    # -- autoencoder (autoencoder.py); ours: small enough to train in minutes on a CPU
    ae_channels: tuple = (16, 32, 64)   # widths of the encoder's levels (the decoder mirrors them)
    ae_latent_channels: int = 4     # latent channels (SVD's VAE: 4)
    ae_kl_weight: float = 1e-6      # SD's first-stage kl_weight
    ae_steps: int = 2000            # training steps
    ae_batch_size: int = 32         # clips; the autoencoder sees one random frame of each
    ae_lr: float = 2e-3             # Adam's learning rate
    # -- teacher (unet.py): SVD's video UNet trained with EDM's denoising loss
    unet: str = "tiny"              # VideoUNet preset in unet.py: tiny, small, svd
    unet_channels: int = 0          # overrides the preset's model_channels when > 0
    teacher_steps: int = 1200       # training steps
    teacher_batch_size: int = 8     # clips per step
    teacher_lr: float = 5e-4        # Adam's learning rate
    # ln sigma ~ N(p_mean, p_std) in training. Ours: between EDM's image default (-1.2, 1.2) and SVD
    # fine-tuners' (0.7, 1.6)
    p_mean: float = 0.0
    p_std: float = 1.2              # see --p-mean
    cond_drop: float = 0.1          # conditioning dropout so that CFG works (ours, as SD's 0.1)
    sigma_min: float = 0.002        # the lowest noise level (EDM and SVD)
    # the top noise level of every sampler and of the students' grid. Ours: EDM's 80 (SVD: 700) lies far
    # outside what our teacher trains on (docs/experiments.md, "The samplers' levels")
    sigma_max: float = 8.0
    cfg_min: float = 1.0            # SVD's per-frame guidance ramp on the first frame (svd.yaml: 1.0 -> 2.5)
    cfg_max: float = 2.5            # the ramp's value on the last frame
    sample_steps: int = 25          # the teacher's sampling steps (SVD: 25)
    # -- Stage 1, latent GAN pretraining (gan.py, discriminator.py); "ours" = not given by the paper
    stage1_steps: int = 400         # the paper: 2K iterations
    stage1_batch_size: int = 8      # the paper: 1 per GPU x 8 GPUs
    stage1_lr: float = 2e-4         # LoRA's Adam; the paper's 5e-6 is for SVD at 2K steps, far too slow here
    disc_lr: float = 2e-4           # the discriminator's Adam (ours)
    lora_rank: int = 8              # ours; 0 = full fine-tuning (the paper's negative result)
    lora_convs: bool = True         # LoRA on the convolutions too, not only attention (ours)
    grid_size: int = 100            # OSV: 100 timesteps
    # the chance that a sample's level is the top one, where one-step sampling starts, else uniform on the
    # grid (gan.LGP.draw_levels). 0: the paper's "from the grid" (0.5 was ours; on two seeds the paired
    # ruler did not resolve it: docs/experiments.md, "Each departure from the paper")
    stage1_top: float = 0.0
    # ours: only fakes from levels >= this meet the discriminator, sample by sample (gan.LGP.meets_disc);
    # 0 is the paper's form, every fake (worse on both seeds: docs/experiments.md)
    adv_min_sigma: float = 1.0
    lambda_adv: float = 0.1         # OSV: the adversarial weight in both stages
    huber_c: float = 0.001          # OSV (from LCM): pseudo-Huber c
    disc_backbone: str = "ae"       # ae | vit | dinov2 (discriminator.py; the offline default is measured)
    disc_input: str = "latent"      # latent (OSV) | decoded (the paper's Table 2e ablation)
    disc_r: int = 0                 # PixelShuffle factor; 0 = autoencoder downsampling / 2 (OSV: 4 on 1/8)
    # -- Stage 2, adversarial consistency distillation (distill.py)
    stage2_steps: int = 200         # the paper: 20K iterations
    stage2_batch_size: int = 8      # the paper: 1 per GPU x 2 GPUs
    stage2_lr: float = 1e-4         # ours (the paper: 5e-6 at SVD scale)
    m: int = 5                      # OSV: the teacher walks 5 grid steps per target
    # each sample's jump (distill.jump_levels; the paper: n "from the grid", worse on both seeds:
    # docs/experiments.md): from the top level with this chance, from direct_sigma straight to the
    # teacher's solution with --stage2-direct's, else uniform
    stage2_top: float = 0.5
    stage2_direct: float = 0.25     # see --stage2-top
    direct_sigma: float = 1.0       # where the direct jumps start
    # lambda(t_n) of the distillation loss (distill.distill_weight): uniform, 1 (ours); or ict, the paper's
    # "similar to iCT", 1 / (t_{n+m} - t_n) scaled to mean 1 (worse on both seeds: docs/experiments.md)
    distill_weight: str = "uniform"
    teacher_cfg: str = "ramp"       # CFG in the teacher's steps: SVD's ramp cfg_min -> cfg_max, or a number
    target_decay: float = 0.95      # EMA of the target network (Song et al. 2023's fixed mu)
    from_teacher: bool = False      # the ablation "no Stage 1": ACD from the teacher, LoRA and disc from scratch
    # -- the loop (train.py)
    grad_checkpoint: bool = False   # gradient checkpointing per UNet block (less memory, more time)
    grad_accum: int = 1             # each step's batch in this many passes (less memory, the same step)
    # frames per call of SVD's temporal VAE decoder in samples and checks (its decode_chunk_size); 0: all at
    # once, as diffusers' pipeline (the most temporal consistency). The decode can outgrow the training step.
    decode_chunk: int = 0
    check_batch: int = 16           # clips per network call in samples and checks (each clip's noise its own)
    cache_clips: int = 0            # --stage latents: clips to encode; 0: as many as the longest stage reads
    ema_decay: float = 0.999        # the EMA of the weights that samples and is evaluated
    grad_clip: float = 1.0          # gradient norm clipping
    warmup: int = 100               # steps of linear learning-rate warm-up
    log_every: int = 50             # steps per record of log.jsonl
    sample_every: int = 500         # steps per sample video in samples/
    ckpt_every: int = 500           # steps per checkpoint
    eval_clips: int = 256           # held-out clips for the end-of-stage measurement
    # held-out clips per row of the report that ends --stage all; 0: report.py's default, 1000 (enough that
    # the paired interval of a 2-point difference excludes 0: docs/experiments.md), or 250 for --svd runs
    report_clips: int = 0
    feature_steps: int = 1500       # training steps of the FVD-syn feature network (metric.py)
    seed: int = 0                   # every random draw follows from it
    device: str = ""                # empty: cuda if available, else cpu
    dtype: str = ""                 # empty: bfloat16 on CUDA, float32 on CPU
    compile: bool = False           # torch.compile the trained networks


PRESETS = {
    "tiny": {},                     # CPU, minutes: the defaults above
    "small": dict(image_size=64, num_frames=16, ae_channels=(32, 64, 128), ae_steps=20000,
                  ae_batch_size=64, ae_lr=1e-3, unet="small", teacher_steps=50000, teacher_batch_size=32,
                  teacher_lr=2e-4, sample_every=2000, ckpt_every=2000),
}
STAGES = ["ae", "teacher", "1", "2"]                    # the pipeline, in order

# The paper's Table 2 (docs/paper.md, "Results"): every ablation that trains, as a tagged run on the
# run's autoencoder and teacher (`python train.py --stage ablations`). tag: (the paper's row, the
# stages it trains, what it changes). (c) "no Stage 2" and (f) "CFG at inference" train nothing: the
# report samples stage1.pt, and stage2.pt with CFG. A Stage 2 ablation starts from the run's stage1.pt.
ABLATIONS = {
    "m1": ("a", ("2",), {"m": 1}),                          # the teacher solves 1 grid step, not 5
    "no-stage1": ("b", ("2",), {"from_teacher": True}),     # ACD from the teacher: fresh LoRA and disc
    # no adversarial loss in either stage: Stage 1 is pseudo-Huber regression to the real latent alone
    # (ours: the paper names only the Stage 2 terms it keeps), Stage 2 consistency distillation alone
    "no-adv": ("d", ("1", "2"), {"lambda_adv": 0.0}),
    "decoded": ("e", ("1", "2"), {"disc_input": "decoded"}),  # disc on VAE-decoded frames, both stages
}
PREFIX = {"ae": "ae", "teacher": "teacher", "1": "stage1", "2": "stage2"}   # config-field prefixes
# fields that may change when a run is resumed; anything else must match the checkpoint
RUN_FIELDS = {"device", "dtype", "compile", "grad_checkpoint", "grad_accum", "decode_chunk", "check_batch",
              "cache_clips", "workers", "log_every", "sample_every", "ckpt_every", "eval_clips", "report_clips",
              "feature_steps"} | {
              f"{p}_steps" for p in PREFIX.values()}


# what `check` holds each numeric field to (beyond finite and >= 0, which every field must be)
AT_LEAST_ONE = {"image_size", "num_frames", "frame_stride", "ae_latent_channels", "grid_size", "m", "sample_steps",
                "grad_accum", "check_batch", "log_every", "sample_every", "ckpt_every", "eval_clips", "feature_steps",
                *(f"{p}_{k}" for p in PREFIX.values() for k in ("steps", "batch_size"))}
POSITIVE = {"sigma_min", "sigma_max", "p_std", "grad_clip", "disc_lr", *(f"{p}_lr" for p in PREFIX.values())}
AT_MOST_ONE = {"test_share", "cond_drop", "stage1_top", "stage2_top", "stage2_direct", "ema_decay", "target_decay"}
SIGNED = {"p_mean"}                                  # ln sigma's mean: any finite number


def flag_help():
    """{field: (group, help)} from the comments of `Config` above: a "# -- NAME" line opens a group of
    flags; a field's trailing comment, after the comment lines just above it, is its --help."""
    out, group, note = {}, "", []
    for line in inspect.getsource(Config).splitlines()[2:]:
        text = line.strip()
        if text.startswith("# --"):
            group, note = text[4:].strip(), []
        elif text.startswith("#"):
            note.append(text[1:].strip())
        elif ":" in text:
            name, _, rest = text.partition(":")
            out[name] = (group, " ".join(note + [rest.partition("#")[2].strip()]).strip())
            note = []
    return out


def check(cfg):
    """Every value a run cannot use, as a one-line error before any work starts."""
    for f in fields(cfg):
        v, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if isinstance(v, tuple) and not all(isinstance(c, int) and c > 0 for c in v):
            raise UserError(f"{flag} {','.join(map(str, v))}: every value must be a positive integer")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        bad = ("is not a finite number" if not math.isfinite(v) else
               "must be at least 1" if f.name in AT_LEAST_ONE and v < 1 else
               "must be positive" if f.name in POSITIVE and v <= 0 else
               "must not be negative" if v < 0 and f.name not in SIGNED else
               "must be at most 1" if f.name in AT_MOST_ONE and v > 1 else None)
        if bad:
            raise UserError(f"{flag} {v} {bad}")
    if cfg.distill_weight not in ("ict", "uniform"):
        raise UserError(f"--distill-weight {cfg.distill_weight!r}: use ict or uniform")
    if cfg.sigma_max <= cfg.sigma_min:
        raise UserError(f"--sigma-max {cfg.sigma_max} must be above --sigma-min {cfg.sigma_min}")
