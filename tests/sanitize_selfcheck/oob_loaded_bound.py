"""A loop whose bound is LOADED from memory at a divided index runs one element too far: triton-sanitizer
must report it.

Checks tests/sanitize/_viz_patches.py fix 6 (``idiv`` concretized for loop bounds that depend on a load):
the bound n = BOUNDS[pid // 2] (as the document-masked kernels read doc_end[b] with b = pid // H) is
read concretely, and the loop's last load x[n] (past the end of x, which holds n elements) must still
be found. Without fix 6 the run dies with "Concretize for op idiv is not implemented" instead.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sanitize"))

import _viz_patches  # noqa: E402,F401
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _loaded_bound_kernel(x_ptr, bounds_ptr, y_ptr):
    b = tl.program_id(0) // 2
    n = tl.load(bounds_ptr + b)
    acc = 0.0
    for k in range(0, tl.minimum(n, 100) + 1):   # BUG (on purpose): must be range(0, tl.minimum(n, 100))
        acc += tl.load(x_ptr + k)
    tl.store(y_ptr + tl.program_id(0), acc)


def main():
    x = torch.randn(5)
    bounds = torch.tensor([5], dtype=torch.int32)
    y = torch.empty(2)
    _loaded_bound_kernel[(2,)](x, bounds, y)
    print("oob_loaded_bound finished without the sanitizer noticing")


if __name__ == "__main__":
    main()
