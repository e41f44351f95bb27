"""A nested loop whose OUTER loop runs one iteration too far: triton-sanitizer must report it.

Checks tests/sanitize/_viz_patches.py fix 1 (enclosing loops' iterators bounded while an inner
loop's accesses are checked): the fix bounds the outer iterator to range(0, n_outer + 1), the
values it really takes, so the last outer iteration's load of x[n_outer * n_inner + k] (past the
end of x) must still be found. The in-bounds kernel (range(0, n_outer)) passes with the patches
and was reported as a false out-of-bounds access by unpatched triton-viz 3.0.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sanitize"))

import _viz_patches  # noqa: E402,F401
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _nested_sum_kernel(x_ptr, y_ptr, n_outer, n_inner):
    acc = 0.0
    for j in range(0, n_outer + 1):        # BUG (on purpose): must be range(0, n_outer)
        for k in range(0, n_inner):
            acc += tl.load(x_ptr + j * n_inner + k)
    tl.store(y_ptr, acc)


def main():
    n_outer, n_inner = 2, 3
    x = torch.randn(n_outer * n_inner)
    y = torch.empty(1)
    _nested_sum_kernel[(1,)](x, y, n_outer, n_inner)
    print("oob_nested_loop finished without the sanitizer noticing")


if __name__ == "__main__":
    main()
