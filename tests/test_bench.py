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
    assert re.search(r"weights held: base [\d.]+ GiB \(bfloat16\)", out)
    for stage in ("1", "2"):
        assert re.search(rf"stage {stage}: process peak RSS [\d.]+ GiB, [\d.]+ s per step", out)
    assert "5 Euler steps with CFG: 10 NFE" in out


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
