"""gan.py: the pseudo-Huber distance, the Stage 1 step (what it updates, which levels it draws, which
fakes meet the discriminator, at batch 8, 2 and 1) and a Stage 1 smoke run."""
import json
import os
import shutil

import pytest
import torch

import discriminator as dm
import lora
import sample
import train
import unet
from autoencoder import AEConfig, AutoEncoder
from gan import LGP, pseudo_huber
from sample import sigma_grid


def micro_denoiser():
    torch.manual_seed(0)
    cfg = unet.UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                          head_channels=8, context_dim=16, micro_dim=8)
    return unet.Denoiser.new(cfg, 4).eval()


def cond_for(B, h=8):
    return {"concat": torch.randn(B, 4, h, h), "image": torch.randn(B, 4, h, h),
            "micro": torch.tensor([[12.0, 5.0, 0.02]]).repeat(B, 1)}


def no_update(loss, name):
    pass


def test_pseudo_huber_on_hand_computed_values():
    # per element: sqrt(d^2 + c^2) - c; d = 0 -> 0, d = 3 -> sqrt(9 + 1e-6) - 1e-3; averaged per video
    a, b = torch.tensor([[0.0, 3.0]]), torch.zeros(1, 2)
    assert torch.isclose(pseudo_huber(a, b), torch.tensor([((9 + 1e-6) ** 0.5 - 1e-3) / 2]))
    assert torch.isclose(pseudo_huber(a, b, c=1.0), torch.tensor([((9 + 1.0) ** 0.5 - 1.0) / 2]))


def test_lgp_step_updates_student_and_discriminator():
    torch.manual_seed(0)
    f = micro_denoiser()
    params = lora.to_student(f, 0.002, {"rank": 4, "convs": True})
    torch.manual_seed(0)
    disc = dm.Discriminator(AutoEncoder(AEConfig(channels=(16, 32, 64))).eval(), "ae").train()
    opts = {"student": torch.optim.Adam(params, lr=1e-2),
            "disc": torch.optim.Adam([p for p in disc.parameters() if p.requires_grad], lr=1e-2)}
    g0 = [p.clone() for p in params]
    d0 = [p.clone() for p in disc.parameters()]

    def update(loss, name):      # the loop's contract: this loss's gradient reaches this optimiser's weights alone
        loss.backward(inputs=[p for g in opts[name].param_groups for p in g["params"]])
    stats = LGP(sigma_grid()).step(f, disc, torch.randn(2, 8, 4, 8, 8), cond_for(2), update)
    for o in opts.values():                         # the loop steps every optimiser after the step
        o.step()
    assert all(torch.isfinite(v) for v in stats.values())
    assert any(not torch.equal(a, b) for a, b in zip(g0, params))
    changed = [not torch.equal(a, b) for a, b in zip(d0, disc.parameters())]
    assert any(changed)
    frozen = {id(p) for p in disc.backbone.parameters()}
    assert not any(c for c, p in zip(changed, disc.parameters()) if id(p) in frozen)


@pytest.mark.parametrize("top_share", [0.0, 1.0])
def test_lgp_step_draws_levels_from_the_grid_with_a_top_share(top_share):
    grid, seen = sigma_grid(), []

    def f(x, sigma, cond):                        # records the levels it is asked for; output keeps a graph
        seen.append(sigma)
        return x * torch.ones((), requires_grad=True)
    disc = lambda x: [x.mean((1, 2, 3, 4))]       # noqa: E731
    torch.manual_seed(0)
    LGP(grid, top_share=top_share).step(f, disc, torch.randn(64, 2, 1, 2, 2), None, no_update)
    levels = seen[0]
    assert all(bool((grid == s).any()) for s in levels)                          # every level is a grid point
    assert bool((levels == grid[-1]).all()) == (top_share == 1.0)
    if top_share == 0.0:
        assert len(levels.unique()) > 20                                         # uniform: many levels


@pytest.mark.parametrize("B", [1, 2, 8])
def test_lgp_draws_follow_the_top_share_at_any_batch_size(B):
    """Each sample draws its own level: P(top) = share + (1 - share) / N, whatever the batch."""
    grid, share = sigma_grid(), 0.5
    lgp = LGP(grid, top_share=share)
    torch.manual_seed(0)
    levels = torch.cat([lgp.draw_levels(B, "cpu") for _ in range(4000 // B)])
    top = (levels == grid[-1]).float().mean().item()
    expected = share + (1 - share) / len(grid)
    assert abs(top - expected) < 4 * (expected * (1 - expected) / len(levels)) ** 0.5


@pytest.mark.parametrize("adv_min_sigma", [0.0, 1.0, 100.0])
def test_lgp_step_shows_the_discriminator_only_generated_fakes(adv_min_sigma):
    """Every real latent meets disc; a fake only if its own level is >= adv_min_sigma; the generator's
    adversarial term judges the same fakes. None judged: no adversarial term, disc sees the reals alone."""
    grid, levels, d_inputs = sigma_grid(), [], []

    def f(x, sigma, cond):                        # tags each output with its level, keeps a graph
        levels.append(sigma)
        return sigma.view(-1, 1, 1, 1, 1).expand_as(x) * torch.ones((), requires_grad=True)

    def disc(x):                                  # two heads with different rows per clip (as ours)
        d_inputs.append(x.detach())
        return [x.mean((2, 3, 4)).flatten(), x.mean((1, 2, 3, 4))]
    x0 = torch.full((32, 2, 1, 2, 2), -1.0)       # reals are -1, fakes their level
    torch.manual_seed(0)
    stats = LGP(grid, adv_min_sigma=adv_min_sigma).step(f, disc, x0, None, no_update)
    sigma = levels[0]
    keep = sigma >= adv_min_sigma
    d_seen = d_inputs[-1][:, 0, 0, 0, 0]
    assert torch.equal(d_seen[:32], x0[:, 0, 0, 0, 0])                         # every real ...
    assert torch.equal(d_seen[32:], sigma[keep])                               # ... and the kept fakes
    if adv_min_sigma == 0.0:                                                   # the paper's form: every fake
        assert bool(keep.all())
    elif adv_min_sigma == 1.0:                                                 # some, all from levels >= 1
        assert 0 < int(keep.sum()) < 32 and bool((sigma[keep] >= 1.0).all())
    if keep.any():
        assert len(d_inputs) == 2 and torch.equal(d_inputs[0][:, 0, 0, 0, 0], sigma[keep])   # the generator's term
    else:                                                                      # above the grid: none judged
        assert len(d_inputs) == 1 and stats["adv_g"] == 0 and torch.isnan(stats["acc_fake"])
        # disc's loss is its real term alone: ReLU(1 - (-1)) = 2 on both heads
        assert torch.isclose(stats["loss_d"], torch.tensor(2.0))


@pytest.mark.parametrize("B", [1, 2])
def test_lgp_sigma_rule_holds_at_small_batches(B):
    grid = sigma_grid(100, 0.002, 8.0)
    lgp = LGP(grid, adv_min_sigma=1.0)
    torch.manual_seed(0)
    judged = torch.cat([lgp.meets_disc(lgp.draw_levels(B, "cpu")) for _ in range(2000 // B)]).float().mean()
    expected = (grid >= 1.0).float().mean()                                   # the share of levels >= 1
    assert abs(judged - expected) < 0.05


@pytest.mark.parametrize("extra", [[], ["--disc-input", "decoded", "--lora-rank", "0"]])
def test_stage1_smoke_run(tiny_run, tmp_path, extra, capsys, fast_args, micro_args):
    out = str(tmp_path / "r")
    shutil.copytree(tiny_run, out)
    assert train.main(["--stage", "1", "--steps", "3", "--out", out, *micro_args, *fast_args, *extra]) == 0
    assert "stage 1, 1 step (NFE 1)" in capsys.readouterr().out
    recs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    recs = [r for r in recs if r.get("stage") == "1" and "loss" in r]
    assert len(recs) == 3
    for r in recs:                  # acc_fake is left out of a record whose steps judged no fake (levels < 1)
        for k in ("loss", "rec", "adv_g", "loss_d", "acc_real", *(["acc_fake"] if "acc_fake" in r else [])):
            assert torch.isfinite(torch.tensor(r[k]))
    ck = torch.load(os.path.join(out, "stage1.pt"), weights_only=False)
    assert ck["done"] and set(ck["models"]) == {"student", "disc"} and set(ck["opts"]) == {"student", "disc"}
    assert sample.main(["--ckpt", os.path.join(out, "stage1.pt"), "--index", "2",
                        "--out", str(tmp_path / "v.gif")]) == 0
    assert "1: 1 steps, 1 NFE" in capsys.readouterr().out
