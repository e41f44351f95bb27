"""q @ k^T through tl.trans with an off-by-one key mask: triton-sanitizer must report the K load.

Checks tests/sanitize/_viz_patches.py fix 2 (tl.trans keeps its block shape): the pattern is the
attention score tile of kernels/thought_attention.py, tl.dot(q, tl.trans(k)), with k a
(BLOCK_N, BLOCK_D) tile of a (T, D) tensor. The mask ``offs_n <= T`` reads key row T, one past the
end. Unpatched triton-viz 3.0 raised an AssertionError in tl.dot (rank-0 transpose) before any
check; with the patch the kernel runs and the load must be reported. Block sizes are all distinct
(the sanitizer models equal-length aranges by one shared variable).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sanitize"))

import _viz_patches  # noqa: E402,F401
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _scores_kernel(q_ptr, k_ptr, s_ptr, T, D, M,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + offs_m[:, None] * D + offs_d[None, :],
                mask=(offs_m[:, None] < M) & (offs_d[None, :] < D), other=0.0)
    k = tl.load(k_ptr + offs_n[:, None] * D + offs_d[None, :],
                mask=(offs_n[:, None] <= T) & (offs_d[None, :] < D), other=0.0)   # BUG (on purpose): < T
    s = tl.dot(q, tl.trans(k))
    tl.store(s_ptr + offs_m[:, None] * T + offs_n[None, :], s,
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < T))


def main():
    M, T, D = 5, 20, 48
    q, k = torch.randn(M, D), torch.randn(T, D)
    s = torch.empty(M, T)
    _scores_kernel[(1,)](q, k, s, T, D, M, BLOCK_M=16, BLOCK_N=32, BLOCK_D=64)
    print("oob_trans_dot finished without the sanitizer noticing")


if __name__ == "__main__":
    main()
