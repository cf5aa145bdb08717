"""Evaluation: the replication report (the paper's Tables 1 and 2 on paired rows, cached row by row),
and the command line of the ruler (metric.py: FVD-syn, FVD, the paired bootstrap, the diagnostics).

Every row of a report is generated from the first frames of the same held-out clips with the same
noise, so two rows can be compared on the *paired* ruler (`metric.paired_fd`): a difference or a ratio
gets its own 95% interval, and "better" or "worse" is said only where that interval excludes 0.

Read first: `write_report` (what a report holds), `measure` (how its rows are made paired and cached),
`paper_table2` (the paper's ablations).

    python evaluate.py --sanity                                 # the ruler checked against corruptions
    python evaluate.py --real videos/ --fake samples/ [--i3d i3d_torchscript.pt]     # or --real synthetic
    python evaluate.py --real synthetic --fake A/ --fake B/     # B against A on the paired ruler
    python evaluate.py --run runs/default                       # the replication report of a run folder
    python evaluate.py --run runs/default --pairs stage1_x.pt:stage1.pt    # a checkpoint against another
"""
import glob
import hashlib
import inspect
import json
import os
import re
import sys
import time
import warnings

import torch
from tqdm import tqdm

import autoencoder
import lora
import metric
import sample
import svd
import unet
from config import ABLATIONS
from data import Parser, SyntheticVideos, UserError, VideoFolder, check_numbers, optional, save_atomic, write_video
from metric import (I3D, bias_corrected, blurred, compare, diagnostics, extract, fd_boot, fd_interval, interval,
                    load_feature_net, paired_fd, shuffled, static)
from sample import TTS_SIGMA, cfg_scale, generate, load_checkpoint, load_model


# ----------------------------------------------------------------------------------------------
# The replication report: the analogue of the paper's Tables 1 and 2 on held-out first frames

TEACHER_25 = ("teacher.pt", 25, "ramp", "euler")        # the reference of Table 1 and of every ratio
FULL_MODEL = ("stage2.pt", 1, None, "tts")              # the reference of Table 2 (the paper's "full model")
PAPER_FULL = 171.15                                     # the paper's full model, OSV 1 step + TTS (FVD)


def paper_table2(seed=0):
    """The paper's Table 2 on the files of training seed `seed` (`train.py --stage ablations [--seed S]`):
    the full model's key and, per ablation row, (the paper's row, label, key, the paper's FVD; docs/paper.md).
    A key is (checkpoint file, steps, guidance, sampler). Seed S's files are stage1_seedS.pt,
    stage2_seedS.pt and stage2_TAG-seedS.pt."""
    own, suffix = (f"_seed{seed}", f"-seed{seed}") if seed else ("", "")
    s1, s2 = f"stage1{own}.pt", f"stage2{own}.pt"
    tag = {row: t for t, (row, _, _) in ABLATIONS.items()}                # the paper's row -> our tag
    ablation = lambda row: (f"stage2_{tag[row]}{suffix}.pt", 1, None, "tts")       # noqa: E731
    return (s2, 1, None, "tts"), [
        ("a", "teacher solve m = 1 instead of 5", ablation("a"), 332.25),
        ("b", "no Stage 1 (ACD from the teacher)", ablation("b"), 221.75),
        ("c", "no Stage 2 (Stage 1 only), without TTS", (s1, 1, None, "consistency"), 298.35),
        ("c", "no Stage 2 (Stage 1 only), with TTS", (s1, 1, None, "tts"), 234.13),
        ("d", "no adversarial loss", ablation("d"), 405.41),
        ("e", "discriminator on decoded frames", ablation("e"), 232.25),
        ("f", "CFG 3.0 at inference (1 step, no TTS)", (s2, 1, 3.0, "consistency"), 531.23),
        ("f", "CFG 1.5 at inference (1 step, no TTS)", (s2, 1, 1.5, "consistency"), 426.71),
        ("f", "no CFG at inference (1 step, no TTS)", (s2, 1, None, "consistency"), 335.36)]


def sampler_rows(run_dir):
    """(table, label, key, reference key, the paper's row and FVD or None) for every row whose checkpoint
    the run folder holds. Table 1: the teacher (Euler) with SVD's per-frame CFG ramp (guidance "ramp"),
    the students without CFG, against the teacher's 25 steps. Table 2: the paper's ablations, 1 step + TTS
    unless noted, against the full model, once per training seed whose full model is here. Table 3: the
    other rows against the full model: the text's TTS, and every tagged checkpoint (`train.py --tag`)
    that is no ablation of Table 2."""
    has = lambda name: os.path.isfile(os.path.join(run_dir, name))          # noqa: E731
    rows = []
    if has("teacher.pt"):
        # SVD's own sampler, Euler: the paper's 25 steps = 50 NFE (Heun would cost twice the calls)
        rows += [(1, "teacher, Euler + CFG", ("teacher.pt", n, "ramp", "euler"), TEACHER_25, None) for n in (25, 8, 2, 1)]
    if has("stage1.pt"):
        rows += [(1, "Stage 1 only (LGP)", ("stage1.pt", 1, None, "consistency"), TEACHER_25, None)]
    if has("stage2.pt"):
        rows += [(1, label, ("stage2.pt", n, None, sampler), TEACHER_25, None) for label, n, sampler in
                 (("OSV", 1, "consistency"), ("OSV + TTS", 1, "tts"), ("OSV", 2, "consistency"), ("OSV", 4, "consistency"))]
    seeds = [0] * has("stage2.pt") + sorted(int(m.group(1)) for p in glob.glob(os.path.join(run_dir, "stage2_seed*.pt"))
                                            if (m := re.fullmatch(r"stage2_seed(\d+)\.pt", os.path.basename(p))))
    in_table2 = set()
    for seed in seeds:
        full, table = paper_table2(seed)
        suffix = f"-seed{seed}" if seed else ""          # an ablation's own Stage 1 is a step of its row
        in_table2 |= {full[0]} | {key[0] for *_, key, _ in table} | {
            f"stage1_{t}{suffix}.pt" for t, (_, stages, _) in ABLATIONS.items() if "1" in stages}
        rows += [(2, "full model (OSV + TTS)" + (f", seed {seed}" if seed else ""), full, full, None)]
        rows += [(2, label, key, full, (row, fvd)) for row, label, key, fvd in table if has(key[0])]
    if has("stage2.pt"):
        rows += [(3, "TTS as Eq. (13)'s text reads", ("stage2.pt", 1, None, "tts-text"), FULL_MODEL, None)]
    others = lambda stage: sorted(n for n in (os.path.basename(p) for p in glob.glob(os.path.join(run_dir, f"stage{stage}_*.pt")))  # noqa: E731,E501
                                  if n not in in_table2 and not re.fullmatch(r"stage1_seed\d+\.pt", n))
    if has("stage2.pt"):
        rows += [(3, f"Stage 2 `--tag {n[7:-3]}`", (n, 1, None, "tts"), FULL_MODEL, None) for n in others(2)]
        rows += [(3, f"Stage 1 `--tag {n[7:-3]}` (1 step, no TTS)", (n, 1, None, "consistency"), FULL_MODEL, None)
                 for n in others(1)]
    return rows


@torch.no_grad()
def run_row(D, ae, cfg, real, steps, guidance, sampler="heun", batch_size=50, seed=0, tts_sigma=TTS_SIGMA):
    """Generate videos from the first frames of `real` (video, fps, motion); return them, the
    milliseconds per video (sampling and decoding, after a one-step warm-up batch of the same shapes)
    and the NFE per video. cfg["sigma_max"] is where every sampler starts. Batch i's noise is drawn from
    seed + i, so every row sees the same clips with the same noise: the rows are paired."""
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


ROW_MAKER = run_row                 # the function as written here, for `row_code` (a test may stand in for it)
_digests = {}


def digest(path):
    """The sha256 of a file's bytes (16 hex digits), once per command and file version."""
    st = os.stat(path)
    k = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if k not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _digests[k] = h.hexdigest()[:16]
    return _digests[k]


def row_code():
    """A hash of the code that makes and measures a row from a checkpoint: the networks (unet.py, the
    autoencoder, LoRA's merge, SVD's encoders), the samplers, `run_row`, the ruler's features and the
    diagnostics. Any change to it makes every row anew: a cached row is never older than its code."""
    parts = (unet, autoencoder, lora.LoRA, lora.merge_lora, svd.SVDEncoders, svd.init_noise_scale, sample.to_d,
             sample.karras_sigmas, sample.sigma_grid, sample.consistency_sigmas, sample.cfg_scale, sample.guided,
             sample.sample_euler, sample.sample_heun, sample.sample_consistency, sample.sample_tts,
             sample.sample_tts_text, sample.generate, ROW_MAKER, metric.FeatureNet, metric.extract,
             metric.motion_magnitude, metric.first_frame_psnr, metric.diagnostics)
    return hashlib.sha256("".join(inspect.getsource(p) for p in parts).encode()).hexdigest()[:12]


def row_identity(run_dir, key, num, size, frames, tts_sigma, sigma_max, features_path):
    """What a generated row depends on: the checkpoint's bytes and its base's (a student's adapters sit on
    teacher.pt), the sampler, steps, guidance, N, the noise's seed, the frame size and count, the samplers'
    levels, the feature network's bytes and the code (`row_code`). A row cached under the same identity
    is the same row."""
    base = os.path.join(run_dir, "teacher.pt")
    return {"code": row_code(), "checkpoint": digest(os.path.join(run_dir, key[0])),
            "base": digest(base) if os.path.isfile(base) else "",
            "steps": key[1], "guidance": key[2], "sampler": key[3], "num": num, "seed": 0, "size": size,
            "frames": frames, "tts_sigma": tts_sigma if key[3] in ("tts", "tts-text") else None,
            "sigma_max": sigma_max, "features": digest(features_path), "batch": 50}


def row_path(run_dir, key, ident):
    h = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    name = f"{key[0][:-3]}_{key[1]}_{key[2] or 1}_{key[3]}"
    return os.path.join(run_dir, "rows", f"{name}_{h}.pt")


def measure(run_dir, keys, num, device="cpu", feature_steps=1500, tts_sigma=TTS_SIGMA, sigma_max=None):
    """Every key (checkpoint, steps, guidance, sampler) sampled from the first frames of the same `num`
    held-out test clips with the same noise, then the paired bootstrap over all of them (paired_fd).
    Also the real-vs-real floor at this N: these clips against the next `num` test clips.

    Each row's features, diagnostics and timing are cached in run_dir/rows/ under `row_identity` as soon
    as the row is made: a second report, or one with a new checkpoint, generates only the rows that are
    new, and an interrupted report keeps the rows it finished. Each checkpoint is loaded once."""
    for key in keys:
        if not os.path.isfile(os.path.join(run_dir, key[0])):
            raise UserError(f"{os.path.join(run_dir, key[0])} not found")
    cfg = load_checkpoint(os.path.join(run_dir, keys[0][0]), ("teacher", "1", "2"))["config"]
    if cfg.get("size"):
        raise UserError(f"{run_dir} trained at --size {cfg['size']}: the report measures square synthetic runs")
    S, T = cfg["image_size"], cfg["num_frames"]
    fpath = os.path.join(run_dir, f"fvdsyn_synthetic_{S}x{T}.pt")
    features = load_feature_net(fpath, "synthetic", S, T, device, steps=feature_steps)
    test = SyntheticVideos(S, T, "test")
    b = test.batch(range(num))
    real = {k: b[k].to(device) for k in ("video", "fps", "motion")}
    f_real = extract(features, real["video"])
    floor_fd, floor_boot = fd_boot(f_real, extract(features, test.batch(range(num, 2 * num))["video"]))
    paths = {k: row_path(run_dir, k, row_identity(run_dir, k, num, S, T, tts_sigma, sigma_max, fpath)) for k in keys}
    new = [k for k in keys if not os.path.isfile(paths[k])]
    models = {}
    for key in tqdm(new, desc=f"rows ({len(keys) - len(new)} of {len(keys)} cached)", dynamic_ncols=True):
        if key[0] not in models:                                # once per checkpoint and command
            models[key[0]] = load_model(os.path.join(run_dir, key[0]), device)
            if sigma_max is not None:
                models[key[0]][2]["sigma_max"] = sigma_max
        D, ae, cfg_k, _ = models[key[0]]
        fake, ms, nfe = run_row(D, ae, cfg_k, real, *key[1:], tts_sigma=tts_sigma)
        os.makedirs(os.path.dirname(paths[key]), exist_ok=True)
        save_atomic({"feats": extract(features, fake), "ms": ms, "nfe": nfe, "videos": fake[:4], "device": device,
                     **diagnostics(fake, real["video"].cpu(), real["video"][:, 0].cpu())}, paths[key])
    rows = {k: torch.load(paths[k], weights_only=False) for k in keys}
    fd, boot = paired_fd(f_real, [rows[k].pop("feats") for k in keys])
    half = 1.96 * float(floor_boot.std(ddof=1))
    return {"index": {k: j for j, k in enumerate(keys)}, "fd": fd, "boot": boot, "info": rows,
            "floor": (floor_fd, max(0.0, floor_fd - half), floor_fd + half),
            "floor_corrected": float(bias_corrected(floor_fd, floor_boot)), "cached": set(keys) - set(new),
            "real": real["video"][:4].cpu(), "cfg": cfg, "device": device}


def ci(est, lo, hi, signed=False, unit=""):
    """'x [lo, hi]': an estimate and its 95% interval."""
    f = "{:+.2f}" if signed else "{:.2f}"
    return f"{f.format(est)}{unit} [{f.format(lo)}, {f.format(hi)}]{unit}"


def preamble(m, num, tts_sigma, sigma_max):
    """The lines that open a report or a --pairs table: what was measured, how, and the floor at this N."""
    S, T = m["cfg"]["image_size"], m["cfg"]["num_frames"]
    dev_name = torch.cuda.get_device_name() if m["device"].startswith("cuda") else "CPU"
    return [f"{num} held-out synthetic test clips ({S}x{S}, {T} frames); each generated video starts from the "
            f"first frame of one of them, with the same noise in every row, so the rows are paired. FVD-syn (our "
            f"offline ruler, not comparable with published FVD) with a 95% bootstrap interval; a difference "
            f"between rows has the paired interval (one draw of clips for all rows), and its verdict is said only "
            f"where that interval excludes 0; a ratio's interval is the difference's divided by the reference, so it "
            f"excludes 1 exactly then. NFE = network evaluations per video (CFG counts two); ms = sampling + "
            f"decoding per video on {m['device']} ({dev_name}), batches of 50, measured when the row was generated.",
            "", f"**The floor at this N:** these {num} real clips against the next {num} give FVD-syn "
            f"{ci(*m['floor'])}. A Fréchet distance from N videos is biased upward by about this much, so every "
            f"row includes it and every ratio is pulled toward 1.", "",
            *([f"**Cached rows:** {len(m['cached'])} of {len(m['index'])} rows were read from `rows/`, made by an "
               f"earlier command from the same checkpoints, sampler, clips and ruler; their ms (marked *) were "
               f"measured then, not side by side with this command's.", ""] if m["cached"] else []),
            *([f"Sampled from sigma_max = {m['cfg']['sigma_max']}; TTS level s = {tts_sigma}.", ""]
              if sigma_max is not None or tts_sigma != TTS_SIGMA else [])]


def direction(ours, paper_fvd):
    """Whether our paired verdict on an ablation reproduces the paper's direction against its full model."""
    theirs = "worse" if paper_fvd > PAPER_FULL else "better"
    return "not resolved" if ours == "not resolved" else "reproduced" if ours == theirs else "opposite"


def write_report(run_dir, num=1000, device="cpu", feature_steps=1500, max_steps=0, tts_sigma=TTS_SIGMA,
                 sigma_max=None, name="report", checkpoints=None):
    """Evaluate every row the run folder supports (`sampler_rows`) and write run_dir/<name>.md and
    run_dir/<name>_grid.gif. Rows that share a model and sampler are computed once, and rows made by an
    earlier command are read from run_dir/rows/ (`measure`). Only rows of at most max_steps steps (0: all)
    and of the checkpoint files in `checkpoints` (None: all); tts_sigma: the Time Travel Sampler's level
    s; sigma_max: where every sampler starts (default: the run's)."""
    rows = [r for r in sampler_rows(run_dir) if (not max_steps or r[2][1] <= max_steps)
            and (not checkpoints or r[2][0] in checkpoints)]
    if not rows:
        raise UserError(f"{run_dir} holds no trained video model (teacher.pt)" +
                        (f" among {','.join(checkpoints)}" if checkpoints else ": train one first"))
    keys = list(dict.fromkeys(r[2] for r in rows))
    m = measure(run_dir, keys, num, device, feature_steps, tts_sigma, sigma_max)
    at, fd, boot, info = m["index"], m["fd"], m["boot"], m["info"]
    vs = {(k, ref): compare(fd, boot, at[k], at[ref]) for _, _, k, ref, _ in rows if ref in at and ref != k}
    star = lambda k: "*" if k in m["cached"] else ""                        # noqa: E731

    def cells(key, ref):
        """FVD-syn [95%], then the difference to ref [paired 95%] and its verdict."""
        j, c = at[key], vs.get((key, ref))
        return (f"{ci(fd[j], *interval(fd[j], boot[:, j]))} | "
                + (f"{ci(*c['diff'], signed=True)} | {c['verdict']}" if c else
                   "reference | " if ref == key else "not measured | "))

    def line(label, key, ref):
        d = info[key]
        return (f"| {label} | {key[1]} | {d['nfe']} | {cells(key, ref)} | {d['first_frame_psnr']:.2f} | "
                f"{d['static_rate']:.3f} | {d['motion_ratio']:.2f} | {d['ms']:.1f}{star(key)} |")

    head = ("| {} | steps | NFE | FVD-syn | difference to {} | verdict | first-frame PSNR (dB) | static rate | "
            "motion vs real | ms / video |")
    lines = [f"# Replication report: {run_dir}", "", *preamble(m, num, tts_sigma, sigma_max),
             "## Table 1: steps against quality", "", head.format("model", "the teacher's 25 steps"),
             "|---" * 10 + "|", *[line(r[1], r[2], r[3]) for r in rows if r[0] == 1]]
    table2 = [r for r in rows if r[0] == 2]
    if table2:
        lines += ["", "## Table 2: the paper's ablations (1 step + TTS unless noted)", "",
                  f"Each ablation against the full model of the same training seed, on the paired ruler; beside it the "
                  f"paper's own ratio (FVD on OpenVid-1M, its full model {PAPER_FULL}). \"reproduced\": our paired "
                  f"verdict goes the paper's way; \"opposite\": it is resolved the other way.", "",
                  "| row | ablation | NFE | FVD-syn | difference to the full model | verdict | ours / full model | "
                  "the paper's / full model | the paper's direction |", "|---" * 9 + "|"]
        repro = {}
        for _, label, key, ref, paper in table2:
            if paper is None:                                             # the full model of a seed
                lines.append(f"| | **{label}** | {info[key]['nfe']} | {cells(key, ref)} | 1 | 1 | |")
                continue
            c = vs[(key, ref)]
            said = direction(c["verdict"], paper[1])
            repro.setdefault((ref, paper[0]), []).append(said)
            lines.append(f"| ({paper[0]}) | {label} | {info[key]['nfe']} | {cells(key, ref)} | "
                         f"{ci(*c['ratio'], unit='x')} | {paper[1] / PAPER_FULL:.2f}x | {said} |")
        for ref in dict.fromkeys(r[3] for r in table2):
            rs = {row: all(x == "reproduced" for x in said) for (r, row), said in repro.items() if r == ref}
            seed = re.fullmatch(r"stage2(?:_seed(\d+))?\.pt", ref[0]).group(1) or 0
            lines += ["", f"**Seed {seed}** (`{ref[0]}`): {sum(rs.values())} of the {len(rs)} ablations measured reproduce the paper's "
                      f"direction (every row of an ablation resolved its way): "
                      + (", ".join(f"({row})" for row, ok in rs.items() if ok) or "none") + "."]
    if any(r[0] == 3 for r in rows):
        lines += ["", "## Other rows against the full model (1 step + TTS unless noted)", "",
                  head.format("row", "the full model"), "|---" * 10 + "|",
                  *[line(r[1], r[2], r[3]) for r in rows if r[0] == 3]]
    if TEACHER_25 in at:                              # the headline: each student against the teacher's 25 steps
        lines += ["", "## Against the teacher's 25 steps (Euler + CFG, 50 NFE)", "",
                  "| model | steps | NFE | FVD-syn / teacher's | difference | verdict | speed-up (ms / video) |",
                  "|---|---|---|---|---|---|---|"]
        for table, label, key, ref, _ in rows:
            if key[0] != "teacher.pt" and table == 1:
                c = vs[(key, ref)]
                lines.append(f"| {label} | {key[1]} | {info[key]['nfe']} | {ci(*c['ratio'], unit='x')} | "
                             f"{ci(*c['diff'], signed=True)} | {c['verdict']} | "
                             f"{info[TEACHER_25]['ms'] / info[key]['ms']:.1f}x{star(key) or star(TEACHER_25)} |")
    changed = [(label, c) for (_, label, key, ref, _) in rows if (c := vs.get((key, ref)))
               and c["corrected"]["verdict"] != c["verdict"]]
    lines += ["", "## The bootstrap's bias correction (a check)", "",
              f"With every distance replaced by 2 FD - (the mean of its bootstrap replicates): the floor, whose true "
              f"value is 0, becomes {m['floor_corrected']:.2f} (from {m['floor'][0]:.2f}); "
              + (f"{len(changed)} of {len(vs)} verdicts would change: "
                 + "; ".join(f"{label}, {c['verdict']} -> {c['corrected']['verdict']}" for label, c in changed)
                 if changed else f"none of the {len(vs)} verdicts would change")
              + (("; the ratios to the teacher's 25 steps would be " + ", ".join(
                  f"{label} {key[1]} step{'s' * (key[1] > 1)} {vs[(key, ref)]['corrected']['ratio']:.2f}x "
                  f"(from {vs[(key, ref)]['ratio'][0]:.2f}x)" for t, label, key, ref, _ in rows
                  if t == 1 and key[0] != "teacher.pt" and (key, ref) in vs)) if TEACHER_25 in at else "") + "."]
    shown = {TEACHER_25: "teacher 25 steps", ("teacher.pt", 1, "ramp", "euler"): "teacher 1 step",
             FULL_MODEL: "OSV 1 step + TTS"}
    shown = {k: v for k, v in shown.items() if k in at}
    T = m["cfg"]["num_frames"]
    cols = [m["real"][:, :1].expand(-1, T, -1, -1, -1)] + [info[k]["videos"] for k in shown]
    write_video(os.path.join(run_dir, f"{name}_grid.gif"), torch.stack(cols, 1).flatten(0, 1), fps=8, ncol=len(cols))
    lines += ["", f"`{name}_grid.gif`: each row one test clip; columns: the conditioning frame, "
              + ", ".join(shown.values()) + "."]
    with open(os.path.join(run_dir, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return lines


def parse_pairs(text):
    """`--pairs A:B,C:D`: each row A against its reference B. An item is FILE[@SAMPLER]: a student's
    1 step (consistency by default; tts, tts-text), the teacher's 25 Euler steps with CFG."""
    def item(s):
        ck, _, sampler = s.strip().partition("@")
        if ck == "teacher.pt":
            if sampler:
                raise UserError(f"--pairs {s}: the teacher is measured with its 25 Euler steps and CFG")
            return TEACHER_25
        if sampler not in ("", "consistency", "tts", "tts-text"):
            raise UserError(f"--pairs {s}: a student's sampler is consistency, tts or tts-text")
        return (ck, 1, None, sampler or "consistency")
    pairs = []
    for p in text.split(","):
        if p.count(":") != 1:
            raise UserError(f"--pairs {p!r}: write ROW:REFERENCE, e.g. stage1_sig0.pt:stage1.pt")
        pairs.append(tuple(map(item, p.split(":"))))
    return pairs


def write_pairs(run_dir, pairs, num=1000, device="cpu", feature_steps=1500, tts_sigma=TTS_SIGMA, name="pairs"):
    """`--run DIR --pairs A:B,...`: each row against its own reference on the paired ruler (DIR/<name>.md)."""
    keys = list(dict.fromkeys(k for p in pairs for k in p))
    m = measure(run_dir, keys, num, device, feature_steps, tts_sigma)
    at, fd, boot = m["index"], m["fd"], m["boot"]
    label = lambda k: k[0] + (f" @{k[3]}" if k[3] != "consistency" and k != TEACHER_25 else "")   # noqa: E731
    lines = [f"# Paired comparisons: {run_dir}", "", *preamble(m, num, tts_sigma, None),
             "| row | reference | FVD-syn (row) | FVD-syn (reference) | difference | verdict |", "|---" * 6 + "|"]
    for k, ref in pairs:
        vs = compare(fd, boot, at[k], at[ref])
        lines.append(f"| {label(k)} | {label(ref)} | {fd[at[k]]:.2f} | {fd[at[ref]]:.2f} | "
                     f"{ci(*vs['diff'], signed=True)} | {vs['verdict']} |")
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


def compare_sets(f_real, sets, metric_name):
    """`--fake X --fake Y ...`: each later set against the first on the paired ruler. The sets pair by
    file name; where every set names the real videos too, the real set is resampled with them."""
    names = [sorted(s[2]) for s in sets]
    if any(n != names[0] for n in names):
        raise UserError("a paired comparison needs the same file names in every --fake folder (one video per "
                        "conditioning frame): " + ", ".join(f"{s[0]} has {len(s[2])}" for s in sets))
    order = [[s[2].index(n) for n in names[0]] for s in sets]
    feats = [s[4][o] for s, o in zip(sets, order)]
    paired_real = all(s[3] for s in sets)
    real = f_real[[sets[0][3][i] for i in order[0]]] if paired_real else f_real
    fd, boot = paired_fd(real, feats, paired_real=paired_real)
    print(f"paired against {sets[0][0]} ({len(feats[0])} videos per set; the real set "
          + ("resampled with them)" if paired_real else "resampled on its own: the names do not match it)"))
    for k, s in enumerate(sets[1:], 1):
        vs = compare(fd, boot, k, 0)
        print(f"{s[0]}: {metric_name} difference {ci(*vs['diff'], signed=True)}, ratio {ci(*vs['ratio'], unit='x')}"
              f": {vs['verdict']}")
    return fd, boot


def main(argv=None):
    p = Parser(description="FVD-syn (offline) or FVD (I3D) between two sets of videos.")
    p.add_argument("--real", default="synthetic", help="a folder of videos, or 'synthetic' (the test split)")
    p.add_argument("--fake", action="append", help="a folder of generated videos; again for more sets, each "
                   "later one also compared with the first on the paired ruler")
    p.add_argument("--sanity", action="store_true", help="check the ruler on real and corrupted clips")
    p.add_argument("--run", metavar="DIR", help="evaluate the models of a run folder; writes DIR/report.md")
    p.add_argument("--plot", metavar="DIR", help="draw a run folder's losses and accuracies to DIR/log.png "
                   "(needs matplotlib)")
    p.add_argument("--size", type=int, default=32, help="frame size of the sets (default: %(default)s, the tiny preset)")
    p.add_argument("--frames", type=int, default=8, help="frames per video (default: %(default)s, the tiny preset)")
    p.add_argument("--num", type=int, default=1000, help="videos per set (default: %(default)s)")
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
    p.add_argument("--pairs", metavar="A:B,...", help="--run: each checkpoint A against B on the paired ruler, "
                   "A and B as FILE[@tts|@tts-text] (students: 1 step); writes DIR/NAME.md (--name)")
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
        if args.run and args.pairs:
            write_pairs(args.run, parse_pairs(args.pairs), args.num, args.device, args.feature_steps,
                        args.tts_sigma, args.name if args.name != "report" else "pairs")
            return 0
        if args.run:
            write_report(args.run, args.num, args.device, args.feature_steps, args.max_steps, args.tts_sigma,
                         args.sigma_max, args.name, args.models.split(",") if args.models else None)
            return 0
        if not args.sanity and not args.fake:
            raise UserError("give --fake PATH (a folder of generated videos), or --sanity")
        features, args.metric_name = (I3D(args.i3d, args.device, args.i3d_protocol), "FVD") if args.i3d else \
            (None, "FVD-syn")

        def offline_ruler():
            """FVD-syn's network, trained (minutes) only once every input has been checked."""
            src = "synthetic" if args.sanity else args.real
            tag = "synthetic" if src == "synthetic" else os.path.basename(os.path.normpath(src))
            path = os.path.join(args.out, f"fvdsyn_{tag}_{args.size}x{args.frames}.pt")
            return load_feature_net(path, src, args.size, args.frames, args.device, steps=args.feature_steps)
        if args.sanity:
            sanity(args, features or offline_ruler())
            return 0
        real, real_names = load_set(args.real, args.num, args.size, args.frames)
        key = lambda name: str(int(name)) if name.isdigit() else name         # noqa: E731
        by_name = {key(n): i for i, n in enumerate(real_names)}
        sets = []
        for src in args.fake:
            fake, fake_names = load_set(src, args.num, args.size, args.frames)
            if min(len(real), len(fake)) < 2:
                raise UserError(f"{len(real)} real and {len(fake)} generated videos in {src}: a Fréchet distance "
                                f"needs at least 2 of each (it compares covariances)")
            # the conditioning frame of a generated video is the first frame of the real video of the same
            # name; numbers match numbers (000123.mp4 is synthetic test clip 123)
            match = [by_name.get(key(n)) for n in fake_names]
            sets.append([src, fake, fake_names, None if None in match else match])
        features = features or offline_ruler()                          # every set read and checked: now the ruler
        f_real = extract(features, real)
        for s in sets:
            s.append(extract(features, s[1]))
        for src, fake, _, match, f_fake in sets:
            n, dim = min(len(f_real), len(f_fake)), f_real.shape[1]
            if n <= dim:
                print(f"note: {n} videos for {dim} features: the covariances are singular, so the distance is "
                      f"biased and its interval unreliable; use more than {dim} videos per set")
            fd, lo, hi = fd_interval(f_real, f_fake)
            d = diagnostics(fake, real, real[match, 0] if match else None)
            print(f"{src}: {args.metric_name} {fd:.3f}  95% bootstrap interval [{lo:.3f}, {hi:.3f}]  "
                  f"({len(real)} real, {len(fake)} generated videos)")
            print(f"  static-video rate {d['static_rate']:.3f}, motion relative to real {d['motion_ratio']:.3f}, "
                  + (f"first-frame PSNR {d['first_frame_psnr']:.2f} dB" if match
                     else "first-frame PSNR n/a (generated files are not named after real ones)"))
        if len(sets) > 1:
            compare_sets(f_real, sets, args.metric_name)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
