"""Peak GPU memory predicted on any machine: the bench's own step run on a fake CUDA device.

    python train.py --bench --estimate --svd random:svd-xt --size 576x1024 --frames 14 --grad-checkpoint

PyTorch's FakeTensorMode gives every tensor a shape, dtype and device but no data, so a training step of
SVD-XT "runs" in seconds on a CPU without the memory. Every tensor a kernel returns has a storage; the
`Tally` adds a storage's bytes when it first appears on the CUDA device and removes them when its last
reference dies (a finaliser on the storage), and keeps the peak: what `torch.cuda.max_memory_allocated`
would report for the same step. Replaying the same allocations through a model of CUDA's caching allocator
(`Allocator`: blocks rounded to 512 B, small ones carved from 2 MiB segments, large ones from 20 MiB or
exactly sized segments, split and coalesced, never returned) estimates `max_memory_reserved`, what runs out.

To make the fake device behave as a GPU would:
- a CPU-only PyTorch cannot run autograd on CUDA tensors, even fake ones: `fake_cuda` compiles a small
  C++ shim (`SHIM`, with the machine's g++ and PyTorch's headers) that registers c10's no-op device guard
  for CUDA and makes ATen's CUDA hooks report one device;
- CUDA's autocast rules (norms and upsampling in fp32, matmuls and convolutions in bf16) are on;
- attention goes to the kernel a GPU picks (flash in bf16/fp16, memory-efficient in fp32): no attention
  matrix is saved;
- a fake tensor has no values, so the step must not read any. The one read in the stages, Stage 1's
  count of the fakes the discriminator judges, is answered as "all of them" (every mask all true), the
  largest step; the bench draws its Stage 1 levels at the top, where that is what happens.

What it cannot see: buffers kernels allocate internally (cuBLAS and cuDNN workspaces, flash attention's
backward scratch), the allocator's fragmentation beyond this model, the attention backend a particular GPU
and library version picks, and the CUDA context (outside both counters). Read first: `fake_gpu`.
"""
import bisect
import ctypes
import hashlib
import os
import shutil
import subprocess
import weakref
from contextlib import ExitStack, contextmanager
from unittest import mock

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from data import UserError

SHIM = r"""
#include <new>
#include <typeinfo>
#include <c10/core/impl/FakeGuardImpl.h>
#include <ATen/detail/CUDAHooksInterface.h>

namespace {
// CUDA's device guard: c10's no-op one (devices and streams are bookkeeping only)
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);

// ATen's CUDA hooks answering that one device exists; no state of its own, so it can take the place
// of the stub object a CPU-only build creates at import (ATen creates its hooks once, before any shim loads)
struct FakeCUDAHooks : at::CUDAHooksInterface {
  void init() const override {}
  bool hasCUDA() const override { return true; }
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return false; }
  c10::DeviceIndex deviceCount() const override { return 1; }
  c10::DeviceIndex getCurrentDevice() const override { return 0; }
  c10::DeviceIndex current_device() const override { return 0; }
  int getNumGPUs() const override { return 1; }
};
static_assert(sizeof(FakeCUDAHooks) == sizeof(at::CUDAHooksInterface), "the hooks hold no state");
}

// 1: fake CUDA is on; 0: these hooks are a real CUDA build's, left alone
extern "C" int osv_fake_cuda() {
  auto* hooks = const_cast<at::CUDAHooksInterface*>(&at::detail::getCUDAHooks());
  if (typeid(*hooks) == typeid(FakeCUDAHooks)) return 1;
  if (typeid(*hooks) != typeid(at::CUDAHooksInterface)) return 0;
  hooks->~CUDAHooksInterface();
  new (hooks) FakeCUDAHooks();
  return 1;
}
"""
_shim = None


def fake_cuda():
    """Make fake CUDA tensors trainable on this machine: nothing to do where a GPU exists; on a CPU-only
    PyTorch, build the shim once (about 2 s; cached by its source and PyTorch's version) and load it."""
    global _shim
    if torch.cuda.is_available() or _shim is not None:
        return
    if torch.version.cuda or torch.version.hip:
        raise UserError("--estimate on a machine without a GPU needs PyTorch's CPU build (see the README's "
                        "install); this build is for CUDA but sees no device")
    cxx = os.environ.get("CXX", "g++")
    if not shutil.which(cxx):
        raise UserError(f"--estimate compiles a 40-line C++ shim with {cxx} (set CXX for another compiler); "
                        "none was found")
    root = os.path.dirname(torch.__file__)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    key = hashlib.sha256(f"{SHIM}{torch.__version__}{abi}".encode()).hexdigest()[:16]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "osv")
    lib = os.path.join(cache, f"fake_cuda_{key}.so")
    if not os.path.exists(lib):
        os.makedirs(cache, exist_ok=True)
        src = f"{lib}.{os.getpid()}.cpp"
        with open(src, "w") as f:
            f.write(SHIM)
        cmd = [cxx, "-O1", "-shared", "-fPIC", "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w",
               f"-I{root}/include", src, "-o", f"{lib}.{os.getpid()}", f"-L{root}/lib", "-lc10", "-ltorch_cpu"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        os.remove(src)
        if done.returncode:
            raise UserError(f"--estimate: compiling its C++ shim failed:\n{done.stderr[-2000:]}")
        os.replace(f"{lib}.{os.getpid()}", lib)
    shim = ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    if shim.osv_fake_cuda() != 1:
        raise UserError("--estimate: this PyTorch's CUDA hooks are not the CPU build's stub; not patched")
    _shim = shim


def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    """F.scaled_dot_product_attention as a GPU runs it: flash attention in bf16/fp16, the memory-efficient
    kernel in fp32 or with a mask (fake CUDA tensors would otherwise take the math path, which saves the
    attention matrix). Under autocast the inputs are cast first, as autocast casts SDPA's."""
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        q, k, v = (t.to(dtype) for t in (q, k, v))
    if attn_mask is None and q.dtype in (torch.bfloat16, torch.float16) and not kw:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
    bias = None if attn_mask is None else attn_mask.to(q.dtype).expand(*q.shape[:-1], k.shape[-2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, q.requires_grad, dropout_p,
                                                                   is_causal, scale=scale)[0]


class Tally(TorchDispatchMode):
    """Live bytes of CUDA storages, their peak, where the step was at the peak, and every allocation and
    free in order (for `Allocator`). `phase` names the part of the step; a module's forward (the
    recomputation of a checkpointed block in backward included) adds its name."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.at, self.events, self.sizes = 0, 0, "", [], {}
        self.phase, self.modules, self.names = "", [], {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self.answer(func, args, kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cuda":
                s = t.untyped_storage()
                key = s._cdata
                if key not in self.sizes and s.nbytes():
                    self.sizes[key] = s.nbytes()
                    self.events.append((key, s.nbytes()))
                    self.live += s.nbytes()
                    weakref.finalize(s, self.free, key)
                    if self.live > self.peak:
                        self.peak = self.live
                        self.at = self.phase + (f" ({self.modules[-1]})" if self.modules else "")
        return out

    def free(self, key):
        self.live -= self.sizes.pop(key)
        self.events.append((key, 0))

    def answer(self, func, args, kwargs):
        """The op, with the value reads a fake tensor cannot make answered as "every mask all true"."""
        name = func.__name__
        if name.startswith("_local_scalar_dense"):
            if hasattr(args[0], "_osv_value"):
                return args[0]._osv_value
            try:
                return func(*args, **kwargs)                           # a constant the fake mode knows
            except DataDependentOutputException:
                raise UserError("--estimate: the step reads a tensor's value (.item(), float(), int(), a "
                                "data-dependent shape), which a fake tensor does not have") from None
        if name.startswith("index.Tensor") and any(i is not None and i.dtype == torch.bool for i in args[1]):
            (x, idx), mask = args[:2], args[1][0]
            if len(idx) != 1:
                raise UserError("--estimate: the step indexes with a boolean mask beside other indices")
            return torch.empty((mask.numel(), *x.shape[mask.dim():]), dtype=x.dtype, device=x.device)
        if name.startswith(("index_put", "_index_put_impl")) and any(
                i is not None and i.dtype == torch.bool for i in args[1]):
            return args[0] if name.endswith("_") else torch.empty_like(args[0])
        out = func(*args, **kwargs)
        if name.startswith("sum") and args[0].dtype == torch.bool and out.dim() == 0:
            out._osv_value = args[0].numel()                                   # every mask all true
        return out

    @contextmanager
    def part(self, phase):
        """Name a part of the step; the module stack starts afresh in it (a checkpointed block's
        recomputation stops early, leaving its forward hooks unpaired)."""
        old, self.phase, modules, self.modules = self.phase, phase, self.modules, []
        try:
            yield
        finally:
            self.phase, self.modules = old, modules

    def watch(self, roots):
        """Name the modules of `roots` ({name: module}) in the peak's label."""
        for root, m in roots.items():
            self.names.update({id(sub): f"{root}.{n}" if n else root for n, sub in m.named_modules()})

    def pre_hook(self, module, args):
        if id(module) in self.names:
            self.modules.append(self.names[id(module)])

    def post_hook(self, module, args, out):
        if id(module) in self.names and self.modules:
            self.modules.pop()

    def reset_peak(self):
        self.peak, self.at = self.live, self.phase


@contextmanager
def fake_gpu():
    """Everything inside runs on a fake CUDA device: factories make fake tensors, autocast("cuda") casts as
    on a GPU, attention takes the GPU's kernels. Yields the Tally."""
    fake_cuda()
    tally, mode, swap = Tally(), FakeTensorMode(), torch.utils.swap_tensors

    def swap_unmemoised(a, b):
        """Module.to() swaps fake parameters in place; a swap refuses tensors with weak references, which
        the fake mode's memos hold (of Parameters, converted real tensors and constants; only caches)."""
        meta = mode.fake_tensor_converter.meta_converter
        for memo in (meta.tensor_memo, meta.storage_memo, meta.describer.lookup_tensor,
                     meta.describer.lookup_storage):
            memo.clear()
        mode.fake_tensor_converter.constant_storage_mapping.clear()
        return swap(a, b)

    with ExitStack() as stack:
        stack.enter_context(mode)
        # backward in this thread: the engine's per-device threads were counted at the process's first backward
        stack.enter_context(torch.autograd.set_multithreading_enabled(False))
        stack.enter_context(mock.patch("torch.utils.swap_tensors", swap_unmemoised))
        # values do not matter here; truncated-normal init redraws until no value lies outside (a read)
        stack.enter_context(mock.patch("torch.nn.init._no_grad_trunc_normal_",
                                       lambda t, mean, std, a, b, generator=None: t))
        stack.enter_context(mock.patch("torch.cuda.amp.common.amp_definitely_not_available", lambda: False))
        stack.enter_context(mock.patch("torch.cuda.is_bf16_supported", lambda *a, **k: True))
        stack.enter_context(mock.patch.object(F, "scaled_dot_product_attention", attention))
        pre = torch.nn.modules.module.register_module_forward_pre_hook(tally.pre_hook)
        post = torch.nn.modules.module.register_module_forward_hook(tally.post_hook)
        stack.callback(pre.remove)
        stack.callback(post.remove)
        stack.enter_context(tally)
        yield tally


def expandable_segments():
    """Whether CUDA's allocator maps one growing segment per pool (PYTORCH_CUDA_ALLOC_CONF, which train.py
    sets to expandable_segments:True unless the environment gives it)."""
    return "expandable_segments:true" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").replace(" ", "").lower()


class Allocator:
    """CUDA's caching allocator, as a model (c10/cuda/CUDACachingAllocator.cpp): requests round up to 512 B;
    those up to 1 MiB come from 2 MiB segments, larger ones from a 20 MiB segment (below 10 MiB) or one of
    their size rounded to 2 MiB; a request takes the smallest cached free block that fits in its pool,
    split when what remains is worth keeping (any in the small pool, over 1 MiB in the large one); a freed
    block merges with free neighbours; segments are never returned. `reserved` is their total, `peak`
    its maximum: what max_memory_reserved would report."""
    MIB = 1 << 20

    def __init__(self, expandable=False):
        self.pools = {True: [], False: []}         # small? -> its free blocks, sorted [(size, segment, offset)]
        self.blocks, self.ends = {}, {}            # (segment, offset) -> [size, free]; (segment, end) -> offset
        self.where, self.segments, self.reserved, self.peak = {}, 2, 0, 0
        self.expandable, self.mapped = expandable, {True: 0, False: 0}     # segments 1 (small), 0 (large)

    def put(self, seg, off, size, free, small):
        self.blocks[(seg, off)], self.ends[(seg, off + size)] = [size, free], off
        if free:
            bisect.insort(self.pools[small], (size, seg, off))

    def take(self, seg, off, small):
        size, free = self.blocks.pop((seg, off))
        del self.ends[(seg, off + size)]
        if free:
            self.pools[small].remove((size, seg, off))
        return size

    def malloc(self, key, nbytes):
        size = -(-max(nbytes, 1) // 512) * 512
        small = size <= self.MIB
        pool = self.pools[small]
        i = bisect.bisect_left(pool, (size, -1, -1))               # best fit
        if i < len(pool):
            block, seg, off = pool[i]
            self.take(seg, off, small)
        elif self.expandable:                      # one segment per pool, mapped further in pages
            seg, end = int(small), self.mapped[small]
            off = self.ends.get((seg, end), end)
            if off < end and self.blocks[(seg, off)][1]:
                self.take(seg, off, small)                 # the free block at the end grows
            else:
                off = end
            page = (2 if small else 20) * self.MIB
            grow = -(-(size - (end - off)) // page) * page
            self.mapped[small] += grow
            self.reserved += grow
            block = end + grow - off
        else:
            block = (2 * self.MIB if small else 20 * self.MIB if size < 10 * self.MIB else
                     -(-size // (2 * self.MIB)) * 2 * self.MIB)
            seg, off, self.segments = self.segments, 0, self.segments + 1
            self.reserved += block
        self.peak = max(self.peak, self.reserved)
        if block - size >= (512 if small or self.expandable else self.MIB + 1):     # split off the rest, free
            self.put(seg, off + size, block - size, True, small)
        else:
            size = block
        self.put(seg, off, size, False, small)
        self.where[key] = (seg, off, small)

    def release(self, key):
        seg, off, small = self.where.pop(key)
        size = self.take(seg, off, small)
        nxt = self.blocks.get((seg, off + size))
        if nxt is not None and nxt[1]:                                     # merge with the next free block
            size += self.take(seg, off + size, small)
        prev = self.ends.get((seg, off))
        if prev is not None and self.blocks[(seg, prev)][1]:               # and with the previous one
            size += self.take(seg, prev, small)
            off = prev
        self.put(seg, off, size, True, small)

    @classmethod
    def replay(cls, events, expandable=False):
        """The reserved peak of a sequence of (key, nbytes) allocations and (key, 0) frees."""
        a = cls(expandable)
        for key, nbytes in events:
            if nbytes:
                a.malloc(key, nbytes)
            elif key in a.where:
                a.release(key)
        return a.peak
