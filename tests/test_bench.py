"""bench.py through `python train.py --bench`: both stages' steps run at a tiny size on the CPU, the one base
is held once in the training precision, and bad flags are one-line errors."""
import re

import pytest
import torch

import bench
import train


def test_bench_runs_both_stages_at_a_tiny_size(monkeypatch, capsys):
    monkeypatch.setattr(bench, "DINO_SIZE", 28)                 # DINOv2 on 28 px (2 x 2 patches): seconds on a CPU
    assert train.main(["--bench", "--svd", "random:tiny", "--size", "16x24", "--frames", "2",
                       "--dtype", "bfloat16", "--grad-checkpoint"]) == 0
    out = capsys.readouterr().out
    assert "16x24, 2 frames, batch 1, cpu bfloat16, gradient checkpointing on" in out
    assert re.search(r"weights held in Stage 2: [\d.]+ GiB = the base once [\d.]+ GiB \(bfloat16\)", out)
    for stage in ("1", "2"):
        assert re.search(rf"stage {stage}: process peak RSS [\d.]+ GiB, [\d.]+ s per step", out)
        assert re.search(rf"stage {stage}, one sample decode \(2 frames at 16x24, 2 per VAE call; the VAE on cpu for "
                         rf"it\): "
                         rf"process peak RSS [\d.]+ GiB, [\d.]+ s", out)
    assert "5 Euler steps with CFG: 10 NFE" in out and re.search(r"SVD's VAE and CLIP: \d+M parameters", out)


def test_bench_prints_both_cuda_counters_and_the_encoders_visit_the_device(monkeypatch):
    """On CUDA a peak is max_memory_allocated beside max_memory_reserved; the encoders sit on the CPU and
    the VAE is on the stage's device only for the decode (svd.resident), then back."""
    assert bench.memory((2 ** 30, 3 * 2 ** 29), True) == "peak allocated 1.00 GiB, reserved 1.50 GiB"
    enc = bench.random_encoders("tiny")
    seen = []
    real = enc.decode_video
    monkeypatch.setattr(enc, "decode_video", lambda z: seen.append(next(enc.parameters()).device) or real(z))
    cfg = train.make_config(train.parse(["--bench", "--svd", "random:tiny"]), [])
    monkeypatch.setattr(bench, "DINO_SIZE", 28)
    moved = []
    real_to = enc.vae.to
    monkeypatch.setattr(enc.vae, "to", lambda *a, **k: moved.append(a) or real_to(*a, **k))
    r = bench.time_stage("1", cfg, "tiny", torch.linspace(0.002, 8, 10), (1, 2, 2, 3), 1, torch.device("cpu"),
                         torch.float32, enc)
    assert seen == [torch.device("cpu")] and len(moved) == 2 and r["decode"] is None and r["decode_sec"] > 0


def test_bench_counts_svd_xts_weights_held_without_building_them(capsys):
    """--bench-steps 0: the weights Stage 2 holds at SVD-XT's size, counted on the meta device. The base is
    1,524,623,082 parameters: 2.84 GiB in bf16 once, against 17.04 GiB for three fp32 copies."""
    assert train.main(["--bench", "--svd", "random:svd-xt", "--size", "320x576", "--frames", "14",
                       "--dtype", "bfloat16", "--bench-steps", "0"]) == 0
    out = capsys.readouterr().out
    assert "the base once 2.84 GiB (bfloat16)" in out and "three fp32 copies of the base would be 17.04 GiB" in out
    total = float(re.search(r"weights held in Stage 2: ([\d.]+) GiB", out).group(1))
    assert 2.84 < total < 3.5 and "stage 1:" not in out


def test_bench_base_is_bf16_and_trainables_fp32():
    D, _ = bench.random_denoiser("tiny", "cpu", False)
    params = bench.to_student(D, 0.002, {"rank": 4, "convs": True, "blends": True}, torch.bfloat16)
    base, trained = bench.held_bytes(D)
    assert base == 2 * sum(p.numel() for p in D.parameters() if not p.requires_grad)
    assert trained == 4 * sum(p.numel() for p in params)


@pytest.mark.parametrize("bad, says", [(["--svd", "svd-folder"], "random:svd-xt"), (["--svd", "random:xl"], "random:"),
                                       (["--svd", "random:tiny", "--size", "20x24"], "multiples of 8")])
def test_bench_errors(bad, says, capsys):
    assert train.main(["--bench", *bad]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1


def test_report_cost_counts_the_rows_a_run_folder_gets(tmp_path, capsys):
    """REPORT_ROWS are the rows report.sampler_rows gives a run with stage1.pt and stage2.pt (SVD as the
    teacher), each key once; their NFE: 50, 16, 4, 2 for the teacher, 18 for the students. The FLOPs of
    one call are counted on the meta device, equal for equal shapes and growing with the frames; with no
    GPU the seconds are printed as an estimate."""
    import json
    import report
    (tmp_path / "run.json").write_text(json.dumps({"svd": "some/folder"}))
    for name in ("stage1.pt", "stage2.pt"):
        (tmp_path / name).write_bytes(b"")
    keys = list(dict.fromkeys(r[2] for r in report.sampler_rows(str(tmp_path))))
    assert sorted(keys, key=str) == sorted(bench.REPORT_ROWS, key=str)
    assert [bench.nfe(k) for k in bench.REPORT_ROWS[:4]] == [50, 16, 4, 2]
    assert sum(map(bench.nfe, bench.REPORT_ROWS[4:])) == 18
    one, two = bench.unet_flops("tiny", (1, 2, 2, 3)), bench.unet_flops("tiny", (1, 4, 2, 3))
    assert 0 < one < two and one == bench.unet_flops("tiny", (1, 2, 2, 3))
    r = bench.report_cost("tiny", (1, 2, 2, 3), 250)
    out = capsys.readouterr().out
    assert r["flops"] == one and r["nfe"] == 90 and "ESTIMATE at an assumed 400 TFLOP/s" in out
    assert re.search(r"at N = 250: the teacher's 25 steps 50 NFE per clip", out)
