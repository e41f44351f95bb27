"""Launch every LM-head kernel on odd shapes on CPU fp32, for triton-sanitizer (no value checks).

Run: ``triton-sanitizer tests/sanitize/lm_head.py``. Covers the forward + lse combine (mixed and
token, with banned ids), the grad-logit, dh and dW kernels (one chunk and several chunks, so dW
both writes and accumulates), and the sampler + its argmax combine. The sanitizer does not compute
values, so nothing here is asserted; tests/test_lm_head.py checks the values.

The launchers pick GPU tiles (BLOCK_N = BLOCK_V = 128, GROUP = 8) unless TRITON_INTERPRET is set,
and triton-sanitizer may run with or without it (tests/conftest.py sets it and the sanitizer
subprocess inherits it), so the script fixes the choice itself: GPU tiles for the first cases.
The (300, 1003) case lowers the SM count so that each forward/sampling program loops over several
V blocks (the last group's extra block fully masked) and uses 128-row backward chunks (3 chunks:
dW accumulates); the last pass re-runs with the interpreter tiles (BLOCK_N = 16, BLOCK_V = 64,
GROUP = 2) that the CPU tests use. _viz_patches fixes triton-viz 3.0 modelling bugs (see that
module); it removes no check.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _viz_patches  # noqa: E402,F401  (triton-viz 3.0 modelling fixes; see that module)
import torch  # noqa: E402

import kernels.lm_head as K  # noqa: E402


def run(N, d, V, gen, chunk_rows=None):
    K._GRAD_CHUNK_BYTES = (chunk_rows * V * 4) if chunk_rows else 256 * 2**20
    ht = torch.randn(N, d, generator=gen)
    hb = torch.randn(N, d, generator=gen)
    w = torch.randn(N, generator=gen)
    W = torch.randn(V, d, generator=gen)
    t = torch.randint(0, V, (N,), generator=gen)
    t[0] = -100
    g = torch.randn(N, generator=gen)
    xs = [x.clone().requires_grad_() for x in (ht, hb, w, W)]
    K.mixed_logprob(*xs, t).backward(g)
    banned = (0, V - 1)
    h, Wt = ht.clone().requires_grad_(), W.clone().requires_grad_()
    K.token_logprob(h, Wt, t.clamp(min=1), 0.7, banned).backward(g)
    K.sample_thought_tokens(ht, W, 0.7, banned, torch.Generator().manual_seed(1))
    K.sample_thought_tokens(ht, W, 1.0, (), None)
    print(f"ok N={N} d={d} V={V} chunk_rows={chunk_rows} interpret_tiles={K._interpreting()} "
          f"sms={K._NUM_SMS_H100}", flush=True)


def main():
    gen = torch.Generator().manual_seed(0)
    K._interpreting = lambda: False             # the GPU tiles, whatever TRITON_INTERPRET says
    run(37, 48, 203, gen)                       # GPU tiles: one row block, 2 V blocks
    run(1, 20, 13, gen)                         # N = 1, V < one block
    sms, K._NUM_SMS_H100 = K._NUM_SMS_H100, 1   # several V blocks per program
    run(300, 48, 1003, gen, chunk_rows=128)     # 3 row blocks < GROUP, 3 backward chunks
    K._NUM_SMS_H100 = sms
    K._interpreting = lambda: True              # the CPU tests' tiles: bpp = 3, GROUP = 2
    run(37, 48, 203, gen, chunk_rows=16)        # 3 backward chunks
    print("lm_head sanitize script finished")


if __name__ == "__main__":
    main()
