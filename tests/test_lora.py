"""lora.py: LoRA starts equal and merges exactly, adapters in fp32 on a base in the training precision, full
fine-tuning at rank 0, the students' boundary condition, the teacher as the student with its adapters
off (bit for bit), and checkpoints that hold the adapters alone."""
import copy

import pytest
import torch
import torch.nn as nn

import lora
from data import UserError
from test_unet import MICRO, cond_for, randomise
from unet import Denoiser, scalings


@pytest.mark.parametrize("convs", [False, True])
def test_lora_starts_equal_and_merges_exactly(convs):
    torch.manual_seed(0)
    base = randomise(Denoiser.new(MICRO)).eval()   # no zero-initialised layers: every adapted weight reaches the output
    f = copy.deepcopy(base)
    params = lora.add_lora(f, rank=4, convs=convs)
    loras = [m for m in f.modules() if isinstance(m, lora.LoRA)]
    assert loras and all(any(p is q for q in params) for m in loras for p in (m.A.weight, m.B.weight))
    assert len(params) == 2 * len(loras)                           # only the adapters train
    assert any(isinstance(m.base, nn.Conv3d) for m in loras) == convs
    x, sigma, c = torch.randn(2, 8, 4, 8, 8), torch.tensor([0.5, 3.0]), cond_for(2)
    with torch.no_grad():
        assert torch.allclose(f(x, sigma, c), base(x, sigma, c), atol=1e-6)   # B = 0 at init
        for m in loras:
            m.B.weight.normal_(0, 0.05)
        w0 = loras[0].base.weight.clone()
        unmerged = f(x, sigma, c)
        assert not torch.allclose(unmerged, base(x, sigma, c), atol=1e-3)
        lora.merge_lora(f)
        assert torch.allclose(f(x, sigma, c), unmerged, atol=1e-4)
        lora.merge_lora(f, False)
        assert torch.allclose(loras[0].base.weight, w0, atol=1e-6)


def test_lora_adapters_follow_the_base_device_and_train_in_fp32():
    # a network already moved to the GPU gets adapters on the GPU; "meta" stands in for the GPU here (the
    # bug this catches: adapters left on the CPU broke every CUDA run). A bf16 base is frozen; the
    # adapters train, in fp32 (Adam's updates on bf16 weights round away)
    for base in (nn.Linear(6, 5, device="meta"), nn.Conv2d(3, 4, 3, device="meta", dtype=torch.bfloat16)):
        m = lora.LoRA(base, rank=2, alpha=2)
        assert {p.device.type for p in m.parameters()} == {"meta"}
        assert {p.dtype for p in m.parameters() if p.requires_grad} == {torch.float32}
        assert m.base.weight.dtype == base.weight.dtype


def test_student_base_is_stored_in_the_training_precision():
    f = Denoiser.new(MICRO)
    params = lora.to_student(f, 0.002, {"rank": 4, "convs": True, "blends": True}, dtype=torch.bfloat16)
    frozen = [p for p in f.parameters() if not p.requires_grad]
    assert frozen and {p.dtype for p in frozen} == {torch.bfloat16}
    assert {p.dtype for p in params} == {torch.float32}
    g = Denoiser.new(MICRO)                         # full fine-tuning trains the base: it stays fp32
    lora.to_student(g, 0.002, {"rank": 0, "convs": True}, dtype=torch.bfloat16)
    assert {p.dtype for p in g.parameters()} == {torch.float32}


def test_lora_rank_zero_is_full_fine_tuning():
    f = Denoiser.new(MICRO)
    params = lora.add_lora(f, rank=0)
    assert len(params) == len(list(f.parameters())) and not any(isinstance(m, lora.LoRA) for m in f.modules())


def test_a_bf16_base_runs_with_and_without_autocast():
    # training runs under autocast; the end-of-stage check and sampling run the same student without it
    torch.manual_seed(0)
    f = randomise(Denoiser.new(MICRO)).eval()
    ref = copy.deepcopy(f)
    lora.to_student(f, 0.002, {"rank": 4, "convs": True, "blends": True}, dtype=torch.bfloat16)
    lora.to_student(ref, 0.002, {"rank": 4, "convs": True, "blends": True})
    x, sigma, c = torch.randn(2, 8, 4, 8, 8), torch.tensor([0.5, 3.0]), cond_for(2)
    with torch.no_grad():
        plain = f(x, sigma, c)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = f(x, sigma, c)
        exact = ref(x, sigma, c)
    scale = exact.abs().max()
    assert (plain - exact).abs().max() < 0.05 * scale and (auto - exact).abs().max() < 0.05 * scale


def test_boundary_condition_is_exact_and_the_student_starts_as_the_teacher():
    torch.manual_seed(0)
    teacher = randomise(Denoiser.new(MICRO)).eval()   # a non-zero output layer: the network's term is visible
    f = copy.deepcopy(teacher)
    lora.to_student(f, 0.002, {"rank": 4, "convs": True})
    x, c = torch.randn(3, 8, 4, 8, 8), cond_for(3)
    with torch.no_grad():
        assert torch.equal(f(x, torch.full((3,), 0.002), c), x)            # f(x, sigma_min) = x
        c_skip, c_out, _, _ = scalings(torch.tensor(0.002), 1.0, 0.002)
        assert c_skip == 1 and c_out == 0
        # above sigma_min the student starts as the teacher, up to O(sigma_min) in its scalings
        sigma = torch.tensor([1.0, 10.0, 80.0])
        out, ref = f(x, sigma, c), teacher(x, sigma, c)
        network_term = ref - scalings(sigma, 1.0)[0].view(3, 1, 1, 1, 1) * x
        assert network_term.abs().max() > 0.1                              # the comparison covers F, not only c_skip
        assert (out - ref).abs().max() < 1e-2 * network_term.abs().max()


def test_teacher_is_the_student_with_its_adapters_off():
    # one base: switching the adapters off gives the separate teacher's output exactly, bit for bit
    torch.manual_seed(0)
    teacher = randomise(Denoiser.new(MICRO)).eval()
    f = copy.deepcopy(teacher)
    params = lora.to_student(f, 0.002, {"rank": 4, "convs": True, "blends": True})
    with torch.no_grad():
        for p in params:                             # trained adapters and blend deltas: far from the base
            p.add_(torch.randn_like(p) * 0.1)
    x, sigma, c, keep = torch.randn(2, 8, 4, 8, 8), torch.tensor([0.5, 3.0]), cond_for(2), torch.tensor([1.0, 0.0])
    with torch.no_grad():
        student = f(x, sigma, c, keep)
        with lora.base_only(f):
            off = f(x, sigma, c, keep)
        assert torch.equal(off, teacher(x, sigma, c, keep))
        assert torch.equal(lora.teacher_of(f)(x, sigma, c, keep), off)
        assert not torch.allclose(student, off, atol=1e-3)              # the adapters do matter
        assert torch.equal(f(x, sigma, c, keep), student)                # and come back on after


def test_student_checkpoint_state_is_its_adapters():
    torch.manual_seed(0)
    f = randomise(Denoiser.new(MICRO))
    base = copy.deepcopy(f)
    params = lora.to_student(f, 0.002, {"rank": 4, "convs": True, "blends": True})
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)
    state = lora.trained_state(f)
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in params)
    lora.to_student(base, 0.002, {"rank": 4, "convs": True, "blends": True})
    lora.load_trained(base, state)
    x, sigma, c = torch.randn(2, 8, 4, 8, 8), torch.tensor([0.5, 3.0]), cond_for(2)
    with torch.no_grad():
        assert torch.equal(base(x, sigma, c), f(x, sigma, c))
    with pytest.raises(UserError, match="is missing"):
        lora.load_trained(base, {k: v for k, v in state.items() if not k.endswith("delta")})
    lora.load_trained(base, {k: v for k, v in state.items() if not k.endswith("delta")}, fresh=("delta",))
