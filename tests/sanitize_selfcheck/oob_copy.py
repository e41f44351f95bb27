"""A deliberately buggy copy kernel: triton-sanitizer must report its out-of-bounds access.

The mask is off by one (``offs <= n`` instead of ``offs < n``), so the last program touches
x[n] and y[n], one element past the end of both tensors. Used by tests/test_sanitizer.py to prove
the sanitizer runner can fail; never import it from library code.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs <= n  # BUG (on purpose): must be offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)


def main():
    n, BLOCK = 64, 32  # n a multiple of BLOCK: the extra element is past the end of the allocation
    x = torch.randn(n)
    y = torch.empty_like(x)
    _copy_kernel[(triton.cdiv(n + 1, BLOCK),)](x, y, n, BLOCK=BLOCK)
    print("oob_copy finished without the sanitizer noticing")


if __name__ == "__main__":
    main()
