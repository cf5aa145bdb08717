"""discriminator.py: the upsampler and heads' shapes, the frozen backbones, the DINOv2 adapter, the decoded
ablation, the hinge losses on hand-computed values, the benchmark."""
import copy

import pytest
import torch
import torch.nn as nn

import discriminator as dm
from autoencoder import AEConfig, AutoEncoder
from data import UserError
from discriminator import accuracy, hinge_d, hinge_g, split_logits

AE = AEConfig(channels=(16, 32, 64))          # the tiny preset's autoencoder: 1/4 resolution


def tiny_ae():
    torch.manual_seed(0)
    return AutoEncoder(AE).eval()


@pytest.mark.parametrize("backbone", ["ae", "vit"])
def test_upsampler_and_head_shapes(backbone):
    disc = dm.Discriminator(tiny_ae(), backbone)
    assert disc.r == 2                                     # f = 4 -> r = 2: half the video's resolution
    z = torch.randn(2, 8, 4, 8, 8)                         # (B, T, c, h, w): 32x32 frames, 8 frames
    assert disc.images(z).shape == (16, 3, 16, 16)         # (B*T, 3, r h, r w)
    logits = disc(z)
    assert len(logits) == 2 * len(disc.backbone.channels)
    for spatial, temporal in zip(logits[::2], logits[1::2]):
        assert spatial.shape[:2] == (16, 1)                # one logit map per frame
        assert temporal.shape[:2] == (2, 8)                # one logit per frame and position, along time
        assert spatial.shape[2:] == temporal.shape[2:]


def test_decoded_input_sees_full_resolution_pixels():
    disc = dm.Discriminator(tiny_ae(), "ae", "decoded")
    z = torch.randn(1, 8, 4, 8, 8, requires_grad=True)
    assert disc.images(z).shape == (8, 3, 32, 32) and disc.upsample is None
    hinge_g(disc(z)).backward()
    assert z.grad.abs().sum() > 0                          # the generator gets a gradient through the decoder
    assert all(p.grad is None for p in disc.ae.parameters())  # and the autoencoder none


@pytest.mark.parametrize("backbone", ["ae", "vit"])
def test_backbone_is_frozen(backbone):
    torch.manual_seed(0)
    disc = dm.Discriminator(tiny_ae(), backbone).train()
    before = copy.deepcopy(disc.backbone.state_dict())
    opt = torch.optim.Adam([p for p in disc.parameters() if p.requires_grad], lr=1e-2)
    heads_before = disc.spatial[0][0].weight.clone()
    fake = torch.randn(2, 8, 4, 8, 8, requires_grad=True)
    for _ in range(2):
        opt.zero_grad()
        dm.disc_train_step(disc, torch.randn(2, 8, 4, 8, 8), fake)
        opt.step()
    assert all(p.grad is None for p in disc.backbone.parameters())
    assert all(torch.equal(before[k], v) for k, v in disc.backbone.state_dict().items())
    assert not disc.backbone.training
    assert not torch.equal(heads_before, disc.spatial[0][0].weight)   # while the heads did train
    assert fake.grad.abs().sum() > 0                                   # and the gradient reaches the generator


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
    monkeypatch.setattr(dm, "load_dinov2", lambda path="": fake)
    disc = dm.Discriminator(tiny_ae(), "dinov2")
    z = torch.randn(1, 8, 4, 8, 8, requires_grad=True)
    logits = disc(z)
    assert fake.calls[0] == ((8, 3, 224, 224), (2, 5, 8, 11), True)   # ViT-S/14's four evenly spaced blocks
    assert len(logits) == 8 and logits[0].shape == (8, 1, 16, 16)
    hinge_g(logits).backward()
    assert all(p.grad is None for p in fake.parameters())              # frozen: no gradient after a backward
    assert disc.upsample[0].weight.grad.abs().sum() > 0                # which did reach the upsampler
    assert z.grad.abs().sum() > 0                                      # and the generator's latents


def test_dinov2_keeps_a_non_square_videos_aspect(monkeypatch):
    fake = FakeDINO()
    monkeypatch.setattr(dm, "load_dinov2", lambda path="": fake)
    disc = dm.Discriminator(tiny_ae(), "dinov2")
    logits = disc(torch.randn(1, 3, 4, 5, 9))                          # SVD's 320x576 has latents 40x72
    assert fake.calls[0][0] == (3, 3, 224, 406)                       # short side 224, long 224 * 9 / 5 -> 29 patches
    assert logits[0].shape == (3, 1, 16, 29) and logits[1].shape == (1, 3, 16, 29)


@pytest.mark.parametrize("backbone", ["ae", "vit"])
def test_heads_accept_non_square_latents(backbone):
    disc = dm.Discriminator(tiny_ae(), backbone)
    logits = disc(torch.randn(2, 3, 4, 6, 10))
    assert all(x.shape[0] in (2, 2 * 3) for x in logits)               # batch (and frames) outermost
    real, fake = split_logits(logits)
    assert torch.isfinite(hinge_d(real, fake)) and torch.isfinite(hinge_g(fake))


def test_dinov2_unavailable_is_a_one_line_error(monkeypatch):
    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "load", offline)
    with pytest.raises(UserError) as e:
        dm.load_dinov2()
    assert "\n" not in str(e.value) and "--disc-backbone" in str(e.value)


def test_hinge_losses_on_hand_computed_values():
    # hinge_d: head 1 real [2, 0] -> relu(1-2)=0, relu(1-0)=1 -> 0.5; fake [-3, 0.5] -> 0, 1.5 -> 0.75
    #          head 2 real [0.5] -> 0.5; fake [-0.5] -> 0.5; mean over heads (1.25 + 1.0) / 2
    real = [torch.tensor([2.0, 0.0]), torch.tensor([0.5])]
    fake = [torch.tensor([-3.0, 0.5]), torch.tensor([-0.5])]
    assert torch.isclose(hinge_d(real, fake), torch.tensor(1.125))
    # hinge_g (OSV's clipped hinge): head 1 relu(1+3)=4, relu(0.5)=0.5 -> 2.25; head 2 relu(1.5) -> 1.5
    assert torch.isclose(hinge_g(fake), torch.tensor(1.875))
    assert torch.isclose(hinge_g([torch.tensor([5.0])]), torch.tensor(0.0))   # clipped: no push past 1
    assert torch.isclose(accuracy(real, True), torch.tensor(2 / 3))
    assert torch.isclose(accuracy(fake, False), torch.tensor(2 / 3))
    # no fake judged (Stage 1 at batch 1, a level below adv_min_sigma): the real term alone, accuracy nan
    none = [torch.zeros(0), torch.zeros(0)]
    assert torch.isclose(hinge_d(real, none), torch.tensor((0.5 + 0.5) / 2)) and torch.isnan(accuracy(none, False))


def test_split_logits_equal_and_unequal_parts_of_every_head():
    logits = [torch.arange(10.0), torch.arange(5.0)]                          # 2 rows per clip, then 1
    a, b = split_logits(logits, 3, 5)
    assert [x.tolist() for x in a] == [[0, 1, 2, 3, 4, 5], [0, 1, 2]]
    assert [x.tolist() for x in b] == [[6, 7, 8, 9], [3, 4]]
    a, b = split_logits([torch.arange(4.0)])                                  # default: halves
    assert a[0].tolist() == [0, 1] and b[0].tolist() == [2, 3]


def test_bench_runs():
    res = dm.bench(32, 8, (16, 32, 64), "ae", batch=1, reps=1)
    assert set(res) == {"latent", "decoded"} and all(t > 0 and m > 0 and g is None for t, m, g in res.values())
    assert res["latent"][1] < res["decoded"][1]          # decoding saves more activations for backward


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_cuda_kernel_time():
    res = dm.bench(32, 8, (16, 32, 64), "ae", batch=2, reps=2, device="cuda")
    for t, m, g in res.values():
        assert 0 < g < t and m > 0            # the GPU's busy time is part of the step's wall time
    assert res["latent"][2] < res["decoded"][2]     # decoding is real GPU work
