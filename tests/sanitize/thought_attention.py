"""Launch every thought-attention kernel under ``triton-sanitizer`` (out-of-bounds loads/stores).

Run: ``triton-sanitizer tests/sanitize/thought_attention.py`` (exit status 0 = no violation).
Shapes are odd (T, L, D not multiples of any block; D = 48 padded to 64; a T = 1 case; L > 32) so
every mask is exercised. Tensors are contiguous: the sanitizer refuses strided views.
Both base dK/dV reductions run (one program per GQA group, fp32 partials per head), and every
kernel also with document masks (doc_start: several documents, one of length 1, one ending at the
last position; key tiles skipped, base dK/dV rows cut at the document end). The sanitizer does not
compute values, so nothing here asserts on them.
"""
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _viz_patches  # noqa: E402,F401  (triton-viz 3.0 modelling fixes; see that module)
import torch  # noqa: E402

ta = importlib.import_module("kernels.thought_attention")


def _inputs(B, H, H_KV, T, L, D, g):
    # contiguous: triton-sanitizer 3.0 refuses non-contiguous tensors ("only supports contiguously
    # stored tensors"); strided views are covered by tests/test_thought_attention.py instead
    shapes = [(B, H, T, L, D), (B, H_KV, T, D), (B, H_KV, T, D), (B, H_KV, T, L, D), (B, H_KV, T, L, D)]
    return [torch.randn(s, generator=g) for s in shapes]


def _doc_start(B, T):
    """Documents of lengths 1, ~T/2 and the rest (ending at the last position), shifted per row."""
    starts = torch.zeros(B, T, dtype=torch.int32)
    for b in range(B):
        a, c = min(1 + b, T - 1), min(T // 2 + 1 + b, T - 1)
        t = torch.arange(T)
        starts[b] = torch.where(t >= c, c, torch.where(t >= a, a, 0)).to(torch.int32)
    return starts


def run(B, H, H_KV, T, L, D, num_sms, g, docs=False):
    ta._num_sms = lambda device: num_sms          # picks the base dK/dV split
    ds = _doc_start(B, T) if docs else None
    xs = [x.requires_grad_() for x in _inputs(B, H, H_KV, T, L, D, g)]
    o = ta.thought_attention(*xs, doc_start=ds)    # forward
    do = torch.randn(B, H, T, L, D, generator=g)
    torch.autograd.grad(o, xs, do)                 # preprocess, dQ, chain dK/dV, base dK/dV
    q, kb, vb, kc, vc = (x.detach() for x in xs)
    for step in sorted({0, L - 1}):
        ta.thought_attention_step(q[:, :, :, step].contiguous(), kb, vb, kc, vc, step, doc_start=ds)
    print(f"ok B={B} H={H} H_KV={H_KV} T={T} L={L} D={D} split={ta._base_split(B, H_KV, H // H_KV, T, 32, num_sms)}"
          f" docs={docs}", flush=True)


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    run(2, 6, 2, 37, 5, 48, num_sms=1, g=g)       # GQA, odd T/L/D, no split
    run(1, 4, 2, 19, 3, 32, num_sms=10**6, g=g)   # split heads -> fp32 partials
    run(1, 2, 1, 1, 2, 16, num_sms=1, g=g)        # T = 1
    run(1, 2, 2, 3, 33, 16, num_sms=1, g=g)       # L > 32
    run(2, 6, 2, 37, 5, 48, num_sms=1, g=g, docs=True)        # documents, GQA, odd shapes
    run(1, 4, 2, 70, 3, 32, num_sms=10**6, g=g, docs=True)    # documents, skipped key tiles, fp32 partials
    sys.exit(0)
