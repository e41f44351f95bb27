"""Launch every LM-head kernel on odd shapes on CPU fp32, for triton-sanitizer (no value checks).

Run: ``triton-sanitizer tests/sanitize/lm_head.py``. Covers the mixing kernel, the per-chunk lse and
sampling folds, the in-place grad-logit kernel and the mixing backward (mixed and token ops, with
banned ids), with one logit chunk, with vocabulary chunks, and with row x vocabulary chunks. The
sanitizer does not compute values, so nothing here is asserted; tests/test_lm_head.py checks the values.

The launchers pick GPU tiles unless TRITON_INTERPRET is set, and triton-sanitizer may run with or
without it (tests/conftest.py sets it and the sanitizer subprocess inherits it), so the script fixes
the choice itself: GPU tiles first (BLOCK_V = 512 > the chunk widths: fully masked column tails), then
the interpreter tiles the CPU tests use. _viz_patches fixes triton-viz 3.0 modelling bugs (see that
module); it removes no check.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _viz_patches  # noqa: E402,F401  (triton-viz 3.0 modelling fixes; see that module)
import torch  # noqa: E402

import kernels.lm_head as K  # noqa: E402


def run(N, d, V, gen, chunk_bytes=64 * 2**20, min_vc=256):
    K._CHUNK_BYTES, K._MIN_VC = chunk_bytes, min_vc
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
    print(f"ok N={N} d={d} V={V} chunks={K._chunk_plan(N, V, 4)} interpret_tiles={K._interpreting()}", flush=True)


def main():
    gen = torch.Generator().manual_seed(0)
    K._interpreting = lambda: False                          # the GPU tiles, whatever TRITON_INTERPRET says
    run(37, 48, 203, gen)                                    # one chunk
    run(1, 20, 13, gen)                                      # N = 1, V < one column block
    run(300, 48, 1003, gen, 300 * 64 * 4 * 2, 64)            # vocabulary chunks of 128 columns
    run(37, 300, 203, gen, 16 * 64 * 4, 64)                  # row x vocabulary chunks; d spans 2 BLOCK_D
    K._interpreting = lambda: True                           # the CPU tests' tiles
    run(37, 48, 203, gen, 16 * 64 * 4, 64)
    print("lm_head sanitize script finished")


if __name__ == "__main__":
    main()
