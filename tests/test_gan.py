"""Stage 1: the latent discriminator, LoRA, the consistency boundary, the LGP losses and a smoke run."""
import copy
import json
import os
import shutil

import pytest
import torch
import torch.nn as nn

import discriminator as dm
import train
import unet
from autoencoder import AEConfig, AutoEncoder
from conftest import FAST, MICRO
from data import UserError
from gan import accuracy, hinge_d, hinge_g, lgp_step, pseudo_huber, sigma_grid, split
from sample import generate

AE = AEConfig(channels=(16, 32, 64))          # the tiny preset's autoencoder: 1/4 resolution


def tiny_ae():
    torch.manual_seed(0)
    return AutoEncoder(AE).eval()


def micro_denoiser():
    torch.manual_seed(0)
    cfg = unet.UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                          head_channels=8, context_dim=16, micro_dim=8)
    return unet.Denoiser(cfg, 4).eval()


def cond_for(B, h=8):
    return {"concat": torch.randn(B, 4, h, h), "image": torch.randn(B, 4, h, h),
            "micro": torch.tensor([[12.0, 5.0, 0.02]]).repeat(B, 1)}


@pytest.mark.parametrize("backbone", ["ae", "vit"])
def test_upsampler_and_head_shapes(backbone):
    D = dm.Discriminator(tiny_ae(), backbone)
    assert D.r == 2                                       # f = 4 -> r = 2: half the video's resolution
    z = torch.randn(2, 8, 4, 8, 8)                         # (B, T, c, h, w): 32x32 frames, 8 frames
    assert D.images(z).shape == (16, 3, 16, 16)            # (B*T, 3, r h, r w)
    logits = D(z)
    assert len(logits) == 2 * len(D.backbone.channels)
    for spatial, temporal in zip(logits[::2], logits[1::2]):
        assert spatial.shape[:2] == (16, 1)                # one logit map per frame
        assert temporal.shape[:2] == (2, 8)                # one logit per frame and position, along time
        assert spatial.shape[2:] == temporal.shape[2:]


def test_decoded_input_sees_full_resolution_pixels():
    D = dm.Discriminator(tiny_ae(), "ae", "decoded")
    z = torch.randn(1, 8, 4, 8, 8, requires_grad=True)
    assert D.images(z).shape == (8, 3, 32, 32) and D.upsample is None
    hinge_g(D(z)).backward()
    assert z.grad.abs().sum() > 0                          # the generator gets a gradient through the decoder
    assert all(p.grad is None for p in D.ae.parameters())  # and the autoencoder none


@pytest.mark.parametrize("backbone", ["ae", "vit"])
def test_backbone_is_frozen(backbone):
    torch.manual_seed(0)
    D = dm.Discriminator(tiny_ae(), backbone).train()
    before = copy.deepcopy(D.backbone.state_dict())
    opt = torch.optim.Adam([p for p in D.parameters() if p.requires_grad], lr=1e-2)
    heads_before = D.spatial[0][0].weight.clone()
    fake = torch.randn(2, 8, 4, 8, 8, requires_grad=True)
    for _ in range(2):
        opt.zero_grad()
        dm.disc_train_step(D, torch.randn(2, 8, 4, 8, 8), fake)
        opt.step()
    assert all(p.grad is None for p in D.backbone.parameters())
    assert all(torch.equal(before[k], v) for k, v in D.backbone.state_dict().items())
    assert not D.backbone.training
    assert not torch.equal(heads_before, D.spatial[0][0].weight)   # while the heads did train
    assert fake.grad.abs().sum() > 0                                # and the gradient reaches the generator


class FakeDINO(nn.Module):
    """DINOv2's interface (embed_dim, patch_size, blocks, get_intermediate_layers) on a tiny conv."""
    embed_dim, patch_size = 24, 14

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Identity() for _ in range(12))
        self.proj = nn.Conv2d(3, 24, 14, stride=14)
        self.calls = []

    def get_intermediate_layers(self, x, n, reshape):
        self.calls.append((tuple(x.shape), tuple(n), reshape))
        f = self.proj(x)
        return tuple(f * (i + 1) for i in range(len(n)))


def test_dinov2_adapter_with_a_stand_in(monkeypatch):
    fake = FakeDINO()
    monkeypatch.setattr(dm, "load_dinov2", lambda: fake)
    D = dm.Discriminator(tiny_ae(), "dinov2")
    logits = D(torch.randn(1, 8, 4, 8, 8))
    assert fake.calls[0] == ((8, 3, 224, 224), (2, 5, 8, 11), True)   # ViT-S/14's four evenly spaced blocks
    assert len(logits) == 8 and logits[0].shape == (8, 1, 16, 16)
    assert all(p.grad is None for p in fake.parameters())


def test_dinov2_unavailable_is_a_one_line_error(monkeypatch):
    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "load", offline)
    with pytest.raises(UserError) as e:
        dm.load_dinov2()
    assert "\n" not in str(e.value) and "--disc-backbone" in str(e.value)


@pytest.mark.parametrize("convs", [False, True])
def test_lora_starts_equal_and_merges_exactly(convs):
    base = micro_denoiser()
    with torch.no_grad():           # no zero-initialised layers: every adapted weight reaches the output
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    f = copy.deepcopy(base)
    params = unet.add_lora(f, rank=4, convs=convs)
    loras = [m for m in f.modules() if isinstance(m, unet.LoRA)]
    assert loras and all(any(p is q for q in params) for m in loras for p in (m.A.weight, m.B.weight))
    assert len(params) == 2 * len(loras)                           # only the adapters train
    assert any(isinstance(m.base, nn.Conv3d) for m in loras) == convs
    x, sigma, cond = torch.randn(2, 8, 4, 8, 8), torch.tensor([0.5, 3.0]), cond_for(2)
    with torch.no_grad():
        assert torch.allclose(f(x, sigma, cond), base(x, sigma, cond), atol=1e-6)   # B = 0 at init
        for m in loras:
            m.B.weight.normal_(0, 0.05)
        w0 = loras[0].base.weight.clone()
        unmerged = f(x, sigma, cond)
        assert not torch.allclose(unmerged, base(x, sigma, cond), atol=1e-3)
        unet.merge_lora(f)
        assert torch.allclose(f(x, sigma, cond), unmerged, atol=1e-4)
        unet.merge_lora(f, False)
        assert torch.allclose(loras[0].base.weight, w0, atol=1e-6)


def test_lora_adapters_follow_the_base_device_and_dtype():
    # a network already moved (to the GPU, to bf16) gets adapters of the same device and dtype; "meta"
    # stands in for the GPU here (the bug this catches: adapters left on the CPU broke every CUDA run)
    for base in (nn.Linear(6, 5, device="meta"), nn.Conv2d(3, 4, 3, device="meta", dtype=torch.bfloat16)):
        m = unet.LoRA(base, rank=2, alpha=2)
        assert {p.device.type for p in m.parameters()} == {"meta"}
        assert {p.dtype for p in m.parameters()} == {base.weight.dtype}


def test_lora_rank_zero_is_full_fine_tuning():
    f = micro_denoiser()
    params = unet.add_lora(f, rank=0)
    assert len(params) == len(list(f.parameters())) and not any(isinstance(m, unet.LoRA) for m in f.modules())


def test_boundary_condition_is_exact():
    teacher = micro_denoiser()
    f, _ = train.make_student(teacher, 0.002, 4, True)
    x, cond = torch.randn(3, 8, 4, 8, 8), cond_for(3)
    with torch.no_grad():
        assert torch.equal(f(x, torch.full((3,), 0.002), cond), x)            # f(x, sigma_min) = x
        c_skip, c_out, _, _ = unet.scalings(torch.tensor(0.002), 1.0, 0.002)
        assert c_skip == 1 and c_out == 0
        # above sigma_min the student starts as the teacher, up to O(sigma_min)
        sigma = torch.tensor([1.0, 10.0, 80.0])
        assert torch.allclose(f(x, sigma, cond), teacher(x, sigma, cond), atol=1e-2)


def test_sigma_grid():
    g = sigma_grid(100, 0.002, 80.0)
    assert g.shape == (100,) and torch.all(g[1:] > g[:-1])
    assert abs(g[0].item() - 0.002) < 1e-8 and abs(g[-1].item() - 80.0) < 1e-4


def test_losses_on_hand_computed_values():
    # hinge_d: head 1 real [2, 0] -> relu(1-2)=0, relu(1-0)=1 -> 0.5; fake [-3, 0.5] -> 0, 1.5 -> 0.75
    #          head 2 real [0.5] -> 0.5; fake [-0.5] -> 0.5; mean over heads (1.25 + 1.0) / 2
    real = [torch.tensor([2.0, 0.0]), torch.tensor([0.5])]
    fake = [torch.tensor([-3.0, 0.5]), torch.tensor([-0.5])]
    assert torch.isclose(hinge_d(real, fake), torch.tensor(1.125))
    # hinge_g (OSV's clipped hinge): head 1 relu(1+3)=4, relu(0.5)=0.5 -> 2.25; head 2 relu(1.5) -> 1.5
    assert torch.isclose(hinge_g(fake), torch.tensor(1.875))
    assert torch.isclose(hinge_g([torch.tensor([5.0])]), torch.tensor(0.0))   # clipped: no push past 1
    assert torch.isclose(accuracy(real, True), torch.tensor(2 / 3))
    # pseudo-Huber, per element: sqrt(d^2 + c^2) - c; d = 0 -> 0, d = 3 -> sqrt(9 + 1e-6) - 1e-3
    a, b = torch.tensor([[0.0, 3.0]]), torch.zeros(1, 2)
    assert torch.isclose(pseudo_huber(a, b), torch.tensor([((9 + 1e-6) ** 0.5 - 1e-3) / 2]))


def test_lgp_step_updates_generator_and_discriminator():
    torch.manual_seed(0)
    f, params = train.make_student(micro_denoiser(), 0.002, 4, True)
    D = dm.Discriminator(tiny_ae(), "ae").train()
    opt_g = torch.optim.Adam(params, lr=1e-2)
    opt_d = torch.optim.Adam([p for p in D.parameters() if p.requires_grad], lr=1e-2)
    g0 = [p.clone() for p in params]
    d0 = [p.clone() for p in D.parameters()]

    def update(opt):
        def go(loss):
            loss.backward()
            opt.step()
            opt.zero_grad()
        return go

    def update_d(loss):
        opt_d.zero_grad()
        update(opt_d)(loss)
    stats = lgp_step(f, D, D, torch.randn(2, 8, 4, 8, 8), cond_for(2), sigma_grid(), update(opt_g), update_d)
    assert all(torch.isfinite(v) for v in stats.values())
    assert any(not torch.equal(a, b) for a, b in zip(g0, params))
    changed = [not torch.equal(a, b) for a, b in zip(d0, D.parameters())]
    assert any(changed)
    frozen = {id(p) for p in D.backbone.parameters()}
    assert not any(c for c, p in zip(changed, D.parameters()) if id(p) in frozen)


@pytest.mark.parametrize("top_share", [0.0, 1.0])
def test_lgp_step_draws_levels_from_the_grid_with_a_top_share(top_share):
    grid, seen = sigma_grid(), []

    def f(x, sigma, cond):                        # records the levels it is asked for; output keeps a graph
        seen.append(sigma)
        return x * torch.ones((), requires_grad=True)
    D = lambda x: [x.mean((1, 2, 3, 4))]          # noqa: E731
    torch.manual_seed(0)
    lgp_step(f, D, D, torch.randn(64, 2, 1, 2, 2), None, grid, lambda loss: None, lambda loss: None,
             top_share=top_share)
    levels = seen[0]
    assert all(bool((grid == s).any()) for s in levels)                          # every level is a grid point
    assert bool((levels == grid[-1]).all()) == (top_share == 1.0)
    if top_share == 0.0:
        assert len(levels.unique()) > 20                                         # uniform: many levels


@pytest.mark.parametrize("adv_min_sigma", [0.0, 1.0, 100.0])
def test_lgp_step_shows_the_discriminator_only_generated_fakes(adv_min_sigma):
    """Every real latent meets D; a fake only if its level is >= adv_min_sigma (at least the batch's
    highest, so D always sees one); the generator's adversarial term judges the same fakes."""
    grid, levels, d_inputs = sigma_grid(), [], []

    def f(x, sigma, cond):                        # tags each output with its level, keeps a graph
        levels.append(sigma)
        return sigma.view(-1, 1, 1, 1, 1).expand_as(x) * torch.ones((), requires_grad=True)

    def D(x):                                     # two heads with different rows per clip (as ours)
        d_inputs.append(x.detach())
        return [x.mean((2, 3, 4)).flatten(), x.mean((1, 2, 3, 4))]
    x0 = torch.full((32, 2, 1, 2, 2), -1.0)       # reals are -1, fakes their level
    torch.manual_seed(0)
    lgp_step(f, D, D, x0, None, grid, lambda loss: None, lambda loss: None, adv_min_sigma=adv_min_sigma)
    sigma = levels[0]
    keep = sigma >= min(adv_min_sigma, float(sigma.max()))
    g_seen, d_seen = d_inputs[0][:, 0, 0, 0, 0], d_inputs[1][:, 0, 0, 0, 0]
    assert torch.equal(g_seen, sigma[keep])                                    # the generator's term
    assert torch.equal(d_seen[:32], x0[:, 0, 0, 0, 0])                         # every real ...
    assert torch.equal(d_seen[32:], sigma[keep])                               # ... and the kept fakes
    if adv_min_sigma == 0.0:                                                   # the paper's form: every fake
        assert bool(keep.all())
    elif adv_min_sigma == 1.0:                                                 # some, all from levels >= 1
        assert 0 < int(keep.sum()) < 32 and bool((sigma[keep] >= 1.0).all())
    else:                                                                      # above the grid: the highest
        assert bool((sigma[keep] == sigma.max()).all()) and int(keep.sum()) >= 1


def test_split_unequal_parts_of_every_head():
    logits = [torch.arange(10.0), torch.arange(5.0)]                          # 2 rows per clip, then 1
    a, b = split(logits, 3, 5)
    assert [x.tolist() for x in a] == [[0, 1, 2, 3, 4, 5], [0, 1, 2]]
    assert [x.tolist() for x in b] == [[6, 7, 8, 9], [3, 4]]


def test_consistency_sampler_counts_calls():
    f, _ = train.make_student(micro_denoiser(), 0.002, 4, True)
    cond = cond_for(2)
    z1, nfe1 = generate(f, cond, 8, 1, 1.0, "consistency", seed=3)
    z1b, _ = generate(f, cond, 8, 1, 1.0, "consistency", seed=3)
    assert nfe1 == 1 and torch.equal(z1, z1b)
    with torch.no_grad():       # one step = f(sigma_max z, sigma_max), z drawn as generate draws it
        g = torch.Generator().manual_seed(3)
        x = torch.randn(2, 8, 4, 8, 8, generator=g) * 80.0
        assert torch.allclose(z1, f(x, torch.full((2,), 80.0), cond), atol=1e-5)
    assert generate(f, cond, 8, 4, 1.0, "consistency")[1] == 4


@pytest.mark.parametrize("extra", [[], ["--disc-input", "decoded", "--lora-rank", "0"]])
def test_stage1_smoke_run(tiny_run, tmp_path, extra, capsys):
    out = str(tmp_path / "r")
    shutil.copytree(tiny_run, out)
    assert train.main(["--stage", "1", "--steps", "3", "--out", out, *MICRO, *FAST, *extra]) == 0
    assert "stage 1, 1 step (NFE 1)" in capsys.readouterr().out
    recs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    recs = [r for r in recs if r.get("stage") == "1" and "loss" in r]
    assert len(recs) == 3
    for r in recs:
        for k in ("loss", "rec", "adv_g", "loss_d", "acc_real", "acc_fake"):
            assert torch.isfinite(torch.tensor(r[k]))
    ck = torch.load(os.path.join(out, "stage1.pt"), weights_only=False)
    assert ck["done"] and set(ck["models"]) == {"student", "disc"} and set(ck["opts"]) == {"student", "disc"}
    from sample import main as sample_main
    assert sample_main(["--ckpt", os.path.join(out, "stage1.pt"), "--index", "2",
                        "--out", str(tmp_path / "v.gif")]) == 0
    assert "1: 1 steps, 1 NFE" in capsys.readouterr().out


def test_bench_runs():
    res = dm.bench("tiny", "ae", batch=1, reps=1)
    assert set(res) == {"latent", "decoded"} and all(t > 0 and m > 0 and g is None for t, m, g in res.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_cuda_kernel_time():
    res = dm.bench("tiny", "ae", batch=2, reps=2, device="cuda")
    for t, m, g in res.values():
        assert 0 < g < t and m > 0            # the GPU's busy time is part of the step's wall time
    assert res["latent"][2] < res["decoded"][2]     # decoding is real GPU work
