"""evaluate.py: the Fréchet distance against closed forms, the ruler's ordering, I3D, diagnostics, CLI."""
import importlib.util
import math
import os
import re
import shutil

import pytest
import torch

import evaluate
import report
import metric
from data import SyntheticVideos, UserError, write_video
from metric import (I3D, blurred, compare, diagnostics, extract, fd_interval, frechet_distance, gaussian_stats, paired_fd,
                    shuffled, static)


def random_rotation(d, g):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    d = 6
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    a, b = torch.rand(d, generator=g, dtype=torch.float64) + 0.1, torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    # commuting covariances (same eigenvectors): ||dmu||^2 + sum (sqrt(a) - sqrt(b))^2
    q = random_rotation(d, g)
    s1, s2 = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T
    expected = (mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected.item(), rel=1e-9, abs=1e-12)
    # non-commuting 2x2: tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det(S1 S2)))
    for _ in range(5):
        m1, m2 = torch.randn(2, 2, generator=g, dtype=torch.float64), torch.randn(2, 2, generator=g, dtype=torch.float64)
        s1, s2 = m1 @ m1.T + 0.1 * torch.eye(2), m2 @ m2.T + 0.1 * torch.eye(2)
        p = s1 @ s2
        tr_sqrt = math.sqrt(p.trace() + 2 * math.sqrt(p.det()))
        expected = (s1.trace() + s2.trace() - 2 * tr_sqrt).item()
        assert frechet_distance(torch.zeros(2), s1, torch.zeros(2), s2) == pytest.approx(expected, rel=1e-9)
    s = q @ torch.diag(a) @ q.T
    assert frechet_distance(mu1, s, mu1, s) == pytest.approx(0, abs=1e-10)


def test_frechet_distance_from_samples():
    """Sample statistics of two known Gaussians give (nearly) the closed-form distance."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200000, 3, generator=g, dtype=torch.float64)
    y = torch.randn(200000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]) + 1.0
    expected = 3 * 1.0 + (1 - 1) ** 2 + (1 - 2) ** 2 + (1 - 0.5) ** 2
    assert frechet_distance(*gaussian_stats(x), *gaussian_stats(y)) == pytest.approx(expected, rel=0.02)
    fd, lo, hi = fd_interval(x[:2000], y[:2000], n_boot=20)
    assert lo < fd < hi and lo < expected < hi


def test_the_paired_bootstrap_resolves_what_single_intervals_cannot():
    """Rows that share clips: a small true shift is "worse" on the paired ruler, though each row's own
    interval overlaps the other's; identical rows differ by exactly 0 and are "not resolved"."""
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 8, generator=g)
    a = real + 0.5 * torch.randn(400, 8, generator=g)           # a model: each video near its own clip
    b = a + 0.1                                                  # the same videos, slightly shifted
    fd, boot = paired_fd(real, [a, b, a.clone()])
    worse = compare(fd, boot, 1, 0)
    assert worse["verdict"] == "worse" and worse["diff"][1] > 0 and worse["ratio"][1] > 1
    assert compare(fd, boot, 0, 1)["verdict"] == "better"
    same = compare(fd, boot, 2, 0)
    assert same["diff"] == (0.0, 0.0, 0.0) and same["ratio"] == (1.0, 1.0, 1.0) and same["verdict"] == "not resolved"
    (_, _, hi_a), (_, lo_b, _) = fd_interval(real, a), fd_interval(real, b)
    assert lo_b < hi_a                                           # each set resampled on its own: overlap
    with pytest.raises(UserError, match="one video per clip"):
        paired_fd(real, [a[:10]])


def test_the_ratio_interval_excludes_1_exactly_where_the_difference_excludes_0():
    """The ratio's interval is the difference's divided by the reference: the two columns of a report
    can never disagree. Two models of one quality, one scaled by `shift`: near the resolution limit
    some pairs are resolved and some are not, and the two columns agree on every one."""
    said = set()
    for shift in (0.0, 0.01, 0.02, 0.03, 0.05, 0.1, -0.1, -0.2):
        g = torch.Generator().manual_seed(3)
        real = torch.randn(300, 8, generator=g, dtype=torch.float64)
        a, b = (real + 0.7 * torch.randn(300, 8, generator=g, dtype=torch.float64) for _ in range(2))
        fd, boot = paired_fd(real, [a, b * (1 + shift)], n_boot=100)
        c = compare(fd, boot, 1, 0)
        (_, d_lo, d_hi), (r, r_lo, r_hi) = c["diff"], c["ratio"]
        assert r == pytest.approx(fd[1] / fd[0]) and r_lo == pytest.approx(1 + d_lo / fd[0])
        assert r_hi == pytest.approx(1 + d_hi / fd[0])
        assert (r_lo > 1 or r_hi < 1) == (d_lo > 0 or d_hi < 0) == (c["verdict"] != "not resolved")
        said.add(c["verdict"])
    assert said == {"better", "worse", "not resolved"}


def test_the_bias_correction_moves_a_null_distance_toward_0():
    """Two samples of one Gaussian: the true distance is 0, the estimate is biased upward by the sample
    size, and the bootstrap's correction (2 FD - mean of the replicates) removes most of that bias."""
    g = torch.Generator().manual_seed(4)
    x, y = (torch.randn(300, 16, generator=g, dtype=torch.float64) for _ in range(2))
    fd, boot = metric.fd_boot(x, y, n_boot=50)
    corrected = float(metric.bias_corrected(fd, boot))
    assert boot.mean() > fd > 0 and abs(corrected) < 0.5 * fd


@pytest.fixture(scope="module")
def small_net(tmp_path_factory):
    """A briefly trained FVD-syn network at tiny sizes (the real one trains for 1,500 steps)."""
    path = str(tmp_path_factory.mktemp("fvd") / "net.pt")
    return metric.train_feature_net("synthetic", 32, 8, path, steps=300, batch_size=16), path


@pytest.mark.parametrize("steps", [3, 20])       # 20: where a 5% warm-up would end at step 0
def test_the_feature_net_trains_for_any_number_of_steps(tmp_path, steps):
    net = metric.train_feature_net("synthetic", 32, 8, str(tmp_path / "net.pt"), steps=steps, batch_size=2)
    assert os.path.isfile(tmp_path / "net.pt") and all(p.isfinite().all() for p in net.parameters())
    with pytest.raises(UserError, match="at least 3"):
        metric.train_feature_net("synthetic", 32, 8, str(tmp_path / "net2.pt"), steps=2)


def test_ruler_orders_real_static_shuffled_blurred(small_net):
    net, _ = small_net
    a = SyntheticVideos(32, 8, "test").batch(range(600))["video"]
    b = SyntheticVideos(32, 8, "test").batch(range(600, 1200))["video"]
    fa = extract(net, a)
    fd = {name: fd_interval(fa, extract(net, v), n_boot=20)
          for name, v in [("real", b), ("static", static(b)), ("shuffled", shuffled(b)), ("blurred", blurred(b))]}
    for name in ("static", "shuffled", "blurred"):
        assert fd[name][1] > fd["real"][2], (name, fd)          # intervals do not overlap
        assert fd[name][0] > 3 * fd["real"][0], (name, fd)


def test_feature_net_cache(small_net, monkeypatch):
    net, path = small_net
    monkeypatch.setattr(metric, "train_feature_net", lambda *a, **k: pytest.fail("trained again"))
    again = metric.load_feature_net(path, "synthetic", 32, 8)
    v = SyntheticVideos(32, 8, "test").batch(range(4))["video"]
    assert torch.allclose(again(v), net(v), atol=1e-5)
    assert again(v).shape == (4, 160)


class I3DStandIn(torch.nn.Module):
    """The interface of the I3D TorchScript file; it checks the protocol and returns 400-d features."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 400)

    def forward(self, x, rescale: bool, resize: bool, return_features: bool):
        assert x.dim() == 5 and x.shape[1] == 3 and x.shape[3] == 224 and x.shape[4] == 224
        assert not rescale and not resize and return_features
        assert x.min() >= -1.0001 and x.max() <= 1.0001
        return self.proj(torch.cat([x.mean((2, 3, 4))[:, :1], x.std((2, 3, 4))[:, :1],
                                    (x[:, :, 1:] - x[:, :, :-1]).abs().mean((1, 2, 3, 4))[:, None]], 1))


class I3DRecorder(torch.nn.Module):
    """Records the shape, value range and flags I3D is called with."""

    def forward(self, x, rescale: bool, resize: bool, return_features: bool):
        return torch.stack([torch.tensor(float(d)) for d in x.shape] + [x.min(), x.max(),
                            torch.tensor(float(rescale)), torch.tensor(float(resize))])[None].repeat(len(x), 1)


@pytest.mark.parametrize("h, w", [(110, 196), (196, 110), (224, 224), (32, 32), (111, 300)])
def test_i3d_sees_224x224_at_any_size_in_both_protocols(tmp_path, h, w):
    """The crop protocol resizes to an explicit size: a scale factor rounded a 110-pixel side to 223 and
    the crop kept a 1-pixel strip. StyleGAN-V's protocol hands uint8 values to the network's own resize."""
    torch.jit.script(I3DRecorder()).save(str(tmp_path / "rec.pt"))
    video = torch.rand(2, 9, 3, h, w) * 2 - 1
    crop = I3D(str(tmp_path / "rec.pt"))(video)[0].tolist()
    assert crop[:5] == [2, 3, 9, 224, 224] and -1 <= crop[5] < crop[6] <= 1 and crop[7:] == [0, 0]
    sgv = I3D(str(tmp_path / "rec.pt"), protocol="stylegan-v")(video)[0].tolist()
    assert sgv[:5] == [2, 3, 9, h, w] and 0 <= sgv[5] < sgv[6] <= 255 and sgv[7:] == [1, 1]


def test_i3d_path_and_cli(tmp_path, capsys, monkeypatch):
    stub = str(tmp_path / "i3d.pt")
    torch.jit.script(I3DStandIn()).save(stub)
    i3d = I3D(stub)
    f = i3d(SyntheticVideos(32, 8).batch(range(3))["video"])
    assert f.shape == (3, 400)
    # the CLI on two folders; generated files named after real ones get a first-frame PSNR
    real, fake = tmp_path / "real", tmp_path / "fake"
    v = SyntheticVideos(32, 8, "test").batch(range(12))["video"]
    for i in range(12):
        write_video(str(real / f"{i:02d}.mp4"), v[i], scale=1)
        write_video(str(fake / f"{i:02d}.mp4"), static(v[i:i + 1])[0], scale=1)
    # real videos are measured with StyleGAN-V's protocol unless --i3d-protocol says otherwise (the stand-in
    # takes the crop protocol's input: it is given that protocol whatever was asked)
    asked, real_i3d = [], evaluate.I3D
    monkeypatch.setattr(evaluate, "I3D", lambda path, device, protocol: asked.append(protocol) or real_i3d(path, device))
    assert evaluate.main(["--real", str(real), "--fake", str(fake), "--i3d", stub, "--num", "12"]) == 0
    assert evaluate.main(["--real", "synthetic", "--fake", str(fake), "--i3d", stub, "--num", "12"]) == 0
    assert evaluate.main(["--real", str(real), "--fake", str(fake), "--i3d", stub, "--num", "12",
                          "--i3d-protocol", "crop"]) == 0
    assert asked == ["stylegan-v", "crop", "crop"]
    monkeypatch.setattr(evaluate, "I3D", real_i3d)
    capsys.readouterr()
    assert evaluate.main(["--real", str(real), "--fake", str(fake), "--i3d", stub, "--num", "12", "--i3d-protocol",
                          "crop"]) == 0
    out = capsys.readouterr().out
    assert "FVD " in out and "static-video rate 1.000" in out and "first-frame PSNR" in out and "n/a" not in out
    # the synthetic test split as the real set: files named by test index pair with it
    assert evaluate.main(["--real", "synthetic", "--fake", str(fake), "--i3d", stub, "--num", "12"]) == 0
    assert "n/a" not in capsys.readouterr().out
    # several sets: each later one against the first on the paired ruler (the real set resampled with them)
    assert evaluate.main(["--real", str(real), "--fake", str(fake), "--fake", str(real), "--i3d", stub,
                          "--num", "12", "--i3d-protocol", "crop"]) == 0
    out = capsys.readouterr().out
    assert "the real set resampled with them" in out
    assert re.search(rf"{re.escape(str(real))}: FVD difference -[\d.]+ \[-[\d.]+, -[\d.]+\], ratio .*: better", out)
    other = tmp_path / "other"
    write_video(str(other / "a.mp4"), v[0], scale=1)
    write_video(str(other / "b.mp4"), v[1], scale=1)
    assert evaluate.main(["--real", str(real), "--fake", str(fake), "--fake", str(other), "--i3d", stub]) == 2
    assert "the same file names in every --fake folder" in capsys.readouterr().err


def test_cli_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert evaluate.main(["--real", "synthetic", "--fake", str(empty), "--i3d", str(tmp_path / "x.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "x.pt").write_text("nonsense")
    assert evaluate.main(["--real", "synthetic", "--fake", str(empty), "--i3d", str(tmp_path / "x.pt")]) == 2
    assert "not a TorchScript file" in capsys.readouterr().err
    torch.jit.script(I3DStandIn()).save(str(tmp_path / "ok.pt"))
    assert evaluate.main(["--real", "synthetic", "--fake", str(empty), "--i3d", str(tmp_path / "ok.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no usable video in") and "\n" not in err


def test_diagnostics_known_answers():
    real = SyntheticVideos(32, 8, "test").batch(range(200))["video"]
    cond = real[:, 0]
    copy = static(real)                                       # every frame the conditioning image
    d = diagnostics(copy, real, cond)
    assert d["first_frame_psnr"] == 100.0 and d["static_rate"] == 1.0 and d["motion_ratio"] == 0.0
    d = diagnostics(real, real, cond)
    assert d["static_rate"] == 0.0 and d["motion_ratio"] == pytest.approx(1.0) and d["first_frame_psnr"] == 100.0
    noisy = (real + 0.02 * torch.randn_like(real)).clamp(-1, 1)
    d = diagnostics(noisy, real, cond)
    # noise of std 0.02 in [-1, 1] is 0.01 in [0, 1]: PSNR about 40 dB; noise is motion, not stillness
    assert 38 < d["first_frame_psnr"] < 42 and d["static_rate"] == 0.0
    assert diagnostics(shuffled(real), real)["motion_ratio"] > 1.5     # shuffling makes jumps


def test_too_few_videos_and_resizes_are_said(tmp_path, capsys):
    """One video cannot give a covariance: a one-line error with the numbers. Two give a distance with a
    note that it is unreliable; videos of another size are read with a note naming the resize."""
    torch.jit.script(I3DStandIn()).save(str(tmp_path / "i3d.pt"))
    fake = tmp_path / "fake"
    fake.mkdir()
    clips = SyntheticVideos(48, 12, "test").batch(range(2))["video"]
    write_video(str(fake / "000000.mp4"), clips[:1], fps=8)
    args = ["--real", "synthetic", "--fake", str(fake), "--i3d", str(tmp_path / "i3d.pt"), "--num", "4"]
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err
    assert "1 generated videos" in err and "at least 2" in err and len(err.strip().splitlines()) == 1
    write_video(str(fake / "000001.mp4"), clips[1:], fps=8)
    assert evaluate.main(args) == 0
    out = capsys.readouterr().out
    assert "resized and centre-cropped to 32x32" in out and re.search(r"the files are \d+x\d+x12", out)
    assert "2 videos for 400 features" in out


def test_plot_draws_the_log_or_says_how_to_get_matplotlib(tiny_run, tmp_path, capsys):
    out = str(tmp_path / "r")
    shutil.copytree(tiny_run, out)
    if importlib.util.find_spec("matplotlib") is None:   # optional: the one-line message names the install
        assert evaluate.main(["--plot", out]) == 2
        err = capsys.readouterr().err
        assert "pip install matplotlib" in err and len(err.strip().splitlines()) == 1
        return
    assert evaluate.main(["--plot", out]) == 0
    assert os.path.getsize(os.path.join(out, "log.png")) > 1000 and "2 stage(s)" in capsys.readouterr().out


def test_inputs_are_checked_before_the_ruler_trains(tmp_path, monkeypatch, capsys):
    """A set too small for a distance is refused before FVD-syn's network is trained (minutes on a CPU)."""
    monkeypatch.setattr(metric, "train_feature_net", lambda *a, **k: pytest.fail("the ruler trained first"))
    fake = tmp_path / "fake"
    fake.mkdir()
    write_video(str(fake / "000000.mp4"), SyntheticVideos(32, 8, "test").batch(range(1))["video"][0], fps=8)
    assert evaluate.main(["--real", "synthetic", "--fake", str(fake), "--num", "4", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "at least 2" in err and len(err.strip().splitlines()) == 1


def test_a_cached_row_is_keyed_on_its_code(tmp_path, monkeypatch):
    """Another sampler (here: sample.generate replaced) gives every row another key, so a report after a
    code change makes its rows anew instead of reading stale ones."""
    (tmp_path / "stage2.pt").write_bytes(b"weights")
    (tmp_path / "net.pt").write_bytes(b"ruler")
    key = ("stage2.pt", 1, None, "tts")
    ident = report.row_identity(str(tmp_path), key, 6, 32, 8, 0.5, None, str(tmp_path / "net.pt"))
    before = report.row_path(str(tmp_path), key, ident)
    assert before == report.row_path(str(tmp_path), key, dict(ident))        # the same row, the same file

    def generate(*args, **kwargs):                                             # a changed sampler
        return None
    monkeypatch.setattr(report.sample, "generate", generate)
    ident2 = report.row_identity(str(tmp_path), key, 6, 32, 8, 0.5, None, str(tmp_path / "net.pt"))
    assert ident2["code"] != ident["code"] and report.row_path(str(tmp_path), key, ident2) != before
