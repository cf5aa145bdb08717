"""data.py: the synthetic dataset (determinism, physics, ground truth), the folder loader, images, writing."""
import os
import subprocess
import sys

import av
import numpy as np
import pytest
import torch

import data
from data import SyntheticVideos, UserError, VideoFolder, bounce, load_image, write_video


# ---------------------------------------------------------------------------------------- synthetic

@pytest.mark.parametrize("size,frames", [(32, 8), (64, 16)])
def test_synthetic_shapes_and_range(size, frames):
    b = SyntheticVideos(size, frames).batch(range(5))
    assert b["video"].shape == (5, frames, 3, size, size)
    assert b["video"].min() >= -1 and b["video"].max() <= 1
    assert b["pos"].shape == b["vel"].shape == (5, frames, data.MAX_OBJECTS, 2)
    assert b["shape"].shape == b["size"].shape == (5, data.MAX_OBJECTS)
    assert b["color"].shape == (5, data.MAX_OBJECTS, 3)
    assert b["motion"].shape == b["fps"].shape == (5,)
    assert set(b["fps"].tolist()) <= {data.BASE_FPS / s for s in data.STRIDES}
    assert ((b["shape"] >= 0).sum(1) == b["num_objects"]).all()


def test_synthetic_is_deterministic_and_splits_are_disjoint():
    ds = SyntheticVideos(32, 8)
    a, b = ds.batch(range(10, 20)), ds.batch(range(10, 20))
    for k in a:
        assert torch.equal(a[k], b[k])
    # a clip does not depend on the batch it is drawn in
    assert torch.equal(ds[13]["video"], a["video"][3])
    test = SyntheticVideos(32, 8, "test").batch(range(10, 20))["video"]
    assert (test - a["video"]).abs().amax((1, 2, 3, 4)).min() > 0.1
    # clips differ from each other
    v = ds.batch(range(64))["video"]
    assert (v[1:] - v[:-1]).abs().amax((1, 2, 3, 4)).min() > 0.1


def test_bounce_matches_a_step_by_step_simulation():
    """The closed form against an explicit simulation with small time steps and reflections."""
    torch.manual_seed(0)
    p0, v = torch.rand(50) * 8 + 1, torch.randn(50) * 3
    lo, hi, dt = 1.0, 9.0, 1e-3
    p, vel = p0.double().clone(), v.double().clone()
    for i in range(1, 5001):          # 5 time units
        p = p + vel * dt
        over, under = p > hi, p < lo
        p = torch.where(over, 2 * hi - p, torch.where(under, 2 * lo - p, p))
        vel = torch.where(over | under, -vel, vel)
        if i % 1000 == 0:
            pos_cf, vel_cf = bounce(p0, v, torch.tensor(i * dt), lo, hi)
            assert torch.allclose(pos_cf.double(), p, atol=1e-3)
            assert torch.equal(vel_cf.sign(), vel.sign().float())


def test_ground_truth_physics():
    b = SyntheticVideos(32, 8).batch(range(200))
    pos, vel, size, valid = b["pos"], b["vel"], b["size"], b["shape"] >= 0
    speed = vel.norm(dim=-1)                                                 # (B, T, K)
    assert torch.allclose(speed, speed[:, :1].expand_as(speed), atol=1e-4)   # elastic: speed is conserved
    lo = size[:, None, :, None]
    assert (pos >= lo - 1e-4).all() and (pos <= 32 - lo + 1e-4).all()      # never through a wall
    step = pos[:, 1:] - pos[:, :-1]
    free = vel[:, 1:] == vel[:, :-1]                                        # no bounce between frames
    assert torch.allclose(step[free], vel[:, :-1][free], atol=1e-4)
    flipped = (vel[:, 1:] == -vel[:, :-1]) & (vel[:, 1:] != 0)
    assert flipped.any() and (free | flipped).all()                         # a bounce only flips a sign
    mean_speed = (speed[:, 0] * valid).sum(1) / valid.sum(1)
    assert torch.allclose(b["motion"], 100 * mean_speed / 32, atol=1e-4)


def test_rendered_objects_sit_at_their_ground_truth_positions():
    """For clips with one circle or square, the centroid of the object's colour is its true position."""
    ds = SyntheticVideos(32, 8)
    b = ds.batch(range(400))
    errors = []
    for i in range(400):
        if b["num_objects"][i] != 1 or b["shape"][i, 0] not in (0, 1):
            continue
        img = (b["video"][i] + 1) / 2                                        # (T, 3, H, W) in [0, 1]
        color = b["color"][i, 0].view(1, 3, 1, 1)
        inside = ((img - color).abs().amax(1) < 0.02).float()                  # (T, H, W)
        grid = torch.arange(32) + 0.5
        cx = (inside.sum(1) * grid).sum(-1) / inside.sum((1, 2))
        cy = (inside.sum(2) * grid).sum(-1) / inside.sum((1, 2))
        errors.append(torch.stack([cx, cy], -1) - b["pos"][i, :, 0])
    errors = torch.cat(errors)
    # fully covered pixels only, so each centroid is within half a pixel; on average much closer
    assert len(errors) >= 80 and errors.abs().max() < 0.6 and errors.abs().mean() < 0.2


# ---------------------------------------------------------------------------------------- folders

def _write_ramp(path, n, codec, w=32, h=32, fps=8):
    """A video whose frame i has grey level 10 * i, to check which frames a clip contains."""
    with av.open(str(path), "w") as c:
        st = c.add_stream(codec, rate=fps)
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            c.mux(st.encode(av.VideoFrame.from_ndarray(np.full((h, w, 3), 10 * i, np.uint8), format="rgb24")))
        c.mux(st.encode())


@pytest.fixture
def video_folder(tmp_path):
    d = tmp_path / "videos"
    (d / "sub").mkdir(parents=True)
    _write_ramp(d / "a.mp4", 20, "libx264")
    _write_ramp(d / "sub" / "b.webm", 20, "libvpx-vp9", w=48, h=32)
    write_video(str(d / "c.gif"), SyntheticVideos(32, 16).batch([0])["video"][0], scale=1)
    _write_ramp(d / "short.mp4", 3, "libx264")
    (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    (d / "notes.txt").write_text("not a video")
    return d


def test_folder_loader_indexes_and_skips(video_folder, tmp_path):
    with pytest.warns(UserWarning) as rec:
        ds = VideoFolder(str(video_folder), 16, 8, frame_stride=2, cache=str(tmp_path / "index.json"))
    msgs = [str(r.message) for r in rec]
    assert len(ds) == 3 and ds.skipped == 2
    assert any("corrupt.mp4" in m and "cannot decode" in m for m in msgs)
    assert any("short.mp4" in m and "too short" in m for m in msgs)
    assert not any("notes.txt" in m for m in msgs)
    b = ds.batch(range(12))
    assert b["video"].shape == (12, 8, 3, 16, 16)
    assert b["video"].min() >= -1 and b["video"].max() <= 1
    assert b["fps"].shape == (12,) and torch.allclose(b["fps"][:1].round(), torch.tensor([4.0]))
    assert torch.equal(ds.batch(range(12))["video"], b["video"])             # deterministic
    # clips from the ramp videos: consecutive frames are stride (2) frames, 20 grey levels, apart
    grey = (b["video"].mean((2, 3, 4)) + 1) * 127.5                          # (12, 8)
    ramps = (grey[:, 1:] - grey[:, :-1] - 20).abs().amax(1) < 3
    assert ramps.sum() >= 2


def test_folder_index_is_built_once(video_folder, tmp_path, monkeypatch):
    cache = str(tmp_path / "index.json")
    with pytest.warns(UserWarning):
        VideoFolder(str(video_folder), 16, 8, cache=cache)
    monkeypatch.setattr(data, "_probe", lambda path: pytest.fail(f"probed {path} again"))
    with pytest.warns(UserWarning):
        ds = VideoFolder(str(video_folder), 16, 8, cache=cache)
    assert len(ds) == 3


def test_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no usable video in .*empty"):
        VideoFolder(str(empty), 16, 8)
    (empty / "bad.mp4").write_bytes(b"garbage" * 100)
    with pytest.warns(UserWarning, match="bad.mp4"), pytest.raises(UserError, match="1 files skipped"):
        VideoFolder(str(empty), 16, 8)
    with pytest.raises(UserError, match="not a folder"):
        VideoFolder(str(tmp_path / "missing"), 16, 8)


def _clips_folder(root, n, size=(32, 48), frames=8):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_video(str(root / f"v{i:02d}.mp4"), SyntheticVideos(size, frames).batch([i])["video"][0], fps=8)
    return root


def test_held_out_split_is_by_file_recorded_and_the_same_on_a_second_command(tmp_path):
    """The test files: ceil(share x N) of them (at least 2), chosen by a hash of the relative path alone,
    so the same names give the same split in any order or folder; split.json keeps it, and a file added
    later joins the training side only."""
    folder = VideoFolder(str(_clips_folder(tmp_path / "a", 10)), 16, 4)
    record = str(tmp_path / "run" / "split.json")
    os.makedirs(os.path.dirname(record))
    test = data.held_out(folder, 0.25, record)
    assert len(test) == 3 and test <= set(folder.names())
    kept = __import__("json").load(open(record))
    assert kept["test"] == sorted(test) and set(kept["train"]) == set(folder.names()) - test
    train_part, test_part = folder.only(test, keep=False), folder.only(test)
    assert {os.path.relpath(p, folder.root) for p, _ in train_part.files}.isdisjoint(test)
    assert len(train_part) + len(test_part) == len(folder) and set(test_part.names()) == test
    b = train_part.batch(range(40))                          # clips are drawn from the training files only
    assert b["video"].shape == (40, 4, 3, 16, 16)
    again = VideoFolder(str(_clips_folder(tmp_path / "b", 10)), 16, 4)       # the same names elsewhere
    assert data.held_out(again, 0.25) == test
    _clips_folder(tmp_path / "a", 14)                                         # four files more
    grown = VideoFolder(str(tmp_path / "a"), 16, 4)
    assert data.held_out(grown, 0.25, record) == test                         # the recorded split stands
    assert data.held_out(grown, 0.25) != test                                 # (unrecorded, it would move)
    with pytest.raises(UserError, match="--test-share 0.25, not 0.5"):
        data.held_out(grown, 0.5, record)
    assert data.held_out(grown, 0.0) == set()


def test_a_folder_too_small_to_split_says_so(tmp_path):
    folder = VideoFolder(str(_clips_folder(tmp_path / "v", 2)), 16, 4)
    with pytest.raises(UserError, match="2 usable video.*too few for a held-out split.*--test-share 0"):
        data.held_out(folder, 0.1, str(tmp_path / "split.json"))
    assert not os.path.exists(tmp_path / "split.json")
    one = VideoFolder(str(_clips_folder(tmp_path / "one", 1)), 16, 4)
    with pytest.raises(UserError, match="cut it into files"):                 # one long video: refused
        data.held_out(one, 0.5)


# ---------------------------------------------------------------------------------------- images

def _write_png(path, array, pix_fmt):
    h, w = array.shape[:2]
    with av.open(str(path), "w") as c:
        st = c.add_stream("png")
        st.width, st.height, st.pix_fmt = w, h, pix_fmt
        c.mux(st.encode(av.VideoFrame.from_ndarray(array, format=pix_fmt)))
        c.mux(st.encode())


def test_image_loading_gray_rgba_jpeg_and_resize(tmp_path, capsys):
    gray = np.tile(np.arange(32, dtype=np.uint8)[None] * 8, (32, 1))
    _write_png(tmp_path / "g.png", gray, "gray")
    x = load_image(str(tmp_path / "g.png"), 32)
    assert x.shape == (3, 32, 32)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert torch.allclose((x[0, 0] + 1) * 127.5, torch.from_numpy(gray[0]).float(), atol=1)

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0], rgba[..., 2], rgba[..., 3] = 200, 50, 128
    _write_png(tmp_path / "c.png", rgba, "rgba")
    x = load_image(str(tmp_path / "c.png"), 32)
    assert x.shape == (3, 32, 32)
    assert torch.allclose((x[:, 5, 5] + 1) * 127.5, torch.tensor([200.0, 0.0, 50.0]), atol=1)
    assert capsys.readouterr().out == ""                                     # right size: no notice

    big = np.zeros((40, 80, 3), np.uint8)
    big[:, 20:60] = 255                                                      # the centre square is white
    with av.open(str(tmp_path / "b.jpg"), "w") as c:
        st = c.add_stream("mjpeg")
        st.width, st.height, st.pix_fmt = 80, 40, "yuvj420p"
        c.mux(st.encode(av.VideoFrame.from_ndarray(big, format="rgb24")))
        c.mux(st.encode())
    x = load_image(str(tmp_path / "b.jpg"), 16)
    assert x.shape == (3, 16, 16) and x.mean() > 0.9                         # centre crop of the short side
    assert "80x40" in capsys.readouterr().out


def test_image_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_image(str(tmp_path / "nope.png"), 32)
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(UserError, match="cannot read image"):
        load_image(str(tmp_path / "x.png"), 32)


# ---------------------------------------------------------------------------------------- writing

@pytest.mark.parametrize("ext,tol", [(".mp4", 0.08), (".gif", 0.08)])
def test_write_video_roundtrip(tmp_path, ext, tol):
    v = SyntheticVideos(32, 8).batch(range(3))["video"]                     # (3, T, 3, 32, 32)
    path = str(tmp_path / f"grid{ext}")
    write_video(path, v, fps=8, ncol=3, scale=2)
    with av.open(path) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 8
    assert frames[0].shape[:2] == (2 * (32 + 2), 2 * (3 * 33 + 1))            # one row of three, 1-px gaps
    got = torch.from_numpy(frames[5][2:66:2, 2:66:2]).permute(2, 0, 1).float() / 127.5 - 1
    assert (got - v[0, 5]).abs().mean() < tol
    with pytest.raises(UserError):
        write_video(str(tmp_path / "x.avi"), v[0])


# ---------------------------------------------------------------------------- optional dependencies

def test_a_missing_svd_package_is_a_one_line_error_with_the_install_command():
    with pytest.raises(UserError, match=r"needs no_such_pkg: pip install -r requirements-svd.txt$"):
        data.optional("no_such_pkg.sub")


def test_the_offline_path_never_imports_the_svd_packages():
    code = "import sys, train; bad = {'diffusers', 'transformers', 'safetensors'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def write_indexed(path, fmt, codec, n=120, size=64):
    """A video whose frame i shows i in binary (7 black or white bars): frames identify themselves."""
    frames = np.zeros((n, size, size, 3), np.uint8)
    for i in range(n):
        for b in range(7):
            frames[i, :, b * 9:b * 9 + 8] = 255 * ((i >> b) & 1)
    if fmt == "gif":                                  # our writer: a palette, 4 cs per frame
        return write_video(str(path), torch.from_numpy(frames).permute(0, 3, 1, 2) / 127.5 - 1, fps=25, scale=1)
    with av.open(str(path), "w", format=fmt) as c:
        st = c.add_stream(codec, rate=25)
        st.width, st.height = size, size
        st.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        st.codec_context.gop_size = 12
        for a in frames:
            for p in st.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in st.encode():
            c.mux(p)


def frame_index(frame):
    """The index drawn by write_indexed, from a (3, H, W) frame in [-1, 1]."""
    return sum(int(frame[:, :, b * 9:b * 9 + 8].mean() > 0) << b for b in range(7))


@pytest.mark.parametrize("fmt, codec, ext", [("mpeg", "mpeg2video", ".mpg"), ("mp4", "h264", ".mp4"),
                                             ("webm", "libvpx-vp9", ".webm"), ("avi", "mjpeg", ".avi"),
                                             ("gif", "gif", ".gif")])
def test_every_clip_start_gives_the_exact_frames(tmp_path, fmt, codec, ext):
    """Every start position of a 120-frame file against its sequential decode: MPEG-2 in a program stream
    once returned frames 1-12 too late after a seek."""
    folder = tmp_path / "v"
    folder.mkdir()
    write_indexed(folder / f"idx{ext}", fmt, codec)
    ds = VideoFolder(str(folder), image_size=64, num_frames=4)
    path, info = ds.files[0]
    assert info["frames"] == 120
    for start in range(info["frames"] - ds.need + 1):
        got = [frame_index(f) for f in ds._decode(path, info, start)]
        assert got == list(range(start, start + 4)), (start, got)
