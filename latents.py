"""The latent cache: every training clip encoded once, read by the stages instead of pixels.

OSV trains in the autoencoder's latent space (docs/paper.md, "The base model"), so the autoencoder only
ever maps a clip to the same latents: at SVD's size its encoder (and CLIP's, for the image embedding)
cost more than a student's step. `python train.py --stage latents` runs `write_cache` once; the stages
then read `LatentCache` whenever it matches the run.

Each clip's entry is exactly what `unet.latents_and_condition` returns for it: the latents x0, the
conditioning latent of its noise-augmented first frame, the image conditioning (SVD's CLIP embedding or
our first-frame latent) and the micro-conditions. The augmentation noise is drawn once per clip: an epoch
over the cache sees each clip once with one draw, as training without the cache does.

Format: a folder of shards (`shard_00000.pt`, SHARD clips each, saved atomically) and `meta.json`, which
names the run that made them (`key`: autoencoder, frame size and count, data) and lists the finished
shards with their sizes. meta.json is rewritten after every shard, so an interrupted encoding resumes.
Read first: `write_cache`, then `LatentCache.batch`.
"""
import json
import os

import torch
from tqdm import tqdm

import autoencoder
import data
import unet
from data import UserError, frame_size

SHARD = 64                          # clips per shard


def file_identity(path):
    """Size and modification time of a file, or of every file under a folder: what identifies the
    autoencoder's weights (ae.pt, SVD's folder) without reading gigabytes."""
    if os.path.isfile(path):
        st = os.stat(path)
        return [os.path.basename(path), st.st_size, st.st_mtime_ns]
    found = []
    for d, _, names in sorted(os.walk(path, followlinks=True)):          # as VideoFolder reads: links followed
        for n in sorted(names):
            st = os.stat(os.path.join(d, n))
            found.append([os.path.relpath(os.path.join(d, n), path), st.st_size, st.st_mtime_ns])
    return found


def code_version(encoder):
    """The cache's format version: a hash of the code that turns a clip index into its entry (reading and
    cropping the clips, the encoder class `encoder`, latents_and_condition). A change to any of it
    changes the key, so old latents are never read by new code."""
    return data.source_hash(data._uniform, data.bounce, data.SyntheticVideos, data._fit, data._frame_to_array,
                            data._to_tensor, data.VideoFolder, data.FixedMotion, encoder, unet.latents_and_condition)


def cache_key(cfg, out, dtype, encoder=autoencoder.AutoEncoder):
    """What a clip's latents depend on (train.py's Config): the autoencoder's weights (by file size and
    time: run/ae.pt or SVD's folder), the frames, the data (a folder's files: one more file changes
    which file every clip index reads), the precision they were encoded in, and the encoding code
    (`code_version`; encoder: the class that encodes, svd.SVDEncoders with --svd)."""
    return {"code": code_version(encoder), "ae": file_identity(cfg.svd or os.path.join(out, "ae.pt")),
            "data": file_identity(cfg.data) if cfg.data else "synthetic", "held_out": held_out_files(cfg, out),
            "size": list(frame_size(cfg.size, cfg.image_size)), "num_frames": cfg.num_frames,
            "frame_stride": cfg.frame_stride, "motion_bucket": cfg.motion_bucket if cfg.svd else None,
            "seed": cfg.seed, "dtype": str(dtype)}


def held_out_files(cfg, out):
    """The test files of a folder run (its split.json): which files the training clips are drawn from."""
    path = os.path.join(out, data.SPLIT)
    if not cfg.data or not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)["test"]


def _differs(a, b):
    return next((k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)), "key")


def read_meta(folder):
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"latent cache {path} is unreadable ({e}); --stage latents --fresh rebuilds it") from None


def _write_meta(folder, meta):
    data.save_atomic(json.dumps(meta, indent=1), os.path.join(folder, "meta.json"), text=True)


def write_cache(folder, key, clips, batches, fresh=False):
    """Encode clips 0 .. clips - 1 into shards under `folder`. batches(first) yields (x0, cond) of the
    clips from `first` on, in order, as `unet.latents_and_condition` returns them, in batches whose size
    divides SHARD. A finished cache for the same key is kept, an unfinished one continued; one for
    another key is refused unless `fresh`."""
    meta = read_meta(folder)
    if meta is not None and meta["key"] != key and not fresh:
        raise UserError(f"{folder} holds latents of another run ({_differs(meta['key'], key)} differs): "
                        f"--fresh rebuilds it")
    if meta is None or meta["key"] != key or fresh:
        meta = {"key": key, "clips": clips, "shard": SHARD, "shards": []}
    elif meta["clips"] != clips:             # the same run, another count: the shards written are a prefix
        kept = []
        for i, shard in enumerate(meta["shards"]):
            has, needs = min(SHARD, meta["clips"] - i * SHARD), min(SHARD, clips - i * SHARD)
            if needs <= 0 or has < needs:
                break
            kept.append(shard)
        print(f"latents: {folder} was encoded for {meta['clips']} clips; {len(kept)} shards kept "
              f"({min(clips, len(kept) * SHARD)} clips), {clips} wanted")
        meta = {**meta, "clips": clips, "shards": kept}
    os.makedirs(folder, exist_ok=True)
    _write_meta(folder, meta)                        # first the list, then the files it no longer names
    for n in os.listdir(folder):
        if n.startswith("shard_") and n not in {s[0] for s in meta["shards"]}:
            os.remove(os.path.join(folder, n))
    first = len(meta["shards"]) * SHARD
    if first >= clips:
        print(f"latents: kept the finished cache {folder} ({clips} clips)")
        return meta
    parts, n = [], first
    with tqdm(total=clips, initial=first, desc="latents", dynamic_ncols=True) as bar:
        for x0, cond in batches(first):
            assert SHARD % len(x0) == 0, "a batch size that divides SHARD"
            parts.append({"x0": x0, **cond})
            n += len(x0)
            bar.update(len(x0))
            if n % SHARD and n < clips:
                continue
            keep = min(SHARD, clips - len(meta["shards"]) * SHARD)                        # the last may be short
            shard = {k: torch.cat([p[k] for p in parts])[:keep].cpu() for k in parts[0]}     # (keep, ...)
            name = f"shard_{len(meta['shards']):05d}.pt"
            torch.save(shard, os.path.join(folder, name + f".{os.getpid()}.tmp"))
            os.replace(os.path.join(folder, name + f".{os.getpid()}.tmp"), os.path.join(folder, name))
            meta["shards"].append([name, os.path.getsize(os.path.join(folder, name))])
            _write_meta(folder, meta)                   # after the shard: an interruption loses no finished one
            parts = []
            if n >= clips:
                break
    print(f"latents: {clips} clips in {len(meta['shards'])} shards, {folder}")
    return meta


class LatentCache:
    """A finished cache as a dataset: `batch(indices)` gives clip i % clips of the cache for each index
    (an epoch is `clips` clips), as the dict `latents_and_condition` reads: x0, concat, image, micro."""

    def __init__(self, folder):
        self.folder, meta = folder, read_meta(folder)
        self.clips, self.per = meta["clips"], meta["shard"]
        self.shards = meta["shards"]
        for name, size in self.shards:                   # a truncated shard is caught before training starts
            path = os.path.join(folder, name)
            if not os.path.isfile(path) or os.path.getsize(path) != size:
                raise self._broken(path, "missing" if not os.path.isfile(path) else
                                   f"{os.path.getsize(path)} bytes, {size} written")
        self._loaded = (None, None)

    def _broken(self, path, why):
        return UserError(f"latent cache shard {path} is broken ({why}): rebuild it with "
                         f"`python train.py --stage latents --fresh` and the run's flags")

    def _shard(self, s):
        if self._loaded[0] != s:                        # sequential steps read one shard after another
            path = os.path.join(self.folder, self.shards[s][0])
            try:
                self._loaded = (s, torch.load(path, map_location="cpu", weights_only=True))
            except Exception as e:
                raise self._broken(path, str(e).splitlines()[0][:120]) from None
        return self._loaded[1]

    def __len__(self):
        return self.clips

    def batch(self, indices):
        rows = []
        for i in indices:
            j = i % self.clips
            shard = self._shard(j // self.per)
            rows.append({k: v[j % self.per] for k, v in shard.items()})
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def check_covers(cache, reads, stage, data_clips=None):
    """A stage reads clips 0 .. reads - 1. A cache that holds fewer is refused in one line, never read
    round and round, unless it holds every clip of a folder of videos (data_clips), which the stage
    would pass over again anyway: then each pass is said, with its frozen augmentation draw."""
    if reads <= cache.clips:
        return None
    if data_clips is not None and cache.clips >= data_clips:
        return (f"stage {stage}: {reads} clips read, {reads / cache.clips:.1f} passes over the latent cache's "
                f"{cache.clips} (every clip of --data); each pass sees each clip with its one frozen "
                f"augmentation draw")
    raise UserError(f"the latent cache {cache.folder} holds {cache.clips} clips; stage {stage} reads {reads} (steps x "
                    f"batch): encode the rest with `python train.py --stage latents --cache-clips {reads}` (the "
                    f"{cache.clips} encoded are kept), or train fewer steps")


def open_cache(folder, key):
    """The run's cache if `folder` holds a finished one for `key`; None (with a note when it holds
    another run's latents or an unfinished encoding) otherwise."""
    meta = read_meta(folder)
    if meta is None:
        return None
    if meta["key"] != key:
        changed = _differs(meta["key"], key)
        print(f"note: {folder} was encoded for another {changed}: encoding on the fly "
              f"(`--stage latents --fresh` rebuilds it)")
        return None
    if len(meta["shards"]) * meta["shard"] < meta["clips"]:
        print(f"note: {folder} is unfinished: encoding on the fly (`--stage latents` finishes it)")
        return None
    return LatentCache(folder)
