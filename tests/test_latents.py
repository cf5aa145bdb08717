"""latents.py: the cache round-trips exactly, resumes, refuses another run's latents, names a broken
shard; train.py's --stage latents writes what the stages would encode, and the stages read it."""
import json
import os
import shutil

import pytest
import torch

import latents
import sample
import train
import unet
from data import SyntheticVideos, UserError

KEY = {"ae": [["ae.pt", 1, 2]], "size": [32, 32], "num_frames": 8}


def fake_batches(n_clips, B=4, fail_at=None):
    """batches(first) of random entries shaped as latents_and_condition's, a function of the clip index."""
    def entry(i):
        g = torch.Generator().manual_seed(i)
        return (torch.randn(8, 4, 8, 8, generator=g),
                {"concat": torch.randn(4, 8, 8, generator=g), "image": torch.randn(4, 8, 8, generator=g),
                 "micro": torch.randn(3, generator=g)})

    def batches(first):
        for i in range(first, n_clips, B):
            if fail_at is not None and i >= fail_at:
                raise KeyboardInterrupt
            rows = [entry(j) for j in range(i, i + B)]
            yield torch.stack([r[0] for r in rows]), {k: torch.stack([r[1][k] for r in rows]) for k in rows[0][1]}
    return batches, entry


def test_cache_round_trips_exactly_and_resumes(tmp_path):
    folder = str(tmp_path / "latents")
    n = latents.SHARD * 2 + 8                                   # two full shards and a short one
    batches, entry = fake_batches(n)
    with pytest.raises(KeyboardInterrupt):                      # interrupted in the second shard
        latents.write_cache(folder, KEY, n, fake_batches(n, fail_at=latents.SHARD + 16)[0])
    assert len(json.load(open(os.path.join(folder, "meta.json")))["shards"]) == 1
    assert latents.open_cache(folder, KEY) is None              # unfinished: not read
    latents.write_cache(folder, KEY, n, batches)               # continues from the second shard
    cache = latents.open_cache(folder, KEY)
    assert len(cache) == n and len(cache.shards) == 3
    got = cache.batch([0, 5, latents.SHARD + 3, n - 1, n + 2])  # past the end: the next epoch
    for row, i in enumerate([0, 5, latents.SHARD + 3, n - 1, 2]):
        x0, cond = entry(i)
        assert torch.equal(got["x0"][row], x0) and all(torch.equal(got[k][row], v) for k, v in cond.items())


def test_cache_refuses_another_runs_latents_and_names_a_broken_shard(tmp_path, capsys):
    folder = str(tmp_path / "latents")
    n = latents.SHARD * 2
    latents.write_cache(folder, KEY, n, fake_batches(n)[0])
    other = {**KEY, "size": [32, 64]}
    assert latents.open_cache(folder, other) is None
    assert "another size" in capsys.readouterr().out
    with pytest.raises(UserError, match="size differs"):
        latents.write_cache(folder, other, n, fake_batches(n)[0])
    shard = os.path.join(folder, "shard_00001.pt")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(UserError) as e:
        latents.open_cache(folder, KEY)
    assert "shard_00001.pt" in str(e.value) and "\n" not in str(e.value)
    latents.write_cache(folder, other, n, fake_batches(n)[0], fresh=True)      # --fresh rebuilds
    assert len(latents.open_cache(folder, other)) == n


def test_stage_latents_writes_what_the_stages_encode_and_they_read_it(tiny_run, tmp_path, capsys, fast_args,
                                                                      micro_args):
    out = str(tmp_path / "r")
    shutil.copytree(tiny_run, out)
    args = ["--out", out, *micro_args, *fast_args]
    assert train.main(["--stage", "latents", "--cache-clips", "12", *args]) == 0
    cfg = train.make_config(train.parse(["--stage", "1", *args]), ["1"])
    cache = latents.open_cache(os.path.join(out, "latents"), latents.cache_key(cfg, out, torch.float32))
    assert cache is not None and len(cache) == 12
    ae = sample.load_ae(os.path.join(out, "ae.pt"))[0]
    video = SyntheticVideos(32, 8, "train").batch(range(4))["video"]
    with torch.no_grad():
        x0 = ae.encode_video(video)
    assert torch.allclose(cache.batch(range(4))["x0"], x0, atol=1e-5)            # clip i is clip i of the data
    capsys.readouterr()
    assert train.main(["--stage", "1", "--steps", "2", *args]) == 0
    assert "reading the latent cache" in capsys.readouterr().out
    assert train.main(["--stage", "1", "--steps", "7", "--fresh", *args]) == 2      # 14 clips of 12: refused
    err = capsys.readouterr().err
    assert "--cache-clips 14" in err and len(err.strip().splitlines()) == 1
    assert train.main(["--stage", "latents", "--cache-clips", "12", "--num-frames", "4", "--override", *args]) == 2
    assert "num_frames differs" in capsys.readouterr().err
    assert train.main(["--stage", "2", "--steps", "1", "--num-frames", "4", "--override", *args]) == 0   # ignored
    assert "encoded for another num_frames" in capsys.readouterr().out


def test_latents_and_condition_passes_a_cached_batch_through():
    batch = {"x0": torch.randn(2, 3, 4, 8, 8), "concat": torch.randn(2, 4, 8, 8), "image": torch.randn(2, 1, 16),
             "micro": torch.randn(2, 3)}
    x0, cond = unet.latents_and_condition(None, batch)
    assert torch.equal(x0, batch["x0"]) and all(cond[k] is batch[k] for k in ("concat", "image", "micro"))


def test_a_cache_too_small_for_the_stage_is_refused_or_its_passes_are_said(tmp_path):
    """A stage never loops silently over a cache that holds fewer clips than it reads: it refuses, naming
    --cache-clips; only a cache of every clip of a folder of videos is read again, and each pass is said."""
    cache = latents.LatentCache.__new__(latents.LatentCache)
    cache.folder, cache.clips = "runs/x/latents", 10
    assert latents.check_covers(cache, 10, "1") is None
    note = latents.check_covers(cache, 25, "2", data_clips=10)
    assert "2.5 passes" in note and "frozen augmentation draw" in note
    for data_clips in (None, 30):                                 # synthetic clips, or a folder not all cached
        with pytest.raises(UserError, match=r"--cache-clips 25` \(the 10 encoded are kept\)"):
            latents.check_covers(cache, 25, "2", data_clips)


def test_the_shards_written_are_kept_when_only_the_count_changes(tmp_path, capsys):
    folder = str(tmp_path / "latents")
    n = latents.SHARD * 2 + 8
    batches, entry = fake_batches(latents.SHARD * 4)
    latents.write_cache(folder, KEY, n, batches)
    firsts = []

    def recorded(first):
        firsts.append(first)
        yield from batches(first)
    latents.write_cache(folder, KEY, latents.SHARD * 3, recorded)           # more: the short shard is redone
    assert firsts == [latents.SHARD * 2] and "2 shards kept" in capsys.readouterr().out
    cache = latents.open_cache(folder, KEY)
    got = cache.batch([3, latents.SHARD * 2 + 20])
    assert torch.equal(got["x0"][0], entry(3)[0]) and torch.equal(got["x0"][1], entry(latents.SHARD * 2 + 20)[0])
    latents.write_cache(folder, KEY, latents.SHARD + 5, recorded)           # fewer: nothing is encoded
    assert firsts == [latents.SHARD * 2] and len(latents.open_cache(folder, KEY)) == latents.SHARD + 5
    assert sorted(n for n in os.listdir(folder) if n.startswith("shard_")) == ["shard_00000.pt", "shard_00001.pt"]


def test_the_key_follows_links_and_names_the_encoding_code(tmp_path):
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "real" / "sub" / "a.mp4").write_bytes(b"12345")
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "real" / "sub", tmp_path / "data" / "linked")          # VideoFolder follows it
    before = latents.file_identity(str(tmp_path / "data"))
    assert [f[0] for f in before] == [os.path.join("linked", "a.mp4")]
    (tmp_path / "real" / "sub" / "a.mp4").write_bytes(b"123456")
    assert latents.file_identity(str(tmp_path / "data")) != before
    cfg = train.make_config(train.parse(["--stage", "1"]), ["1"])
    key = latents.cache_key(cfg, str(tmp_path), torch.float32)
    assert key["code"] == latents.code_version(latents.autoencoder.AutoEncoder)
    assert latents.cache_key(cfg, str(tmp_path), torch.float32, encoder=torch.nn.Linear)["code"] != key["code"]
