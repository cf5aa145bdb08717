"""unet.py: SVD's architecture (parameter count, shapes), the temporal path, preconditioning, EDM loss,
gradient checkpointing, the EMA."""
import dataclasses

import pytest
import torch

import lora
import unet
from unet import Denoiser, UNetConfig, edm_loss, scalings

MICRO = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                   head_channels=16, context_dim=32, micro_dim=16)


def cond_for(B, c=4, h=8, w=8):
    return {"concat": torch.randn(B, c, h, w), "image": torch.randn(B, c, h, w), "micro": torch.rand(B, 3) * 10}


def test_svd_preset_has_the_reference_parameter_count():
    n = unet.count_parameters("svd")
    assert abs(n - unet.SVD_REFERENCE_PARAMS) / unet.SVD_REFERENCE_PARAMS < 0.01
    assert n == unet.SVD_REFERENCE_PARAMS            # and in fact exactly


@pytest.mark.parametrize("preset", ["tiny", "small", "svd"])
def test_shapes(preset):
    """Tiny latents for every preset; the full-size one on the meta device (shapes only)."""
    device = "meta" if preset == "svd" else "cpu"
    with torch.device(device):
        D = Denoiser.new(unet.PRESETS[preset])
        x = torch.randn(2, 3, 4, 8, 8)
        out = D(x, torch.tensor([0.5, 20.0]), cond_for(2))
    assert out.shape == (2, 3, 4, 8, 8) and out.dtype == torch.float32


def randomise(module, seed=0):
    """Move every parameter off its (often zero) initial value, so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def test_temporal_path_is_a_no_op_with_alpha_forced_to_one():
    torch.manual_seed(0)
    D = randomise(Denoiser.new(MICRO)).eval()
    x, cond, sigma = torch.randn(1, 4, 4, 8, 8), cond_for(1), torch.tensor([1.0])
    x2 = x.clone()
    x2[:, 2] += 1.0                                                     # change frame 2 only
    with torch.no_grad():
        video, video2 = D(x, sigma, cond), D(x2, sigma, cond)
        still, still2 = D(x, sigma, cond, image_only=True), D(x2, sigma, cond, image_only=True)
        alone = D(x[:, 1:2], sigma, cond, image_only=True)               # frame 1 as a one-frame video
    assert (video[:, 0] - video2[:, 0]).abs().max() > 1e-3            # the video layers mix frames
    assert torch.allclose(still[:, 0], still2[:, 0], atol=1e-5)       # alpha = 1: no information across time
    assert torch.allclose(still[:, 1], alone[:, 0], atol=1e-5)         # each frame is an image
    assert (still - video).abs().max() > 1e-3                          # and the blend did something


def test_preconditioning_identities():
    sd = 1.0
    sigma = torch.logspace(-3, 2.5, 50, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = scalings(sigma, sd)
    assert torch.allclose(c_in ** 2 * (sigma ** 2 + sd ** 2), torch.ones_like(sigma))   # unit-variance input
    # the network's target (x0 - c_skip x) / c_out has unit variance for data of std sd (EDM App. B.6)
    assert torch.allclose(((1 - c_skip) ** 2 * sd ** 2 + c_skip ** 2 * sigma ** 2) / c_out ** 2, torch.ones_like(sigma))
    assert (c_out < 0).all()                                            # SVD's v-prediction sign
    assert torch.allclose(c_noise, sigma.log() / 4)
    c_skip0, c_out0, _, _ = scalings(torch.tensor(0.0), sd)
    assert c_skip0 == 1 and c_out0 == 0                                 # sigma = 0: D(x) = x
    # the loss weight 1 / c_out^2 is EDM's lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2
    assert torch.allclose(1 / c_out ** 2, (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2)


def test_denoiser_combines_skip_and_network():
    """With the network's output forced to zero, D(x, sigma) = c_skip x; conditioning zeroed by keep."""
    D = Denoiser.new(MICRO).eval()                 # the output conv is zero-initialised: F = 0
    x, sigma = torch.randn(2, 3, 4, 8, 8), torch.tensor([0.3, 7.0])
    with torch.no_grad():
        out = D(x, sigma, cond_for(2))
    c_skip = scalings(sigma, 1.0)[0].view(2, 1, 1, 1, 1)
    assert torch.allclose(out, c_skip * x, atol=1e-6)
    randomise(D)
    c = cond_for(2)
    zeroed = {**c, "concat": torch.zeros_like(c["concat"])}
    with torch.no_grad():
        a = D(x, sigma, c, keep=torch.tensor([0.0, 1.0]))
        b = D(x, sigma, zeroed, keep=torch.tensor([0.0, 1.0]))
        full = D(x, sigma, c)
    assert torch.allclose(a[0], b[0], atol=1e-5)                       # keep = 0 ignores the image
    assert torch.allclose(a[1], full[1], atol=1e-5)


def test_teacher_overfits_a_batch():
    """EDM loss on a fixed batch with fixed noise falls: the network, conditioning and loss are wired."""
    torch.manual_seed(0)
    D = Denoiser.new(MICRO)
    x0, cond = torch.randn(4, 4, 4, 8, 8), cond_for(4)
    opt = torch.optim.Adam(D.parameters(), lr=1e-3)
    losses = []
    for _ in range(60):
        torch.manual_seed(1)                                             # the same sigmas and noise each step
        loss = edm_loss(D, x0, cond, 0.0, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    D = randomise(Denoiser.new(MICRO))
    D2 = Denoiser.new(dataclasses.replace(MICRO, checkpoint=True))
    D2.load_state_dict(D.state_dict())
    x0, cond = torch.randn(2, 3, 4, 8, 8), cond_for(2)
    grads = []
    for model in (D, D2):
        torch.manual_seed(3)
        edm_loss(model, x0, cond, 0.0, 1.0).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients_in_a_student():
    torch.manual_seed(0)
    f = randomise(Denoiser.new(MICRO))
    params = lora.to_student(f, 0.002, {"rank": 4, "convs": True, "blends": True})
    for p in params:                                        # B starts at zero: move it so A gets gradients
        p.data.add_(torch.randn_like(p) * 0.05)
    x0, cond = torch.randn(2, 3, 4, 8, 8), cond_for(2)
    grads = []
    for checkpointing in (False, True):
        f.unet.cfg.checkpoint = checkpointing
        f.zero_grad()
        torch.manual_seed(3)
        edm_loss(f, x0, cond, 0.0, 1.0).backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-5)


# ---------------------------------------------------------------------------------------- EMA

def test_ema_averages_the_trainable_weights_and_swaps_them_in():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    a[0].requires_grad_(False)                       # a frozen base layer: not averaged, not stored
    ema = unet.EMA(a, 0.95, warmup=False)
    before = [s.clone() for s in ema.shadow]
    with torch.no_grad():
        for p in a[1].parameters():
            p.add_(1.0)
    ema.update(step=0)
    for s0, s, p in zip(before, ema.shadow, a[1].parameters()):
        assert torch.allclose(s, 0.95 * s0 + 0.05 * p)
    assert set(ema.state_dict()) == {"1.weight", "1.bias"}
    own = [p.clone() for p in a.parameters()]
    with ema.swapped() as m:
        assert m is a and not m.training
        assert torch.equal(a[1].weight, ema.shadow[0]) and torch.equal(a[0].weight, own[0])
    assert a.training and all(torch.equal(p, q) for p, q in zip(a.parameters(), own))
    warm = unet.EMA(a, 0.999)                      # the evaluation EMA ramps: step 0 uses (1 + 0) / (10 + 0)
    start = warm.shadow[0].clone()
    with torch.no_grad():
        a[1].weight.add_(1.0)
    warm.update(step=0)
    assert torch.allclose(warm.shadow[0], 0.1 * start + 0.9 * a[1].weight)
