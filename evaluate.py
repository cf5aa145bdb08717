"""Evaluation's command line: the replication report of a run folder (report.py) and the ruler on
sets of videos (metric.py: FVD-syn, FVD, the paired bootstrap, the diagnostics).

Read first: `main` (the flags), then report.py for `--run`. `compare_sets` is the paired ruler on
folders of generated videos; `sanity` checks the ruler against corruptions of real clips.

    python evaluate.py --run runs/default                       # the replication report of a run folder
    python evaluate.py --run runs/default --pairs stage1_x.pt:stage1.pt    # a checkpoint against another
    python evaluate.py --sanity                                 # the ruler checked against corruptions
    python evaluate.py --real videos/ --fake samples/ [--i3d i3d_torchscript.pt]     # or --real synthetic
    python evaluate.py --real synthetic --fake A/ --fake B/     # B against A on the paired ruler
"""
import json
import os
import sys
import warnings

import torch

from data import Parser, SyntheticVideos, UserError, VideoFolder, check_numbers, optional
from metric import (I3D, blurred, compare, diagnostics, extract, fd_interval, load_feature_net, paired_fd, shuffled,
                    static)
from report import SVD_NUM, ci, parse_pairs, read_run, write_pairs, write_report
from sample import TTS_SIGMA


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


def check_pairable(sets):
    """Sets compared on the paired ruler need the same file names (one video per conditioning frame)."""
    names = [sorted(s[2]) for s in sets]
    if any(n != names[0] for n in names):
        raise UserError("a paired comparison needs the same file names in every --fake folder (one video per "
                        "conditioning frame): " + ", ".join(f"{s[0]} has {len(s[2])}" for s in sets))
    return names


def compare_sets(f_real, sets, metric_name):
    """`--fake X --fake Y ...`: each later set against the first on the paired ruler. The sets pair by
    file name; where every set names the real videos too, the real set is resampled with them."""
    names = check_pairable(sets)
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
    p.add_argument("--num", type=int, help=f"videos per set (default: 1000; --run of an --svd run: {SVD_NUM})")
    p.add_argument("--i3d", metavar="FILE", help="use I3D (FVD) instead of the offline network (FVD-syn)")
    p.add_argument("--i3d-protocol", choices=["crop", "stylegan-v"], help="I3D's input: see metric.I3D (default: "
                   "stylegan-v for real videos, as FVDs published with its code; crop for synthetic clips)")
    p.add_argument("--out", default="runs/default", help="run folder that caches the feature network")
    p.add_argument("--feature-steps", type=int, default=1500, help="training steps of the feature network")
    p.add_argument("--max-steps", type=int, default=0, help="--run: only rows of at most this many steps")
    p.add_argument("--tts-sigma", type=float, default=TTS_SIGMA, help="--run: the Time Travel Sampler's level s")
    p.add_argument("--sigma-max", type=float, help="--run: where every sampler starts (default: the run's)")
    p.add_argument("--name", default="report", help="--run: write DIR/NAME.md and DIR/NAME_grid.gif")
    p.add_argument("--models", help="--run: only these checkpoint files, comma-separated (teacher.pt,stage2.pt)")
    p.add_argument("--pairs", metavar="A:B,...", help="--run: each checkpoint A against B on the paired ruler, "
                   "A and B as FILE[@tts|@tts-text] (students: 1 step); writes DIR/NAME.md (--name)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="--run: the rows' autocast on CUDA "
                   "(default: bfloat16 for an --svd run, as it trains; else float32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda if available")
    args = p.parse_args(argv)
    warnings.formatwarning = lambda msg, category, *a, **k: f"warning: {msg}\n"
    try:
        if args.num is None:
            args.num = SVD_NUM if args.run and read_run(args.run).get("svd") else 1000
        check_numbers(("--size", args.size, 1), ("--frames", args.frames, 1), ("--num", args.num, 2),
                      ("--feature-steps", args.feature_steps, 3), ("--max-steps", args.max_steps, 0),
                      ("--tts-sigma", args.tts_sigma, 1e-6), ("--sigma-max", args.sigma_max, 1e-6))
        if args.plot:
            return 0 if plot_log(args.plot) else 1
        if args.run and args.pairs:
            write_pairs(args.run, parse_pairs(args.pairs), args.num, args.device, args.feature_steps,
                        args.tts_sigma, args.name if args.name != "report" else "pairs", args.i3d, args.i3d_protocol,
                        args.dtype)
            return 0
        if args.run:
            write_report(args.run, args.num, args.device, args.feature_steps, args.max_steps, args.tts_sigma,
                         args.sigma_max, args.name, args.models.split(",") if args.models else None, args.i3d,
                         args.i3d_protocol, args.dtype)
            return 0
        if not args.sanity and not args.fake:
            raise UserError("give --fake PATH (a folder of generated videos), or --sanity")
        protocol = args.i3d_protocol or ("crop" if args.sanity or args.real == "synthetic" else "stylegan-v")
        features, args.metric_name = (I3D(args.i3d, args.device, protocol), "FVD") if args.i3d else \
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
        if len(sets) > 1:
            check_pairable(sets)
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
