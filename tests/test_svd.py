"""svd.py: the published SVD in our network, proven against the reference implementation (diffusers) on
tiny random models we build and save ourselves: the UNet at several configs in float64, the original
single-file checkpoint, SVD-XT's published config, the whole sampling pipeline, and students trained
from a tiny pipeline. The SVD extras are required in CI (OSV_REQUIRE_SVD=1) and skip elsewhere."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

if not os.environ.get("OSV_REQUIRE_SVD"):
    pytest.importorskip("diffusers", reason="the SVD path's tests need: pip install -r requirements-svd.txt")
import av                                                                         # noqa: E402
import diffusers                                                                  # noqa: E402
import safetensors.torch                                                          # noqa: E402
import transformers                                                               # noqa: E402
from diffusers.pipelines.stable_video_diffusion import pipeline_stable_video_diffusion as svd_pipeline  # noqa: E402

import sample                                                                     # noqa: E402
import svd                                                                        # noqa: E402
import train                                                                      # noqa: E402
import unet                                                                       # noqa: E402
from data import UserError                                                        # noqa: E402


def diffusers_unet(levels=2, attention=(0,), heads_per_width=4, layers=2, depth=1, seed=0):
    """A tiny random diffusers UNetSpatioTemporalConditionModel, every weight moved off its initial value
    (zero-initialised output layers would hide a wrong mapping)."""
    widths = tuple(32 * 2 ** min(i, 1) for i in range(levels))                  # 32, 64, 64, ...
    down = tuple("CrossAttnDownBlockSpatioTemporal" if i in attention else "DownBlockSpatioTemporal"
                 for i in range(levels))
    up = tuple(("CrossAttnUpBlockSpatioTemporal" if d.startswith("CrossAttn") else "UpBlockSpatioTemporal")
               for d in reversed(down))
    torch.manual_seed(seed)
    model = diffusers.UNetSpatioTemporalConditionModel(
        sample_size=16, in_channels=8, out_channels=4, down_block_types=down, up_block_types=up,
        block_out_channels=widths, layers_per_block=layers, cross_attention_dim=24,
        transformer_layers_per_block=depth, num_attention_heads=tuple(w // heads_per_width for w in widths),
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=24, num_frames=5)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def match_diffusers_eps(ours, theirs, cfg):
    """Give our GroupNorms diffusers' epsilons (it hard-codes 1e-6 in some blocks), found through the
    key mapping itself."""
    ours_modules = dict(ours.named_modules())
    for name, m in theirs.named_modules():
        if isinstance(m, nn.GroupNorm):
            ours_modules[svd.ours_from_diffusers(name + ".weight", cfg)[:-len(".weight")]].eps = m.eps


CONFIGS = {                                                    # (levels, attention levels, depth), latent size, frames
    "2 levels, attention at 0": ((2, (0,), 1), (6, 10), 3),
    "3 levels, attention at 0 and 1, depth 2": ((3, (0, 1), 2), (9, 13), 5),
    "3 levels, attention everywhere": ((3, (0, 1, 2), 1), (8, 12), 1),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet_parity_with_diffusers_in_float64(name, tmp_path):
    (levels, attention, depth), (h, w), T = CONFIGS[name]
    theirs = diffusers_unet(levels, attention, depth=depth).double()
    theirs.save_pretrained(tmp_path / "unet")
    ours = svd.from_pretrained(str(tmp_path / "unet"), dtype=torch.float64)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    match_diffusers_eps(ours, theirs, ours.cfg)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, T, 8, h, w, generator=g, dtype=torch.float64)
    t = torch.tensor([0.3, -1.1], dtype=torch.float64)                       # c_noise = ln(sigma) / 4
    context = torch.randn(2, 1, 24, generator=g, dtype=torch.float64)
    micro = torch.tensor([[6.0, 127.0, 0.02], [11.0, 40.0, 0.1]], dtype=torch.float64)
    with torch.no_grad():
        ref = theirs(x, t, context, micro).sample
        out = ours(x, t, context, micro)
    assert ref.shape == out.shape == (2, T, 4, h, w)
    assert (out - ref).abs().max() <= 1e-10 * max(1.0, ref.abs().max().item())


def test_default_eps_is_the_originals_and_differs_from_diffusers(tmp_path):
    theirs = diffusers_unet().double()
    theirs.save_pretrained(tmp_path / "unet")
    ours = svd.from_pretrained(str(tmp_path / "unet"), dtype=torch.float64)
    assert {m.eps for m in ours.modules() if isinstance(m, nn.GroupNorm)} == {1e-5, 1e-6}   # ResBlocks, transformers
    x = torch.randn(1, 3, 8, 6, 10, dtype=torch.float64)
    args = (x, torch.tensor([0.3], dtype=torch.float64), torch.randn(1, 1, 24, dtype=torch.float64),
            torch.tensor([[6.0, 127.0, 0.02]], dtype=torch.float64))
    with torch.no_grad():
        gap = (ours(*args) - theirs(*args).sample).abs().max()
    assert 1e-8 < gap < 1e-2                       # the only difference: diffusers' hard-coded 1e-6


def sgm_name(ours_key):
    """Our key -> the original checkpoint's (the inverse of svd.ours_from_sgm, written independently)."""
    k = ours_key.replace("conv_in.", "input_blocks.0.0.", 1) if ours_key.startswith("conv_in.") else ours_key
    if k.startswith("input_blocks.") and not ours_key.startswith("conv_in."):
        n = int(k.split(".")[1])
        k = f"input_blocks.{n + 1}." + k.split(".", 2)[2]
    k = k.replace("label_emb.", "label_emb.0.", 1) if k.startswith("label_emb.") else k
    k = k.replace(".spatial.", ".").replace(".skip.", ".skip_connection.").replace(".to_out.", ".to_out.0.")
    k = k.replace(".ff.proj.", ".ff.net.0.proj.").replace(".ff.out.", ".ff.net.2.")
    k = k.replace(".ff_in.proj.", ".ff_in.net.0.proj.").replace(".ff_in.out.", ".ff_in.net.2.")
    return "model.diffusion_model." + k


def test_the_original_single_file_loads_to_the_same_network(tmp_path):
    theirs = diffusers_unet(3, (0, 1))
    theirs.save_pretrained(tmp_path / "unet")
    ours = svd.from_pretrained(str(tmp_path / "unet"))
    sd = {sgm_name(k): (v.reshape(1) if k.endswith("mix_factor") else v).contiguous()
          for k, v in ours.state_dict().items()}
    sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(3)        # the single file's other parts
    sd["conditioner.embedders.0.open_clip.proj"] = torch.zeros(2)
    safetensors.torch.save_file(sd, str(tmp_path / "svd_tiny.safetensors"))
    os.replace(tmp_path / "unet" / "config.json", tmp_path / "config.json")  # found beside the file
    single = svd.from_pretrained(str(tmp_path / "svd_tiny.safetensors"))
    assert single.cfg == ours.cfg
    for k, v in ours.state_dict().items():
        assert torch.equal(single.state_dict()[k], v), k


def test_a_mismatch_is_a_one_line_error_naming_the_keys(tmp_path):
    theirs = diffusers_unet()
    sd = theirs.state_dict()
    cfg = svd.config_from_diffusers(dict(theirs.config))
    sd["down_blocks.0.resnets.0.spatial_res_block.extra.weight"] = torch.zeros(1)
    del sd["conv_out.bias"]
    with pytest.raises(UserError) as e:
        svd.ours_from(sd, cfg, "diffusers")
    msg = str(e.value)
    assert "\n" not in msg and "spatial_res_block.extra.weight" in msg and "out.2.bias" in msg
    with pytest.raises(UserError, match="no config.json"):
        svd.from_pretrained(str(tmp_path))


SVD_XT_CONFIG = {                                   # stabilityai/stable-video-diffusion-img2vid-xt, unet/config.json
    "_class_name": "UNetSpatioTemporalConditionModel", "addition_time_embed_dim": 256,
    "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal",
                         "CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
    "in_channels": 8, "layers_per_block": 2, "num_attention_heads": [5, 10, 20, 20], "num_frames": 25,
    "out_channels": 4, "projection_class_embeddings_input_dim": 768, "sample_size": 96,
    "transformer_layers_per_block": 1,
    "up_block_types": ["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal",
                       "CrossAttnUpBlockSpatioTemporal"]}


def test_svd_xt_published_config_builds_with_the_reference_count_and_every_key_maps(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SVD_XT_CONFIG))
    c = json.loads((tmp_path / "config.json").read_text())
    cfg = svd.config_from_diffusers(c)
    assert cfg == unet.UNetConfig()                                     # our svd preset, derived from the file
    with torch.device("meta"):
        theirs = diffusers.UNetSpatioTemporalConditionModel.from_config(c)
        ours = unet.VideoUNet(cfg)
    mapped = svd.ours_from(theirs.state_dict(), cfg, "diffusers")      # raises unless every key pairs up
    assert len(mapped) == len(ours.state_dict()) == 1428
    assert sum(v.numel() for v in mapped.values()) == unet.SVD_REFERENCE_PARAMS
    assert sum(p.numel() for p in ours.parameters()) == unet.SVD_REFERENCE_PARAMS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_unet_runs_in_any_precision_outside_autocast(dtype):
    cfg = unet.UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                          head_channels=8, context_dim=16, micro_dim=8)
    D = unet.Denoiser.new(cfg).to(dtype)
    cond = {"concat": torch.randn(1, 4, 5, 7), "image": torch.randn(1, 4, 5, 7), "micro": torch.ones(1, 3)}
    with torch.no_grad():
        out = D(torch.randn(1, 3, 4, 5, 7), torch.tensor([2.0]), cond)     # 5x7: not divisible by 2
    assert out.shape == (1, 3, 4, 5, 7) and torch.isfinite(out).all()


def test_clip_resize_matches_svds_antialiased_resize():
    x = torch.rand(2, 3, 50, 70) * 2 - 1
    ref = svd_pipeline._resize_with_antialiasing(x, (32, 32))
    assert torch.allclose(svd.resize_antialiased(x, (32, 32)), ref, atol=1e-5)
    assert not torch.allclose(torch.nn.functional.interpolate(x, (32, 32), mode="bicubic", align_corners=True),
                              ref, atol=1e-3)                          # the blur matters


# ---------------------------------------------------------------------------------------- the pipeline

@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """A tiny random StableVideoDiffusionPipeline saved as a model folder: a tiny UNet, diffusers'
    temporal-decoder VAE, a CLIP vision encoder with projection, its image processor, SVD's scheduler."""
    d = tmp_path_factory.mktemp("svd_tiny")
    unet_model = diffusers_unet(2, (1,))
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLTemporalDecoder(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                                                 down_block_types=["DownEncoderBlock2D"] * 2, latent_channels=4)
    torch.manual_seed(0)
    clip = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=32, projection_dim=24, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        intermediate_size=37, patch_size=4))
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
        steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True)
    pipe = diffusers.StableVideoDiffusionPipeline(vae=vae, image_encoder=clip, unet=unet_model, scheduler=scheduler,
                                                  feature_extractor=transformers.CLIPImageProcessor(crop_size=32, size=32))
    pipe.save_pretrained(str(d))
    return str(d)


def test_pipeline_parity_latents_and_frames(pipeline_folder):
    """From the same image, initial noise, fps, motion bucket and noise augmentation, with SVD's CFG ramp:
    our sampler's final latents equal diffusers' pipeline's, and so do the decoded frames."""
    pipe = diffusers.StableVideoDiffusionPipeline.from_pretrained(pipeline_folder)
    D, enc, cfg, _ = sample.load_svd(pipeline_folder)
    T, steps = 3, 3
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))      # [0, 1], CLIP's size
    x_T = torch.randn(1, T, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    ref = pipe(image, height=32, width=32, num_frames=T, num_inference_steps=steps, min_guidance_scale=1.0,
               max_guidance_scale=2.5, fps=7, motion_bucket_id=127, noise_aug_strength=0.02,
               generator=torch.Generator().manual_seed(0), latents=x_T.clone(), output_type="latent").frames
    frame = image * 2 - 1
    aug_noise = torch.randn(frame.shape, generator=torch.Generator().manual_seed(0))   # the pipeline's first draw
    cond = enc.condition(frame, torch.tensor([7.0]), torch.tensor([127.0]), torch.tensor([0.02]), noise=aug_noise)
    z, nfe = sample.generate(D, cond, T, steps, sample.cfg_scale(1.0, 2.5, T), "euler", cfg["sigma_min"],
                             cfg["sigma_max"], noise=x_T, svd_init=True)
    assert nfe == 2 * steps and (cfg["sigma_min"], cfg["sigma_max"]) == (0.002, 700.0)
    assert ((z - ref).abs().max() / ref.abs().max()) < 1e-4
    frames_ref = pipe.decode_latents(ref, num_frames=T, decode_chunk_size=T)          # (B, C, T, H, W)
    frames = enc.decode_video(ref)                                                     # (B, T, C, H, W)
    assert torch.allclose(frames.permute(0, 2, 1, 3, 4), frames_ref, atol=1e-5)
    with pytest.raises(AssertionError):                                               # and the checks can fail:
        cond_fps = enc.condition(frame, torch.tensor([8.0]), torch.tensor([127.0]), torch.tensor([0.02]),
                                 noise=aug_noise)                                      # fps instead of fps - 1
        z2, _ = sample.generate(D, cond_fps, T, steps, sample.cfg_scale(1.0, 2.5, T), "euler", 0.002, 700.0,
                                noise=x_T, svd_init=True)
        assert ((z2 - ref).abs().max() / ref.abs().max()) < 1e-4


def write_png(path, size=32):
    a = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    with av.open(str(path), "w") as c:
        st = c.add_stream("png")
        st.width, st.height, st.pix_fmt = size, size, "rgb24"
        c.mux(st.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        c.mux(st.encode())


def test_sample_cli_samples_the_published_svd(pipeline_folder, tmp_path, capsys):
    write_png(tmp_path / "frame.png")
    assert sample.main(["--svd", pipeline_folder, "--image", str(tmp_path / "frame.png"), "--steps", "2",
                        "--frames", "3", "--size", "32x32", "--out", str(tmp_path / "v.mp4")]) == 0
    assert "svd: 2 steps, 4 NFE" in capsys.readouterr().out and os.path.isfile(tmp_path / "v.mp4")


@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=24, num_hidden_layers=4, num_attention_heads=4,
                                                       patch_size=14, image_size=56)).save_pretrained(str(d))
    return str(d)


def test_students_train_from_the_published_svd(pipeline_folder, dinov2_folder, tmp_path, capsys):
    """Stage 1 and Stage 2 from the tiny pipeline folder: a few steps on the CPU, finite losses, the
    checkpoints name the folder, DINOv2 is the discriminator's backbone, and a student samples."""
    out = str(tmp_path / "run")
    common = ["--svd", pipeline_folder, "--dinov2", dinov2_folder, "--out", out, "--steps", "2",
              "--batch-size", "2", "--num-frames", "3", "--eval-clips", "2", "--log-every", "1", "--warmup", "2"]
    assert train.main(["--stage", "1", *common]) == 0
    assert train.main(["--stage", "2", *common]) == 0
    recs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    for stage, keys in (("1", ("loss", "rec", "adv_g", "loss_d")), ("2", ("loss", "distill", "adv_g", "loss_d"))):
        rows = [r for r in recs if r.get("stage") == stage and "loss" in r]
        assert len(rows) == 2 and all(np.isfinite([r[k] for k in keys]).all() for r in rows)
    ck = torch.load(os.path.join(out, "stage2.pt"), weights_only=False)
    assert ck["config"]["svd"] == pipeline_folder and ck["config"]["disc_backbone"] == "dinov2"
    assert ck["config"]["sigma_max"] == 700.0 and not os.path.exists(os.path.join(out, "teacher.pt"))
    capsys.readouterr()
    write_png(tmp_path / "f.png")
    assert sample.main(["--ckpt", os.path.join(out, "stage2.pt"), "--image", str(tmp_path / "f.png"),
                        "--size", "32x32", "--frames", "3", "--out", str(tmp_path / "s.mp4")]) == 0
    assert "2: 1 steps, 1 NFE" in capsys.readouterr().out
    assert train.main(["--stage", "teacher", *common]) == 2                  # SVD is the teacher: nothing to train
    assert "--svd" in capsys.readouterr().err


def test_svds_encoders_stay_off_the_device_while_a_stage_reads_the_latent_cache(pipeline_folder):
    """A stage that reads the latent cache never runs the VAE or CLIP: they load on the CPU and visit the
    run's device only for samples and checks (svd.resident); without the cache they load on the device."""
    from types import SimpleNamespace
    run = SimpleNamespace(cfg=SimpleNamespace(svd=pipeline_folder, decode_chunk=0), device=torch.device("meta"),
                          out="unused")
    for cached, home in ((True, "cpu"), (False, "meta")):
        run.cached = cached
        enc, _ = train.finished(run, "ae")
        assert next(enc.parameters()).device.type == home
