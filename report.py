"""The replication report of a run folder: the analogue of the paper's Tables 1 and 2 on paired rows,
cached row by row, for any run: synthetic or a folder of videos (--data, measured on its held-out
split), square or not, our teacher or the published SVD (--svd).

Every row of a report is generated from the first frames of the same held-out clips with the same
noise, so two rows can be compared on the *paired* ruler (`metric.paired_fd`): a difference or a ratio
gets its own 95% interval, and "better" or "worse" is said only where that interval excludes 0.

Read first: `write_report` (what a report holds), `measure` (how its rows are made paired and cached),
`held_out_clips` (which clips), `paper_table2` (the paper's ablations). The command line is
evaluate.py's `--run`.
"""
import dataclasses
import glob
import hashlib
import json
import os
import re
import time
import warnings
from contextlib import nullcontext

import torch
from tqdm import tqdm

import autoencoder
import latents
import lora
import metric
import sample
import svd
import unet
from config import ABLATIONS, Config
from data import (SPLIT, FixedMotion, SyntheticVideos, UserError, VideoFolder, frame_size, held_out, save_atomic,
                  source_hash, write_video)
from metric import (I3D, bias_corrected, compare, diagnostics, extract, fd_boot, interval, load_feature_net,
                    paired_fd)
from sample import TTS_SIGMA, cfg_scale, generate, load_checkpoint, load_model, load_svd


# ----------------------------------------------------------------------------------------------
# The replication report: the analogue of the paper's Tables 1 and 2 on held-out first frames

TEACHER_25 = ("teacher.pt", 25, "ramp", "euler")        # the reference of Table 1 and of every ratio
SVD = "svd"                  # an --svd run's teacher: the published SVD of run.json, in a key's file slot
FULL_MODEL = ("stage2.pt", 1, None, "tts")              # the reference of Table 2 (the paper's "full model")
PAPER_FULL = 171.15                                     # the paper's full model, OSV 1 step + TTS (FVD)
SVD_NUM = 250                # the report's default N for --svd runs (README: what it costs, what it resolves)


def read_run(run_dir):
    """run.json: the flags a run folder was made with (its first train.py command writes it)."""
    path = os.path.join(run_dir, "run.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def teacher_25(run_dir):
    """The run's teacher at 25 Euler steps with CFG: teacher.pt, or with --svd the published SVD."""
    return (SVD if read_run(run_dir).get("svd") else "teacher.pt", 25, "ramp", "euler")


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
    t25 = teacher_25(run_dir)
    has = lambda name: name == t25[0] == SVD or os.path.isfile(os.path.join(run_dir, name))      # noqa: E731
    rows = []
    if has(t25[0]):
        # SVD's own sampler, Euler: the paper's 25 steps = 50 NFE (Heun would cost twice the calls)
        label = "SVD (the teacher), Euler + CFG" if t25[0] == SVD else "teacher, Euler + CFG"
        rows += [(1, label, (t25[0], n, "ramp", "euler"), t25, None) for n in (25, 8, 2, 1)]
    if has("stage1.pt"):
        rows += [(1, "Stage 1 only (LGP)", ("stage1.pt", 1, None, "consistency"), t25, None)]
    if has("stage2.pt"):
        rows += [(1, label, ("stage2.pt", n, None, sampler), t25, None) for label, n, sampler in
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
    return source_hash(unet, autoencoder, lora.LoRA, lora.merge_lora, svd.SVDEncoders, svd.init_noise_scale,
                       sample.to_d, sample.karras_sigmas, sample.sigma_grid, sample.consistency_sigmas,
                       sample.cfg_scale, sample.guided, sample.sample_euler, sample.sample_heun,
                       sample.sample_consistency, sample.sample_tts, sample.sample_tts_text, sample.generate,
                       ROW_MAKER, metric.FeatureNet, metric.extract, metric.motion_magnitude, metric.first_frame_psnr,
                       metric.diagnostics)


def folder_id(path):
    """A folder's identity without reading it (SVD's weights): a hash of its files' names, sizes and times."""
    return hashlib.sha256(json.dumps(latents.file_identity(path)).encode()).hexdigest()[:16]


def row_identity(run_dir, key, num, size, frames, tts_sigma, sigma_max, features_path, svd_path="", extra=None):
    """What a generated row depends on: the checkpoint's bytes and its base's (a student's adapters sit on
    teacher.pt, or on SVD's folder), the sampler, steps, guidance, N, the noise's seed, the frame size and
    count, the samplers' levels, the feature network's bytes and the code (`row_code`); extra: the real
    clips of a folder run and I3D's protocol. A row cached under the same identity is the same row."""
    base, svd_id = os.path.join(run_dir, "teacher.pt"), folder_id(svd_path) if svd_path else ""
    return {"code": row_code(), "checkpoint": svd_id if key[0] == SVD else digest(os.path.join(run_dir, key[0])),
            "base": svd_id or (digest(base) if os.path.isfile(base) else ""),
            "steps": key[1], "guidance": key[2], "sampler": key[3], "num": num, "seed": 0, "size": size,
            "frames": frames, "tts_sigma": tts_sigma if key[3] in ("tts", "tts-text") else None,
            "sigma_max": sigma_max, "features": digest(features_path), "batch": 50, **(extra or {})}


def row_path(run_dir, key, ident):
    h = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    name = f"{os.path.splitext(key[0])[0]}_{key[1]}_{key[2] or 1}_{key[3]}"
    return os.path.join(run_dir, "rows", f"{name}_{h}.pt")


def run_config(run_dir, keys):
    """What a report needs to know of a run (frames, size, data, split, SVD): config.py's defaults, then
    run.json, then the config of the first checkpoint among `keys` (the flags it trained with)."""
    cfg = {**dataclasses.asdict(Config()), **read_run(run_dir)}
    ck = next((k[0] for k in keys if k[0] != SVD), None)
    if ck:
        cfg.update(load_checkpoint(os.path.join(run_dir, ck), ("teacher", "1", "2"))["config"])
    return cfg


def held_out_clips(run_dir, cfg, num):
    """The report's real clips, whose first frames start every row: (real batch, the floor's two sets,
    what they are, their identity for the row cache or None, the test files). Synthetic: the first num
    test clips, the floor against the next num. A folder (--data): the first clip of each held-out test
    file of split.json, at most num; the floor against the next num test files where the split holds
    2 num of them, else between the two halves of the N (at N/2, as the report says)."""
    T = cfg["num_frames"]
    if not cfg.get("data"):
        S = frame_size(cfg["size"], cfg["image_size"]) if cfg.get("size") else cfg["image_size"]
        test = SyntheticVideos(S, T, "test")
        if cfg.get("svd"):
            test = FixedMotion(test, cfg["motion_bucket"])
        real = {k: v for k, v in test.batch(range(num)).items() if k in ("video", "fps", "motion")}
        H, W = frame_size(cfg["size"], cfg["image_size"])
        what = f"{num} held-out synthetic test clips ({H}x{W}, {T} frames)"
        return real, (real["video"], test.batch(range(num, 2 * num))["video"]), what, None, []
    record = os.path.join(run_dir, SPLIT)
    if not os.path.isfile(record):
        raise UserError(f"{run_dir} has no {SPLIT}: its stages read every file of {cfg['data']} (--test-share 0), "
                        f"so no clip is held out to report on")
    hw = frame_size(cfg["size"], cfg["image_size"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                      # the training command said which files it skips
        folder = VideoFolder(cfg["data"], hw, T, cfg["frame_stride"], cache=os.path.join(run_dir, "data_index.json"))
    files = sorted(held_out(folder, cfg["test_share"], record))
    test = folder.only(files)
    n = min(num, len(test))
    if n < 4:
        raise UserError(f"{len(test)} usable held-out file(s) in {record}: a report needs at least 4 (the floor "
                        f"compares two halves); make a run with more videos or a larger --test-share")
    b = test.first_batch(min(len(test), 2 * n))
    if cfg.get("svd"):                                    # SVD's motion bucket, as the run trained with
        b["motion"] = torch.full_like(b["motion"], float(cfg["motion_bucket"]))
    real = {k: b[k][:n] for k in ("video", "fps", "motion")}
    h = n if len(b["video"]) >= 2 * n else n // 2
    floor = (b["video"][:h], b["video"][n:2 * n] if h == n else b["video"][h:2 * h])
    ident = hashlib.sha256(json.dumps([[f, *latents.file_identity(os.path.join(cfg["data"], f))[1:]]
                                       for f in test.names()[:2 * n]]).encode()).hexdigest()[:16]
    what = (f"{n} held-out videos of {cfg['data']} ({hw[0]}x{hw[1]}, {T} frames: the first clip of each of the "
            f"first {n} of the {len(test)} test files of {SPLIT}, which no training stage read)")
    return real, floor, what, ident, files


def report_ruler(run_dir, cfg, device, feature_steps, i3d, protocol, test_files):
    """(feature network, its file, the metric's name): I3D from --i3d (FVD), or FVD-syn, our offline
    network, trained on the run's data without its held-out files (cached in the run folder)."""
    T = cfg["num_frames"]
    if i3d:
        return I3D(i3d, device, protocol), i3d, "FVD"
    size = frame_size(cfg["size"], cfg["image_size"]) if cfg.get("size") else cfg["image_size"]
    tag = os.path.basename(os.path.normpath(cfg["data"])) if cfg.get("data") else "synthetic"
    name = f"fvdsyn_{tag}_{size}x{T}.pt" if isinstance(size, int) else f"fvdsyn_{tag}_{size[0]}x{size[1]}x{T}.pt"
    path = os.path.join(run_dir, name)
    return load_feature_net(path, cfg.get("data") or "synthetic", size, T, device, steps=feature_steps,
                            frame_stride=cfg["frame_stride"], exclude=test_files), path, "FVD-syn"


def measure(run_dir, keys, num, device="cpu", feature_steps=1500, tts_sigma=TTS_SIGMA, sigma_max=None,
            i3d=None, protocol=None, dtype=None):
    """Every key (checkpoint, steps, guidance, sampler) sampled from the first frames of the same `num`
    held-out clips with the same noise, then the paired bootstrap over all of them (paired_fd). Also
    the real-vs-real floor at this N (`held_out_clips`). The ruler: `report_ruler`; protocol: I3D's
    (default: StyleGAN-V's for real video, ours for synthetic clips). dtype: the rows' autocast on CUDA
    (default: bfloat16 for an --svd run, as it trains; else float32).

    Each row's features, diagnostics and timing are cached in run_dir/rows/ under `row_identity` as soon
    as the row is made: a second report, or one with a new checkpoint, generates only the rows that are
    new, and an interrupted report keeps the rows it finished. Each checkpoint is loaded once."""
    for key in keys:
        if key[0] != SVD and not os.path.isfile(os.path.join(run_dir, key[0])):
            raise UserError(f"{os.path.join(run_dir, key[0])} not found")
    cfg = run_config(run_dir, keys)
    if any(k[0] == SVD for k in keys) and not cfg.get("svd"):
        raise UserError(f"{run_dir}/run.json names no SVD folder (--svd): its teacher is teacher.pt")
    protocol = protocol or ("stylegan-v" if cfg.get("data") else "crop")
    cuda = device.startswith("cuda")
    dtype = dtype or ("bfloat16" if cfg.get("svd") and cuda else "float32")
    autocast = cuda and dtype != "float32"
    amp = torch.autocast("cuda", dtype=getattr(torch, dtype)) if autocast else nullcontext()
    real, (floor_a, floor_b), what, data_id, test_files = held_out_clips(run_dir, cfg, num)
    num = len(real["video"])
    features, fpath, ruler = report_ruler(run_dir, cfg, device, feature_steps, i3d, protocol, test_files)
    real = {k: v.to(device) for k, v in real.items()}
    f_real = extract(features, real["video"])
    floor_fd, floor_boot = fd_boot(extract(features, floor_a), extract(features, floor_b))
    T = cfg["num_frames"]
    size = list(frame_size(cfg["size"], cfg["image_size"])) if cfg.get("size") else cfg["image_size"]
    extra = {**({"data": data_id} if data_id else {}), **({"i3d": protocol} if i3d else {}),
             **({"dtype": dtype} if autocast else {})}
    paths = {k: row_path(run_dir, k, row_identity(run_dir, k, num, size, T, tts_sigma, sigma_max, fpath,
                                                  cfg.get("svd", ""), extra)) for k in keys}
    new = [k for k in keys if not os.path.isfile(paths[k])]
    models = {}
    for key in tqdm(new, desc=f"rows ({len(keys) - len(new)} of {len(keys)} cached)", dynamic_ncols=True):
        if key[0] not in models:                                # once per checkpoint and command
            if key[0] == SVD:                                   # SVD's own levels and guidance, the run's frames
                D, ae, c, stage = load_svd(cfg["svd"], device)
                models[key[0]] = (D, ae, {**c, "num_frames": T}, stage)
            else:
                models[key[0]] = load_model(os.path.join(run_dir, key[0]), device)
            if sigma_max is not None:
                models[key[0]][2]["sigma_max"] = sigma_max
        D, ae, cfg_k, _ = models[key[0]]
        with amp:
            fake, ms, nfe = run_row(D, ae, cfg_k, real, *key[1:], tts_sigma=tts_sigma)
        fake = fake.float()
        os.makedirs(os.path.dirname(paths[key]), exist_ok=True)
        save_atomic({"feats": extract(features, fake), "ms": ms, "nfe": nfe, "videos": fake[:4], "device": device,
                     **diagnostics(fake, real["video"].cpu(), real["video"][:, 0].cpu())}, paths[key])
    rows = {k: torch.load(paths[k], weights_only=False) for k in keys}
    fd, boot = paired_fd(f_real, [rows[k].pop("feats") for k in keys])
    half = 1.96 * float(floor_boot.std(ddof=1))
    return {"index": {k: j for j, k in enumerate(keys)}, "fd": fd, "boot": boot, "info": rows,
            "floor": (floor_fd, max(0.0, floor_fd - half), floor_fd + half), "floor_n": len(floor_a),
            "floor_corrected": float(bias_corrected(floor_fd, floor_boot)), "cached": set(keys) - set(new),
            "real": real["video"][:4].cpu(), "cfg": cfg, "device": device, "what": what, "ruler": ruler, "num": num,
            "protocol": protocol if i3d else None, "dtype": dtype if autocast else "float32"}


def ci(est, lo, hi, signed=False, unit=""):
    """'x [lo, hi]': an estimate and its 95% interval."""
    f = "{:+.2f}" if signed else "{:.2f}"
    return f"{f.format(est)}{unit} [{f.format(lo)}, {f.format(hi)}]{unit}"


def preamble(m, tts_sigma, sigma_max):
    """The lines that open a report or a --pairs table: what was measured, how, and the floor at this N."""
    dev_name = torch.cuda.get_device_name() if m["device"].startswith("cuda") else "CPU"
    R, num = m["ruler"], m["num"]
    ruler = (f"FVD (I3D, {m['protocol']} protocol)" if R == "FVD" else
             "FVD-syn (our offline ruler, trained without the held-out files; not comparable with published FVD)")
    n_floor = m["floor_n"]
    return [f"{m['what']}; each generated video starts from the "
            f"first frame of one of them, with the same noise in every row, so the rows are paired. {ruler} "
            f"with a 95% bootstrap interval; a difference "
            f"between rows has the paired interval (one draw of clips for all rows), and its verdict is said only "
            f"where that interval excludes 0; a ratio's interval is the difference's divided by the reference, so it "
            f"excludes 1 exactly then. NFE = network evaluations per video (CFG counts two); ms = sampling + "
            f"decoding per video on {m['device']} ({dev_name}, {m['dtype']}), batches of 50, measured when the row "
            "was generated.",
            "", (f"**The floor at this N:** these {num} real clips against the next {num} give {R} {ci(*m['floor'])}"
                 if n_floor == num else f"**The floor at N/2:** the first {n_floor} of these real clips against the "
                 f"other {n_floor} give {R} {ci(*m['floor'])} (the split holds fewer than {2 * num} test files; at N "
                 f"the bias is about half of this)") + ". A Fréchet distance from N videos is biased upward by "
            "about this much, so every row includes it and every ratio is pulled toward 1.", "",
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
                 sigma_max=None, name="report", checkpoints=None, i3d=None, protocol=None, dtype=None):
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
    m = measure(run_dir, keys, num, device, feature_steps, tts_sigma, sigma_max, i3d, protocol, dtype)
    at, fd, boot, info, R, t25 = m["index"], m["fd"], m["boot"], m["info"], m["ruler"], teacher_25(run_dir)
    vs = {(k, ref): compare(fd, boot, at[k], at[ref]) for _, _, k, ref, _ in rows if ref in at and ref != k}
    star = lambda k: "*" if k in m["cached"] else ""                        # noqa: E731

    def cells(key, ref):
        """The distance [95%], then the difference to ref [paired 95%] and its verdict."""
        j, c = at[key], vs.get((key, ref))
        return (f"{ci(fd[j], *interval(fd[j], boot[:, j]))} | "
                + (f"{ci(*c['diff'], signed=True)} | {c['verdict']}" if c else
                   "reference | " if ref == key else "not measured | "))

    def line(label, key, ref):
        d = info[key]
        return (f"| {label} | {key[1]} | {d['nfe']} | {cells(key, ref)} | {d['first_frame_psnr']:.2f} | "
                f"{d['static_rate']:.3f} | {d['motion_ratio']:.2f} | {d['ms']:.1f}{star(key)} |")

    head = ("| {} | steps | NFE | " + R + " | difference to {} | verdict | first-frame PSNR (dB) | static rate | "
            "motion vs real | ms / video |")
    lines = [f"# Replication report: {run_dir}", "", *preamble(m, tts_sigma, sigma_max),
             "## Table 1: steps against quality", "", head.format("model", "the teacher's 25 steps"),
             "|---" * 10 + "|", *[line(r[1], r[2], r[3]) for r in rows if r[0] == 1]]
    table2 = [r for r in rows if r[0] == 2]
    if table2:
        lines += ["", "## Table 2: the paper's ablations (1 step + TTS unless noted)", "",
                  f"Each ablation against the full model of the same training seed, on the paired ruler; beside it the "
                  f"paper's own ratio (FVD on OpenVid-1M, its full model {PAPER_FULL}). \"reproduced\": our paired "
                  f"verdict goes the paper's way; \"opposite\": it is resolved the other way.", "",
                  f"| row | ablation | NFE | {R} | difference to the full model | verdict | ours / full model | "
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
    if t25 in at:                                     # the headline: each student against the teacher's 25 steps
        lines += ["", "## Against the teacher's 25 steps (Euler + CFG, 50 NFE)", "",
                  f"| model | steps | NFE | {R} / teacher's | difference | verdict | speed-up (ms / video) |",
                  "|---|---|---|---|---|---|---|"]
        for table, label, key, ref, _ in rows:
            if key[0] != t25[0] and table == 1:
                c = vs[(key, ref)]
                lines.append(f"| {label} | {key[1]} | {info[key]['nfe']} | {ci(*c['ratio'], unit='x')} | "
                             f"{ci(*c['diff'], signed=True)} | {c['verdict']} | "
                             f"{info[t25]['ms'] / info[key]['ms']:.1f}x{star(key) or star(t25)} |")
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
                  if t == 1 and key[0] != t25[0] and (key, ref) in vs)) if t25 in at else "") + "."]
    shown = {t25: "teacher 25 steps", (t25[0], 1, "ramp", "euler"): "teacher 1 step", FULL_MODEL: "OSV 1 step + TTS"}
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
    1 step (consistency by default; tts, tts-text), the teacher's 25 Euler steps with CFG (teacher.pt, or
    svd for an --svd run's)."""
    def item(s):
        ck, _, sampler = s.strip().partition("@")
        if ck in ("teacher.pt", SVD):
            if sampler:
                raise UserError(f"--pairs {s}: the teacher is measured with its 25 Euler steps and CFG")
            return (ck, 25, "ramp", "euler")
        if sampler not in ("", "consistency", "tts", "tts-text"):
            raise UserError(f"--pairs {s}: a student's sampler is consistency, tts or tts-text")
        return (ck, 1, None, sampler or "consistency")
    pairs = []
    for p in text.split(","):
        if p.count(":") != 1:
            raise UserError(f"--pairs {p!r}: write ROW:REFERENCE, e.g. stage1_sig0.pt:stage1.pt")
        pairs.append(tuple(map(item, p.split(":"))))
    return pairs


def write_pairs(run_dir, pairs, num=1000, device="cpu", feature_steps=1500, tts_sigma=TTS_SIGMA, name="pairs",
                i3d=None, protocol=None, dtype=None):
    """`--run DIR --pairs A:B,...`: each row against its own reference on the paired ruler (DIR/<name>.md)."""
    keys = list(dict.fromkeys(k for p in pairs for k in p))
    m = measure(run_dir, keys, num, device, feature_steps, tts_sigma, None, i3d, protocol, dtype)
    at, fd, boot, R = m["index"], m["fd"], m["boot"], m["ruler"]
    label = lambda k: k[0] + (f" @{k[3]}" if k[3] not in ("consistency", "euler") else "")   # noqa: E731
    lines = [f"# Paired comparisons: {run_dir}", "", *preamble(m, tts_sigma, None),
             f"| row | reference | {R} (row) | {R} (reference) | difference | verdict |", "|---" * 6 + "|"]
    for k, ref in pairs:
        vs = compare(fd, boot, at[k], at[ref])
        lines.append(f"| {label(k)} | {label(ref)} | {fd[at[k]]:.2f} | {fd[at[ref]]:.2f} | "
                     f"{ci(*vs['diff'], signed=True)} | {vs['verdict']} |")
    with open(os.path.join(run_dir, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return lines
