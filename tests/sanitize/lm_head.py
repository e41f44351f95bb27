"""Launch every LM-head kernel on odd shapes on CPU fp32, for triton-sanitizer (no value checks).

Run: ``triton-sanitizer tests/sanitize/lm_head.py``. Covers the forward + lse combine (mixed and
token, with banned ids), the grad-logit, dh and dW kernels (one chunk and several chunks, so dW
both writes and accumulates), and the sampler + its argmax combine. The sanitizer does not compute
values, so nothing here is asserted; tests/test_lm_head.py checks the values.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402

import kernels.lm_head as K  # noqa: E402


def main():
    gen = torch.Generator().manual_seed(0)
    for N, d, V, chunk_rows in ((37, 48, 203, None), (1, 20, 13, None), (37, 48, 203, 16)):
        if chunk_rows is not None:
            K._GRAD_CHUNK_BYTES = chunk_rows * V * 4     # several backward chunks: dW accumulates
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
    print("lm_head sanitize script finished")


if __name__ == "__main__":
    main()
