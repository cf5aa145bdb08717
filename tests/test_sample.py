"""sample.py: noise levels, Euler and Heun against the exact PF-ODE solution for Gaussian data, CFG, the
consistency samplers (k steps, the Time Travel Sampler's exact arithmetic), reading checkpoints, the CLI."""
import math
import os

import av
import numpy as np
import pytest
import torch

import lora
import sample
import unet
from sample import (cfg_scale, consistency_sigmas, generate, guided, karras_sigmas, sample_euler, sample_heun,
                    sample_tts, sigma_grid)


def test_karras_sigmas():
    s = karras_sigmas(10, 0.002, 80.0, 7.0)
    assert len(s) == 11 and s[-1] == 0
    assert s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002)
    assert (s[1:] < s[:-1]).all()
    # evenly spaced in sigma^(1/rho)
    r = s[:-1] ** (1 / 7)
    assert torch.allclose(r[1:] - r[:-1], (r[1] - r[0]).expand(9), atol=1e-9)


def test_sigma_grid_and_consistency_levels():
    g = sigma_grid(100, 0.002, 80.0)
    assert g.shape == (100,) and torch.all(g[1:] > g[:-1])
    assert abs(g[0].item() - 0.002) < 1e-8 and abs(g[-1].item() - 80.0) < 1e-4
    assert torch.allclose(g.double(), karras_sigmas(100, 0.002, 80.0)[:-1].flip(0), rtol=1e-6)
    s = consistency_sigmas(4, g)
    assert len(s) == 5 and s[0] == g[-1] and s[-1] == 0 and all(x in g for x in s[:-1])
    assert torch.all(s[1:] < s[:-1])


class Gaussian:
    """Data x0 ~ N(mu, s^2) per dimension. Its exact denoiser is E[x0 | x] = mu + s^2 / (s^2 + sigma^2)
    (x - mu), and the PF-ODE keeps (x - mu) / sqrt(s^2 + sigma^2) constant, so the exact sample from
    x_T at sigma_max is mu + (x_T - mu) s / sqrt(s^2 + sigma_max^2)."""

    def __init__(self, d=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(d, generator=g, dtype=torch.float64)
        self.s = torch.rand(d, generator=g, dtype=torch.float64) * 1.5 + 0.1

    def D(self, x, sigma):
        return self.mu + self.s ** 2 / (self.s ** 2 + sigma ** 2) * (x - self.mu)

    def exact(self, x_T, sigma_max):
        return self.mu + (x_T - self.mu) * self.s / (self.s ** 2 + sigma_max ** 2).sqrt()


def solve_error(sampler, n, gauss, x_T, sigma_max=80.0):
    x, calls = sampler(gauss.D, x_T.clone(), karras_sigmas(n, 0.002, sigma_max))
    return (x - gauss.exact(x_T, torch.tensor(sigma_max, dtype=torch.float64))).abs().max().item(), calls


def test_heun_and_euler_against_the_exact_pf_ode_solution():
    gauss = Gaussian()
    x_T = torch.randn(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 80.0
    errors = {}
    for name, sampler in (("euler", sample_euler), ("heun", sample_heun)):
        for n in (16, 32, 64, 128):
            errors[name, n], calls = solve_error(sampler, n, gauss, x_T)
            assert calls == (n if name == "euler" else 2 * n - 1)
    for n in (32, 64, 128):                                            # far more accurate at equal steps,
        assert errors["heun", n] < 0.2 * errors["euler", n]            # and more so as steps grow
    assert errors["heun", 128] / errors["euler", 128] < 0.5 * errors["heun", 32] / errors["euler", 32]
    # convergence order: doubling the steps divides the error by about 2^order
    heun_order = math.log2(errors["heun", 64] / errors["heun", 128])
    euler_order = math.log2(errors["euler", 64] / errors["euler", 128])
    assert 1.7 < heun_order < 2.5 and 0.8 < euler_order < 1.3, (heun_order, euler_order)


def test_cfg_scale_one_is_the_conditional_prediction():
    def denoiser(x, sigma, cond, keep=None):          # a toy denoiser that uses its conditioning
        keep = torch.ones(len(x)) if keep is None else keep
        return x * 0.5 + cond["concat"].view(-1, 1, 1) * keep.view(-1, 1, 1) + sigma.view(-1, 1, 1)

    x, sigma = torch.randn(3, 4, 2), torch.tensor(0.7)
    cond = {"concat": torch.randn(3)}
    D1, passes1 = guided(denoiser, cond, 1.0)
    Dr, passes2 = guided(denoiser, cond, torch.ones(1, 4, 1))         # a ramp of ones: two passes, same result
    expected = denoiser(x, sigma.expand(3), cond)
    assert passes1 == 1 and passes2 == 2
    assert torch.allclose(D1(x, sigma), expected) and torch.allclose(Dr(x, sigma), expected, atol=1e-6)
    Dw, _ = guided(denoiser, cond, 3.0)
    uncond = denoiser(x, sigma.expand(3), cond, keep=torch.zeros(3))
    assert torch.allclose(Dw(x, sigma), uncond + 3.0 * (expected - uncond), atol=1e-6)
    ramp = cfg_scale(1.0, 2.5, 8)
    assert ramp.shape == (1, 8, 1, 1, 1) and ramp[0, 0].item() == 1.0 and ramp[0, -1].item() == 2.5


def test_cli_errors(tmp_path, capsys):
    assert sample.main(["--ckpt", str(tmp_path / "none.pt"), "--index", "0"]) == 2
    assert "none.pt not found" in capsys.readouterr().err
    torch.save({"stage": "ae", "step": 1, "done": True}, tmp_path / "ae.pt")
    assert sample.main(["--ckpt", str(tmp_path / "ae.pt"), "--index", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "checkpoint of stage 'ae', not of teacher or 1 or 2" in err and "\n" not in err
    (tmp_path / "junk.pt").write_text("junk")
    assert sample.main(["--ckpt", str(tmp_path / "junk.pt"), "--index", "0"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_cli_generates_from_a_test_clip_and_an_image(tiny_run, tmp_path, capsys):
    ckpt = os.path.join(tiny_run, "teacher.pt")
    out = str(tmp_path / "grid.gif")
    assert sample.main(["--ckpt", ckpt, "--index", "3", "--steps", "2", "--num", "2", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "2 steps, 6 NFE" in printed and "s per video" in printed and os.path.isfile(out)
    img = str(tmp_path / "frame.png")
    with av.open(img, "w") as c:                                   # a 48x40 image: resized with a notice
        st = c.add_stream("png")
        st.width, st.height, st.pix_fmt = 48, 40, "rgb24"
        c.mux(st.encode(av.VideoFrame.from_ndarray(np.full((40, 48, 3), 90, np.uint8), format="rgb24")))
        c.mux(st.encode())
    assert sample.main(["--ckpt", ckpt, "--image", img, "--steps", "1", "--cfg", "1", "--out",
                        str(tmp_path / "v.mp4")]) == 0
    printed = capsys.readouterr().out
    assert "resized" in printed and "1 steps, 1 NFE" in printed
    assert sample.main(["--ckpt", ckpt, "--image", str(tmp_path / "missing.png"), "--out", out]) == 2
    assert "image not found" in capsys.readouterr().err


def micro_student():
    torch.manual_seed(0)
    cfg = unet.UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                          head_channels=8, context_dim=16, micro_dim=8)
    f = unet.Denoiser.new(cfg, 4).eval()
    lora.to_student(f, 0.002, {"rank": 4, "convs": True})
    return f


def test_consistency_sampler_counts_calls():
    f = micro_student()
    cond = {"concat": torch.randn(2, 4, 8, 8), "image": torch.randn(2, 4, 8, 8),
            "micro": torch.tensor([[12.0, 5.0, 0.02]]).repeat(2, 1)}
    z1, nfe1 = generate(f, cond, 8, 1, 1.0, "consistency", seed=3)
    z1b, _ = generate(f, cond, 8, 1, 1.0, "consistency", seed=3)
    assert nfe1 == 1 and torch.equal(z1, z1b)
    with torch.no_grad():       # one step = f(sigma_max z, sigma_max), z drawn as generate draws it
        g = torch.Generator().manual_seed(3)
        x = torch.randn(2, 8, 4, 8, 8, generator=g) * 80.0
        assert torch.allclose(z1, f(x, torch.full((2,), 80.0), cond), atol=1e-5)
    assert generate(f, cond, 8, 4, 1.0, "consistency")[1] == 4


def test_time_travel_sampler_exact_arithmetic():
    """Pinned on a known nonlinear f: f_A = f(x, T); e_A = (x - f_A) / T; x_s = f_A + s (e_0 + e_A) / sqrt(2)
    with e_0 the generator's next normal draw; the result is f(x_s, s). Any other two-call sampler (the
    text's / 2, fresh noise alone, re-reading the raw output at T) gives other numbers."""
    calls = []

    def f(x, sigma):
        calls.append(float(sigma))
        return torch.tanh(x / (1 + sigma)) + 0.1 * sigma * x

    x = torch.randn(2, 4, 2, 3, 3, dtype=torch.float64) * 8
    T, s = torch.tensor(8.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    out, n = sample_tts(f, x, T, s, torch.Generator().manual_seed(5))
    assert n == 2 and calls == [8.0, 0.5]
    e_0 = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).double()
    f_A = torch.tanh(x / 9) + 0.8 * x
    x_s = f_A + 0.5 * (e_0 + (x - f_A) / 8) / math.sqrt(2)
    assert torch.allclose(out, torch.tanh(x_s / 1.5) + 0.05 * x_s, rtol=0, atol=1e-12)
    other, _ = sample_tts(f, x, T, s, torch.Generator().manual_seed(6))
    assert (other - out).abs().max() > 1e-3                       # the fresh noise enters the result



def test_time_travel_sampler_as_the_text_reads():
    """Eq. (13) as written (docs/paper.md): x_s = f_A + s (e_0 + e_A) / 2; the second call's raw output
    F_B, recovered from f_B through the scalings at s, is re-read through the scalings at T:
    c_skip(T) (f_B + T e_B) + c_out(T) F_B with e_B = (e_0 + (x_s - f_B) / s) / 2."""
    skip = lambda sig: 1 / (sig ** 2 + 1)                                     # noqa: E731
    out_ = lambda sig: -sig / (sig ** 2 + 1).sqrt()                           # noqa: E731
    F_raw = lambda x, sig: torch.sin(x) * (1 + sig)                           # noqa: E731, a known network

    def f(x, sigma):
        return skip(sigma) * x + out_(sigma) * F_raw(x, sigma)

    x = torch.randn(2, 4, 2, 3, 3, dtype=torch.float64) * 8
    T, s = torch.tensor(8.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    out, n = sample_tts(f, x, T, s, torch.Generator().manual_seed(5), text_scalings=lambda sig: (skip(sig), out_(sig)))
    e_0 = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).double()
    f_A = f(x, T)
    x_s = f_A + 0.5 * (e_0 + (x - f_A) / 8) / 2
    f_B = f(x_s, s)
    e_B = (e_0 + (x_s - f_B) / 0.5) / 2
    assert n == 2 and torch.allclose(out, skip(T) * (f_B + 8 * e_B) + out_(T) * F_raw(x_s, s), rtol=0, atol=1e-9)
    ours, _ = sample_tts(f, x, T, s, torch.Generator().manual_seed(5))
    assert (ours - out).abs().max() > 1e-2                        # ours is another sampler

def test_a_models_defaults_for_an_image_are_its_training_clips_medians(tiny_run):
    """sample.py conditions an --image on the fps and motion the model trained on, not on constants."""
    from data import SyntheticVideos
    ck = torch.load(os.path.join(tiny_run, "teacher.pt"), weights_only=False)
    b = SyntheticVideos(32, 8, "test").batch(range(8))                      # the run's --eval-clips 8
    assert ck["micro_median"] == {k: float(b[k].float().median()) for k in ("fps", "motion")}
    assert sample.load_model(os.path.join(tiny_run, "teacher.pt"))[2]["micro_median"] == ck["micro_median"]
