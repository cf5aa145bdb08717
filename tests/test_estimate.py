"""estimate.py: the peak predicted on a fake CUDA device equals the real allocation of the same step on the
CPU (within 2%), the allocator model follows CUDA's rules, value reads are answered or refused, and
`python train.py --bench --estimate` prints each stage's peaks."""
import re

import pytest
import torch

import bench
import estimate
import train
from sample import karras_sigmas, sigma_grid


def real_peak(fn):
    """The peak bytes the CPU allocator held while fn() ran, from the profiler's record of every allocation
    and free (kernels' internal buffers included, which the estimate cannot see)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("stage,checkpoint", [("1", False), ("2", True)])
def test_the_estimate_equals_the_real_allocation_of_the_same_step(stage, checkpoint, monkeypatch):
    """Build a stage of the tiny random SVD and run a warm-up step and a step (Adam, the EMA; Stage 2 with the
    teacher's solve and the target), then the check's call, once for real on the CPU and once on the fake CUDA
    device, in fp32 (CUDA's and the CPU's autocast lists differ). The fake peak is the real one less kernels'
    own buffers: within 2%."""
    monkeypatch.setattr(bench, "DINO_SIZE", 28)                  # the UNet's activations, not DINOv2's, dominate
    cfg = train.make_config(train.parse(["--bench", "--svd", "random:tiny", "--frames", "4"]
                                        + ["--grad-checkpoint"] * checkpoint), [])
    shape = (1, 4, 16, 16)

    def run(device, part=None):
        grid = sigma_grid(cfg.grid_size, cfg.sigma_min, cfg.sigma_max).to(device)
        parts = bench.build_stage(stage, cfg, "tiny", grid, shape, torch.device(device), torch.float32,
                                  *([part] if part else []))
        parts.step(0)
        parts.step(1)
        parts.check(1)                                          # its code path; the step holds the peak

    real = real_peak(lambda: run("cpu"))
    with estimate.fake_gpu() as tally:
        run("cuda", tally.part)
    print(f"stage {stage}, checkpointing {checkpoint}: estimate {tally.peak:,} B, real {real:,} B, "
          f"ratio {tally.peak / real:.4f}")
    assert 0.98 * real <= tally.peak <= 1.005 * real, (tally.peak, real)
    assert tally.at.startswith(("forward", "backward into the student", "backward into the disc", "the check"))


def test_the_allocator_model_follows_cudas_rules():
    """CUDACachingAllocator: 512 B rounding, 2 MiB small segments, 20 MiB for requests under 10 MiB, exact
    (2 MiB-rounded) segments above, best-fit reuse with splitting and merging, nothing returned; expandable
    segments grow one mapping per pool in pages (2 MiB small, 20 MiB large)."""
    MiB = 2 ** 20
    a = estimate.Allocator()
    a.malloc("s1", 100)                                           # a small block: one 2 MiB segment
    a.malloc("s2", 1000)                                          # fits in the same segment's rest
    assert a.reserved == 2 * MiB
    a.malloc("l1", 5 * MiB)                                       # a 20 MiB segment, split: 15 MiB stay free
    a.malloc("l2", 12 * MiB)                                      # the 15 MiB rest fits it: no new segment
    assert a.reserved == 22 * MiB
    a.malloc("l3", 11 * MiB + 1)                                  # over 10 MiB: its own 12 MiB segment
    assert a.reserved == 34 * MiB
    a.release("l1")
    a.release("l2")                                               # merged back into one free 20 MiB block
    a.malloc("l4", 19 * MiB)
    assert a.reserved == 34 * MiB and a.peak == 34 * MiB
    assert estimate.Allocator.replay([("x", 30 * MiB), ("x", 0), ("y", 30 * MiB)]) == 30 * MiB
    e = estimate.Allocator(expandable=True)
    for key in "abc":
        e.malloc(key, 5 * MiB)                                    # 15 MiB: one 20 MiB page of the large pool
    assert e.reserved == 20 * MiB
    e.malloc("d", 10 * MiB)                                       # the free 5 MiB at the end grows by a page
    assert e.reserved == 40 * MiB
    e.release("b")
    e.malloc("f", 5 * MiB)                                        # the hole is reused
    assert e.reserved == 40 * MiB


def test_value_reads_are_answered_as_all_true_masks_or_refused():
    """A fake tensor has no values: the count of a boolean mask (Stage 1's judged fakes) is its size, indexing
    with it keeps every row; any other read is a one-line error. Stage 2's direct levels read nothing."""
    with estimate.fake_gpu():
        x = torch.randn(3, 4, device="cuda")
        mask = x[:, 0] > 0
        assert int(mask.sum()) == 3 and x[mask].shape == (3, 4)
        with pytest.raises(estimate.UserError, match="reads a tensor's value"):
            float(x.sum())
        grid = sigma_grid(10, 0.002, 80.0).to("cuda")
        assert karras_sigmas(3, grid[0].double(), 1.0).device.type == "cuda"
    grid = sigma_grid(10, 0.002, 80.0)
    assert torch.equal(karras_sigmas(3, grid[0].double(), 1.0), karras_sigmas(3, float(grid[0]), 1.0))


def test_bench_estimate_prints_each_stages_peaks(monkeypatch, capsys):
    monkeypatch.setattr(bench, "DINO_SIZE", 28)
    assert train.main(["--bench", "--estimate", "--svd", "random:tiny", "--size", "16x16", "--frames", "2",
                       "--grad-checkpoint", "--m", "1"]) == 0
    out = capsys.readouterr().out
    assert "bench --estimate: random tiny UNet" in out and "cuda bfloat16, gradient checkpointing on" in out
    for stage in "12":
        m = re.search(rf"stage {stage} ESTIMATE: peak allocated ([\d.]+) GiB, reserved about ([\d.]+) GiB \(a model "
                      r"of CUDA's caching allocator, expandable segments\), at: (.+)", out)
        assert m and 0 < float(m[1]) <= float(m[2]) and m[3].startswith(("forward", "backward", "Adam", "EMA"))
        assert re.search(rf"stage {stage} ESTIMATE, one sample decode \(2 frames at 16x16, 2 per VAE call\) with "
                         r"the stage in memory: peak allocated [\d.]+ GiB", out)
        assert re.search(rf"stage {stage} ESTIMATE, the network call of samples and checks on 16 clips \(no "
                         r"gradient\): peak allocated [\d.]+ GiB, reserved about [\d.]+ GiB .*, at: the check's "
                         r"step on 16 clips", out)
    assert "the estimate cannot see kernels' own buffers" in out


def test_estimate_without_bench_is_a_one_line_error(capsys):
    assert train.main(["--stage", "1", "--estimate", "--out", "unused"]) == 2
    assert "give it with --bench" in capsys.readouterr().err
