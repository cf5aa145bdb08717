"""report.py on runs of a folder of videos at a non-square size: our own (--data) and the published SVD
distilled on it (--svd --data, on the tiny random pipeline and DINOv2 of tests/test_svd.py). No training
stage reads a held-out file, and `evaluate.py --run` writes each run's report with paired verdicts."""
import json
import os
import re

import pytest
import torch

import data
import evaluate
import report
import train
from data import SyntheticVideos, write_video

if not os.environ.get("OSV_REQUIRE_SVD"):
    pytest.importorskip("diffusers", reason="the SVD path's tests need: pip install -r requirements-svd.txt")
from test_svd import dinov2_folder, pipeline_folder                               # noqa: E402,F401  (fixtures)

SIZE = (32, 48)                                                  # H x W: a non-square frame


def videos(root, n=20):
    """n short non-square videos of the synthetic shapes, one mp4 each, 16 frames: the FVD-syn network
    trains on clips of twice the run's 8."""
    root.mkdir()
    for i in range(n):
        write_video(str(root / f"clip{i:02d}.mp4"), SyntheticVideos(SIZE, 16).batch([i])["video"][0], fps=8)
    return str(root)


def reads(monkeypatch):
    """Every clip decode, as (file, whether a training step asked for it: data.StepBatches, the loader of
    every stage and of --stage latents; else a check, or the statistics a stage takes of its training
    clips). Folder data in the main process (--workers 0), so the decodes are seen here."""
    seen, decode, step = [], data.VideoFolder._decode, data.StepBatches.__getitem__
    training = []

    def watched_decode(self, path, info, start):
        seen.append((os.path.relpath(path, self.root), bool(training)))
        return decode(self, path, info, start)

    def watched_step(self, s):
        training.append(1)
        try:
            return step(self, s)
        finally:
            training.pop()
    monkeypatch.setattr(data.VideoFolder, "_decode", watched_decode)
    monkeypatch.setattr(data.StepBatches, "__getitem__", watched_step)
    return seen


def split_of(seen):
    """(files training steps read, files the checks read)."""
    return {f for f, t in seen if t}, {f for f, t in seen if not t}


def check_report(out, teacher):
    """report.md holds the teacher's 25 steps as the reference and each OSV row with its paired verdict."""
    text = open(os.path.join(out, "report.md")).read()
    table1 = text.split("## Table 1")[1].split("\n## ")[0]
    assert re.search(rf"^\| {re.escape(teacher)} \| 25 \| 50 \| .+ \| reference \| ", table1, re.M)
    for steps, nfe in ((1, 1), (2, 2)):
        assert re.search(rf"^\| OSV \| {steps} \| {nfe} \| [\d.]+ \[.+\] \| [+-][\d.]+ \[.+\] \| "
                         rf"(better|worse|not resolved) \|", table1, re.M)
    assert re.search(r"^\| OSV \+ TTS \| 1 \| 2 \| .+ \| (better|worse|not resolved) \|", table1, re.M)
    assert "held-out videos of" in text and "which no training stage read" in text
    return text


def test_a_folder_run_at_a_non_square_size_trains_on_its_split_and_gets_a_report(tmp_path, monkeypatch, fast_args,
                                                                              micro_args):
    """Our own autoencoder and teacher on a folder of 32x48 videos: the split is recorded, the training
    stages read only training files, the end-of-stage checks only test files, and the report measures
    the test files with an FVD-syn network trained without them."""
    folder, out = videos(tmp_path / "videos"), str(tmp_path / "run")
    common = ["--out", out, "--steps", "1", "--workers", "0", *fast_args, *micro_args]
    seen = reads(monkeypatch)
    assert train.main(["--stage", "ae", "--data", folder, "--size", "32x48", "--test-share", "0.6", *common]) == 0
    split = json.load(open(os.path.join(out, "split.json")))
    assert len(split["test"]) == 12 and len(split["train"]) == 8
    assert train.main(["--stage", "teacher", *common]) == 0
    for stage in ("1", "2"):
        assert train.main(["--stage", stage, "--sample-steps", "1", *common]) == 0
    trained, checked = split_of(seen)
    assert trained and trained <= set(split["train"])                # no training step read a test file
    assert checked & set(split["test"])                              # the end-of-stage checks: held-out files
    assert json.load(open(os.path.join(out, "run.json")))["test_share"] == 0.6        # later commands inherit it
    assert evaluate.main(["--run", out, "--num", "6", "--feature-steps", "3", "--models", "teacher.pt,stage2.pt"]) == 0
    text = check_report(out, "teacher, Euler + CFG")
    assert "FVD-syn" in text and "32x48" in text
    net = torch.load(os.path.join(out, f"fvdsyn_{os.path.basename(folder)}_32x48x8.pt"), weights_only=False)
    assert net["excluded"] == split["test"]                         # the ruler never trained on a test file


def test_svd_distilled_on_a_folder_gets_a_report_and_never_trains_on_a_test_file(
        pipeline_folder, dinov2_folder, tmp_path, monkeypatch, capsys):                       # noqa: F811
    """--svd --data at 32x48: `--stage latents` encodes training files only; Stages 1 and 2 read the
    cache, so every clip they decode is a held-out one (the checks'); `evaluate.py --run` measures SVD's
    own sampler (Euler, its levels, the CFG ramp) at 25, 8, 2 and 1 steps against the students, and a
    second report makes no row again."""
    folder, out = videos(tmp_path / "videos"), str(tmp_path / "run")
    common = ["--svd", pipeline_folder, "--dinov2", dinov2_folder, "--data", folder, "--size", "32x48",
              "--test-share", "0.6", "--out", out, "--steps", "2", "--batch-size", "2", "--num-frames", "3",
              "--eval-clips", "2", "--log-every", "1", "--warmup", "2", "--workers", "0"]
    seen = reads(monkeypatch)
    assert train.main(["--stage", "latents", *common]) == 0
    split = json.load(open(os.path.join(out, "split.json")))
    trained, checked = split_of(seen)
    assert trained and trained <= set(split["train"]) and not checked    # the cache holds training clips alone
    seen.clear()
    assert train.main(["--stage", "1", *common]) == 0 and train.main(["--stage", "2", *common]) == 0
    assert "reading the latent cache" in capsys.readouterr().out
    trained, checked = split_of(seen)
    assert not trained and checked & set(split["test"])            # steps read the cache; checks, test files
    assert evaluate.main(["--run", out, "--num", "6", "--feature-steps", "3"]) == 0
    text = check_report(out, "SVD (the teacher), Euler + CFG")
    for steps, nfe in ((8, 16), (2, 4), (1, 2)):
        assert re.search(rf"^\| SVD \(the teacher\), Euler \+ CFG \| {steps} \| {nfe} \| ", text, re.M)
    monkeypatch.setattr(report, "run_row", lambda *a, **k: pytest.fail("a row was generated again"))
    assert evaluate.main(["--run", out, "--num", "6", "--feature-steps", "3"]) == 0
    assert "rows were read from `rows/`" in open(os.path.join(out, "report.md")).read()


def test_a_run_without_a_split_is_refused_before_any_network(tmp_path, monkeypatch, capsys, fast_args, micro_args):
    """--test-share 0 trains on every file: the report refuses in one line, before the ruler trains."""
    folder, out = videos(tmp_path / "videos", n=3), str(tmp_path / "run")
    common = ["--steps", "1", "--out", out, "--workers", "0", *fast_args]
    assert train.main(["--stage", "ae", "--data", folder, "--test-share", "0", *common]) == 0
    assert train.main(["--stage", "teacher", *common, *micro_args]) == 0
    assert not os.path.exists(os.path.join(out, "split.json"))
    monkeypatch.setattr(report, "load_feature_net", lambda *a, **k: pytest.fail("the ruler was trained"))
    capsys.readouterr()
    assert evaluate.main(["--run", out]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "split.json" in err and "--test-share 0" in err
