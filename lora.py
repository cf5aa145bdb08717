"""LoRA on a shared base: how OSV adapts the teacher into its students, stated once.

OSV's students are the teacher plus LoRA (Hu et al. 2021: W x + (alpha / r) B A x, B zero-initialised;
Stage 1 trains LoRA only, full fine-tuning collapsed to static videos in the paper), in the
consistency parametrisation (`unet.scalings(..., sigma_min)`). The teacher's weights are never copied:
`to_student` wraps them in place and freezes them (stored in the training precision), and the teacher
is the same network with its adapters switched off (`base_only`). So Stage 2 holds one copy of the
base for its three networks: the student, its EMA target (unet.EMA swaps the adapters' average in)
and the teacher. A student's checkpoint holds what trained (`trained_state`), not the base.

Read first: `LoRA`, then `to_student` and `base_only`.
"""
import math
from contextlib import contextmanager

import torch
import torch.nn as nn

from data import UserError
from unet import AlphaBlender, Attention


class LoRA(nn.Module):
    """A frozen Linear or ConvNd plus a trainable low-rank update. For a conv, A is a conv with the base
    kernel and r output channels and B a 1x1 conv, so B A is a rank-r change of the flattened kernel.
    B starts at zero: the adapted network starts exactly equal to the base network. `off` switches the
    update off: the base alone (the teacher, `base_only`)."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale, self.merged, self.off = base.requires_grad_(False), alpha / rank, False, False
        if isinstance(base, nn.Linear):
            self.A = nn.Linear(base.in_features, rank, bias=False)
            self.B = nn.Linear(rank, base.out_features, bias=False)
        else:
            k = base.kernel_size
            self.A = type(base)(base.in_channels, rank, k, base.stride, base.padding, bias=False)
            self.B = type(base)(rank, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.B.weight)
        # initialised on the CPU (the same values on every device), then moved to where the base lives;
        # in fp32 whatever the base's dtype: a bf16 base is frozen, the adapters train (autocast casts)
        self.A.to(base.weight.device)
        self.B.to(base.weight.device)

    def delta(self):
        """(alpha / r) B A as a change of the base weight: (out, r) @ (r, in * kernel) -> base's shape."""
        return (self.B.weight.flatten(1) @ self.A.weight.flatten(1)).view_as(self.base.weight) * self.scale

    @torch.no_grad()
    def merge(self, on=True):
        """Fold B A into the base weight (on=True) or take it back out (on=False); the output is unchanged."""
        if on != self.merged:
            self.base.weight += (self.delta() if on else -self.delta()).to(self.base.weight.dtype)
            self.merged = on

    def forward(self, x):
        y = self.base(x)
        if self.merged or self.off:
            return y
        if not torch.is_autocast_enabled(x.device.type):      # a bf16 base sampled without autocast
            x = x.to(self.A.weight.dtype)
        return y + (self.B(self.A(x)) * self.scale).to(y.dtype)


def add_lora(model, rank, alpha=None, convs=False):
    """Freeze `model` and wrap its attention projections (q, k, v, out) and, with convs=True, every
    convolution in LoRA adapters of this rank (alpha defaults to the rank: scale 1). rank 0 means full
    fine-tuning: nothing is wrapped and everything trains. Returns the trainable parameters."""
    if rank == 0:
        return [p for p in model.requires_grad_(True).parameters()]
    model.requires_grad_(False)
    targets = [(m, n) for m in model.modules() for n, c in m.named_children()
               if (isinstance(m, Attention) and n in ("to_q", "to_k", "to_v", "to_out"))
               or (convs and isinstance(c, (nn.Conv1d, nn.Conv2d, nn.Conv3d)))]
    for m, n in targets:
        setattr(m, n, LoRA(getattr(m, n), rank, alpha or rank))
    return [p for p in model.parameters() if p.requires_grad]


def merge_lora(model, on=True):
    """Fold every adapter into its base (LoRA's B A, the blends' deltas): the same outputs, faster."""
    for m in model.modules():
        if isinstance(m, LoRA):
            m.merge(on)
        elif isinstance(m, AlphaBlender) and m.delta is not None and on:
            with torch.no_grad():
                m.mix_factor += m.delta.to(m.mix_factor.dtype)
            m.delta = None


def unwrap(model):
    """Fold every adapter in (`merge_lora`) and put each LoRA's base back in its place: a plain network
    with the base's own parameter names, which computes what the student computes (export.py)."""
    merge_lora(model)
    for m in list(model.modules()):
        for n, c in list(m.named_children()):
            if isinstance(c, LoRA):
                setattr(m, n, c.base)
    return model


def to_student(D, sigma_min, lora, dtype=None):
    """Turn the denoiser D into OSV's student in place: the consistency parametrisation (f(x, sigma_min)
    = x) and LoRA adapters of lora["rank"] (on the convolutions too with lora["convs"]); with
    lora["blends"], a trainable delta on every temporal blend scalar (Stage 2's "specific layers").
    D's own weights become the frozen base, stored in `dtype` (the training precision), and stay the
    teacher: `base_only` switches the adapters off. rank 0 is full fine-tuning: the base itself trains,
    there is no base to share. Returns the trainable parameters."""
    if lora["rank"] > 0 and dtype is not None:
        D.to(dtype)
    D.sigma_min = sigma_min
    params = add_lora(D, lora["rank"], convs=lora["convs"])
    for m in D.modules():
        if lora.get("blends") and isinstance(m, AlphaBlender):
            m.delta = nn.Parameter(torch.zeros((), device=m.mix_factor.device))   # fp32, as the adapters
            params.append(m.delta)
    return params


@contextmanager
def base_only(f):
    """The student f as its teacher: every adapter off (LoRA, the blends' deltas), EDM's
    parametrisation (sigma_min None), eval mode. The same weights: Stage 2 holds one copy of the base."""
    adapters = [m for m in f.modules() if isinstance(m, (LoRA, AlphaBlender))]
    assert not any(getattr(m, "merged", False) for m in adapters), "a merged student has no base left"
    sigma_min, f.sigma_min, mode = f.sigma_min, None, f.training
    for m in adapters:
        m.off = True
    try:
        yield f.eval()
    finally:
        for m in adapters:
            m.off = False
        f.sigma_min = sigma_min
        f.train(mode)


def teacher_of(f):
    """The teacher as a denoiser function D(x, sigma, cond, keep): f run with `base_only`."""
    def D(*args, **kwargs):
        with base_only(f):
            return f(*args, **kwargs)
    return D


def trained_state(model):
    """What a student's checkpoint holds: its trainable parameters and its buffers. The frozen base
    comes from where it was built (teacher.pt or SVD's folder), which the checkpoint names."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k in keep}


def load_trained(model, state, fresh=()):
    """Load `trained_state` into a model built on its base. Every trainable parameter must be given,
    except those whose names end with one of `fresh` (new in this stage: Stage 2's blend deltas)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    train = {n for n, p in model.named_parameters() if p.requires_grad}
    lost = [k for k in missing if k in train and not k.endswith(tuple(fresh))]
    if unexpected or lost:
        raise UserError(f"the checkpoint does not fit this student: {(unexpected or lost)[0]} "
                        f"{'is not one of its weights' if unexpected else 'is missing'}")
