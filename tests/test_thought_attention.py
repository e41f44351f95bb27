"""Tests of kernels/thought_attention.py against the float64 reference (DESIGN.md section 7).

Every check: fresh random inputs; the kernel's max error against float64 ground truth is bounded
by ERR_FACTOR x PyTorch's own error (the reference run in the test dtype) plus a per-dtype atol
(relative to the tensor's magnitude);
output buffers are poisoned with NaN so an element the kernel fails to write shows up. On CPU the
kernels run in the Triton interpreter (fp32 / fp16; bf16 dots are wrong there), bf16 on a GPU.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

# the package attribute kernels.thought_attention is the public function; fetch the module itself
ta = importlib.import_module("kernels.thought_attention")
from kernels.reference import thought_attention_mask, thought_attention_ref, thought_attention_step_ref
from kernels.thought_attention import (
    ThoughtAttentionFunction,
    thought_attention,
    thought_attention_fwd,
    thought_attention_step,
    thought_attention_step_launch,
)

ERR_FACTOR = 2.0
# per-dtype floor, in units of the tensor's largest magnitude max|ref|: ~16 ulp in fp32 (the
# flash-style backward's delta = rowsum(dO * O) cancels to a few ulp where PyTorch may get 1),
# ~1 ulp in fp16 / bf16.
ATOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
CPU_DTYPES = [torch.float32, torch.float16]
GRAD_NAMES = ("dq", "dk_base", "dv_base", "dk_chain", "dv_chain")


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    """Poison every buffer the launchers allocate: torch.empty returns NaN-filled float tensors."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        x = real_empty(*args, **kwargs)
        if x.is_floating_point():
            x.fill_(float("nan"))
        return x

    monkeypatch.setattr(ta.torch, "empty", poisoned)
    yield


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return g


def _randn(shape, g, device, dtype=torch.float32):
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def _make_inputs(B, H, H_KV, T, L, D, g, device):
    """fp32 masters of (q, k_base, v_base, k_chain, v_chain)."""
    shapes = [(B, H, T, L, D), (B, H_KV, T, D), (B, H_KV, T, D), (B, H_KV, T, L, D), (B, H_KV, T, L, D)]
    return [_randn(s, g, device) for s in shapes]


def _strided(x: torch.Tensor, g, kind: int) -> torch.Tensor:
    """A non-contiguous tensor equal to x: a slice of a bigger buffer (kind 0), a permuted view of
    a buffer in another dim order (kind 1), or a view with a non-unit head-dim stride (kind 2)."""
    if kind == 0:
        big = _randn(tuple(s + 3 for s in x.shape), g, x.device, x.dtype)
        view = big[tuple(slice(1, 1 + s) for s in x.shape)]
    elif kind == 1:
        perm = list(reversed(range(x.dim() - 1))) + [x.dim() - 1]
        big = _randn(tuple(x.shape[p] for p in perm), g, x.device, x.dtype)
        view = big.permute(*[perm.index(i) for i in range(x.dim())])
    else:
        big = _randn(x.shape[:-1] + (2 * x.shape[-1],), g, x.device, x.dtype)
        view = big[..., ::2]
    with torch.no_grad():
        view.copy_(x)
    assert not view.is_contiguous()
    return view


def _slices(B, H, H_KV):
    """(batch row, query heads, KV head) of every independent sub-problem: query head h reads KV head h // G
    only, and a row only its own keys."""
    G = H // H_KV
    return [(b, slice(g * G, (g + 1) * G), slice(g, g + 1)) for b in range(B) for g in range(H_KV)]


def _lse_ref(q, k_base, k_chain, scale):
    """Log-sum-exp per query row, (B, H, T, L), in the inputs' dtype, built with the dense mask one (row,
    KV head) at a time (see ref_and_grads)."""
    B, H, T, L, D = q.shape
    mask = ~thought_attention_mask(T, L, q.device)
    out = torch.full((B, H, T * L), float("nan"), dtype=q.dtype, device=q.device)     # a missed slice shows
    for b, hq, hk in _slices(B, H, k_base.shape[1]):
        k = torch.cat([k_base[b, hk], k_chain[b, hk].reshape(1, T * L, D)], dim=1)
        s = (q[b, hq].reshape(-1, T * L, D) @ k.transpose(-1, -2)) * scale
        out[b, hq] = torch.logsumexp(s.masked_fill(mask, float("-inf")), -1)
    return out.reshape(B, H, T, L)


def ref_and_grads(xs, do, **kw):
    """thought_attention_ref(*xs, **kw) and the gradients of <o, do> with respect to xs = (q, k_base, v_base,
    k_chain, v_chain), computed one (batch row, KV head) at a time and joined: the same numbers as the whole
    batch at once (the slices are independent problems) at 1 / (B * H_KV) of the dense reference's memory. At
    the paper shape (B=2, H=32/8, T=256, L=14) the whole batch in float64 holds about 27 GB, and three such GPU
    tests running at once (pytest -n 8) exceed an 80 GB GPU."""
    q, kb, vb, kc, vc = xs
    doc_start = kw.pop("doc_start", None)
    parts = []
    for b, hq, hk in _slices(q.shape[0], q.shape[1], kb.shape[1]):
        x = [q[b:b + 1, hq]] + [t[b:b + 1, hk] for t in (kb, vb, kc, vc)]
        x = [t.detach().requires_grad_() for t in x]
        if doc_start is not None:
            kw["doc_start"] = doc_start[b:b + 1]
        o = thought_attention_ref(*x, **kw)
        parts.append((o.detach(),) + torch.autograd.grad(o, x, do[b:b + 1, hq]))
    H_KV = kb.shape[1]
    rows = [parts[i:i + H_KV] for i in range(0, len(parts), H_KV)]         # per batch row, its KV heads in order
    joined = [torch.cat([torch.cat([p[j] for p in row], 1) for row in rows], 0) for j in range(6)]
    return joined[0], tuple(joined[1:])


def _maxerr(a, ref):
    assert not torch.isnan(a).any(), "kernel output holds NaN (an element was not written)"
    return (a.double() - ref.double()).abs().max().item()


def _check(name, got, ref64, ref_dtype, dtype):
    err = _maxerr(got, ref64)
    torch_err = (ref_dtype.double() - ref64).abs().max().item()
    atol = ATOL[dtype] * ref64.abs().max().item()
    bound = ERR_FACTOR * torch_err + atol
    assert err <= bound, f"{name}: error {err:.3g} > {ERR_FACTOR} x torch's {torch_err:.3g} + atol {atol:.2g}"


def _run_parallel_check(B, H, H_KV, T, L, D, dtype, device, seed, strided=None, scale=None):
    g = _gen(seed)
    masters = _make_inputs(B, H, H_KV, T, L, D, g, device)
    do_master = _randn((B, H, T, L, D), g, device)
    sc = 1.0 / math.sqrt(D) if scale is None else scale

    x64 = [x.double() for x in masters]
    o64, g64 = ref_and_grads(x64, do_master.double(), scale=scale)
    lse64 = _lse_ref(x64[0], x64[1], x64[3], sc)

    xd = [x.to(dtype) for x in masters]
    od, gd = ref_and_grads(xd, do_master.to(dtype), scale=scale)
    lsed = _lse_ref(xd[0], xd[1], xd[3], sc)            # PyTorch's own error: the scores in the test dtype

    xk = [x.to(dtype) for x in masters]
    do = do_master.to(dtype)
    if strided is not None:
        xk = [_strided(x, g, (strided + i) % 3) for i, x in enumerate(xk)]
        do = _strided(do, g, strided)
    xk = [x.requires_grad_() for x in xk]
    o = thought_attention(*xk, scale=scale)
    grads = torch.autograd.grad(o, xk, do)

    _check("o", o, o64, od, dtype)
    for name, gk, gr64, grd in zip(GRAD_NAMES, grads, g64, gd):
        assert gk.shape == gr64.shape and gk.dtype == dtype, name
        _check(name, gk, gr64, grd, dtype)

    # lse: fp32, natural log
    _, lse = thought_attention_fwd(*[x.detach() for x in xk], scale=scale)
    assert lse.dtype == torch.float32 and lse.shape == (B, H, T, L)
    _check("lse", lse, lse64, lsed, dtype)


def test_ref_and_grads_is_the_whole_batch_at_a_fraction_of_the_memory():
    """The tests' reference, slice by slice: the whole batch's output and gradients (with scale and documents),
    and its peak memory (the profiler's allocation events) well below the whole batch's at once."""
    from test_kernel_memory import peak_extra
    B, H, H_KV, T, L, D = 2, 4, 2, 12, 3, 8
    g = _gen(3)
    xs = [x.double() for x in _make_inputs(B, H, H_KV, T, L, D, g, "cpu")]
    do = _randn((B, H, T, L, D), g, "cpu", torch.float64)
    ds = torch.tensor([[0] * 5 + [5] * 7, [0] * 12])
    for kw in ({}, {"scale": 0.3, "doc_start": ds}):
        x = [t.clone().requires_grad_() for t in xs]
        o = thought_attention_ref(*x, **kw)
        want = (o,) + torch.autograd.grad(o, x, do)
        o_s, grads = ref_and_grads(xs, do, **dict(kw))
        for name, got, ref in zip(("o",) + GRAD_NAMES, (o_s,) + grads, want):
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
    lse = _lse_ref(xs[0], xs[1], xs[3], 0.3)
    s = (xs[0].reshape(B, H, T * L, D) @ torch.cat([xs[1], xs[3].reshape(B, H_KV, T * L, D)], 2)
         .repeat_interleave(H // H_KV, 1).transpose(-1, -2)) * 0.3
    torch.testing.assert_close(lse, torch.logsumexp(s.masked_fill(~thought_attention_mask(T, L, "cpu"), float("-inf")),
                                                    -1).reshape(B, H, T, L), rtol=1e-12, atol=1e-12)

    # memory: PyTorch's math attention (what float64 gets on a GPU; the CPU has a fused kernel that does not
    # hold the scores) at a shape where the (T*L) x (T + T*L) scores, not the outputs, are most of it
    from torch.nn.attention import SDPBackend, sdpa_kernel
    B, H, H_KV, T, L, D = 2, 4, 2, 24, 4, 4
    xs = [x.double() for x in _make_inputs(B, H, H_KV, T, L, D, g, "cpu")]
    do = _randn((B, H, T, L, D), g, "cpu", torch.float64)

    def whole():
        x = [t.clone().requires_grad_() for t in xs]
        torch.autograd.grad(thought_attention_ref(*x), x, do)
    with sdpa_kernel(SDPBackend.MATH):
        sliced, at_once = peak_extra(lambda: ref_and_grads(xs, do), "cpu"), peak_extra(whole, "cpu")
    assert sliced < at_once / 2, (sliced, at_once)           # 4 slices: about a quarter plus the outputs


# ----------------------------------------------------------------------------------------------
# parallel op: forward, lse, all five gradients
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("D", [48, 64])
def test_parallel_odd_shapes(dtype, D, device):
    _run_parallel_check(2, 6, 2, 37, 5, D, dtype, device, seed=D)


@pytest.mark.parametrize(
    "B,H,H_KV,T,L,D",
    [
        (2, 4, 4, 9, 1, 32),     # L = 1, no GQA
        (1, 3, 1, 1, 4, 64),     # T = 1, all heads share one KV head
        (3, 2, 1, 20, 3, 96),    # B > 1, D = 96 (padded to 128)
        (1, 2, 2, 3, 33, 16),    # L > 32: the chain tile grows to 64 rows
    ],
)
def test_parallel_edge_shapes(B, H, H_KV, T, L, D, device):
    _run_parallel_check(B, H, H_KV, T, L, D, torch.float32, device, seed=B * 1000 + T * 10 + L)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("kind", [0, 1, 2])
def test_parallel_noncontiguous(dtype, kind, device):
    _run_parallel_check(1, 4, 2, 13, 3, 32, dtype, device, seed=100 + kind, strided=kind, scale=0.3)


@pytest.mark.parametrize("num_sms", [1, 10**6], ids=["no-split", "split-heads"])
def test_base_dkv_split_and_determinism(num_sms, device, monkeypatch):
    """Both reductions of base dK/dV (one program per GQA group; fp32 partials per head) are
    right, and repeated runs are bitwise identical (no atomics)."""
    monkeypatch.setattr(ta, "_num_sms", lambda dev: num_sms)
    B, H, H_KV, T, L, D = 1, 6, 2, 21, 3, 32
    split = ta._base_split(B, H_KV, H // H_KV, T, ta._bwd_base_config(D, torch.float32, T)["BLOCK_N"], num_sms)
    assert split == (1 if num_sms == 1 else 3)
    _run_parallel_check(B, H, H_KV, T, L, D, torch.float32, device, seed=7 + num_sms % 5)
    g = _gen(3)
    xs = [x.requires_grad_() for x in _make_inputs(B, H, H_KV, T, L, D, g, device)]
    do = _randn((B, H, T, L, D), g, device)
    first = torch.autograd.grad(thought_attention(*xs), xs, do)
    second = torch.autograd.grad(thought_attention(*xs), xs, do)
    for name, a, b in zip(GRAD_NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


@pytest.mark.parametrize("num_sms", [1, 10**6], ids=["no-split", "split-heads"])
def test_parallel_fp16_d128_tiles(num_sms, device, monkeypatch):
    """The 16-bit D = 128 tiles the GPU runs (tuned on an H200: 128-row dQ tile, 128-key base dK/dV tile,
    4-warp forward), in fp16 here (the interpreter's bf16 dot is wrong), T spanning several tiles."""
    monkeypatch.setattr(ta, "_num_sms", lambda dev: num_sms)
    assert ta._bwd_dq_config(128, torch.float16, 200)["BLOCK_M"] == 128
    assert ta._bwd_base_config(128, torch.float16, 200)["BLOCK_N"] == 128
    _run_parallel_check(1, 4, 2, 200, 5, 128, torch.float16, device, seed=128 + num_sms % 7)


@pytest.mark.parametrize("D", [48, 64])
def test_parallel_fp16_long_T_forward_tile(D, device, monkeypatch):
    """The forward tile the GPU takes at T >= 1024 with D <= 64 (128 rows, 64 keys, 8 warps), forced at a
    short T so that the interpreter runs it (on the GPU, test_gpu_bf16_long_T_forward_tile runs it at
    T = 1024): 150 positions x 5 steps leave a partial 128-row tile and a partial 64-key block."""
    fwd = ta._fwd_config
    long_T = fwd(D, torch.float16, 1024)
    assert long_T["BLOCK_M"] == 128 and long_T != fwd(D, torch.float16, 150)
    used = []

    def forced(D_, dtype, T):
        used.append(fwd(D_, dtype, max(T, 1024)))
        return used[-1]
    monkeypatch.setattr(ta, "_fwd_config", forced)
    _run_parallel_check(1, 4, 2, 150, 5, D, torch.float16, device, seed=1024 + D)
    assert used and all(c == long_T for c in used), used


def test_autograd_function_matches_public(device):
    g = _gen(11)
    xs = _make_inputs(1, 2, 1, 6, 2, 32, g, device)
    assert torch.equal(ThoughtAttentionFunction.apply(*xs, None), thought_attention(*xs))


# ----------------------------------------------------------------------------------------------
# step op
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("B,H,H_KV,T,L,D", [(2, 6, 2, 37, 5, 48), (1, 3, 3, 11, 4, 64), (1, 4, 2, 29, 3, 128)])
def test_step_equals_parallel_slice(dtype, B, H, H_KV, T, L, D, device):
    """At every step the step kernel equals the parallel kernel's slice and the float64 reference,
    reading only chain indices 0..step of a cache whose later entries are NaN."""
    g = _gen(T * L + D)
    L_max = L + 2
    q, kb, vb, kc, vc = [x.to(dtype) for x in _make_inputs(B, H, H_KV, T, L, D, g, device)]
    o_par = thought_attention(q, kb, vb, kc, vc)
    # the model's layout: chain caches (B, H_KV, T, L_max, D), queries a strided [:, :, :, step] view
    kc_cache = torch.full((B, H_KV, T, L_max, D), float("nan"), device=device, dtype=dtype)
    vc_cache = torch.full_like(kc_cache, float("nan"))
    for step in range(L):
        kc_cache[:, :, :, step] = kc[:, :, :, step]
        vc_cache[:, :, :, step] = vc[:, :, :, step]
        q_step = q[:, :, :, step]
        out = torch.full((B, H, T, D), float("nan"), device=device, dtype=dtype)
        o = thought_attention_step_launch(q_step, kb, vb, kc_cache, vc_cache, step, out=out)
        assert o is out
        o_pub = thought_attention_step(q_step, kb, vb, kc_cache, vc_cache, step)
        assert torch.equal(o_pub, o)
        clean = [x[:, :, :, : step + 1] for x in (kc, vc)]
        ref64 = thought_attention_step_ref(q_step.double(), kb.double(), vb.double(),
                                           *[x.double() for x in clean], step)
        refd = thought_attention_step_ref(q_step, kb, vb, *clean, step)
        _check(f"step {step}", o, ref64, refd, dtype)
        _check(f"step {step} vs parallel", o, o_par[:, :, :, step].double(), refd, dtype)


# ----------------------------------------------------------------------------------------------
# bad inputs: clear errors naming the argument
# ----------------------------------------------------------------------------------------------
def _good(device, D=32, dtype=torch.float32):
    g = _gen(0)
    return [x.to(dtype) for x in _make_inputs(1, 4, 2, 5, 3, D, g, device)]


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda x: x.__setitem__(0, x[0][..., :1, :]), ValueError, "k_chain"),            # L mismatch
        (lambda x: x.__setitem__(1, x[1][:, :, :4]), ValueError, r"^k_base must be \(B="),  # T mismatch: k_base named
        (lambda x: x.__setitem__(2, x[2][:, :1]), ValueError, "^v_base must have"),        # shape
        (lambda x: x.__setitem__(3, x[3][:, :, :4]), ValueError, r"^k_chain must be \(B="), # T mismatch: k_chain named
        (lambda x: x.__setitem__(4, x[4][..., :1, :]), ValueError, "^v_chain must have"),  # L mismatch of v_chain
        (lambda x: x.__setitem__(3, x[3].half()), TypeError, "k_chain"),                  # dtype
        (lambda x: x.__setitem__(0, x[0][:, :3]), ValueError, "H_KV"),                    # H % H_KV
        (lambda x: x.__setitem__(0, x[0][0]), ValueError, "q must be"),                   # rank
        (lambda x: x.__setitem__(4, x[4].long()), TypeError, "v_chain"),                  # integer
    ],
)
def test_bad_inputs_parallel(mutate, exc, match, device):
    x = _good(device)
    mutate(x)
    with pytest.raises(exc, match=match):
        thought_attention(*x)


def test_bad_head_dim_and_length(device):
    with pytest.raises(ValueError, match=r"D=40 of q"):
        thought_attention(*_good(device, D=40))
    with pytest.raises(ValueError, match=r"D=144 of q"):
        thought_attention(*_good(device, D=144))
    with pytest.raises(TypeError, match="float64"):
        thought_attention(*_good(device, dtype=torch.float64))
    g = _gen(1)
    long_chain = _make_inputs(1, 2, 1, 2, ta._MAX_L + 1, 16, g, device)
    with pytest.raises(ValueError, match="chain length L=65"):
        thought_attention(*long_chain)
    with pytest.raises(ValueError, match="scale"):
        thought_attention(*_good(device), scale=float("nan"))


def test_bad_inputs_step(device):
    q, kb, vb, kc, vc = _good(device)
    q_step = q[:, :, :, 0]
    for step in (3, -1):
        with pytest.raises(ValueError, match=f"step={step}"):
            thought_attention_step(q_step, kb, vb, kc, vc, step)
    with pytest.raises(TypeError, match="step must be a Python int"):
        thought_attention_step(q_step, kb, vb, kc, vc, torch.tensor(1))
    with pytest.raises(ValueError, match="q must be"):
        thought_attention_step(q, kb, vb, kc, vc, 0)
    with pytest.raises(TypeError, match="v_base"):
        thought_attention_step(q_step, kb, vb.half(), kc, vc, 0)
    with pytest.raises(ValueError, match="D=40 of q"):
        q40, kb40, vb40, kc40, vc40 = _good(device, D=40)
        thought_attention_step(q40[:, :, :, 0], kb40, vb40, kc40, vc40, 0)
    with pytest.raises(ValueError, match="out must be"):
        thought_attention_step_launch(q_step, kb, vb, kc, vc, 0, out=torch.empty(1, 4, 5, 16))
    # no rows or no positions: refused as by thought_attention (it used to return an empty output)
    with pytest.raises(ValueError, match="B >= 1 and T >= 1"):
        thought_attention_step(q_step[:0], kb[:0], vb[:0], kc[:0], vc[:0], 0)
    with pytest.raises(ValueError, match="B >= 1 and T >= 1"):
        thought_attention_step(q_step[:, :, :0], kb[:, :, :0], vb[:, :, :0], kc[:, :, :0], vc[:, :, :0], 0)


def test_double_backward_and_meta_tensors_are_refused(device):
    """create_graph=True would give first derivatives cut off from the graph (a gradient penalty silently zero):
    refused in the backward. Meta tensors (no data) are refused by name, not by a copy error inside Triton."""
    xs = [x.requires_grad_() for x in _good(device)]
    o = thought_attention(*xs)
    with pytest.raises(RuntimeError, match="thought_attention: double backward"):
        torch.autograd.grad(o.square().sum(), xs[0], create_graph=True)
    g = torch.autograd.grad(thought_attention(*xs).square().sum(), xs[0])[0]      # the plain backward still runs
    assert torch.isfinite(g).all()
    meta = [x.detach().to("meta") for x in _good(device)]
    with pytest.raises(ValueError, match="^q is on meta"):
        thought_attention(*meta)
    with pytest.raises(ValueError, match="^q is on meta"):
        thought_attention_step(meta[0][:, :, :, 0], *meta[1:], 0)


def test_h100_compile_cases_follow_the_launchers():
    cases = ta.h100_compile_cases()
    kernels_seen = {c["kernel"] for c in cases}
    assert kernels_seen == {"thought_attn_fwd", "thought_attn_bwd_preprocess", "thought_attn_bwd_dq",
                            "thought_attn_bwd_dkv_chain", "thought_attn_bwd_dkv_base", "thought_attn_step"}
    for c in cases:
        params = dict(ta._params(c["fn"]))
        assert set(c["signature"]) | set(c["constexprs"]) == set(params), c["kernel"]
        assert not set(c["signature"]) & set(c["constexprs"])
        assert all(params[n] for n in params if n not in c["signature"] and not n.startswith("stride_"))
        assert set(c["divisible_by_16"]) <= set(c["signature"])
        assert ("bf16" in c["config"]) != ("fp16" in c["config"])
    # the paper shape's forward config is the launcher's
    cfg = ta._fwd_config(128, torch.bfloat16, 256)
    assert any(c["kernel"] == "thought_attn_fwd" and c["constexprs"]["BLOCK_M"] == cfg["BLOCK_M"]
               and c["num_warps"] == cfg["num_warps"] for c in cases)


# ----------------------------------------------------------------------------------------------
# GPU: bf16 at benchmark-like shapes, CUDA-graph capture of the step kernel
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("B,H,H_KV,T,L,D", [(2, 32, 8, 256, 14, 128), (2, 9, 3, 200, 5, 64)])
def test_gpu_bf16_parallel(B, H, H_KV, T, L, D):
    _run_parallel_check(B, H, H_KV, T, L, D, torch.bfloat16, "cuda", seed=T + L)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_step_cuda_graph(dtype):
    B, H, H_KV, T, L_max, D = 2, 32, 8, 256, 14, 128
    g = _gen(5)
    q = _randn((B, H, T, L_max, D), g, "cuda", dtype)
    kb, vb = (_randn((B, H_KV, T, D), g, "cuda", dtype) for _ in range(2))
    kc, vc = (_randn((B, H_KV, T, L_max, D), g, "cuda", dtype) for _ in range(2))
    step = 6
    q_step = q[:, :, :, step]
    out = torch.full((B, H, T, D), float("nan"), device="cuda", dtype=dtype)
    thought_attention_step_launch(q_step, kb, vb, kc, vc, step, out=out)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        thought_attention_step_launch(q_step, kb, vb, kc, vc, step, out=out)
    # new contents in the captured buffers, then replay
    with torch.no_grad():
        for x in (q, kb, vb, kc, vc):
            x.copy_(torch.randn(x.shape, generator=g).to(x))
        out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    eager = thought_attention_step(q_step, kb, vb, kc, vc, step)
    assert torch.equal(out, eager)
    ref64 = thought_attention_step_ref(q_step.double(), kb.double(), vb.double(), kc.double(), vc.double(), step)
    refd = thought_attention_step_ref(q_step, kb, vb, kc, vc, step)
    _check("graph step", out, ref64, refd, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [128, 64])
def test_gpu_bf16_long_T_forward_tile(D):
    """T >= 1024: the 128-row forward tile at D <= 64 (a config no other test reaches); at D = 128 the
    H200-tuned 64-row, 4-warp tile over a long base."""
    B, H, H_KV, T, L = 1, 4, 2, 1024, 4
    assert ta._fwd_config(D, torch.bfloat16, T)["BLOCK_M"] == (128 if D <= 64 else 64)
    _run_parallel_check(B, H, H_KV, T, L, D, torch.bfloat16, "cuda", seed=T + D)


@pytest.mark.gpu
def test_gpu_bf16_base_dkv_written_directly():
    """B * H_KV * T / BLOCK_N programs fill the GPU without a head split: bf16 dK/dV written in place."""
    B, H, H_KV, T, L, D = 8, 16, 8, 1024, 2, 128
    cfg = ta._bwd_base_config(D, torch.bfloat16, T)
    assert ta._base_split(B, H_KV, H // H_KV, T, cfg["BLOCK_N"], ta._num_sms(torch.device("cuda"))) == 1
    _run_parallel_check(B, H, H_KV, T, L, D, torch.bfloat16, "cuda", seed=88)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_step_smollm2_heads(dtype):
    """The step kernel at SmolLM2's heads (H=9, H_KV=3: G=3 query heads packed per program, D=64)."""
    B, H, H_KV, T, L_max, D = 2, 9, 3, 256, 14, 64
    g = _gen(64)
    q = _randn((B, H, T, D), g, "cuda", dtype)
    kb, vb = (_randn((B, H_KV, T, D), g, "cuda", dtype) for _ in range(2))
    kc, vc = (_randn((B, H_KV, T, L_max, D), g, "cuda", dtype) for _ in range(2))
    for step in (0, 6, L_max - 1):
        clean = [x[:, :, :, : step + 1] for x in (kc, vc)]
        o = thought_attention_step(q, kb, vb, kc, vc, step)
        ref64 = thought_attention_step_ref(q.double(), kb.double(), vb.double(), *[x.double() for x in clean], step)
        refd = thought_attention_step_ref(q, kb, vb, *clean, step)
        _check(f"step {step}", o, ref64, refd, dtype)


def test_cpu_tensors_outside_the_interpreter_are_refused(monkeypatch):
    """Without CUDA or the interpreter, Triton itself would fail with "0 active drivers": say what to do."""
    import sys
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delitem(sys.modules, "triton_viz", raising=False)
    q, kb, vb, kc, vc = _good("cpu")
    with pytest.raises(ValueError, match="q is on cpu; the Triton thought-attention kernels need CUDA"):
        thought_attention(q, kb, vb, kc, vc)
    with pytest.raises(ValueError, match="q is on cpu; the Triton thought-attention kernels need CUDA"):
        thought_attention_step(q[:, :, :, 0], kb, vb, kc, vc, 0)
