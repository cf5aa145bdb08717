"""Stage 1 of OSV, Latent GAN Pretraining (LGP): the pseudo-Huber distance and the training step.

docs/paper.md, "Stage 1". The student f_theta (the teacher plus LoRA, in the consistency
parametrisation of unet.scalings, so f(x, sigma_min) = x exactly) takes a real latent noised to a level
t_n of the 100-point grid straight to a clean latent. Its loss pulls that towards the real latent
(pseudo-Huber) and fools the latent discriminator (discriminator.py):

    L_g1 = 0.1 * ReLU(1 - disc(f_theta(x_tn, t_n))) + d(x_0, f_theta(x_tn, t_n))        (OSV, Stage 1)
    L_d1 = ReLU(1 - disc(x_0)) + ReLU(1 + disc(f_theta(x_tn, t_n)))

Two choices the paper leaves open, both decided on the paired ruler (docs/experiments.md): which levels
t_n are drawn (`LGP.draw_levels`: uniform on the grid as the paper, or a share at the top level by
--stage1-top), and which fakes meet the discriminator (`LGP.meets_disc`: ours, only those from levels
>= adv_min_sigma, sample by sample; 0 is the paper's form, worse on both seeds).

Read first: `LGP.step`, then `setup_stage1` (what `python train.py --stage 1` builds).
"""
import torch

from discriminator import Discriminator, accuracy, hinge_d, hinge_g, split_logits
from sample import sigma_grid
from lora import to_student
from unet import EMA, latents_and_condition


def pseudo_huber(a, b, c=0.001):
    """d(a, b) = sqrt((a - b)^2 + c^2) - c per element, averaged per video -> (B,). OSV takes c = 0.001
    from LCM, whose code applies it per element (LCM's `train_lcm_distill_sd_wds.py`); the norm over the
    whole video would make the 0.1-weighted adversarial term vanish beside it at any resolution."""
    return (torch.sqrt((a.float() - b.float()) ** 2 + c ** 2) - c).flatten(1).mean(1)


class LGP:
    """Stage 1's levels and hyperparameters, bound once. grid: the students' levels (N,), ascending;
    lambda_adv: OSV's 0.1; c: pseudo-Huber's c; top_share: the chance that a sample's level is the top
    one (where one-step sampling starts) rather than uniform on the grid; adv_min_sigma: the lowest
    level whose fakes meet the discriminator."""

    def __init__(self, grid, lambda_adv=0.1, c=0.001, top_share=0.0, adv_min_sigma=0.0):
        self.grid, self.lambda_adv, self.c = grid, lambda_adv, c
        self.top_share, self.adv_min_sigma = top_share, adv_min_sigma

    def draw_levels(self, B, device):
        """Each sample's t_n: the top level t_N with probability top_share, else uniform on the grid."""
        n = torch.randint(len(self.grid), (B,), device=device)
        top = torch.rand(B, device=device) < self.top_share
        return self.grid.to(device)[torch.where(top, len(self.grid) - 1, n)]                   # (B,)

    def meets_disc(self, sigma):
        """Which fakes the discriminator judges, sample by sample: those generated from a level >=
        adv_min_sigma. Below sigma_data = 1 the noisy input already shows the clip, f's output
        reconstructs its real latent, and calling one fake and the other real contradicts itself."""
        return sigma >= self.adv_min_sigma

    def step(self, f, disc, x0, cond, update, disc_wrapped=None):
        """One Stage 1 step on real latents x0 (B, T, c, h, w). f: the student; disc: the discriminator,
        used in the generator's loss (its gradient goes to the student alone); disc_wrapped: the same
        module as the loop wraps it (DDP) for its own loss, default disc. update(loss, name)
        backpropagates `loss` into the parameters of optimiser `name` ("student" or "disc") only."""
        B = len(x0)
        sigma = self.draw_levels(B, x0.device)                                                # t_n
        x_t = x0 + sigma.view(B, 1, 1, 1, 1) * torch.randn_like(x0)                          # x_{t_n}
        fake = f(x_t, sigma, cond)                                                            # f_theta(x_tn, t_n)
        judged = self.meets_disc(sigma)                                                       # (B,) bool
        n_fake = int(judged.sum())                  # may be 0 (at batch 1, often): no adversarial term

        # generator: L_g1 = d(x_0, f) + 0.1 ReLU(1 - disc(f))
        rec = pseudo_huber(fake, x0, self.c).mean()
        adv = hinge_g(disc(fake[judged])) if n_fake else rec.new_zeros(())
        update(rec + self.lambda_adv * adv, "student")

        # discriminator: L_d1, every real latent "real", the judged fakes "fake"; one pass over both
        logits = (disc_wrapped or disc)(torch.cat([x0, fake.detach()[judged]]))
        real_logits, fake_logits = split_logits(logits, B, B + n_fake)
        loss_d = hinge_d(real_logits, fake_logits)
        update(loss_d, "disc")
        return {"loss": rec + self.lambda_adv * adv, "rec": rec, "adv_g": adv, "loss_d": loss_d,
                "acc_real": accuracy(real_logits, True), "acc_fake": accuracy(fake_logits, False)}


def make_disc_optimizer(disc, lr):
    """Adam on the discriminator's trainable parts, betas (0, 0.99) as StyleGAN-T (ours for OSV)."""
    return torch.optim.Adam([p for p in disc.parameters() if p.requires_grad], lr=lr, betas=(0.0, 0.99))


def setup_stage1(cfg, ae, teacher, device, dtype=None):
    """`python train.py --stage 1`: the student from the teacher (in place: its weights become the
    frozen base, stored in `dtype`) and the EMA of its adapters, a fresh discriminator, their
    optimisers and the step. Returns the parts train.py's loop assembles."""
    torch.manual_seed(cfg.seed)
    lora = {"rank": cfg.lora_rank, "convs": cfg.lora_convs}
    f, params = teacher, to_student(teacher, cfg.sigma_min, lora, dtype)
    disc = Discriminator(ae, cfg.disc_backbone, cfg.disc_input, cfg.disc_r or None, dinov2=cfg.dinov2).to(device)
    ema = EMA(f, cfg.ema_decay)
    opts = {"student": torch.optim.Adam(params, lr=cfg.stage1_lr), "disc": make_disc_optimizer(disc, cfg.disc_lr)}
    lgp = LGP(sigma_grid(cfg.grid_size, cfg.sigma_min, cfg.sigma_max).to(device), cfg.lambda_adv, cfg.huber_c,
              cfg.stage1_top, cfg.adv_min_sigma)

    def step(nets, batch, update):
        x0, cond = latents_and_condition(ae, batch)                                # (B, T, c, h, w)
        return lgp.step(nets["student"], disc, x0, cond, update, nets["disc"])

    return {"models": {"student": f, "disc": disc}, "opts": opts, "ema": {"student": ema}, "step": step,
            "extra": {"lora": lora}}
