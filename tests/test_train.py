"""train.py: exact resume, non-finite loss, DDP on CPU, stage errors, mixed precision."""
import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import av
import pytest
import torch

import config
import evaluate
import report
import sample
from data import SyntheticVideos, write_video
import train
import unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def losses(out, stage="ae"):
    with open(os.path.join(out, "log.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return {r["step"]: r for r in recs if r["stage"] == stage and "event" not in r}


def interrupt_at(monkeypatch, call, exc):
    """Make the ae loss misbehave on its `call`-th use (counted from 1)."""
    real, n = train.ae_loss, [0]

    def patched(*a, **k):
        n[0] += 1
        out = real(*a, **k)
        if n[0] == call:
            if exc is None:
                out["loss"] = out["loss"] * float("nan")
            else:
                raise exc
        return out
    monkeypatch.setattr(train, "ae_loss", patched)


def test_exact_resume(tmp_path, monkeypatch, fast_args):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = ["--stage", "ae", "--steps", "8", "--ckpt-every", "4", *fast_args]
    assert train.main([*args, "--out", a]) == 0
    interrupt_at(monkeypatch, 6, KeyboardInterrupt())       # dies during step 6, after the step-4 save
    assert train.main([*args, "--out", b]) == 130
    assert torch.load(os.path.join(b, "ae.pt"), weights_only=False)["step"] == 4
    monkeypatch.undo()
    assert train.main([*args, "--out", b]) == 2              # neither --resume nor --fresh: refused
    assert train.main([*args, "--out", b, "--resume"]) == 0
    recs = [json.loads(line) for line in open(os.path.join(b, "log.jsonl"))]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 9))     # each step once after the resume
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 9))
    for s in range(1, 9):
        assert la[s]["loss"] == pytest.approx(lb[s]["loss"], rel=1e-5, abs=1e-7), s
    ca = torch.load(os.path.join(a, "ae.pt"), weights_only=False)
    cb = torch.load(os.path.join(b, "ae.pt"), weights_only=False)
    for k, v in ca["ema"]["ae"].items():
        assert torch.allclose(v, cb["ema"]["ae"][k], atol=1e-6), k
    assert ca["psnr"] == pytest.approx(cb["psnr"], abs=1e-3) and ca["done"] and cb["done"]


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys, fast_args):
    out = str(tmp_path / "r")
    interrupt_at(monkeypatch, 6, None)                      # NaN at step 6
    assert train.main(["--stage", "ae", "--steps", "10", "--ckpt-every", "2", "--out", out, *fast_args]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "step 6" in err and "ae.pt (step 4)" in err
    ckpt = torch.load(os.path.join(out, "ae.pt"), weights_only=False)
    assert ckpt["step"] == 4 and not ckpt["done"]
    assert all(torch.isfinite(v).all() for v in ckpt["models"]["ae"].values())


def test_errors_are_one_line(tmp_path, capsys, fast_args):
    out = str(tmp_path / "r")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train.main(["--stage", "ae", "--data", str(empty), "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no usable video in") and str(empty) in err and "\n" not in err
    assert train.main(["--stage", "ae", "--steps", "2", "--out", out, *fast_args]) == 0
    capsys.readouterr()
    # resuming with another architecture is refused with the field named
    args = ["--stage", "ae", "--steps", "3", "--out", out, "--resume", "--ae-channels", "8,8", *fast_args]
    assert train.main(args) == 2
    assert "--ae-channels (16, 32, 64)" in capsys.readouterr().err             # the run folder's, first
    assert train.main([*args, "--override"]) == 2
    assert "ae_channels" in capsys.readouterr().err                            # then the checkpoint's
    with pytest.raises(train.UserError, match="run `python train.py --stage ae`"):
        sample.load_checkpoint(os.path.join(out, "nothing.pt"), "ae", "python train.py --stage ae")


def test_stage_all_end_to_end_and_kept(tmp_path, capsys, fast_args, micro_args):
    """--stage all on a micro preset: ae, teacher, stage 1, stage 2, then the report; a second call keeps
    every finished stage and only rewrites the report."""
    out = str(tmp_path / "r")
    args = ["--stage", "all", "--steps", "2", "--out", out, "--report-clips", "6", "--feature-steps", "5",
            *micro_args, *fast_args]
    assert train.main(args) == 0
    for name in ("ae.pt", "teacher.pt", "stage1.pt", "stage2.pt", "report.md", "report_grid.gif"):
        assert os.path.isfile(os.path.join(out, name)), name
    report = open(os.path.join(out, "report.md")).read()
    for row in ("| teacher, Euler + CFG | 25 | 50 |", "| Stage 1 only (LGP) | 1 | 1 |", "| OSV | 1 | 1 |",
                "| OSV + TTS | 1 | 2 |", "| OSV | 4 | 4 |", "| (f) | CFG 3.0 at inference (1 step, no TTS) | 2 |"):
        assert row in report, row
    ratios = report.split("## Against the teacher's 25 steps")[1]
    assert "| OSV + TTS | 1 | 2 |" in ratios and "teacher, Euler" not in ratios
    # paired: each row's difference to its table's reference, with a verdict; the floor at this N
    cells = [[c.strip() for c in x.strip("|").split("|")] for x in report.split("## Table 2")[0].splitlines()]
    rows = {(c[0], c[1]): c for c in cells if len(c) == 10}
    assert rows[("teacher, Euler + CFG", "25")][4] == "reference"
    assert rows[("OSV + TTS", "1")][5] in ("better", "worse", "not resolved")
    assert re.search(r"\| OSV \+ TTS \| 1 \| 2 \| [\d.]+x \[[\d.-]+, [\d.-]+\]x \|", ratios)
    assert "these 6 real clips against the next 6 give FVD-syn" in report
    assert train.main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("kept the finished") == 4 and "Table 2: the paper's ablations" in printed
    # evaluate.py --run measures a sampler's level on chosen checkpoints, into a report of its own name
    report = open(os.path.join(out, "report.md")).read()
    assert evaluate.main(["--run", out, "--num", "6", "--feature-steps", "5", "--models", "stage2.pt",
                          "--max-steps", "1", "--tts-sigma", "2.0", "--name", "tts2"]) == 0
    tts = open(os.path.join(out, "tts2.md")).read()
    assert "TTS level s = 2.0" in tts and "| teacher" not in tts.split("## Table 1")[1]
    assert "| OSV + TTS | 1 | 2 |" in tts and "not measured" in tts       # no teacher: no difference to it
    # --pairs: each checkpoint against its own reference, on the same paired clips
    assert evaluate.main(["--run", out, "--num", "6", "--feature-steps", "5", "--pairs",
                          "stage2.pt@tts:stage2.pt,stage2.pt@tts-text:stage2.pt@tts,stage1.pt:teacher.pt"]) == 0
    pairs = open(os.path.join(out, "pairs.md")).read()
    for row in ("| stage2.pt @tts | stage2.pt |", "| stage2.pt @tts-text | stage2.pt @tts |", "| stage1.pt | teacher.pt |"):
        assert row in pairs, row
    assert evaluate.main(["--run", out, "--pairs", "stage2.pt"]) == 2
    assert "write ROW:REFERENCE" in capsys.readouterr().err
    quality = lambda text: next(x for x in text.splitlines() if x.startswith("| OSV + TTS |")).split("|")[4:6]  # noqa
    assert quality(tts) != quality(report)                         # another level s: another FVD-syn and PSNR
    assert open(os.path.join(out, "report.md")).read() == report   # the main report is untouched


def test_ablations_make_table2_and_rows_are_made_once(tiny_run, tmp_path, monkeypatch, capsys, fast_args, micro_args):
    """--stage ablations: the full model, then each ablation of the paper's Table 2 as a tagged run, then
    the report with rows (a) to (f), each with its paired verdict and the paper's direction. A second
    report generates no row; an interrupted one keeps the rows it made; a checkpoint is loaded once."""
    out = str(tmp_path / "r")
    shutil.copytree(tiny_run, out)
    args = ["--stage", "ablations", "--steps", "2", "--out", out, "--report-clips", "6", "--feature-steps", "5",
            *micro_args, *fast_args]
    assert train.main([*args, "--tag", "x"]) == 2
    assert "names its own tags" in capsys.readouterr().err
    assert train.main(args) == 0
    capsys.readouterr()
    init = {n: torch.load(os.path.join(out, f"stage2{n}.pt"), weights_only=False) for n in ("_m1", "_no-stage1", "_no-adv", "_decoded")}
    assert {n: c["init"] for n, c in init.items()} == {"_m1": "stage1.pt", "_no-stage1": "teacher", "_no-adv": "stage1_no-adv.pt",
                                                        "_decoded": "stage1_decoded.pt"}
    assert init["_m1"]["config"]["m"] == 1 and init["_no-adv"]["config"]["lambda_adv"] == 0
    assert torch.load(os.path.join(out, "stage1_decoded.pt"), weights_only=False)["config"]["disc_input"] == "decoded"
    text = open(os.path.join(out, "report.md")).read()
    table2 = text.split("## Table 2")[1].split("\n## ")[0]
    for row in "abcdef":
        assert re.search(rf"^\| \({row}\) \| .+ \| [\d.]+x \[[\d.-]+, [\d.-]+\]x \| [\d.]+x \| "
                         rf"(reproduced|opposite|not resolved) \|$", table2, re.M), row
    assert "of the 6 ablations measured reproduce the paper's direction" in table2
    assert "stage1_no-adv" not in text                  # an ablation's own Stage 1 is no row of its own
    rows = sorted(os.listdir(os.path.join(out, "rows")))
    assert len(rows) == 17 and "rows were read" not in text

    real_row, real_load = report.run_row, report.load_model
    monkeypatch.setattr(report, "run_row", lambda *a, **k: pytest.fail("a row was generated again"))
    assert evaluate.main(["--run", out, "--num", "6", "--feature-steps", "5"]) == 0
    again = open(os.path.join(out, "report.md")).read()
    assert "17 of 17 rows were read from `rows/`" in again
    strip = lambda text: re.sub(r"\*", "", text.split("## Table 1")[1])              # noqa: E731
    assert strip(again) == strip(text)                  # the same numbers, every ms marked as measured then

    for name in rows:                                      # stage2.pt's rows are gone: only they are made again
        if re.match(r"stage2_\d", name):
            os.remove(os.path.join(out, "rows", name))
    loads, made = [], []
    monkeypatch.setattr(report, "load_model", lambda path, *a: loads.append(os.path.basename(path)) or real_load(path, *a))

    def interrupted_row(*a, **k):
        if len(made) == 2:
            raise KeyboardInterrupt
        made.append(1)
        return real_row(*a, **k)
    monkeypatch.setattr(report, "run_row", interrupted_row)
    with pytest.raises(KeyboardInterrupt):
        report.write_report(out, num=6, feature_steps=5)
    assert len(os.listdir(os.path.join(out, "rows"))) == 17 - 7 + 2          # the two finished rows are kept
    monkeypatch.setattr(report, "run_row", lambda *a, **k: made.append(1) or real_row(*a, **k))
    loads.clear()
    report.write_report(out, num=6, feature_steps=5)
    assert loads == ["stage2.pt"] and len(made) == 2 + 5 and len(os.listdir(os.path.join(out, "rows"))) == 17


def test_ablations_of_a_second_seed_train_both_arms(tiny_run, tmp_path, monkeypatch):
    """--seed 1: the full model's stages as tag seed1, each ablation as TAG-seed1 starting from seed1's
    Stage 1; the report pairs each with the full model of its own seed."""
    plan = []
    monkeypatch.setattr(train, "train_stage", lambda s, cfg, run, mode: plan.append(
        (s, run.tag, cfg.seed, cfg.m, cfg.from_teacher, cfg.lambda_adv, cfg.disc_input, run.stage1_tag)))
    monkeypatch.setattr(train, "write_report", lambda *a, **k: None)
    assert train.main(["--stage", "ablations", "--seed", "1", "--out", str(tmp_path / "r")]) == 0
    assert plan == [("1", "seed1", 1, 5, False, 0.1, "latent", "seed1"), ("2", "seed1", 1, 5, False, 0.1, "latent", "seed1"),
                    ("2", "m1-seed1", 1, 1, False, 0.1, "latent", "seed1"),
                    ("2", "no-stage1-seed1", 1, 5, True, 0.1, "latent", "seed1"),
                    ("1", "no-adv-seed1", 1, 5, False, 0.0, "latent", "seed1"),
                    ("2", "no-adv-seed1", 1, 5, False, 0.0, "latent", "seed1"),
                    ("1", "decoded-seed1", 1, 5, False, 0.1, "decoded", "seed1"),
                    ("2", "decoded-seed1", 1, 5, False, 0.1, "decoded", "seed1")]
    for name in ("stage1.pt", "stage2.pt", "stage1_seed1.pt", "stage2_seed1.pt", "stage2_m1-seed1.pt", "stage2_mine.pt"):
        open(tmp_path / name, "w").close()
    rows = report.sampler_rows(str(tmp_path))
    seed1 = [r for r in rows if r[3] == ("stage2_seed1.pt", 1, None, "tts")]
    assert [(r[4] or ("", 0))[0] for r in seed1] == ["", "a", "c", "c", "f", "f", "f"]
    assert ("stage2_m1-seed1.pt", 1, None, "tts") in [r[2] for r in seed1]
    assert [r[2][0] for r in rows if r[0] == 3] == ["stage2.pt", "stage2_mine.pt"]      # the text's TTS, a user's tag


def test_bfloat16_autocast_on_cpu(tmp_path, fast_args):
    out = str(tmp_path / "r")
    assert train.main(["--stage", "ae", "--steps", "3", "--dtype", "bfloat16", "--out", out, *fast_args]) == 0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in losses(out).values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_mixed_precision(tmp_path, dtype, fast_args):
    out = str(tmp_path / dtype)
    assert train.main(["--stage", "ae", "--steps", "20", "--dtype", dtype, "--device", "cuda", "--out", out,
                       *fast_args]) == 0
    ckpt = torch.load(os.path.join(out, "ae.pt"), weights_only=False)
    if dtype == "float16":                         # fp16 trains with a GradScaler, bf16 without one
        assert ckpt["scaler"]["scale"] > 0 and ckpt["scaler"]["_growth_tracker"] >= 0
    else:
        assert ckpt["scaler"] == {}
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in losses(out).values())


def test_ddp_two_processes_on_cpu(tmp_path, fast_args):
    out = str(tmp_path / "ddp")
    with socket.socket() as s:                     # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           os.path.join(ROOT, "train.py"), "--stage", "ae", "--steps", "4", "--device", "cpu",
           "--out", out, *fast_args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "over 2 process(es)" in p.stdout
    ckpt = torch.load(os.path.join(out, "ae.pt"), weights_only=False)
    assert ckpt["done"] and ckpt["step"] == 4
    assert sorted(losses(out)) == [1, 2, 3, 4]            # rank 0 logs once per step
    # --grad-accum 2: the first micro-batch under no_sync, the last all-reduced; the replicas still agree
    # (train.check_replicas would stop the run otherwise)
    p = subprocess.run([*cmd[:-len(fast_args) - 2], "--out", out + "_accum", "--grad-accum", "2", *fast_args],
                       capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]


def test_grad_accum_skips_ddps_all_reduce_but_on_the_last_micro_batch():
    """Run.in_sync: every DDP net's no_sync for the micro-batches before the last, nothing for the last
    one or without DDP; a compiled net's DDP is found inside it."""
    entered = []

    class Net:
        def __init__(self, name):
            self.name = name

        @contextlib.contextmanager
        def no_sync(self):
            entered.append(self.name)
            yield
    compiled = types.SimpleNamespace(_orig_mod=Net("disc"))
    nets = {"student": Net("student"), "disc": compiled}
    for ddp, skip, expected in ((True, True, ["student", "disc"]), (True, False, []), (False, True, [])):
        entered.clear()
        with train.Run.in_sync(types.SimpleNamespace(ddp=ddp), nets, skip):
            pass
        assert entered == expected, (ddp, skip)


def test_grad_checkpoint_is_this_stages_flag_not_the_teachers(tiny_run, tmp_path, monkeypatch, fast_args, micro_args):
    """The teacher trained without --grad-checkpoint; Stage 1 with it checkpoints the student's blocks,
    Stage 2 without it does not."""
    out = str(tmp_path / "r")
    shutil.copytree(tiny_run, out)
    calls, real = [], unet.checkpoint
    monkeypatch.setattr(unet, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert not torch.load(os.path.join(out, "teacher.pt"), weights_only=False)["unet_config"]["checkpoint"]
    common = ["--steps", "1", "--out", out, *micro_args, *fast_args]
    assert train.main(["--stage", "1", "--grad-checkpoint", *common]) == 0
    assert calls and torch.load(os.path.join(out, "stage1.pt"), weights_only=False)["unet_config"]["checkpoint"]
    calls.clear()
    assert train.main(["--stage", "2", *common]) == 0
    assert not calls


def test_folder_videos_decode_in_worker_processes_with_the_same_batches(tmp_path, fast_args):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(4):
        write_video(str(videos / f"{i}.mp4"), SyntheticVideos(32, 16).batch([i])["video"][0], fps=8)
    runs = {}
    for workers in ("0", "2"):                              # the main thread, then the default's processes
        out = str(tmp_path / f"w{workers}")
        args = ["--stage", "ae", "--steps", "3", "--data", str(videos), "--workers", workers, "--out", out]
        assert train.main([*args, *fast_args]) == 0
        runs[workers] = {s: r["loss"] for s, r in losses(out).items()}
    assert sorted(runs["0"]) == [1, 2, 3] and runs["0"] == runs["2"]


def test_grad_accum_takes_the_same_step(tmp_path, monkeypatch, fast_args):
    """--grad-accum N: the batch in N passes, the gradients summed, one optimiser step: the same weights
    as one pass (a loss that is a mean over the clips, so N equal micro-batch means average to it)."""
    def setup(cfg, run):
        torch.manual_seed(0)
        m = torch.nn.Linear(3, 2)

        def step(nets, batch, update):
            pred = nets["ae"](batch["video"].mean((1, 3, 4)))                         # (B, 3) -> (B, 2)
            loss = ((pred - batch["fps"][:, None]) ** 2).mean()
            update(loss, "ae")
            return {"loss": loss}
        return train.Stage({"ae": m}, {"ae": torch.optim.Adam(m.parameters(), lr=1e-2)}, step)
    monkeypatch.setitem(train.SETUP, "ae", setup)
    weights = []
    for n in (1, 2, 4):
        out = str(tmp_path / f"n{n}")
        assert train.main(["--stage", "ae", "--steps", "3", "--out", out, "--batch-size", "8",
                           "--grad-accum", str(n), *fast_args]) == 0
        weights.append(torch.load(os.path.join(out, "ae.pt"), weights_only=False)["models"]["ae"])
    assert not torch.equal(weights[0]["weight"], setup(None, None).models["ae"].weight)       # it did train
    for w in weights[1:]:
        assert all(torch.allclose(w[k], weights[0][k], atol=1e-6) for k in w)
    assert train.main(["--stage", "ae", "--steps", "1", "--out", str(tmp_path / "bad"), "--batch-size", "8",
                       "--grad-accum", "3", *fast_args]) == 2                          # 8 clips do not split in 3


def test_non_square_frames_train_and_sample(tmp_path, capsys, fast_args, micro_args):
    """--size HxW: every network (autoencoder, UNet, discriminator) on non-square frames, end to end."""
    out = str(tmp_path / "r")
    assert train.main(["--stage", "all", "--size", "16x32", "--steps", "2", "--out", out, "--report-clips", "6",
                       "--feature-steps", "3", *micro_args, *fast_args]) == 0
    assert "6 held-out synthetic test clips (16x32, 8 frames)" in open(os.path.join(out, "report.md")).read()
    assert sample.main(["--ckpt", os.path.join(out, "stage2.pt"), "--out", str(tmp_path / "v.mp4")]) == 0
    with av.open(str(tmp_path / "v.mp4")) as c:
        frame = next(c.decode(video=0))
    assert frame.width == 2 * frame.height                              # 16x32, scaled up for viewing
    assert train.main(["--stage", "ae", "--size", "16by32", "--out", str(tmp_path / "bad")]) == 2
    assert "--size" in capsys.readouterr().err


def start(args, **kw):
    """train.py in its own process, unbuffered, as a user starts it."""
    return subprocess.Popen([sys.executable, "-u", os.path.join(ROOT, "train.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for(cond, timeout=120):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.1)


def logged_steps(out):
    path = os.path.join(out, "log.jsonl")
    return [json.loads(line)["step"] for line in open(path) if "loss" in line] if os.path.isfile(path) else []


def test_sigint_mid_stage_saves_and_says_how_to_resume(tmp_path, fast_args):
    out = str(tmp_path / "my run")                                         # a space: the command is quoted
    args = ["--stage", "ae", "--steps", "60", "--out", out, "--ckpt-every", "1000", *fast_args]
    proc = start(args)
    wait_for(lambda: len(logged_steps(out)) >= 3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    ck = torch.load(os.path.join(out, "ae.pt"), weights_only=False)
    assert not ck["done"] and 3 <= ck["step"] < 60 and f"stopped at step {ck['step']} of 60" in err
    resume = err.strip().splitlines()[-1].split("Resume with: ")[1]
    assert shlex.split(resume)[:2] == ["python", "train.py"] and shlex.split(resume)[-1] == "--resume"
    assert train.main(shlex.split(resume)[2:]) == 0
    assert logged_steps(out) == list(range(1, 61))                          # each step once


def test_sigint_in_the_end_of_stage_check_keeps_the_finished_stage(tiny_run, tmp_path):
    out = str(tmp_path / "r")
    shutil.copytree(tiny_run, out)
    os.remove(os.path.join(out, "teacher.pt"))
    proc = start(["--stage", "teacher", "--steps", "2", "--out", out, "--unet-channels", "16", "--batch-size", "2",
                  "--sample-steps", "25", "--eval-clips", "64", "--log-every", "1", "--warmup", "2"])
    for line in proc.stdout:                                               # the check starts after the save
        if "end-of-stage check follows" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Resume with:" in err, err
    ck = torch.load(os.path.join(out, "teacher.pt"), weights_only=False)
    assert ck["done"] and ck["step"] == 2                                   # the stage is not lost
    assert sample.main(["--ckpt", os.path.join(out, "teacher.pt"), "--steps", "1", "--out",
                        str(tmp_path / "v.gif")]) == 0


def test_one_command_per_run_folder(tmp_path, capsys, fast_args):
    out = str(tmp_path / "r")
    proc = start(["--stage", "ae", "--steps", "100000", "--out", out, *fast_args])
    wait_for(lambda: os.path.isfile(os.path.join(out, ".lock")))
    assert train.main(["--stage", "ae", "--out", out, "--resume", *fast_args]) == 2
    err = capsys.readouterr().err
    assert f"in use by process {proc.pid}" in err and len(err.strip().splitlines()) == 1
    wait_for(lambda: len(logged_steps(out)) >= 1)
    proc.send_signal(signal.SIGTERM)                                        # SIGTERM: the same clean stop
    proc.communicate(timeout=120)
    assert proc.returncode == 130 and not os.path.exists(os.path.join(out, ".lock"))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with open(os.path.join(out, ".lock"), "w") as f:                       # a stale lock: its process is gone
        f.write(gone.stdout.strip())
    with pytest.warns(UserWarning, match="taking over the lock"):
        assert train.main(["--stage", "ae", "--out", out, "--resume", "--steps", "1", *fast_args]) == 0


def test_a_full_run_folder_is_refused_at_start(tmp_path, monkeypatch, capsys, fast_args):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 ** 12, 10 ** 12, 10 ** 6))
    assert train.main(["--stage", "ae", "--out", str(tmp_path / "r"), *fast_args]) == 2
    err = capsys.readouterr().err
    assert "1 MiB free" in err and len(err.strip().splitlines()) == 1


def test_an_unwritable_run_folder_is_refused_at_start(tmp_path, monkeypatch, capsys, fast_args):
    def denied(*a, **k):                                                   # root ignores chmod: simulate it
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(train.os, "makedirs", denied)
    assert train.main(["--stage", "ae", "--out", str(tmp_path / "r"), *fast_args]) == 2
    err = capsys.readouterr().err
    assert "cannot write to the run folder" in err and len(err.strip().splitlines()) == 1


def numeric_flags():
    for f in dataclasses.fields(config.Config):
        if f.type in (int, float):
            yield "--" + f.name.replace("_", "-"), f


def test_every_impossible_value_is_a_one_line_error(tmp_path, capsys):
    """Negative, NaN, infinite, unreadable, and zero where zero means nothing: for every numeric flag of
    train.py, exit 2 with one line and no traceback, before anything is written."""
    out = str(tmp_path / "r")
    for flag, f in numeric_flags():
        bad = ["-1", "abc"] + (["nan", "inf"] if f.type is float else ["1.5"])
        if f.name in config.AT_LEAST_ONE | config.POSITIVE:
            bad.append("0")
        if f.name in config.SIGNED:
            bad = ["nan", "inf", "abc"]
        for v in bad:
            assert train.main(["--stage", "ae", "--out", out, flag, v]) == 2, (flag, v)
            err = capsys.readouterr().err
            assert err.startswith("error:") and len(err.strip().splitlines()) == 1, (flag, v, err)
    for extra in (["--steps", "-1"], ["--batch-size", "0"], ["--lr", "nan"], ["--ae-channels", "16,0,64"]):
        assert train.main(["--stage", "all", "--out", out, *extra]) == 2, extra
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not os.path.exists(out)


@pytest.mark.parametrize("bad", [["--steps", "0"], ["--index", "-5"], ["--num", "0"], ["--cfg", "nan"],
                                 ["--tts-sigma", "0"]])
def test_sample_refuses_impossible_values(tiny_run, tmp_path, bad, capsys):
    assert sample.main(["--ckpt", os.path.join(tiny_run, "teacher.pt"), *bad, "--out", str(tmp_path / "v.gif")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_every_flag_has_a_help_line_and_shows_its_default(capsys):
    actions = [a for a in train.make_parser()._actions if a.dest != "help"]
    assert all(a.help for a in actions), [a.dest for a in actions if not a.help]
    assert train.main(["--help"]) == 0
    out = capsys.readouterr().out
    for group in ("data:", "autoencoder", "teacher", "Stage 1", "Stage 2", "the loop"):
        assert group in out
    assert "--stage1-top FLOAT" in out and "(default: 0.0)" in out and "(default: 1.0)" in out


def test_a_run_folder_remembers_its_data_and_sizes(tmp_path, capsys, fast_args, micro_args):
    """--data, sizes and frames are given once: later stages inherit them from run.json; a different value
    is refused unless --override."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(2):
        write_video(str(videos / f"{i}.mp4"), SyntheticVideos(32, 8).batch([i])["video"][0], fps=8)
    out = str(tmp_path / "r")
    assert train.main(["--stage", "ae", "--steps", "1", "--data", str(videos), "--num-frames", "4", "--test-share",
                       "0", "--out", out, *fast_args]) == 0
    assert train.main(["--stage", "teacher", "--steps", "1", "--out", out, *micro_args, *fast_args]) == 0
    cfg = torch.load(os.path.join(out, "teacher.pt"), weights_only=False)["config"]
    assert cfg["data"] == str(videos) and cfg["num_frames"] == 4               # inherited, not synthetic
    capsys.readouterr()
    assert train.main(["--stage", "1", "--steps", "1", "--num-frames", "8", "--out", out, *micro_args,
                       *fast_args]) == 2
    err = capsys.readouterr().err
    assert "--num-frames 4" in err and "--override" in err and len(err.strip().splitlines()) == 1
    assert train.main(["--stage", "1", "--steps", "1", "--num-frames", "8", "--override", "--out", out,
                       *micro_args, *fast_args]) == 0


def exit_code(main, argv):
    try:
        return main(argv)
    except SystemExit as e:                      # argparse's own errors (now one line) exit here
        return e.code


@pytest.mark.parametrize("command, flags", [
    (sample.main, ["--steps", "--index", "--tts-sigma", "--cfg", "--cfg-min", "--fps", "--motion", "--cond-aug",
                   "--frames", "--num", "--seed"]),
    (evaluate.main, ["--size", "--frames", "--num", "--feature-steps", "--max-steps", "--tts-sigma", "--sigma-max"])])
def test_sample_and_evaluate_refuse_impossible_values_in_one_line(command, flags, tmp_path, capsys):
    for flag in flags:
        for v in ("-1", "nan", "inf", "abc"):
            argv = [flag, v, "--out", str(tmp_path / ("v.gif" if command is sample.main else "r"))]
            assert exit_code(command, argv) == 2, (flag, v)
            err = capsys.readouterr().err
            assert err.startswith("error:") and len(err.strip().splitlines()) == 1, (flag, v, err)
