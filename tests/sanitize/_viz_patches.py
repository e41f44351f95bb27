"""Six fixes to triton-sanitizer's (PyPI triton-viz 3.0) modelling, backported from upstream triton-viz.

Import this module from a sanitize script BEFORE its first kernel launch; it patches the already
imported triton_viz in place and is a no-op outside triton-sanitizer. Neither fix removes a check:
every load and store is still checked against the same valid byte ranges; the fixes only make the
tool model what the kernel actually does.

1. Nested loops (upstream PR #258, "Add outer loop constraints when checking nested loops", merged
   2026-02-02, after the 3.0 release). Loads/stores inside a ``for`` loop are checked when the loop
   exits, with the loop's iterator bounded to its ``range``. 3.0 bounds only the innermost
   iterator: an enclosing loop's iterator is a free z3 integer, so an inner-loop address that uses it
   (``x_ptr + j * n_inner + k``) is "out of bounds" at j = -1000. Fix: while the innermost loop's
   deferred checks run, also bound every enclosing loop's iterator to its own range (the values it
   takes). Repro: a 2-level loop summing x[j * n_inner + k] over a (2 * 3,) tensor is reported OOB.
   Self-check: tests/sanitize_selfcheck/oob_nested_loop.py (an outer loop that really runs one
   iteration too far must still be reported).

2. ``tl.trans`` (upstream PR #401, "Patch symbolic transpose at builder level", 2026-06-04). 3.0
   patches ``tl.trans`` in the ``triton.language`` namespace and wraps the symbolic result as
   ``tl.tensor(handle, x.dtype)``, i.e. with the ELEMENT dtype: the result has rank 0 and every
   ``tl.dot(a, tl.trans(b))`` raises "input and other must have equal ranks >= 2". Fix (as
   upstream): intercept the builder's ``create_trans`` instead, under the language function, so
   ``tl.trans`` computes the permuted block type itself. The symbolic value is unchanged (a
   transpose moves values, it does not create addresses). Self-check:
   tests/sanitize_selfcheck/oob_trans_dot.py (a q @ k^T tile whose K load mask is off by one must
   still be reported).

3. ``tl.math.umulhi`` (used by ``tl.randint``'s Philox rounds; not fixed upstream as of 2026-06).
   3.0 lists umulhi twice, as the builder op ``create_umulhi`` and as ``tl.math.umulhi``, and its
   op patcher raises "Patching math ops not yet supported" for any ``tl.math`` entry, so every
   kernel calling ``tl.randint`` dies before its first load. ``tl.math.umulhi`` only calls
   ``builder.create_umulhi``, which stays intercepted, so dropping the ``tl.math`` entry loses
   nothing. Random bits are values, not addresses: no check depends on them.

4. ``tl.argmax`` / ``tl.argmin`` (upstream PR #316, "Add argmax/argmin as symbolic reduce ops",
   2026-03-13, on top of a later refactor, so not backported verbatim). 3.0 patches ``tl.max``
   but ``tl.argmax`` reaches the interpreter's ``ReduceOps.min_max``, which runs ``np.argmax`` on
   the symbolic handle and raises AxisError. Fix: when the reduced tensor is symbolic, return a
   symbolic ``max``/``min`` (as ``tl.max`` gives) and, for the index, a symbolic int32 ranging over
   [0, size of the reduced axis) (an ``arange`` node: exactly the values an index can take), both
   with the reduced block shape. Concrete inputs take the original path.

5. TRITON_INTERPRET=1 in the environment (tests/conftest.py sets it, and subprocesses inherit it):
   triton's own @jit library functions (``tl.random.philox_impl``, which has a ``static_range``
   loop) are then InterpretedFunctions, which triton-viz does not route through ``patch_lang``, so
   the loop hook its AST rewrite inserts is an undefined global ("name '_triton_viz_loop_patcher'
   is not defined"), and its ``tl.static_range(n_rounds)`` bound reaches the loop hook as a
   ``tl.constexpr`` ("Unsupported type"): every ``tl.randint`` kernel dies. Fix: define that global
   in those modules, as ``patch_lang`` does for the kernel's own module, and unwrap constexpr loop
   bounds to their int value before the hook reads them. Philox has no loads or stores.

6. Loop bounds computed from loaded values (not fixed upstream as of 2026-11). 3.0 makes a loop
   bound that depends on a load concrete by replacing the load with its value, then reads the
   result as a constant: a bound that is a load passes, but arithmetic on a loaded value
   (``tl.minimum(tl.load(p), T) * L``) raises "to_py must be implemented by subclasses", and a load
   whose address divides (``ptr + (pid // H) * stride``, a batch index split off a program id, as
   the document-masked thought-attention kernels read doc_start) raises "Concretize for op idiv is
   not implemented". Fix: concretize such a bound entirely (as 3.0 does for bounds without loads,
   after marking the run as needing the full grid, as it does for loads), with ``idiv``
   concretized by the interpreter's own ``create_idiv`` (Triton's semantics). Only how a bound's
   value is computed changes, not which accesses are checked. Self-check:
   tests/sanitize_selfcheck/oob_loaded_bound.py (a loop whose loaded, divided-index, arithmetic
   bound runs one element too far must still be reported).
"""
from __future__ import annotations

import dataclasses
import sys

_APPLIED = False


def _patch_nested_loop_constraints(san) -> None:
    import triton.language as tl

    SymbolicSanitizer = san.SymbolicSanitizer
    if getattr(SymbolicSanitizer.register_for_loop_callback, "_outer_loop_fix", False):
        return
    original = SymbolicSanitizer.register_for_loop_callback

    def register_for_loop_callback(self):
        callbacks = original(self)
        after = callbacks.after_loop_callback

        def after_loop(lineno):
            stack = self.loop_stack
            # the original pops stack[-1] and checks its pending accesses with only its own iterator
            # bounded; bound the enclosing loops' iterators (stack[:-1]) too, for those checks only
            if not stack or stack[-1].lineno != lineno or not stack[-1].pending_checks or len(stack) < 2:
                return after(lineno)
            self.solver.push()
            try:
                for outer in stack[:-1]:
                    self.solver.add(san._range_to_iterator_constraint(
                        outer.idx_z3, start=outer.start, stop=outer.stop, step=outer.step))
                return after(lineno)
            finally:
                self.solver.pop()

        wrap_range = callbacks.range_wrapper_factory

        def concrete_bound(v):
            # fix 6: a bound computed from a load -> one constant node, the value it takes in this program
            if isinstance(v, (int, tl.constexpr)) or v is None:
                return v
            e = san.SymbolicExpr.from_value(v)
            if e.op != "const" and e.has_op("load"):
                self.need_full_grid = True
                return e.replace_subtree("load").replace_subtree()
            return v

        def range_wrapper(iterable, lineno, range_type, iter_args=None, iter_kwargs=None, *rest):
            # fix 5: un-patched library functions pass tl.constexpr loop bounds
            unwrap = lambda v: concrete_bound(v.value if isinstance(v, tl.constexpr) else v)  # noqa: E731
            iter_args = tuple(unwrap(v) for v in (iter_args or ()))
            iter_kwargs = {k: unwrap(v) for k, v in (iter_kwargs or {}).items()}
            return wrap_range(iterable, lineno, range_type, iter_args, iter_kwargs, *rest)

        return dataclasses.replace(callbacks, after_loop_callback=after_loop, range_wrapper_factory=range_wrapper)

    register_for_loop_callback._outer_loop_fix = True
    SymbolicSanitizer.register_for_loop_callback = register_for_loop_callback


def _patch_trans_at_builder() -> None:
    import triton.language as tl
    from triton.runtime.interpreter import interpreter_builder
    from triton_viz.core.data import Trans
    from triton_viz.frontends.base import OPERATION_REGISTRY

    frontend = OPERATION_REGISTRY["triton"]
    lang_ops = frontend.namespaces.get(tl, {})
    if lang_ops.get("trans") is not Trans:
        return                                     # already moved (or a newer triton-viz)
    builder_ops = frontend.namespaces[interpreter_builder]
    # ops are patched per launch from these tables, so editing them before the first launch is enough
    del lang_ops["trans"]
    del frontend.original_ops[tl]["trans"]
    builder_ops["create_trans"] = Trans
    frontend.original_ops[interpreter_builder]["create_trans"] = getattr(interpreter_builder, "create_trans")


def _patch_math_umulhi() -> None:
    import triton.language as tl
    from triton.runtime.interpreter import interpreter_builder
    from triton_viz.frontends.base import OPERATION_REGISTRY

    frontend = OPERATION_REGISTRY["triton"]
    math_ops = frontend.namespaces.get(tl.math, {})
    if "umulhi" not in math_ops or "create_umulhi" not in frontend.namespaces[interpreter_builder]:
        return
    del math_ops["umulhi"]
    del frontend.original_ops[tl.math]["umulhi"]


def _patch_symbolic_argminmax(san) -> None:
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    ReduceOps = interp.ReduceOps
    if getattr(ReduceOps.min_max, "_symbolic_fix", False):
        return
    original = ReduceOps.min_max
    SymbolicExpr = san.SymbolicExpr

    def min_max(self, input, val_reduce_op, idx_reduce_op=None):
        x = input[0] if isinstance(input, tuple) else input
        if not isinstance(x.handle, SymbolicExpr):
            return original(self, input, val_reduce_op, idx_reduce_op)
        shape, axis = [int(getattr(s, "value", s)) for s in x.shape], self.axis
        if axis is None:
            n = 1
            for s in shape:
                n *= s
            out = [1] * len(shape) if self.keep_dims else []
        else:
            axis = axis % len(shape)
            n = shape[axis]
            out = shape[:axis] + ([1] if self.keep_dims else []) + shape[axis + 1:]

        def wrap(sym, scalar_ty):
            t = tl.core.tensor(sym, tl.block_type(scalar_ty, out) if out else scalar_ty)
            return t

        val = idx = None
        if val_reduce_op is not None:
            op = "max" if val_reduce_op in (np.max, np.nanmax) else "min"
            val = wrap(SymbolicExpr.create(op, x.handle, self.axis, self.keep_dims), x.dtype)
        if idx_reduce_op is not None:
            # an index along the reduced axis: some int in [0, n)
            idx = wrap(SymbolicExpr.create("arange", tl.block_type(tl.int32, [n]), 0, n), tl.int32)
        if val is not None and idx is not None:
            return val, idx
        return val if val is not None else idx

    min_max._symbolic_fix = True
    ReduceOps.min_max = min_max


def _patch_stdlib_loop_global() -> None:
    import triton.language.random
    import triton.language.standard
    from triton_viz.core.patch import _loop_patcher

    for module in (triton.language.random, triton.language.standard):
        module.__dict__.setdefault("_triton_viz_loop_patcher", _loop_patcher)


def _patch_concrete_idiv(san) -> None:
    Binary = san.BinarySymbolicExpr
    if getattr(Binary.concretize, "_idiv_fix", False):
        return
    original = Binary.concretize

    def concretize(self):
        # the other binary ops go through a numpy table into the builder's binary_op; idiv's concrete_fn
        # is the interpreter builder's own create_idiv(lhs, rhs): Triton's semantics exactly
        if self.op == "idiv" and "idiv" not in self._NUMPY_OPS:
            return self.concrete_fn(self.lhs.concretize(), self.rhs.concretize())
        return original(self)

    concretize._idiv_fix = True
    Binary.concretize = concretize


def apply() -> bool:
    """Apply both fixes once; returns False (and does nothing) when not under triton-sanitizer."""
    global _APPLIED
    if _APPLIED:
        return True
    if "triton_viz" not in sys.modules:
        return False
    import triton_viz  # noqa: F401
    from triton_viz.clients.sanitizer import sanitizer as san

    _patch_nested_loop_constraints(san)
    _patch_trans_at_builder()
    _patch_math_umulhi()
    _patch_symbolic_argminmax(san)
    _patch_stdlib_loop_global()
    _patch_concrete_idiv(san)
    _APPLIED = True
    return True


apply()
