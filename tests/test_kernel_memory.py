"""Peak memory of the kernels' backward passes, counted allocation by allocation.

What each backward allocates, besides its outputs, is small by design (kernels/lm_head.py and
kernels/thought_attention.py docstrings), and the order of its allocations decides the peak:
- LM head: the chunk buffer and the mixed hidden states are freed before dh_talk / dh_base are
  allocated, so the peak is the loop's (h_mix, buffer, dW, the fp32 dh_mix) or the epilogue's
  (dW, dh_mix, dh_talk, dh_base), not their sum (the H200 run 2 measured the sum: 635 MiB at N=8192
  d=4096 V=32000, where Liger and Cut Cross-Entropy took 506);
- thought attention: the fp32 per-head-split partials of base dK/dV are summed and freed before dQ
  and the chain dK/dV are allocated, so the peak is the gradients plus delta (run 2: 648 MiB at the
  paper shape, FlexAttention 575).

On CPU the kernels run in the Triton interpreter and the count is the profiler's allocation and free
events (bytes requested from PyTorch's CPU allocator); on a GPU it is max_memory_allocated. The
interpreter keeps the tensors of the last launch alive until the next launch (measured: a tensor
passed to a kernel and deleted stays allocated until another kernel runs), which the CPU bounds
add where it matters: so on CPU the LM-head test sees h_mix freed but cannot see the logit chunk
freed (the last grad-kernel launch holds it); the GPU variant checks both. Kept out of test_lm_head.py / test_thought_attention.py on purpose: the
learning experiment replaces a kernel family whose correctness tests fail on the GPU by its
plain-PyTorch path (benchmarks/learn_experiment.py FALLBACKS), which a memory bound must not trigger.
"""
import importlib

import pytest
import torch

import kernels

lm = importlib.import_module("kernels.lm_head")
ta = importlib.import_module("kernels.thought_attention")

DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                     reason="the Triton interpreter is off where CUDA is")),
           pytest.param("cuda", marks=pytest.mark.gpu)]
SLACK_CPU = 4096              # the small per-row vectors (lse, w partials, grad of a sum), bytes
SLACK_GPU = 2**20             # the same plus the caching allocator's 512-byte rounding


def peak_extra(fn, device: str) -> int:
    """The most bytes allocated at once during fn() beyond what was allocated when it started."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]"):
        live += nbytes                      # frees are negative
        peak = max(peak, live)
    return peak


def _lm_case(device):
    # CPU: fp32 (the interpreter's 16-bit GEMM path adds a product temporary per chunk, CPU only);
    # one vocabulary chunk either way, all rows in it
    return (32, 256, 256, torch.float32) if device == "cpu" else (1024, 2048, 4096, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_lm_head_backward_peak(device):
    N, d, V, dt = _lm_case(device)
    e = torch.tensor([], dtype=dt).element_size()
    R, Vc = lm._chunk_plan(N, V, e)
    assert (R, Vc) == (N, V)
    g = torch.Generator().manual_seed(0)
    h_talk, h_base = (torch.randn(N, d, generator=g).to(device, dt).requires_grad_() for _ in range(2))
    w = (0.5 * torch.rand(N, generator=g)).to(device, dt).requires_grad_()
    weight = (torch.randn(V, d, generator=g) * d ** -0.5).to(device, dt).requires_grad_()
    target = torch.randint(0, V, (N,), generator=g).to(device)
    up = torch.randn(N, generator=g).to(device)
    kernels.mixed_logprob(h_talk, h_base, w, weight, target).backward(up)     # JIT, cuBLAS workspace
    for t in (h_talk, h_base, w, weight):
        t.grad = None
    logp = kernels.mixed_logprob(h_talk, h_base, w, weight, target)
    extra = peak_extra(lambda: logp.backward(up), device)

    hm = dh = N * d * e                      # h_mix; each of dh_talk, dh_base
    buf = R * Vc * e                         # the logit chunk
    dW, dmix = V * d * e, N * d * 4
    held = buf if device == "cpu" else 0     # the interpreter's last launch (the grad kernel's buffer)
    bound = dW + dmix + max(hm + buf, 2 * dh + held) + (SLACK_CPU if device == "cpu" else SLACK_GPU)
    assert extra <= bound, (f"backward peak {extra} B > {bound} B: something besides dW, dh_mix and the loop's "
                            f"or the epilogue's tensors is alive (h_mix {hm} B, buffer {buf} B, dh {dh} B each)")
    assert extra >= dW + dmix + 2 * dh, f"backward peak {extra} B is below its own outputs: not measured"


@pytest.mark.parametrize("device", DEVICES)
def test_thought_attention_backward_peak_with_split_partials(device, monkeypatch):
    monkeypatch.setattr(ta, "_num_sms", lambda dev: 10**6)      # split base dK/dV over every head
    B, H, H_KV, T, L, D, dt = ((1, 4, 1, 16, 4, 32, torch.float32) if device == "cpu"
                               else (2, 8, 2, 256, 8, 128, torch.bfloat16))
    G = H // H_KV
    assert ta._base_split(B, H_KV, G, T, ta._bwd_base_config(D, dt, T)["BLOCK_N"], 10**6) == G
    g = torch.Generator().manual_seed(1)
    shapes = [(B, H, T, L, D), (B, H_KV, T, D), (B, H_KV, T, D), (B, H_KV, T, L, D), (B, H_KV, T, L, D)]
    xs = [torch.randn(s, generator=g).to(device, dt).requires_grad_() for s in shapes]
    o = kernels.thought_attention(*xs)
    do = torch.randn(o.shape, generator=g).to(device, dt)
    o.backward(do, retain_graph=True)                                    # JIT
    for x in xs:
        x.grad = None
    extra = peak_extra(lambda: o.backward(do), device)

    e = torch.tensor([], dtype=dt).element_size()
    grads = sum(x.numel() for x in xs) * e
    delta = B * H * T * L * 4
    partials = 2 * G * B * H_KV * T * D * 4
    bound = grads + delta + (SLACK_CPU if device == "cpu" else SLACK_GPU)
    assert extra <= bound, (f"backward peak {extra} B > gradients + delta {bound} B: the fp32 split partials "
                            f"({partials} B) are alive next to the big gradients")
    assert extra >= grads, f"backward peak {extra} B is below its own outputs: not measured"
