"""The cost of OSV's two stages at the published SVD's size: peak memory and seconds per training step.

    python train.py --bench --svd random:svd-xt --size 320x576 --frames 14 --grad-checkpoint

builds SVD-XT's UNet with random weights (nothing to download: the cost does not depend on the values),
makes it a LoRA student exactly as `--stage 1` and `--stage 2` do (lora.to_student: the frozen base in
the training precision, adapters in fp32), and times a few steps of each stage at batch 1 (the paper's
per-GPU batch): Stage 1's generator and discriminator updates (gan.LGP.step), and Stage 2's, which
include the teacher's m-step Euler solve with classifier-free guidance (2 network passes per step) and
the EMA target's prediction, both on the student's own base (distill.ACD.step). The discriminator is
OSV's: the latent upsampler (r = 4) and a ViT-S/14 DINOv2 with random weights (transformers).
The latents are random too: with the latent cache (latents.py) the stages never run the VAE or CLIP,
so SVD's VAE and CLIP ViT-H/14 (random, their published configurations) sit where such a run keeps them,
on the CPU, and the VAE visits the GPU for one mid-run sample: the decode of one video at full size
(--decode-chunk frames per call), measured with the stage's weights and optimiser states still in
memory. On CUDA both of PyTorch's counters are printed: allocated (what tensors hold) and reserved (what
the caching allocator holds, which is what runs out). --estimate predicts both on any machine
(estimate.py), on the same code path (`build_stage`).

Read first: `bench`. `random:tiny` is the offline tiny UNet with SVD's conditioning, for the CPU tests.
"""
import dataclasses
import gc
import resource
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

import estimate
import svd
from data import UserError, frame_size, optional
from discriminator import Discriminator, DINOv2Backbone, TransformersDINOv2
from distill import ACD, teacher_scale
from gan import LGP, make_disc_optimizer
from sample import sigma_grid
from lora import teacher_of, to_student
from report import SVD_NUM
from unet import EMA, PRESETS, Denoiser, VideoUNet, count_parameters

MODELS = {"svd": "svd", "svd-xt": "svd", "tiny": "tiny"}     # SVD and SVD-XT share the UNet architecture
DINO_SIZE = 224                                              # DINOv2's input: the short side, in pixels


def random_denoiser(name, device, grad_checkpoint):
    """SVD's denoiser with random weights: our VideoUNet of the preset, no learned embedder (the context
    is SVD's CLIP image embedding, (B, 1, context_dim))."""
    cfg = dataclasses.replace(PRESETS[MODELS[name]], checkpoint=grad_checkpoint)
    with torch.device(device):                            # initialised where it runs: seconds, not minutes
        return Denoiser(VideoUNet(cfg)), cfg


def random_disc(device, latent_channels=4, downsample=8, dinov2_layers=12):
    """OSV's discriminator on SVD's latents: upsampler r = 4, DINOv2 ViT-S/14 (random), the heads."""
    transformers = optional("transformers")
    dino = transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=384, num_hidden_layers=dinov2_layers,
                                                              num_attention_heads=6, patch_size=14, image_size=518))
    vae = SimpleNamespace(downsample=downsample, cfg=SimpleNamespace(latent_channels=latent_channels))
    return Discriminator(vae, DINOv2Backbone(TransformersDINOv2(dino), DINO_SIZE)).to(device)


def random_encoders(name):
    """SVD's VAE (AutoencoderKLTemporalDecoder, 97.7 M parameters) and CLIP ViT-H/14 with projection
    (632 M) with random weights and their published configurations, on the CPU in fp32 as a run loads
    them; for "tiny", small ones of the same classes (the CPU tests)."""
    diffusers, transformers = optional("diffusers"), optional("transformers")
    big = name != "tiny"
    widths = [128, 256, 512, 512] if big else [32, 32, 32, 32]
    vae = diffusers.AutoencoderKLTemporalDecoder(block_out_channels=widths, down_block_types=["DownEncoderBlock2D"] * 4,
                                                 in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2)
    clip = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        **(dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
                image_size=224, projection_dim=1024, hidden_act="gelu") if big else
           dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=4,
                image_size=32, projection_dim=PRESETS[MODELS[name]].context_dim))))
    return svd.SVDEncoders(vae, clip)


def gib(n):
    return n / 2 ** 30


# ----------------------------------------------------------------------------------------------
# What the report costs: `evaluate.py --run` samples every row from the same N held-out clips

# the rows of a run folder with stage1.pt and stage2.pt (report.sampler_rows; a test pins the list): keys
# (checkpoint, steps, guidance, sampler), each made once however many tables show it
REPORT_ROWS = [("svd", n, "ramp", "euler") for n in (25, 8, 2, 1)] + [
    ("stage1.pt", 1, None, "consistency"), ("stage1.pt", 1, None, "tts"), ("stage2.pt", 1, None, "consistency"),
    ("stage2.pt", 1, None, "tts"), ("stage2.pt", 2, None, "consistency"), ("stage2.pt", 4, None, "consistency"),
    ("stage2.pt", 1, 3.0, "consistency"), ("stage2.pt", 1, 1.5, "consistency"), ("stage2.pt", 1, None, "tts-text")]
ASSUMED_TFLOPS = 400      # an assumption where no GPU times a call: 40% of an H100 SXM's 989 dense bf16 TFLOP/s


def nfe(key):
    """Network evaluations per clip of a row: steps, x2 for CFG (a guided and an unguided pass), x2 for TTS."""
    _, steps, guidance, sampler = key
    return steps * (2 if guidance == "ramp" or (guidance or 1) > 1 else 1) * (2 if sampler.startswith("tts") else 1)


def unet_flops(name, shape):
    """FLOPs of one forward pass of the UNet on latents `shape` (B, T, h, w), counted by
    torch.utils.flop_counter on the meta device: exact for the matmuls, convolutions and attention that
    hold nearly all of them, with no memory and no GPU."""
    D, cfg = random_denoiser(name, "meta", False)
    B, T, h, w = shape
    with torch.device("meta"):
        x, sigma = torch.randn(B, T, 4, h, w), torch.ones(B)
        cond = {"concat": torch.randn(B, 4, h, w), "image": torch.randn(B, 1, cfg.context_dim),
                "micro": torch.randn(B, 3)}
    with FlopCounterMode(display=False) as count, torch.no_grad():
        D(x, sigma, cond)
    return count.get_total_flops()


def time_call(name, shape, device, dtype, calls=3):
    """Seconds per UNet call as the report makes them (fp32 weights as SVD loads, autocast to `dtype`,
    no grad): the median of `calls` after one warm-up."""
    D, cfg = random_denoiser(name, device, False)
    B, T, h, w = shape
    x, sigma = torch.randn(B, T, 4, h, w, device=device), torch.ones(B, device=device)
    cond = {"concat": torch.randn(B, 4, h, w, device=device),
            "image": torch.randn(B, 1, cfg.context_dim, device=device), "micro": torch.randn(B, 3, device=device)}
    times = []
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for _ in range(calls + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            D(x, sigma, cond)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    del D
    return sorted(times[1:])[calls // 2]


def report_cost(name, shape, num, sec_per_call=None, log=print):
    """The report's cost at this size: one UNet call's FLOPs x each row's NFE x N clips, and in seconds
    from `sec_per_call` (a GPU's measurement) or, without one, an estimate at ASSUMED_TFLOPS, said as such.
    The VAE's decodes (one per clip and row) are not in the count."""
    flops = unet_flops(name, shape)
    teacher, every = nfe(REPORT_ROWS[0]), sum(map(nfe, REPORT_ROWS))
    sec = sec_per_call or flops / (ASSUMED_TFLOPS * 1e12)
    how = (f"measured: {sec:.3f} s per call" if sec_per_call else
           f"an ESTIMATE at an assumed {ASSUMED_TFLOPS} TFLOP/s sustained (40% of an H100 SXM's dense bf16 peak), "
           f"{sec:.3f} s per call")
    log(f"report cost: one UNet call on {tuple(shape)} latents: {flops / 1e12:.1f} TFLOP "
        "(counted; decodes not counted)")
    log(f"report cost at N = {num}: the teacher's 25 steps {teacher} NFE per clip = {num * teacher * flops / 1e15:.0f} "
        f"PFLOP; all {len(REPORT_ROWS)} rows of a run with stage1.pt and stage2.pt {every} NFE per clip = "
        f"{num * every * flops / 1e15:.0f} PFLOP")
    log(f"report cost in time ({how}): {teacher * sec:.1f} s per clip for the teacher's 25 steps, "
        f"{num * teacher * sec / 60:.0f} min for its row; {every * sec:.1f} s per clip, {num * every * sec / 60:.0f} "
        f"min for all rows")
    return {"flops": flops, "sec_per_call": sec, "teacher_nfe": teacher, "nfe": every}


def held_bytes(f):
    """Bytes of the student's weights: the frozen base and the trainable parameters."""
    base = sum(p.numel() * p.element_size() for p in f.parameters() if not p.requires_grad)
    train = sum(p.numel() * p.element_size() for p in f.parameters() if p.requires_grad)
    return base, train


def weights_held(cfg, name, dtype):
    """What Stage 2 holds before any activation, counted on the meta device (no memory, instant): the
    base once in `dtype`, the trainable parameters with their EMA and Adam's two moments in fp32, the
    discriminator and Adam on its trainable part. Returns a line, with the three fp32 copies of the
    base a naive Stage 2 would hold (teacher, student, target) for comparison."""
    with torch.device("meta"):
        D = Denoiser(VideoUNet(PRESETS[MODELS[name]]))
        disc = random_disc("meta")
    n_base = sum(p.numel() for p in D.parameters())
    to_student(D, cfg.sigma_min, {"rank": cfg.lora_rank, "convs": cfg.lora_convs, "blends": True}, dtype)
    base, train = held_bytes(D)
    d_all = sum(p.numel() * p.element_size() for p in disc.parameters())
    d_train = sum(p.numel() * p.element_size() for p in disc.parameters() if p.requires_grad)
    total = base + 4 * train + d_all + 2 * d_train
    return (f"weights held in Stage 2: {gib(total):.2f} GiB = the base once {gib(base):.2f} GiB "
            f"({str(dtype).split('.')[-1]}) + trainable {train / 4e6:.1f}M parameters x 4 (weights, EMA, Adam's "
            f"two moments; fp32) {gib(4 * train):.2f} GiB + the discriminator with Adam {gib(d_all + 2 * d_train):.2f} "
            f"GiB; three fp32 copies of the base would be {gib(3 * 4 * n_base):.2f} GiB")


def bench(cfg, name, size, steps=3, device="cuda", dtype=torch.bfloat16, log=print, estimate_only=False):
    """Time `steps` steps (after one warm-up) of Stage 1 and of Stage 2 at cfg.num_frames frames of
    size (H, W), batch 1, and one sample decode in each; returns {stage: time_stage's dict}. On CUDA the
    peaks are max_memory_allocated and max_memory_reserved (weights included); on the CPU the process's
    peak RSS is logged. estimate_only: no step runs; each stage's peaks are predicted on a fake CUDA
    device (estimate_stage) and returned as {stage: estimate_stage's dict}."""
    H, W = size
    if name not in MODELS:
        raise UserError(f"--svd random:{name}: use one of {', '.join('random:' + m for m in MODELS)}")
    if H % 8 or W % 8:
        raise UserError(f"--size {H}x{W}: SVD's latents are 1/8 of the frame; use multiples of 8")
    device = torch.device("cuda" if estimate_only else device)
    cuda = device.type == "cuda" and not estimate_only
    B, T, h, w = 1, cfg.num_frames, H // 8, W // 8
    chunk = f"{T} frames at {H}x{W}, {cfg.decode_chunk or T} per VAE call"
    log(f"bench{' --estimate' if estimate_only else ''}: random {name} UNet ({count_parameters(MODELS[name]):,} "
        f"parameters), {H}x{W}, {T} frames, batch {B}, {device} {str(dtype).split('.')[-1]}, gradient checkpointing "
        f"{'on' if cfg.grad_checkpoint else 'off'}")
    log(weights_held(cfg, name, dtype))
    report_cost(name, (B, T, h, w), SVD_NUM, time_call(name, (B, T, h, w), device, dtype) if cuda and steps else None,
                log)
    results = {}
    if estimate_only:
        for stage in ("1", "2") if steps else ():
            r = results[stage] = estimate_stage(stage, cfg, name, (B, T, h, w), dtype)
            log(f"stage {stage} ESTIMATE: {estimated(r['step'])}")
            log(f"stage {stage} ESTIMATE, one sample decode ({chunk}) with the stage in memory: "
                f"{estimated(r['decode'][cfg.decode_chunk or T])}")
            log(f"stage {stage} ESTIMATE, the network call of samples and checks on {cfg.check_batch} clips (no "
                f"gradient): {estimated(r['check'][cfg.check_batch])}")
            for flag, what, given in (("--decode-chunk", "decode", cfg.decode_chunk or T),
                                      ("--check-batch", "check", cfg.check_batch)):
                fits = [n for n, p in r[what].items() if p[1] <= r["step"][1]]
                if fits and max(fits) != given:
                    p = r[what][max(fits)]
                    log(f"stage {stage} ESTIMATE: with {flag} {max(fits)} the {what} stays within the step's reserved "
                        f"memory: peak allocated {gib(p[0]):.2f} GiB, reserved about {gib(p[1]):.2f} GiB")
                elif not fits:
                    log(f"stage {stage} ESTIMATE: the {what} needs more than the step even at {flag} 1: reserved "
                        f"about {gib(r[what][1][1]):.2f} GiB")
        log(f"the estimate cannot see kernels' own buffers (cuBLAS/cuDNN workspaces, flash attention's backward "
            f"scratch: add {RESERVE_MARGIN} GiB), fragmentation beyond its allocator model, nor the attention kernel "
            "a given GPU and library pick; the CUDA context (about 0.5 GiB) is outside both counters")
        return results
    grid = sigma_grid(cfg.grid_size, cfg.sigma_min, cfg.sigma_max).to(device)
    enc = random_encoders(name) if steps else None          # on the CPU, as a run that reads the latent cache
    if enc is not None:
        enc.chunk = cfg.decode_chunk
        log(f"SVD's VAE and CLIP: {sum(p.numel() for p in enc.parameters()) / 1e6:.0f}M parameters, fp32, on the CPU "
            f"but for the sample decode")
    for stage in ("1", "2") if steps else ():  # each built afresh; the previous stage's memory is freed
        r = time_stage(stage, cfg, name, grid, (B, T, h, w), steps, device, dtype, enc)
        extra = "" if stage == "1" else f" (the teacher's {cfg.m} Euler steps with CFG: {2 * cfg.m} NFE)"
        log(f"stage {stage}: {memory(r['step'], cuda)}, {r['sec']:.3f} s per step (median of {steps} after 1 "
            f"warm-up){extra}")
        log(f"stage {stage}, one sample decode ({chunk}; the VAE on {device} for it): "
            f"{memory(r['decode'], cuda)}, {r['decode_sec']:.2f} s")
        log(f"stage {stage}, the network call of samples and checks on {cfg.check_batch} clips (no gradient): "
            f"{memory(r['check'], cuda)}")
        results[stage] = r
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return results


RESERVE_MARGIN = "0.1-0.5"


def estimated(peak):
    """An estimate_stage peak as printed."""
    allocated, reserved, where = peak
    return (f"peak allocated {gib(allocated):.2f} GiB, reserved about {gib(reserved):.2f} GiB (a model of CUDA's "
            f"caching allocator{', expandable segments' if estimate.expandable_segments() else ''}), at: {where}")


def memory(peak, cuda):
    """A peak as printed: CUDA's (allocated, reserved) bytes, or the process's peak RSS on the CPU."""
    if cuda:
        return f"peak allocated {gib(peak[0]):.2f} GiB, reserved {gib(peak[1]):.2f} GiB"
    return f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB"


def cuda_peak(cuda):
    """CUDA's peaks since the last reset: (max_memory_allocated, max_memory_reserved), or None."""
    return (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if cuda else None


def build_stage(stage, cfg, name, grid, shape, device, dtype, part=lambda what: nullcontext()):
    """Stage `stage`'s student (a LoRA student of a random SVD), discriminator, optimisers and EMA, and
    random latents of `shape` (B, T, h, w). Returns .step(i): one step as train.py's loop makes it, then
    Adam and the EMA; .check(n): the network call of the stage's samples and checks (run.stage_checks) on
    n clips; .nets {name: module}; .x0, the latents. part(what) names the parts of a step for the
    estimate. Stage 1's levels are all at the top, where every fake meets the discriminator: its largest
    step."""
    B, T, h, w = shape
    torch.manual_seed(cfg.seed)
    D, ucfg = random_denoiser(name, device, cfg.grad_checkpoint)
    lora = {"rank": cfg.lora_rank, "convs": cfg.lora_convs, "blends": stage == "2"}
    params = to_student(D, cfg.sigma_min, lora, dtype)
    disc = random_disc(device)
    opts = {"student": torch.optim.Adam(params, lr=1e-6), "disc": make_disc_optimizer(disc, 1e-6)}
    groups = {k: [p for g in o.param_groups for p in g["params"]] for k, o in opts.items()}
    ema = EMA(D, cfg.ema_decay if stage == "1" else cfg.target_decay, warmup=stage == "1")
    x0 = torch.randn(B, T, 4, h, w, device=device)
    cond = {"concat": torch.randn(B, 4, h, w, device=device),
            "image": torch.randn(B, 1, ucfg.context_dim, device=device),                 # CLIP's embedding
            "micro": torch.tensor([[7.0, 127.0, 0.02]], device=device)}                  # fps - 1, motion, aug
    if stage == "1":
        lgp = LGP(grid, cfg.lambda_adv, cfg.huber_c, 1.0, cfg.adv_min_sigma)

        def step(update):
            return lgp.step(D, disc, x0, cond, update)
    else:
        acd = ACD(grid, cfg.m, teacher_scale(cfg), cfg.lambda_adv, cfg.huber_c, cfg.stage2_top,
                  cfg.stage2_direct, cfg.direct_sigma)

        def f_target(*args):
            with ema.swapped(), part("the EMA target's forward"):
                return D(*args)

        def step(update):
            return acd.step(D, f_target, teacher_of(D), disc, x0, cond, update)

    def backward(loss, k):
        with part(f"backward into the {k}"):
            loss.backward(inputs=groups[k])

    def train_step(i):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32), part("forward"):
            step(backward)
        with part("Adam"):
            for o in opts.values():
                o.step()
                o.zero_grad(set_to_none=True)
        with part("EMA"):
            ema.update(i)

    def check(n):
        """One step of the EMA student from the top level on n clips, no gradient and no autocast, as
        samples and the end-of-stage check make it (--check-batch clips per call)."""
        c = {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}
        x = torch.randn(n, T, 4, h, w, device=device) * cfg.sigma_max
        with torch.no_grad(), ema.swapped():
            D(x, torch.full((n,), cfg.sigma_max, device=device), c)

    D.train()
    disc.train()
    return SimpleNamespace(step=train_step, check=check, nets={"student": D, "disc": disc}, x0=x0)


def time_stage(stage, cfg, name, grid, shape, steps, device, dtype, enc=None):
    """Time `steps` steps (after one warm-up) of stage `stage` (build_stage), then one sample decode with
    `enc` (SVD's encoders, moved to the device for it) while the stage is in memory. Returns {"step": peaks,
    "sec": seconds per step, "decode": peaks, "decode_sec": seconds}; peaks are CUDA's (allocated, reserved)
    or None."""
    cuda = device.type == "cuda"
    parts = build_stage(stage, cfg, name, grid, shape, device, dtype)
    train_step, x0 = parts.step, parts.x0
    times = []
    for i in range(steps + 1):                                    # the first is warm-up
        if cuda:
            torch.cuda.synchronize()
            if i == 1:
                torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        train_step(i)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {"step": cuda_peak(cuda), "sec": sorted(times[1:])[len(times[1:]) // 2]}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad(), svd.resident(enc.vae, device):          # as run.stage_checks: fp32, no autocast
        enc.decode_video(x0.float())
        if cuda:
            torch.cuda.synchronize()
        out.update(decode=cuda_peak(cuda), decode_sec=time.perf_counter() - t0)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        parts.check(cfg.check_batch)
    return {**out, "check": cuda_peak(cuda)}


def estimate_stage(stage, cfg, name, shape, dtype):
    """Stage `stage`'s peak GPU memory predicted without a GPU (estimate.py): build_stage, a warm-up step
    and a step on a fake CUDA device, then one sample decode with SVD's encoders brought over from the CPU,
    as time_stage, at --decode-chunk and at fewer frames per call until the decode's reserved memory is
    within the step's, and the network call of samples and checks at --check-batch and fewer clips the same
    way. Returns {"step": peak, "decode": {chunk: peak}, "check": {clips: peak}}, each peak (allocated,
    reserved estimate, where)."""
    expandable = estimate.expandable_segments()
    with estimate.fake_gpu() as tally:
        device, T = torch.device("cuda"), shape[1]
        grid = sigma_grid(cfg.grid_size, cfg.sigma_min, cfg.sigma_max).to(device)
        parts = build_stage(stage, cfg, name, grid, shape, device, dtype, tally.part)
        with torch.device("cpu"):
            enc = random_encoders(name)
        tally.watch({**parts.nets, "vae": enc.vae})
        parts.step(0)                                             # Adam's moments appear
        tally.reset_peak()
        parts.step(1)
        out = {"step": (tally.peak, estimate.Allocator.replay(tally.events, expandable), tally.at), "decode": {}}
        with torch.no_grad(), svd.resident(enc.vae, device):      # as run.stage_checks: fp32, no autocast
            held = len(tally.events)
            for chunk in sorted({cfg.decode_chunk or T, T, -(-T // 2), -(-T // 4), 2, 1}, reverse=True):
                tally.reset_peak()
                start = len(tally.events)
                with tally.part("sample decode"):
                    enc.decode_video(parts.x0.float(), chunk)
                reserved = estimate.Allocator.replay(tally.events[:held] + tally.events[start:], expandable)
                out["decode"][chunk] = (tally.peak, reserved, tally.at)
                if chunk <= (cfg.decode_chunk or T) and reserved <= out["step"][1]:
                    break
            out["check"] = {}
            for n in sorted({cfg.check_batch, 8, 4, 2, 1}, reverse=True):
                tally.reset_peak()
                start = len(tally.events)
                with tally.part(f"the check's step on {n} clips"):
                    parts.check(n)
                reserved = estimate.Allocator.replay(tally.events[:held] + tally.events[start:], expandable)
                out["check"][n] = (tally.peak, reserved, tally.at)
                if n <= cfg.check_batch and reserved <= out["step"][1]:
                    break
        return out


def main(cfg, steps=3, estimate_only=False):
    """`python train.py --bench --svd random:svd-xt --size 320x576 --frames 14` (train.py's Config);
    --bench-steps 0 prints the weights held alone (instant, on any machine); --estimate predicts the peaks
    (estimate_only)."""
    try:
        if not cfg.svd.startswith("random:"):
            raise UserError("--bench builds SVD's architecture with random weights: give --svd random:svd-xt")
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, cfg.dtype or ("bfloat16" if device.startswith("cuda") or estimate_only else "float32"))
        bench(cfg, cfg.svd.split(":", 1)[1], frame_size(cfg.size, cfg.image_size), steps, device, dtype,
              estimate_only=estimate_only)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
