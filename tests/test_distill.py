"""Stage 2: the teacher's m-step solve, the distillation loss on a closed form, the target EMA, the Time
Travel Sampler, and a smoke run."""
import json
import os
import shutil

import pytest
import torch

import train
from conftest import FAST, MICRO
from distill import acd_pair, jump_levels, teacher_solve
from gan import pseudo_huber, sigma_grid
from sample import consistency_sigmas, generate, karras_sigmas, sample_euler, sample_tts

S = 0.7            # Gaussian data x0 ~ N(0, S^2): every quantity below has a closed form
SIGMA_MIN = 0.002


def D_exact(x, sigma):
    """The exact denoiser of N(0, S^2) data: E[x0 | x] = S^2 / (S^2 + sigma^2) x."""
    return S ** 2 / (S ** 2 + sigma.view(-1, 1, 1, 1, 1) ** 2) * x


def flow(x, sigma, sigma_to):
    """The exact PF-ODE solution from sigma to sigma_to: x scales by sqrt((S^2 + to^2) / (S^2 + sigma^2))."""
    return x * ((S ** 2 + sigma_to.view(-1, 1, 1, 1, 1) ** 2) / (S ** 2 + sigma.view(-1, 1, 1, 1, 1) ** 2)).sqrt()


def f_exact(x, sigma):
    """The exact consistency function: follow the flow down to sigma_min."""
    return flow(x, sigma, torch.full_like(sigma, SIGMA_MIN))


def exact_solve(x, levels):
    return flow(x, levels[0], levels[-1])


def test_teacher_solve_is_m_euler_steps():
    grid = sigma_grid(100, SIGMA_MIN, 80.0).double()
    torch.manual_seed(0)
    x = torch.randn(3, 4, 2, 3, 3, dtype=torch.float64) * 5
    n, m = torch.tensor([40, 40, 40]), 5
    levels = torch.stack([grid[n + m - j] for j in range(m + 1)])                 # (m + 1, B)
    ours = teacher_solve(D_exact, x, levels)
    manual, calls = sample_euler(D_exact, x, grid[40:46].flip(0))                 # the same 5 levels, by hand
    assert calls == m and torch.allclose(ours, manual, rtol=1e-12, atol=1e-12)
    # per-sample levels: each sample walks its own part of the grid
    n = torch.tensor([0, 50, 94])
    levels = torch.stack([grid[n + m - j] for j in range(m + 1)])
    ours = teacher_solve(D_exact, x, levels)
    for b in range(3):
        one, _ = sample_euler(D_exact, x[b:b + 1], grid[n[b]:n[b] + m + 1].flip(0))
        assert torch.allclose(ours[b:b + 1], one, rtol=1e-12, atol=1e-12)


def test_exact_consistency_function_has_zero_loss():
    grid = sigma_grid(100, SIGMA_MIN, 80.0).double()
    torch.manual_seed(1)
    B, m = 16, 5
    x0 = torch.randn(B, 4, 2, 3, 3, dtype=torch.float64) * S
    eps = torch.randn_like(x0)
    levels = jump_levels(grid, m, B, top_share=0.25, direct_share=0.25)          # every kind of jump
    student, target = acd_pair(f_exact, f_exact, exact_solve, x0, eps, levels)
    assert pseudo_huber(target, student).max() < 1e-9
    # a perturbed consistency function is caught
    f_bad = lambda x, sigma: f_exact(x, sigma) * (1 + 0.05 * sigma.view(-1, 1, 1, 1, 1) / 80)   # noqa: E731
    student, target = acd_pair(f_bad, f_bad, exact_solve, x0, eps, levels)
    assert pseudo_huber(target, student).mean() > 1e-4
    # with the teacher's Euler solve the exact f is nearly, not exactly, consistent: Euler's own error
    euler = lambda x, levels: teacher_solve(D_exact, x, levels)                                   # noqa: E731
    student, target = acd_pair(f_exact, f_exact, euler, x0, eps, levels)
    assert pseudo_huber(target, student).mean() < pseudo_huber(*acd_pair(f_bad, f_bad, euler, x0, eps, levels)).mean()


def walks_the_grid(grid, col, m):
    """True when the levels col (m + 1,) are m consecutive grid steps down: Eq. (8) as written."""
    i = int((grid == col[0]).nonzero())
    return torch.equal(col, grid[i - m:i + 1].flip(0))


def test_jump_levels_top_direct_and_grid():
    """Stage 2's three kinds of jump: from the top level down the grid, from direct_sigma all the way to
    sigma_min in m steps (where the target is the teacher's solution itself), the rest m grid steps."""
    grid = sigma_grid(100, SIGMA_MIN, 8.0).double()
    torch.manual_seed(2)
    B, m = 8, 5
    levels = jump_levels(grid, m, B, top_share=0.5, direct_share=0.25, direct_sigma=1.0)
    assert levels.shape == (m + 1, B) and torch.all(levels[1:] < levels[:-1])
    assert torch.equal(levels[:, :4], grid[-m - 1:].flip(0).view(-1, 1).expand(-1, 4))           # 4 from the top
    down = levels[:, 4:6]                                                                        # 2 direct jumps
    assert torch.equal(down[:, 0], down[:, 1]) and down[0, 0] == 1.0 and abs(down[-1, 0] - grid[0]) < 1e-12
    assert torch.allclose(down[:, 0], karras_sigmas(m + 1, SIGMA_MIN, 1.0)[:-1])
    assert all(walks_the_grid(grid, levels[:, b], m) for b in (6, 7))                           # m grid steps
    # a direct jump's target is the teacher's own m Euler steps down to sigma_min (the target network is the
    # identity there), closer to the exact flow than the teacher's single step
    x0 = torch.randn(B, 4, 2, 3, 3, dtype=torch.float64) * S
    eps = torch.randn_like(x0)
    x = x0 + levels[0].view(-1, 1, 1, 1, 1) * eps
    _, target = acd_pair(f_exact, f_exact, lambda x, lv: teacher_solve(D_exact, x, lv), x0, eps, levels)
    for b in (4, 5):
        manual, calls = sample_euler(D_exact, x[b:b + 1], levels[:, b])
        assert calls == m and torch.allclose(target[b:b + 1], manual.float(), rtol=1e-5, atol=1e-6)
    exact = flow(x, levels[0], levels[-1])[4:6].float()
    assert (target[4:6] - exact).abs().max() < 0.5 * (D_exact(x, levels[0])[4:6] - exact).abs().max()
    uniform = jump_levels(grid, m, B)                                                           # no shares: Eq. (8)
    assert all(walks_the_grid(grid, uniform[:, b], m) for b in range(B))


def test_target_ema_update_math():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ema = train.EMA(a, 0.95, warmup=False)
    before = [p.clone() for p in ema.model.parameters()]
    ema.update(b, step=0)
    for p0, p, q in zip(before, ema.model.parameters(), b.parameters()):
        assert torch.allclose(p, 0.95 * p0 + 0.05 * q)
    warm = train.EMA(a, 0.999)                     # the evaluation EMA ramps: step 0 uses (1 + 0) / (10 + 0)
    warm.update(b, step=0)
    w = next(warm.model.parameters())
    assert torch.allclose(w, 0.1 * next(a.parameters()) + 0.9 * next(b.parameters()))


def test_time_travel_sampler_calls_and_determinism():
    calls = []

    def f(x, sigma):
        calls.append(float(sigma.reshape(-1)[0]))
        return f_exact(x, sigma.reshape(-1).expand(len(x)))
    x = torch.randn(2, 4, 2, 3, 3) * 80
    out1, n1 = sample_tts(f, x, torch.tensor(80.0), torch.tensor(2.5), torch.Generator().manual_seed(5))
    out2, n2 = sample_tts(f, x, torch.tensor(80.0), torch.tensor(2.5), torch.Generator().manual_seed(5))
    assert n1 == n2 == 2 and len(calls) == 4 and calls[:2] == [80.0, 2.5]
    assert torch.equal(out1, out2)
    out3, _ = sample_tts(f, x, torch.tensor(80.0), torch.tensor(2.5), torch.Generator().manual_seed(6))
    assert not torch.equal(out1, out3)


def test_consistency_levels_come_from_the_grid():
    grid = sigma_grid(100, SIGMA_MIN, 80.0)
    s = consistency_sigmas(4, grid)
    assert len(s) == 5 and s[0] == grid[-1] and s[-1] == 0 and all(x in grid for x in s[:-1])
    assert torch.all(s[1:] < s[:-1])


def test_stage2_smoke_run_and_samplers(tiny_run, tmp_path, capsys):
    out = str(tmp_path / "r")
    shutil.copytree(tiny_run, out)
    assert train.main(["--stage", "1", "--steps", "2", "--out", out, *MICRO, *FAST]) == 0
    assert train.main(["--stage", "2", "--steps", "3", "--out", out, *MICRO, *FAST]) == 0
    recs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    recs = [r for r in recs if r.get("stage") == "2" and "loss" in r]
    assert len(recs) == 3 and all(torch.isfinite(torch.tensor([r[k] for k in ("loss", "distill", "adv_g", "loss_d")])).all()
                                  for r in recs)
    ck = torch.load(os.path.join(out, "stage2.pt"), weights_only=False)
    assert set(ck["models"]) == {"student", "disc"} and set(ck["ema"]) == {"student"} and ck["init"] == "stage1.pt"
    from sample import load_model, main as sample_main
    f, ae, cfg, stage = load_model(os.path.join(out, "stage2.pt"))
    b = {"concat": torch.randn(2, 4, 8, 8), "image": torch.randn(2, 4, 8, 8), "micro": torch.ones(2, 3)}
    for sampler, steps, nfe in (("consistency", 1, 1), ("tts", 1, 2), ("consistency", 2, 2), ("consistency", 4, 4)):
        assert generate(f, b, 8, steps, 1.0, sampler)[1] == nfe
    capsys.readouterr()
    assert sample_main(["--ckpt", os.path.join(out, "stage2.pt"), "--index", "1", "--steps", "1", "--tts",
                        "--out", str(tmp_path / "v.mp4")]) == 0
    assert "2: 1 steps, 2 NFE" in capsys.readouterr().out
    # the ablation flags each run as one command, beside the main run
    assert train.main(["--stage", "2", "--steps", "1", "--out", out, "--tag", "m1", "--m", "1", *MICRO, *FAST]) == 0
    assert train.main(["--stage", "2", "--steps", "1", "--out", out, "--tag", "nos1", "--from-teacher", *MICRO, *FAST]) == 0
    assert os.path.isfile(os.path.join(out, "stage2_m1.pt")) and os.path.isfile(os.path.join(out, "stage2_nos1.pt"))
    assert torch.load(os.path.join(out, "stage2_nos1.pt"), weights_only=False)["init"] == "teacher"


@pytest.mark.parametrize("bad", [["--m", "0"], ["--teacher-cfg", "strong"], ["--stage2-top", "0.8"],
                                 ["--direct-sigma", "100"]])
def test_stage2_bad_flags(tiny_run, tmp_path, bad, capsys):
    out = str(tmp_path / "r")
    shutil.copytree(tiny_run, out)
    assert train.main(["--stage", "2", "--steps", "1", "--out", out, "--from-teacher", *bad, *MICRO, *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
