"""Stage 1 of OSV, Latent GAN Pretraining (LGP): the losses and the training step.

../shared/PAPER.md, "Stage 1". The student f_theta (the teacher plus LoRA, in the consistency
parametrisation of unet.scalings, so f(x, sigma_min) = x exactly) takes a real latent noised to a level
t_n of the 100-point grid straight to a clean latent. Its loss pulls that towards the real latent
(pseudo-Huber) and fools the latent discriminator (discriminator.py):

    L_g1 = 0.1 * ReLU(1 - D(f_theta(x_tn, t_n))) + d(x_0, f_theta(x_tn, t_n))        (OSV, Stage 1)
    L_d1 = ReLU(1 - D(x_0)) + ReLU(1 + D(f_theta(x_tn, t_n)))

The generator's adversarial term is OSV's clipped hinge ReLU(1 - D(fake)), not the usual -D(fake): once
D scores a fake above 1 it stops pushing. One departure (measured, README "Stage 1"): only fakes from
levels t_n >= adv_min_sigma (1 by default; 0 is the paper's form) enter the adversarial terms, G's and
D's fake side: below it f reconstructs its input rather than generating. Read first: `lgp_step`, then
the three losses above it.
"""
import torch
import torch.nn.functional as F

from sample import karras_sigmas


def sigma_grid(n=100, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """The paper's grid t_1 < ... < t_N of N = 100 levels ("uniformly samples 100 timesteps"; the map to
    sigma is not given). Ours: Karras levels between the teacher's sigma_min and sigma_max, as
    AnimateLCM-SVD's N = 100 grid (rho 7), ascending, so index n and n + m read as in OSV Eq. (8)."""
    return karras_sigmas(n, sigma_min, sigma_max, rho)[:-1].flip(0).float()        # (N,), grid[0] = sigma_min


def pseudo_huber(a, b, c=0.001):
    """d(a, b) = sqrt((a - b)^2 + c^2) - c per element, averaged per video -> (B,). OSV takes c = 0.001
    from LCM, whose code applies it per element (LCM's `train_lcm_distill_sd_wds.py`); the norm over the
    whole video would make the 0.1-weighted adversarial term vanish beside it at any resolution."""
    return (torch.sqrt((a.float() - b.float()) ** 2 + c ** 2) - c).flatten(1).mean(1)


def hinge_d(real_logits, fake_logits):
    """The discriminator's hinge loss, ReLU(1 - D(real)) + ReLU(1 + D(fake)), each head's logits averaged,
    then the heads averaged (StyleGAN-T, PCM)."""
    return torch.stack([F.relu(1 - r.float()).mean() + F.relu(1 + f.float()).mean()
                        for r, f in zip(real_logits, fake_logits)]).mean()


def hinge_g(fake_logits):
    """OSV's generator term: the clipped hinge ReLU(1 - D(fake)), averaged like hinge_d."""
    return torch.stack([F.relu(1 - f.float()).mean() for f in fake_logits]).mean()


def accuracy(logits, real):
    """Share of logits on the right side of 0 (real > 0, fake < 0), over all heads' outputs."""
    flat = torch.cat([x.float().flatten() for x in logits])
    return ((flat > 0) if real else (flat < 0)).float().mean()


def split(logits, n_a=1, n=2):
    """Logits of D(cat([a, b])) for n clips -> (logits of a, logits of b), a the first n_a clips (default:
    half). Every head keeps the batch outermost, with the same number of rows for every clip."""
    return [x[:n_a * len(x) // n] for x in logits], [x[n_a * len(x) // n:] for x in logits]


def lgp_step(f, D, D_plain, x0, cond, grid, update_g, update_d, lambda_adv=0.1, c=0.001, top_share=0.0,
             adv_min_sigma=0.0):
    """One Stage 1 step on real latents x0 (B, T, c, h, w). f: the student (maybe DDP-wrapped); D the
    discriminator used for its own update (maybe DDP-wrapped), D_plain the same module unwrapped, used
    inside the generator's loss (its gradients there reach D's parameters; update_d clears them first).
    update_g(loss) / update_d(loss) backpropagate and step one optimiser. Each sample's level t_n is
    the grid's top level with probability top_share (where one-step sampling starts), else uniform.
    Only fakes from levels >= adv_min_sigma meet the discriminator (README, "Stage 1"): below sigma_data
    = 1 the noisy input already shows the clip, so f's output is a reconstruction of the real latent, and
    asking D to call it fake and the real one real contradicts itself."""
    B = len(x0)
    n = torch.randint(len(grid), (B,), device=x0.device)                            # t_n, uniform on the grid
    top = torch.rand(B, device=x0.device) < top_share                              # ... or the top level t_N
    n = torch.where(top, len(grid) - 1, n)
    sigma = grid.to(x0.device)[n]
    x_t = x0 + sigma.view(B, 1, 1, 1, 1) * torch.randn_like(x0)
    fake = f(x_t, sigma, cond)                                                       # f_theta(x_tn, t_n)
    # the fakes D judges: those generated from a level >= adv_min_sigma (at least the batch's highest)
    gen = sigma >= torch.clamp(sigma.max(), max=adv_min_sigma)

    # generator: L_g1 = d(x_0, f) + 0.1 * ReLU(1 - D(f))
    rec = pseudo_huber(fake, x0, c).mean()
    adv = hinge_g(D_plain(fake[gen]))
    update_g(rec + lambda_adv * adv)

    # discriminator: L_d1, every real latent as "real"; one pass over both (one DDP forward)
    real_logits, fake_logits = split(D(torch.cat([x0, fake.detach()[gen]])), B, B + int(gen.sum()))
    loss_d = hinge_d(real_logits, fake_logits)
    update_d(loss_d)
    return {"loss": rec + lambda_adv * adv, "rec": rec, "adv_g": adv, "loss_d": loss_d,
            "acc_real": accuracy(real_logits, True), "acc_fake": accuracy(fake_logits, False)}


# ----------------------------------------------------------------------------------------------
# What both student stages hand train.py's loop (used by distill.py too), and the Stage 1 setup

def student_videos(f, ae, run, cfg, n, steps):
    """n held-out clips and a student's videos from their first frames (consistency sampler, no CFG)."""
    from sample import generate
    from unet import condition
    b = run.eval_batch(n)
    cond = condition(ae, b["video"], b["fps"], b["motion"], torch.full((n,), 0.02, device=run.device))
    z, _ = generate(f, cond, cfg.num_frames, steps, 1.0, "consistency", cfg.sigma_min, cfg.sigma_max,
                    seed=cfg.seed, grid_size=cfg.grid_size)
    return b["video"], ae.decode_video(z).clamp(-1, 1)


def student_stage(name, f, disc, opts, step, target, ae, ae_config, ucfg, run, cfg, **extra):
    """The Stage that Stages 1 and 2 hand the loop: student and discriminator, their optimisers, the
    EMA (`target`) that samples, 1-step sample videos, the end-of-stage measurement, what loading needs."""
    from data import write_video
    from train import Stage

    def sample(path):
        real, fake = student_videos(target.model, ae, run, cfg, 4, 1)
        write_video(path, torch.cat([real, fake]), fps=8, ncol=4)          # top: real; bottom: 1 step

    def finish():
        return {"diagnostics": report_student(name, target.model, ae, run, cfg)}

    return Stage({"student": f, "disc": disc}, opts, step, {"student": target}, sample, finish, cosine=False,
                 extra={"unet_config": ucfg, "ae_config": ae_config, "ae_state": ae.state_dict(),
                        "sigma_min": cfg.sigma_min, **extra})


def report_student(name, f, ae, run, cfg, steps=1):
    """The end-of-stage printout: a student's 1-step diagnostics on up to 64 held-out first frames."""
    from evaluate import diagnostics
    n = min(64, cfg.eval_clips)
    real, fake = student_videos(f, ae, run, cfg, n, steps)
    d = diagnostics(fake, real, real[:, 0])
    if run.master:
        print(f"{name}, {steps} step (NFE {steps}) on {n} {run.eval_name}: first-frame PSNR "
              f"{d['first_frame_psnr']:.2f} dB, static-video rate {d['static_rate']:.3f}, motion relative to "
              f"real {d['motion_ratio']:.3f}")
    return d



def setup_stage1(cfg, run):
    """`python train.py --stage 1`: networks, optimisers and the step for train.py's shared loop. The
    student and its EMA start from the teacher's EMA weights; the discriminator from scratch."""
    from discriminator import Discriminator
    from train import EMA, latents_and_condition, load_ae, load_teacher, make_student
    ae, ae_config = load_ae(run)
    teacher, ucfg = load_teacher(run)
    torch.manual_seed(cfg.seed)
    f, params = make_student(teacher, cfg.sigma_min, cfg.lora_rank, cfg.lora_convs)
    del teacher
    disc = Discriminator(ae, cfg.disc_backbone, cfg.disc_input, cfg.disc_r or None).to(run.device)
    ema = EMA(f, cfg.ema_decay)
    opt_g = torch.optim.Adam(params, lr=cfg.stage1_lr)
    opt_d = torch.optim.Adam([p for p in disc.parameters() if p.requires_grad], lr=cfg.disc_lr, betas=(0.0, 0.99))
    grid = sigma_grid(cfg.grid_size, cfg.sigma_min, cfg.sigma_max).to(run.device)

    def step(nets, batch, update):
        x0, cond = latents_and_condition(ae, batch)                                # (B, T, c, h, w)

        def update_d(loss):
            opt_d.zero_grad(set_to_none=True)      # drop what the generator's loss left in D's gradients
            update(loss, "disc")
        return lgp_step(nets["student"], nets["disc"], disc, x0, cond, grid, lambda loss: update(loss, "student"),
                        update_d, cfg.lambda_adv, cfg.huber_c, cfg.stage1_top, cfg.adv_min_sigma)

    return student_stage("stage 1", f, disc, {"student": opt_g, "disc": opt_d}, step, ema, ae, ae_config, ucfg, run,
                         cfg, lora={"rank": cfg.lora_rank, "convs": cfg.lora_convs})
