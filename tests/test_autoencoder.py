"""autoencoder.py: shapes, frame-chunked video coding, overfitting a tiny batch, scale_factor."""
import torch

from autoencoder import AEConfig, AutoEncoder, ae_loss, measure_scale_factor, psnr
from data import SyntheticVideos


def test_shapes_and_chunking():
    torch.manual_seed(0)
    ae = AutoEncoder(AEConfig(channels=(8, 16, 16), latent_channels=4)).eval()
    v = SyntheticVideos(32, 8).batch(range(3))["video"]                      # (3, 8, 3, 32, 32)
    z = ae.encode_video(v, chunk=5)
    assert z.shape == (3, 8, 4, 8, 8) and ae.downsample == 4
    assert torch.allclose(z, ae.encode_video(v, chunk=100), atol=1e-5)       # chunking changes nothing
    x = ae.decode_video(z, chunk=7)
    assert x.shape == v.shape
    assert torch.allclose(x, ae.decode_video(z, chunk=24), atol=1e-5)
    # frames are coded independently: frame 2 of clip 1 alone gives the same latent
    assert torch.allclose(ae.encode_video(v[1:2, 2:3])[0, 0], z[1, 2], atol=1e-5)


def test_overfits_a_tiny_batch():
    torch.manual_seed(0)
    ae = AutoEncoder(AEConfig(channels=(16, 32, 32)))
    v = SyntheticVideos(32, 8).batch(range(2))["video"][:, :2]              # 4 frames
    opt = torch.optim.Adam(ae.parameters(), lr=2e-3)
    first = None
    for i in range(150):
        out = ae_loss(ae, v, kl_weight=1e-6)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else out["loss"].item()
    assert out["loss"].item() < 0.15 * first
    assert psnr(ae.eval(), v) > 24


def test_scale_factor_gives_unit_std():
    torch.manual_seed(0)
    ae = AutoEncoder(AEConfig(channels=(8, 16, 16))).eval()
    with torch.no_grad():                      # make the raw latents far from unit std
        ae.encoder.net[-1].weight.mul_(7.0)
        ae.encoder.net[-1].bias.mul_(7.0)
    v = SyntheticVideos(32, 8).batch(range(16))["video"]
    raw_std = ae.encode_video(v).std().item()
    sf = measure_scale_factor(ae, v)
    assert abs(sf - raw_std) < 1e-4 and sf > 2
    assert abs(ae.encode_video(v).std().item() - 1) < 1e-4
    # decoding undoes the scaling: the same pixels as an unscaled round trip
    x = ae.decode_video(ae.encode_video(v))
    ae.scale_factor.fill_(1.0)
    assert torch.allclose(x, ae.decode_video(ae.encode_video(v)), atol=1e-4)
