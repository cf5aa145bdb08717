"""distill.py: the teacher's m-step solve, the distillation loss on a closed form, the jump draw, what a
Stage 2 step feeds the discriminator, CFG inside the teacher's solve, and a smoke run."""
import json
import os
import shutil

import pytest
import torch

import sample
import train
from distill import ACD, acd_pair, jump_levels, teacher_solve
from gan import pseudo_huber
from sample import cfg_scale, generate, karras_sigmas, sample_euler, sigma_grid

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


@pytest.mark.xfail(strict=True, reason="round(share * B) is 0 at batch 1 (and 1 of 2 for a quarter at batch 2): "
                   "the shares depend on the batch size; a per-sample draw is the one-GPU issue's")
@pytest.mark.parametrize("B", [1, 2])
def test_jump_shares_hold_at_small_batches(B):
    grid = sigma_grid(100, SIGMA_MIN, 8.0)
    torch.manual_seed(0)
    starts = torch.cat([jump_levels(grid, 5, B, top_share=0.5, direct_share=0.25)[0] for _ in range(2000 // B)])
    assert abs((starts == grid[-1]).float().mean() - 0.5) < 0.05          # from the top
    assert abs((starts == 1.0).float().mean() - 0.25) < 0.05               # direct from sigma = 1


class Recorder:
    """A discriminator stand-in that records its inputs and returns one logit per clip."""

    def __init__(self):
        self.inputs = []

    def __call__(self, z):
        self.inputs.append(z)
        return [z.mean((1, 2, 3, 4))]


def teacher_with_cond(x, sigma, cond, keep=None):
    """A conditioned toy teacher: the exact denoiser plus the conditioning's offset, zeroed by keep = 0
    (SVD's unconditional branch), so classifier-free guidance visibly moves its predictions."""
    keep = torch.ones(len(x)) if keep is None else keep
    return D_exact(x, sigma) + (keep * cond["offset"]).view(-1, 1, 1, 1, 1)


def run_acd_step(scale, m=5, B=4):
    """One ACD step with stand-ins; returns what it fed the discriminator and the same quantities by hand."""
    grid = sigma_grid(100, SIGMA_MIN, 8.0)
    w = torch.ones((), requires_grad=True)
    f = lambda x, s, cond: f_exact(x, s) * w                   # noqa: E731  the student, with a graph
    f_target = lambda x, s, cond: x + 0.5                      # noqa: E731  the target, told apart from f
    cond = {"offset": torch.linspace(0.1, 0.4, B)}
    x0 = torch.randn(B, 8, 2, 3, 3)
    disc = Recorder()
    torch.manual_seed(3)
    ACD(grid, m, scale).step(f, f_target, teacher_with_cond, disc, x0, cond, lambda loss, name: None)
    torch.manual_seed(3)                                       # the same draws, by hand
    levels = jump_levels(grid, m, B)
    x = x0 + levels[0].view(-1, 1, 1, 1, 1) * torch.randn_like(x0)
    w_frames = scale if torch.is_tensor(scale) else torch.tensor(scale)
    D_cfg = lambda x, s: D_exact(x, s) + w_frames * cond["offset"].view(-1, 1, 1, 1, 1)   # noqa: E731  D_u + w (D_c - D_u)
    target = teacher_solve(D_cfg, x, levels) + 0.5
    return disc.inputs, f_exact(x, levels[0]), target, levels


def test_acd_step_feeds_disc_the_target_as_real_and_the_detached_student_as_fake():
    (g_in, d_in), student, target, _ = run_acd_step(1.0)
    B = len(student)
    assert g_in.requires_grad and torch.allclose(g_in, student)                # generator's term: the student
    assert not d_in.requires_grad                                              # disc's update: nothing to f
    assert torch.allclose(d_in[:B], target, atol=1e-5)                         # "real" = the target's output
    assert torch.allclose(d_in[B:], student)                                   # "fake" = the student, detached


@pytest.mark.parametrize("scale", [2.5, cfg_scale(1.0, 2.5, 8)])
def test_teacher_solve_inside_the_step_uses_cfg(scale):
    (_, d_in), _, target, levels = run_acd_step(scale)
    B = len(target)
    assert torch.allclose(d_in[:B], target, atol=1e-5)                         # guided steps, per frame for a ramp
    (_, unguided), _, _, _ = run_acd_step(1.0)
    assert (d_in[:B] - unguided[:B]).abs().max() > 1e-2                        # and guidance moved the target


def test_stage2_smoke_run_and_samplers(tiny_run, tmp_path, capsys, fast_args, micro_args):
    out = str(tmp_path / "r")
    shutil.copytree(tiny_run, out)
    assert train.main(["--stage", "1", "--steps", "2", "--out", out, *micro_args, *fast_args]) == 0
    assert train.main(["--stage", "2", "--steps", "3", "--out", out, *micro_args, *fast_args]) == 0
    recs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    recs = [r for r in recs if r.get("stage") == "2" and "loss" in r]
    assert len(recs) == 3 and all(torch.isfinite(torch.tensor([r[k] for k in ("loss", "distill", "adv_g", "loss_d")])).all()
                                  for r in recs)
    ck = torch.load(os.path.join(out, "stage2.pt"), weights_only=False)
    assert set(ck["models"]) == {"student", "disc"} and set(ck["ema"]) == {"student"} and ck["init"] == "stage1.pt"
    f, ae, cfg, stage = sample.load_model(os.path.join(out, "stage2.pt"))
    b = {"concat": torch.randn(2, 4, 8, 8), "image": torch.randn(2, 4, 8, 8), "micro": torch.ones(2, 3)}
    for sampler, steps, nfe in (("consistency", 1, 1), ("tts", 1, 2), ("consistency", 2, 2), ("consistency", 4, 4)):
        assert generate(f, b, 8, steps, 1.0, sampler)[1] == nfe
    capsys.readouterr()
    assert sample.main(["--ckpt", os.path.join(out, "stage2.pt"), "--index", "1", "--steps", "1", "--tts",
                        "--out", str(tmp_path / "v.mp4")]) == 0
    assert "2: 1 steps, 2 NFE" in capsys.readouterr().out
    # the ablation flags each run as one command, beside the main run
    assert train.main(["--stage", "2", "--steps", "1", "--out", out, "--tag", "m1", "--m", "1", *micro_args,
                       *fast_args]) == 0
    assert train.main(["--stage", "2", "--steps", "1", "--out", out, "--tag", "nos1", "--from-teacher", *micro_args,
                       *fast_args]) == 0
    assert os.path.isfile(os.path.join(out, "stage2_m1.pt")) and os.path.isfile(os.path.join(out, "stage2_nos1.pt"))
    assert torch.load(os.path.join(out, "stage2_nos1.pt"), weights_only=False)["init"] == "teacher"


@pytest.mark.parametrize("bad", [["--m", "0"], ["--teacher-cfg", "strong"], ["--stage2-top", "0.8"],
                                 ["--direct-sigma", "100"]])
def test_stage2_bad_flags(tiny_run, tmp_path, bad, capsys, fast_args, micro_args):
    out = str(tmp_path / "r")
    shutil.copytree(tiny_run, out)
    assert train.main(["--stage", "2", "--steps", "1", "--out", out, "--from-teacher", *bad, *micro_args,
                       *fast_args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
