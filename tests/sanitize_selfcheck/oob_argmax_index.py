"""An address built from tl.argmax's index, one past the end: triton-sanitizer must report it.

Checks tests/sanitize/_viz_patches.py fix 4 (symbolic tl.argmax): the patch models the index as
an int in [0, BLOCK) (what an index along a BLOCK-long axis can be), so x[argmax + 1] with a
BLOCK-element x must be reported. The in-bounds x[argmax] passes with the patches; unpatched
triton-viz 3.0 died in tl.argmax (the interpreter's np.argmax on a symbolic handle) before any check.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sanitize"))

import _viz_patches  # noqa: E402,F401
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _gather_argmax_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    v = tl.load(x_ptr + tl.arange(0, BLOCK))
    i = tl.argmax(v, axis=0)
    tl.store(y_ptr, tl.load(x_ptr + i + 1))   # BUG (on purpose): x_ptr + i


def main():
    BLOCK = 16
    x = torch.randn(BLOCK)
    y = torch.empty(1)
    _gather_argmax_kernel[(1,)](x, y, BLOCK=BLOCK)
    print("oob_argmax_index finished without the sanitizer noticing")


if __name__ == "__main__":
    main()
