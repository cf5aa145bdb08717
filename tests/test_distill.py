"""distill.py: the teacher's m-step solve, the distillation loss on a closed form, the jump draw, what a
Stage 2 step feeds the discriminator, CFG inside the teacher's solve, a smoke run, one copy of the base, exact
resume."""
import gc
import json
import os
import shutil

import pytest
import torch

import sample
import train
from distill import ACD, acd_pair, distill_weight, jump_levels, teacher_solve
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
    B, m = 32, 5
    levels = jump_levels(grid, m, B, top_share=0.5, direct_share=0.25, direct_sigma=1.0)
    assert levels.shape == (m + 1, B) and torch.all(levels[1:] < levels[:-1])
    down = karras_sigmas(m + 1, SIGMA_MIN, 1.0)[:-1].double()                   # direct_sigma ... sigma_min
    direct = torch.tensor([torch.allclose(levels[:, b], down) for b in range(B)])
    top = levels[0] == grid[-1]
    assert direct.any() and top.any() and (~direct & ~top).any()                 # each sample drew a kind
    assert bool((levels[0, direct] == 1.0).all()) and (levels[-1, direct] - grid[0]).abs().max() < 1e-12
    assert all(walks_the_grid(grid, levels[:, b], m) for b in range(B) if not direct[b])   # m grid steps
    # a direct jump's target is the teacher's own m Euler steps down to sigma_min (the target network is the
    # identity there), closer to the exact flow than the teacher's single step
    x0 = torch.randn(B, 4, 2, 3, 3, dtype=torch.float64) * S
    eps = torch.randn_like(x0)
    x = x0 + levels[0].view(-1, 1, 1, 1, 1) * eps
    _, target = acd_pair(f_exact, f_exact, lambda x, lv: teacher_solve(D_exact, x, lv), x0, eps, levels)
    d = direct.nonzero().flatten()[:2]
    for b in d.tolist():
        manual, calls = sample_euler(D_exact, x[b:b + 1], levels[:, b])
        assert calls == m and torch.allclose(target[b:b + 1], manual.float(), rtol=1e-5, atol=1e-6)
    exact = flow(x, levels[0], levels[-1])[d].float()
    assert (target[d] - exact).abs().max() < 0.5 * (D_exact(x, levels[0])[d] - exact).abs().max()
    uniform = jump_levels(grid, m, B)                                                           # no shares: Eq. (8)
    assert all(walks_the_grid(grid, uniform[:, b], m) for b in range(B))


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
    for sampler, steps, nfe in (("consistency", 1, 1), ("tts", 1, 2), ("tts-text", 1, 2), ("consistency", 2, 2),
                                ("consistency", 4, 4)):
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


def live_storages():
    """Every tensor storage alive in this process: {address: bytes}."""
    gc.collect()
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.device.type == "cpu"}


def unique_bytes(tensors):
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def test_stage2_holds_one_copy_of_the_base(tiny_run, tmp_path, fast_args, micro_args):
    """The memory claim of one base: after a Stage 2 step, the storage the setup created is the base once
    (student = target = teacher), the autoencoder and disc, plus the trainable weights' EMA and Adam's two
    moments; a deep-copied teacher or a full EMA copy would add the base again."""
    out = str(tmp_path / "r")
    shutil.copytree(tiny_run, out)
    assert train.main(["--stage", "1", "--steps", "1", "--out", out, *micro_args, *fast_args]) == 0
    cfg = train.make_config(train.parse(["--stage", "2", "--out", out, *micro_args, *fast_args]), ["2"])
    run = train.Run(cfg, out)
    batch = run.dataset.batch(range(2))
    run.eval_batch(min(64, cfg.eval_clips))                     # clips the checks read: data, not weights
    before = live_storages()
    spec = train.setup_stage2(cfg, run)
    params = {k: [p for g in o.param_groups for p in g["params"]] for k, o in spec.opts.items()}
    spec.step(spec.models, batch, lambda loss, k: loss.backward(inputs=params[k]))
    for o in spec.opts.values():
        o.step()
        o.zero_grad(set_to_none=True)
    new = sum(n for p, n in live_storages().items() if p not in before)
    f, disc = spec.models["student"], spec.models["disc"]
    ae = sample.load_ae(os.path.join(out, "ae.pt"))[0]
    trained = unique_bytes(params["student"])
    held = (unique_bytes([*f.parameters(), *disc.parameters(), *disc.buffers()]) + unique_bytes([*ae.parameters(), *ae.buffers()])
            + 3 * trained + 2 * unique_bytes(params["disc"]))    # the EMA target; Adam's exp_avg, exp_avg_sq
    base = unique_bytes([p for p in f.parameters() if not p.requires_grad])
    assert base > 4 * trained                                   # a second base would not hide in the slack
    assert new <= held + 64 * 1024, (new, held, base)           # 64 KiB: the grid, Adam's step counters


def test_stage2_resume_is_exact_and_checkpoints_hold_the_adapters(tiny_run, tmp_path, fast_args, micro_args):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    shutil.copytree(tiny_run, a)
    assert train.main(["--stage", "1", "--steps", "2", "--out", a, *micro_args, *fast_args]) == 0
    shutil.copytree(a, b)
    assert train.main(["--stage", "2", "--steps", "4", "--out", a, *micro_args, *fast_args]) == 0
    assert train.main(["--stage", "2", "--steps", "2", "--out", b, *micro_args, *fast_args]) == 0
    assert train.main(["--stage", "2", "--steps", "4", "--out", b, "--resume", *micro_args, *fast_args]) == 0
    ca, cb = (torch.load(os.path.join(d, "stage2.pt"), weights_only=False) for d in (a, b))
    for part in ("models", "ema"):
        for net in ca[part]:
            assert ca[part][net].keys() == cb[part][net].keys()
            assert all(torch.equal(v, cb[part][net][k]) for k, v in ca[part][net].items()), (part, net)
    teacher = torch.load(os.path.join(a, "teacher.pt"), weights_only=False)["ema"]["denoiser"]
    student = ca["models"]["student"]
    assert ca["base"] == "teacher.pt" and not set(student) & set(teacher)      # the base is not stored again
    assert any(k.endswith("time_mixer.delta") for k in student) and any(k.endswith(".A.weight") for k in student)


def test_lambda_of_t_ict_or_uniform(tmp_path, capsys):
    """lambda(t_n): iCT's 1 / (t_{n+m} - t_n), scaled to mean 1 over the grid's uniform jumps; or 1."""
    grid, m = sigma_grid(100, 0.002, 8.0), 5
    t_n, t_nm = grid[:-m], grid[m:]                                 # every uniform jump, n + m <= N - 1
    lam = distill_weight(t_n, t_nm, "ict", grid, m)
    assert torch.allclose(lam.mean(), torch.tensor(1.0, dtype=lam.dtype)) and torch.allclose(lam * (t_nm - t_n), lam[0] * (t_nm[0] - t_n[0]))
    assert lam[0] > 100 * lam[-1]                                   # largest just above sigma_min
    assert torch.equal(distill_weight(t_n, t_nm, "uniform"), torch.ones_like(t_n))
    assert train.main(["--stage", "2", "--distill-weight", "icT", "--out", str(tmp_path / "r")]) == 2
    assert "--distill-weight 'icT': use ict or uniform" in capsys.readouterr().err
