"""Stage 2 of OSV, Adversarial Consistency Distillation (ACD): OSV Eq. (8) and the Stage 2 losses.

docs/paper.md, "Stage 2". A real latent is noised to level t_{n+m} of the 100-point grid. The
frozen teacher walks m first-order steps down the grid, classifier-free guidance folded into every
step, to x^_{t_n}; the EMA target network's prediction there, f_theta-(x^_{t_n}, t_n), is what the
student's one jump f_theta(x_{t_{n+m}}, t_{n+m}) must equal:

    x^_{t_{k-1}} = x^_{t_k} + (t_{k-1} - t_k) Phi(x^_{t_k}, t_k)   k = n+m ... n+1   (OSV Eq. 8)
    L_g2 = lambda(t_n) d(f_theta-(x^_{t_n}, t_n), f_theta(x_{t_{n+m}}, t_{n+m})) + 0.1 ReLU(1 - disc(f_theta(...)))
    L_d2 = ReLU(1 - disc(f_theta-(x^_{t_n}, t_n))) + ReLU(1 + disc(f_theta(x_{t_{n+m}}, t_{n+m})))

The discriminator's "real" side is the target's prediction, not data: the adversarial loss can reach
zero exactly when the student is consistent, so it does not fight the distillation (the paper's
argument). Read first: `acd_pair` (Eq. 8 and the two predictions), then `jump_levels` and `ACD.step`.

Choices the paper leaves open, made here (docs/paper.md lists them; docs/experiments.md measures them):
- Phi is the PF-ODE direction (x - D(x; t)) / t of the teacher's denoiser (EDM Eq. 4): Euler steps.
- CFG in the teacher step: Phi^ = Phi_u + w (Phi_c - Phi_u) with SVD's per-frame ramp (1.0 -> 2.5) by
  default, a constant with --teacher-cfg W. Linear in D, so it is sample.guided(D).
- lambda(t_n) = 1, as the consistency-distillation launch scripts of Song et al. 2023; the paper's
  "similar to iCT" 1 / (t_{n+m} - t_n) is --distill-weight ict (`distill_weight`; worse on two seeds).
- the target's EMA decay mu = 0.95 (Song et al. 2023's fixed target EMA), updated after every step.
- where the jumps start (`jump_levels`): a share from the top level, a share from sigma = 1 straight
  to the teacher's solution (Eq. 8 with n = 1, the m steps spread over the whole way down), the rest
  uniform on the grid. A departure from Eq. (8) as written, kept: Eq. (8) as written is worse on two
  seeds (docs/experiments.md).
"""
import copy

import torch

from data import UserError
from discriminator import Discriminator, accuracy, hinge_d, hinge_g, split_logits
from gan import make_disc_optimizer, pseudo_huber
from sample import cfg_scale, guided, karras_sigmas, sigma_grid
from lora import load_trained, teacher_of, to_student
from unet import EMA, latents_and_condition


def teacher_solve(D, x, levels):
    """OSV Eq. (8): first-order steps of the teacher's PF-ODE through `levels` (m + 1, B), from
    levels[0] = t_{n+m} down to levels[-1] = t_n, each sample on its own levels. D(x, sigma (B,))."""
    for k in range(len(levels) - 1):
        t, t_next = levels[k].view(-1, 1, 1, 1, 1), levels[k + 1].view(-1, 1, 1, 1, 1)
        phi = (x - D(x, levels[k])) / t                                                # dx/dsigma
        x = x + (t_next - t) * phi
    return x


def distill_weight(t_n, t_nm, form, grid=None, m=None):
    """lambda(t_n). "ict" (the paper: "similar to iCT", Song & Dhariwal 2023): 1 / (t_{n+m} - t_n),
    divided by its mean over the grid's uniform jumps (n + m <= N - 1) so that lambda_adv keeps its
    balance; a constant factor is all that differs from iCT. "uniform" (ours, as the consistency-distillation
    launch scripts of Song et al. 2023): 1. On our Karras grid iCT's form spans three orders of magnitude,
    largest just above sigma_min where the boundary condition already makes f nearly exact."""
    if form == "uniform":
        return torch.ones_like(t_n)
    mean = (1 / (grid[m:] - grid[:-m])).mean()                  # over n = 0 .. N-1-m, the uniform jumps
    return 1 / ((t_nm - t_n) * mean)


def jump_levels(grid, m, B, top_share=0.0, direct_share=0.0, direct_sigma=1.0):
    """Each sample's levels for the teacher's walk, (m + 1, B), from where the student jumps (t_{n+m})
    down to where the target predicts (t_n). The paper draws n "from the grid" and says no more. Ours:
    each sample draws one of three kinds of jump, whatever the batch size:
      - with probability top_share, from the top level t_N, where one-step sampling starts (as Stage 1);
      - with probability direct_share, from direct_sigma all the way down: the m Euler steps spread over
        the teacher's own Karras levels from direct_sigma to sigma_min = t_1, where the target network
        is exact by the boundary condition (f(x, sigma_min) = x), so the target is the teacher's
        solution itself, free of the target network's error (Eq. 8 with n = 1);
      - else t_{n+m} uniform on the grid and m grid steps down (OSV Eq. 8 as written)."""
    n = torch.randint(len(grid) - m, (B,), device=grid.device)                        # n + m <= N - 1
    u = torch.rand(B, device=grid.device)                                               # each sample's kind
    top, direct = u < top_share, (u >= top_share) & (u < top_share + direct_share)
    n = torch.where(top, len(grid) - 1 - m, n)                                         # t_{n+m} = t_N
    levels = torch.stack([grid[n + m - j] for j in range(m + 1)])                     # (m + 1, B)
    down = karras_sigmas(m + 1, grid[0].double(), direct_sigma, rho=7.0)[:-1]       # direct_sigma ... sigma_min
    return torch.where(direct, down.to(levels).view(-1, 1), levels)


def acd_pair(f, f_target, solve, x0, eps, levels):
    """The student's prediction at t_{n+m} = levels[0] and the target's at t_n = levels[-1] (no
    gradient). f, f_target, solve take (x, sigma (B,)) with the conditioning bound; levels (m + 1, B)."""
    t_nm, t_n = levels[0], levels[-1]
    x = x0 + t_nm.view(-1, 1, 1, 1, 1) * eps                                          # x_{t_{n+m}}
    with torch.no_grad():
        x_hat = solve(x, levels)                                                       # x^_{t_n}, Eq. (8)
        target = f_target(x_hat, t_n).float()                                          # f_theta-(x^_{t_n}, t_n)
    return f(x, t_nm), target


class ACD:
    """Stage 2's levels and hyperparameters, bound once: the grid (N,), the teacher's solve length m,
    its guidance scale (a number or SVD's per-frame ramp), lambda_adv, pseudo-Huber's c, the shares of
    the jumps (`jump_levels`) and lambda(t)'s form (`distill_weight`)."""

    def __init__(self, grid, m, scale, lambda_adv=0.1, c=0.001, top_share=0.0, direct_share=0.0,
                 direct_sigma=1.0, weight="uniform"):
        self.grid, self.m, self.scale, self.lambda_adv, self.c = grid, m, scale, lambda_adv, c
        self.weight = weight
        self.top_share, self.direct_share, self.direct_sigma = top_share, direct_share, direct_sigma

    def step(self, f, f_target, teacher, disc, x0, cond, update, disc_wrapped=None):
        """One Stage 2 step on real latents x0. f: the student, f_target: the EMA target, teacher: the
        frozen denoiser; all take (x, sigma, cond). disc, disc_wrapped, update: as in gan.LGP.step.
        The teacher and the target run before the student's forward: they share its weights."""
        levels = jump_levels(self.grid, self.m, len(x0), self.top_share, self.direct_share, self.direct_sigma)
        D_teacher, _ = guided(teacher, cond, self.scale)                               # CFG in every step
        student, target = acd_pair(lambda x, s: f(x, s, cond), lambda x, s: f_target(x, s, cond),
                                   lambda x, lv: teacher_solve(D_teacher, x, lv), x0, torch.randn_like(x0), levels)

        # generator: L_g2 = lambda(t_n) d(target, student) + 0.1 ReLU(1 - disc(student))
        lam = distill_weight(levels[-1], levels[0], self.weight, self.grid, self.m)
        dist = (lam * pseudo_huber(target, student, self.c)).mean()
        adv = hinge_g(disc(student))
        update(dist + self.lambda_adv * adv, "student")

        # discriminator: L_d2, the target's prediction "real", the (detached) student "fake"
        real_logits, fake_logits = split_logits((disc_wrapped or disc)(torch.cat([target, student.detach()])))
        loss_d = hinge_d(real_logits, fake_logits)
        update(loss_d, "disc")
        return {"loss": dist + self.lambda_adv * adv, "distill": dist, "adv_g": adv, "loss_d": loss_d,
                "acc_real": accuracy(real_logits, True), "acc_fake": accuracy(fake_logits, False)}


def teacher_scale(cfg):
    """The teacher's guidance in Stage 2: SVD's per-frame ramp cfg_min -> cfg_max, or a constant."""
    if cfg.teacher_cfg == "ramp":
        return cfg_scale(cfg.cfg_min, cfg.cfg_max, cfg.num_frames)
    try:
        return float(cfg.teacher_cfg)
    except ValueError:
        raise UserError(f"--teacher-cfg must be 'ramp' or a number, not {cfg.teacher_cfg!r}") from None


def setup_stage2(cfg, ae, base, stage1, device, dtype=None):
    """`python train.py --stage 2`: the student from Stage 1's EMA adapters (`stage1`, its checkpoint
    dict) on the teacher's weights (`base`, in place: they stay frozen, stored in `dtype`), LoRA unmerged
    and trainable, plus a delta on the temporal blend scalar alpha of every video block (the "specific
    layers" we unfreeze: they set how much each block mixes time, and cost nothing); the discriminator
    from Stage 1. One copy of the base serves three networks: the student, the EMA target (its adapters'
    average swapped in) and the teacher (its adapters off, `lora.teacher_of`). stage1 None
    (--from-teacher, the ablation "no Stage 1"): fresh LoRA, a fresh discriminator. Returns the parts
    train.py's loop assembles."""
    if not 1 <= cfg.m < cfg.grid_size:
        raise UserError(f"--m must be between 1 and {cfg.grid_size - 1}")
    if cfg.stage2_top < 0 or cfg.stage2_direct < 0 or cfg.stage2_top + cfg.stage2_direct > 1:
        raise UserError("--stage2-top and --stage2-direct are shares of the batch: each >= 0, together <= 1")
    if not cfg.sigma_min < cfg.direct_sigma <= cfg.sigma_max:
        raise UserError(f"--direct-sigma must lie in ({cfg.sigma_min}, {cfg.sigma_max}], the grid's range")
    scale = teacher_scale(cfg)
    torch.manual_seed(cfg.seed)
    lora = stage1["lora"] if stage1 is not None else {"rank": cfg.lora_rank, "convs": cfg.lora_convs}
    lora = {**lora, "blends": True}
    # full fine-tuning (rank 0) trains the base itself: only then is the teacher a copy of its own
    own = copy.deepcopy(base).eval().requires_grad_(False) if lora["rank"] == 0 else None
    f, params = base, to_student(base, cfg.sigma_min, lora, dtype)
    if stage1 is not None:
        load_trained(f, stage1["ema"]["student"], fresh=("delta",))
    teacher = own if own is not None else teacher_of(f)
    dcfg = type(cfg)(**stage1["config"]) if stage1 is not None else cfg   # disc as Stage 1 built it
    disc = Discriminator(ae, dcfg.disc_backbone, dcfg.disc_input, dcfg.disc_r or None, dinov2=cfg.dinov2).to(device)
    if stage1 is not None:
        disc.load_state_dict(stage1["models"]["disc"])
    target = EMA(f, cfg.target_decay, warmup=False)                  # theta-, updated by the loop each step
    opts = {"student": torch.optim.Adam(params, lr=cfg.stage2_lr), "disc": make_disc_optimizer(disc, cfg.disc_lr)}
    acd = ACD(sigma_grid(cfg.grid_size, cfg.sigma_min, cfg.sigma_max).to(device), cfg.m, scale, cfg.lambda_adv,
              cfg.huber_c, cfg.stage2_top, cfg.stage2_direct, cfg.direct_sigma, cfg.distill_weight)

    def f_target(*args):
        with target.swapped():
            return f(*args)

    def step(nets, batch, update):
        x0, cond = latents_and_condition(ae, batch)                                # (B, T, c, h, w)
        return acd.step(nets["student"], f_target, teacher, disc, x0, cond, update, nets["disc"])

    return {"models": {"student": f, "disc": disc}, "opts": opts, "ema": {"student": target}, "step": step,
            "extra": {"lora": lora}}
