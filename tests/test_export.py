"""export.py: a micro student of the tiny random SVD pipeline (tests/test_svd.py builds it), exported to
diffusers' folder and to SVD's single file. The round trip gives back the merged student exactly,
diffusers' own pipeline samples from the export what sample.py samples from the checkpoint, and every
input that cannot be exported is a one-line error."""
import os

import numpy as np
import pytest
import torch

if not os.environ.get("OSV_REQUIRE_SVD"):
    pytest.importorskip("diffusers", reason="the SVD path's tests need: pip install -r requirements-svd.txt")
import diffusers                                                                  # noqa: E402
import safetensors.torch                                                          # noqa: E402

import export                                                                     # noqa: E402
import sample                                                                     # noqa: E402
import svd                                                                        # noqa: E402
import train                                                                      # noqa: E402
from lora import load_trained, to_student                                        # noqa: E402
from test_svd import dinov2_folder, pipeline_folder, write_png                    # noqa: E402,F401  (fixtures)


@pytest.fixture(scope="module")
def student(pipeline_folder, dinov2_folder, tmp_path_factory):               # noqa: F811
    """Stage 1 and Stage 2 for two steps each on the tiny pipeline, then every trained tensor of the
    Stage 2 checkpoint moved by noise: adapters far from zero, so folding them in is visible."""
    out = str(tmp_path_factory.mktemp("svd_run"))
    common = ["--svd", pipeline_folder, "--dinov2", dinov2_folder, "--out", out, "--steps", "2", "--batch-size", "2",
              "--num-frames", "3", "--eval-clips", "2", "--log-every", "1", "--warmup", "2"]
    assert train.main(["--stage", "1", *common]) == 0 and train.main(["--stage", "2", *common]) == 0
    path = os.path.join(out, "stage2.pt")
    ckpt = torch.load(path, weights_only=False)
    g = torch.Generator().manual_seed(0)
    trained = ckpt["ema"]["student"]
    assert any(k.endswith("delta") for k in trained) and any(k.endswith(".B.weight") for k in trained)
    for k, v in trained.items():
        if k.endswith((".A.weight", ".B.weight", "delta")):
            v += 0.05 * torch.randn(v.shape, generator=g)
    torch.save(ckpt, path)
    return path, pipeline_folder


def test_the_diffusers_export_loads_back_as_the_merged_student(student, tmp_path, capsys):
    path, base = student
    out = str(tmp_path / "osv")
    assert export.main(["--ckpt", path, "--out", out, "--dtype", "float32"]) == 0
    assert "num_inference_steps=1" in capsys.readouterr().out
    for part in ("model_index.json", "unet/config.json", "vae/config.json", "image_encoder/config.json",
                 "feature_extractor/preprocessor_config.json", "scheduler/scheduler_config.json"):
        assert os.path.isfile(os.path.join(out, part)), part
    assert open(os.path.join(out, "unet", "config.json")).read() == open(os.path.join(base, "unet", "config.json")).read()
    ckpt, _ = export.student_checkpoint(path)
    merged = export.merged_unet(ckpt, base)
    back, base_unet = svd.from_pretrained(out), svd.from_pretrained(base)
    for k, v in merged.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    moved = max((v - base_unet.state_dict()[k]).abs().max().item() for k, v in merged.state_dict().items())
    assert moved > 1e-2                                                 # the adapters are in it
    # the merged network computes what the student with its adapters on computes
    D = svd.load_denoiser(base)
    to_student(D, ckpt["sigma_min"], ckpt["lora"])
    load_trained(D, ckpt["ema"]["student"])
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 3, 8, 16, 16, generator=g), torch.tensor([0.7])
    ctx, micro = torch.randn(1, 1, 24, generator=g), torch.tensor([[6.0, 127.0, 0.02]])
    with torch.no_grad():
        assert torch.allclose(back(x, t, ctx, micro), D.unet(x, t, ctx, micro), atol=1e-5)
    # float16, the default: the weights as stored, within fp16's rounding
    assert export.main(["--ckpt", path, "--out", str(tmp_path / "half")]) == 0
    half = safetensors.torch.load_file(str(tmp_path / "half" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in half.values()} == {torch.float16}
    for k, v in svd.from_pretrained(str(tmp_path / "half")).state_dict().items():
        assert torch.allclose(v, merged.state_dict()[k], rtol=1e-3, atol=1e-4), k


def test_diffusers_pipeline_on_the_export_samples_what_sample_py_samples(student, tmp_path, monkeypatch):
    """One step, guidance 1, the same image, micro-conditions and seed: the frames of diffusers' pipeline
    on the exported folder are sample.py's frames of the checkpoint. What may differ is stated in
    export.py: EDM's scalings against the consistency form and the start noise, O(sigma_min / sigma_max)
    = 3e-6 relative, plus diffusers' GroupNorm epsilon 1e-6 where the original has 1e-5 (svd.py), far
    below the tolerance 2e-3 on frames in [0, 1]; the base's own frames are far outside it."""
    path, base = student
    out = str(tmp_path / "osv")
    assert export.main(["--ckpt", path, "--out", out, "--dtype", "float32"]) == 0
    write_png(tmp_path / "f.png")
    pixels = np.random.default_rng(0).random((32, 32, 3))                       # write_png's image
    image = torch.from_numpy((pixels * 255).astype(np.uint8)).permute(2, 0, 1)[None].float() / 255
    run = dict(height=32, width=32, num_frames=3, num_inference_steps=1, min_guidance_scale=1.0, max_guidance_scale=1.0,
               fps=7, motion_bucket_id=127, noise_aug_strength=0.02, output_type="pt", decode_chunk_size=3)
    pipe = diffusers.StableVideoDiffusionPipeline.from_pretrained(out)
    theirs = pipe(image, generator=torch.Generator().manual_seed(5), **run).frames[0]           # (T, 3, H, W), [0, 1]
    written = []
    monkeypatch.setattr(sample, "write_video", lambda p, video, **k: written.append(video))
    assert sample.main(["--ckpt", path, "--image", str(tmp_path / "f.png"), "--steps", "1", "--fps", "7",
                        "--motion", "127", "--seed", "5", "--size", "32x32", "--frames", "3",
                        "--out", str(tmp_path / "s.mp4")]) == 0
    ours = ((written[0] + 1) / 2).clamp(0, 1)
    gap = (ours - theirs).abs().max().item()
    assert gap < 2e-3, gap
    teacher = diffusers.StableVideoDiffusionPipeline.from_pretrained(base)
    base_frames = teacher(image, generator=torch.Generator().manual_seed(5), **run).frames[0]
    assert (base_frames - theirs).abs().max().item() > 50 * max(gap, 2e-5)      # the check can fail


def test_the_single_file_export(student, tmp_path, capsys):
    """Without an original file: the UNet alone in SVD's names, with its config beside it. With one: that
    file, its other parts kept as they were, its UNet replaced. Both load back to the merged student."""
    path, base = student
    ckpt, _ = export.student_checkpoint(path)
    merged = export.merged_unet(ckpt, base).state_dict()
    alone = str(tmp_path / "a" / "osv.safetensors")
    os.makedirs(os.path.dirname(alone))
    assert export.main(["--ckpt", path, "--out", alone, "--format", "single-file", "--dtype", "float32"]) == 0
    assert "UNet alone" in capsys.readouterr().out
    assert all(k.startswith("model.diffusion_model.") for k in safetensors.torch.load_file(alone))
    for k, v in svd.from_pretrained(alone).state_dict().items():
        assert torch.equal(v, merged[k]), k
    # an original single file: the base's UNet in SVD's names, plus a VAE and a conditioner tensor
    original = {svd.sgm_from_ours(k): (v.reshape(1) if k.endswith("mix_factor") else v).contiguous()
                for k, v in svd.from_pretrained(base).state_dict().items()}
    original["first_stage_model.decoder.conv_in.weight"] = torch.arange(3.0)
    original["conditioner.embedders.0.open_clip.proj"] = torch.ones(2, dtype=torch.float16)
    orig_path = str(tmp_path / "svd_tiny.safetensors")
    safetensors.torch.save_file(original, orig_path, metadata={"made": "here"})
    out = str(tmp_path / "b" / "osv.safetensors")
    os.makedirs(os.path.dirname(out))
    assert export.main(["--ckpt", path, "--out", out, "--format", "single-file", "--original", orig_path,
                        "--dtype", "float32"]) == 0
    got = safetensors.torch.load_file(out)
    assert set(got) == set(original) and torch.equal(got["first_stage_model.decoder.conv_in.weight"], torch.arange(3.0))
    assert got["conditioner.embedders.0.open_clip.proj"].dtype == torch.float16
    with safetensors.safe_open(out, "pt") as h:
        assert h.metadata() == {"made": "here"}
    for k, v in svd.from_pretrained(out).state_dict().items():
        assert torch.equal(v, merged[k]), k


def test_what_cannot_be_exported_is_a_one_line_error(student, tmp_path, capsys):
    path, base = student
    ckpt = torch.load(path, weights_only=False)
    cases = {"moved": {**ckpt, "config": {**ckpt["config"], "svd": str(tmp_path / "gone")}},
             "offline": {**ckpt, "config": {**ckpt["config"], "svd": ""}},
             "unfinished": {**ckpt, "done": False}}
    said = {"moved": "give its place with --base", "offline": "offline teacher", "unfinished": "is unfinished"}
    for name, c in cases.items():
        torch.save(c, tmp_path / f"{name}.pt")
        assert export.main(["--ckpt", str(tmp_path / f"{name}.pt"), "--out", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip()
        assert said[name] in err and "\n" not in err, err
        assert not os.path.exists(tmp_path / name)                           # nothing written
    assert export.main(["--ckpt", str(tmp_path / "moved.pt"), "--base", base, "--out", str(tmp_path / "m"),
                        "--dtype", "float32"]) == 0                           # --base finds the moved folder
    assert export.main(["--ckpt", path, "--out", str(tmp_path / "m")]) == 2    # never overwritten
    assert "nothing is overwritten" in capsys.readouterr().err
