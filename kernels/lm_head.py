"""LM-head ops that never materialise the (N, V) logits (DESIGN.md sections 4, 5, 7).

Three ops on hidden states h (N, d) and the LM-head weight W (V, d) (``weight``):

* ``mixed_logprob(h_talk, h_base, w, weight, target, ignore_index=-100)``
  equals ``torch.log_softmax(((1 - w)[:, None] * h_base + w[:, None] * h_talk) @ weight.T, -1)
  .gather(1, target[:, None])[:, 0]`` (fp32, 0 where target == ignore_index), float32 (N,).
  Mixing is linear in the logits, so the hidden states are mixed first,
  h_mix = h_base + w * (h_talk - h_base) (in fp32, stored in W's dtype), and W is applied once.
* ``token_logprob(h, weight, target, temperature=1.0, banned_ids=())``
  equals ``torch.log_softmax((h @ weight.T / temperature).index_fill(1, banned, -inf), -1)
  .gather(1, target[:, None])[:, 0]``, float32 (N,).
* ``sample_thought_tokens(h, weight, temperature=1.0, banned_ids=(), generator=None, *, seed=None)``: one exact
  sample per row of softmax(W h / temperature) over the non-banned ids, by Gumbel-max, int64 (N,).

Math. z = W h_mix / tau (tau = temperature, 1 for the mixed op), lse = log sum_v exp z_v,
logp = z_target - lse. With an upstream gradient g_i per row (REINFORCE advantages are per row):
    dL/dz_iv = G_iv = g_i (1[v = t_i] - softmax(z_i)_v) / tau     (0 on banned ids and ignored rows)
    dh_mix = G W,  dW = G^T h_mix
    dh_talk = w dh_mix,  dh_base = (1 - w) dh_mix,  dw_i = <dh_mix_i, h_talk_i - h_base_i>.
w may have any sign (it is not clamped).

Design. The GEMMs with W are the whole cost (2 N d V FLOPs each) and cuBLAS runs them at ~700 TFLOP/s
on an H200 (benchmarks/gpu_profile.py), where the former all-Triton GEMM kernels of this file reached
200-400 (29 ms fwd+bwd at N=8192 d=4096 V=32000 against 3 ms per cuBLAS GEMM). So the logits are made
chunk by chunk by torch.mm into ONE reused buffer of at most _CHUNK_BYTES (64 MiB: R rows x Vc vocabulary
columns, R = N unless N is huge), and Triton kernels do everything that touches the logits once:
  forward   per chunk: Z = h_mix W_v^T; ``_lse_chunk_kernel`` folds Z into a running per-row (max, sum-exp,
            target logit) in fp32 (the target logit read by a compare against the column ids, never an
            indirect load); lse and logp at the end.
  backward  per chunk: Z = h_mix W_v^T again; ``_grad_chunk_kernel`` overwrites Z with G in W's dtype;
            dW_v = G^T h_mix (torch.mm, written once: exact, no accumulation across chunks when R = N);
            dh_mix += G W_v accumulated in fp32 (one bf16 rounding of each chunk's product when
            torch.addmm with out_dtype=float32 is not available: CPU); ``_mix_grad_kernel`` then writes
            dh_talk, dh_base and dw in one pass.
  sampling  per chunk: Z = h W_v^T; ``_sample_chunk_kernel`` adds Gumbel noise drawn in the kernel with
            counter-based Philox (tl.randint) at counter offset row * V + column (int64), keyed by a 64-bit
            seed read from device memory, and keeps a running (max, argmax) per row (first index on ties).
            The seed is drawn from ``generator`` by a one-element torch.randint on h's device (no host sync;
            it advances the generator, so the same generator state gives the same tokens), or passed in as
            ``seed`` (a (1,) int64 device tensor: a CUDA graph reads its keys from a static buffer).
            u = (2k + 1) 2^-24 with k the top 23 bits of the Philox output lies strictly inside (0, 1),
            G = -log(-log u).
Logits are rounded to W's dtype by the GEMM (as an F.linear LM head, Liger and Cut Cross-Entropy do);
everything after the GEMM is fp32. Peak extra memory of the backward: dW and the fp32 dh_mix accumulator
(N x d), plus either the loop's h_mix (N x d in W's dtype) and chunk buffer or the epilogue's dh_talk and
dh_base, whichever is larger (the buffer and h_mix are freed before the epilogue allocates:
tests/test_kernel_memory.py); the forward's: the chunk buffer and h_mix.

Banned ids (at most _MAX_BANNED) are loaded once per program as a small vector and each tile's
columns are compared against it. Launchers validate; kernels validate nothing. Target values are not
range-checked on the host (that would sync): an out-of-range target that is not ignore_index gives
NaN; a banned target gives -inf (as the reference).

Limits: fp32/fp16/bf16 (W's dtype sets the GEMM dtype; h is cast to it); fp32 GEMMs are IEEE fp32 (torch's
default, no tf32); CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (torch.mm on the CPU, the Triton
kernels in the interpreter). Offsets are int64. Deterministic: no atomics, fixed chunk order.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .lm_head_chunked import mixed_logprob_chunked, token_logprob_chunked
from .reference import (banned_id_list, banned_ids_tensor, check_ignore_index, check_lm_head_inputs,
                        check_mixed_logprob_inputs, check_temperature, check_triton_device, refuse_double_backward)

__all__ = [
    "mixed_logprob",
    "token_logprob",
    "sample_thought_tokens",
    "MixedLogprobFunction",
    "TokenLogprobFunction",
    "h100_compile_cases",
]

_MAX_BANNED = 128                # banned ids are one (BLOCK_B,) vector per program
_CHUNK_BYTES = 64 * 2**20        # the (R, Vc) logit / grad-logit buffer, in W's dtype
_MIN_VC = 256                    # fewest vocabulary columns per chunk (rows are split below that)


# ----------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_banned(banned_ptr, n_banned, BLOCK_B: tl.constexpr):
    ids = tl.arange(0, BLOCK_B)
    return tl.load(banned_ptr + ids, mask=ids < n_banned, other=-1)


@triton.jit
def _allowed_cols(cols, V, banned, HAS_BANNED: tl.constexpr):
    """cols < V and not banned, as a (BLOCK_V,) mask."""
    ok = cols < V
    if HAS_BANNED:
        hit = tl.max((cols[:, None] == banned[None, :]).to(tl.int32), axis=1)
        ok = ok & (hit == 0)
    return ok


@triton.jit
def _chunk_tile(z_ptr, r64, row_ok, cc, Vc, stride_zr, stride_zv, inv_temp):
    """fp32 (rows, columns cc) tile of a logit chunk, divided by tau; 0 outside the chunk (callers mask it)."""
    mask = row_ok[:, None] & (cc < Vc)[None, :]
    return tl.load(z_ptr + r64 * stride_zr + cc[None, :] * stride_zv, mask=mask, other=0.0).to(tl.float32) * inv_temp


# ----------------------------------------------------------------------------------------------
# forward kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mix_kernel(
    h_ptr, h2_ptr, w_ptr, out_ptr, N, d,
    stride_hn, stride_hd, stride_h2n, stride_h2d, stride_w, stride_on, stride_od,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """h_mix = h2 + w (h - h2) in fp32, stored in out's dtype (h = h_talk, h2 = h_base)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < N) & (ds[None, :] < d)
    r64 = rows.to(tl.int64)[:, None]
    w = tl.load(w_ptr + rows * stride_w, mask=rows < N, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + r64 * stride_hn + ds[None, :] * stride_hd, mask=mask, other=0.0).to(tl.float32)
    hb = tl.load(h2_ptr + r64 * stride_h2n + ds[None, :] * stride_h2d, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + r64 * stride_on + ds[None, :] * stride_od,
             (hb + w[:, None] * (h - hb)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lse_chunk_kernel(
    z_ptr, target_ptr, banned_ptr, m_ptr, s_ptr, t_ptr,
    R, Vc, v0, V, n_banned, inv_temp,
    stride_zr, stride_zv, stride_t,
    HAS_BANNED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Fold one logit chunk (R rows, vocabulary columns v0 .. v0 + Vc - 1) into the rows' running
    (max m, sum exp(z - m), target logit t), all fp32, z = logit / tau with banned columns at -inf."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    r64 = rows.to(tl.int64)[:, None]
    tgt = tl.load(target_ptr + rows * stride_t, mask=row_ok, other=-1)
    banned = _load_banned(banned_ptr, n_banned, BLOCK_B)
    m = tl.load(m_ptr + rows, mask=row_ok, other=float("-inf"))
    s = tl.load(s_ptr + rows, mask=row_ok, other=0.0)
    t = tl.load(t_ptr + rows, mask=row_ok, other=0.0)
    for c0 in range(0, Vc, BLOCK_V):
        cc = c0 + tl.arange(0, BLOCK_V)
        cols = v0 + cc
        ok = (cc < Vc) & _allowed_cols(cols, V, banned, HAS_BANNED)
        z = _chunk_tile(z_ptr, r64, row_ok, cc, Vc, stride_zr, stride_zv, inv_temp)
        z = tl.where(ok[None, :], z, float("-inf"))
        # online log-sum-exp; m_ref keeps exp() finite while a row has seen only -inf
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref[:, None]), axis=1)
        m = m_new
        # (cc < Vc): a tile's masked tail holds the NEXT chunk's ids, which must not match the target;
        # a banned target does match (its z is -inf: logp = -inf, as the reference)
        hit = (cols[None, :] == tgt[:, None]) & (cc < Vc)[None, :]
        t += tl.sum(tl.where(hit, z, 0.0), axis=1)
    tl.store(m_ptr + rows, m, mask=row_ok)
    tl.store(s_ptr + rows, s, mask=row_ok)
    tl.store(t_ptr + rows, t, mask=row_ok)


@triton.jit
def _sample_chunk_kernel(
    z_ptr, banned_ptr, seed_ptr, best_ptr, idx_ptr,
    R, Vc, v0, V, row0, n_banned, inv_temp,
    stride_zr, stride_zv,
    HAS_BANNED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Fold one logit chunk into the rows' running Gumbel-max (max of z / tau + G, its column)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    r64 = rows.to(tl.int64)[:, None]
    banned = _load_banned(banned_ptr, n_banned, BLOCK_B)
    seed = tl.load(seed_ptr)
    best = tl.load(best_ptr + rows, mask=row_ok, other=float("-inf"))
    best_idx = tl.load(idx_ptr + rows, mask=row_ok, other=0)
    grow = (row0 + rows).to(tl.int64)[:, None]
    for c0 in range(0, Vc, BLOCK_V):
        cc = c0 + tl.arange(0, BLOCK_V)
        cols = v0 + cc
        ok = (cc < Vc) & _allowed_cols(cols, V, banned, HAS_BANNED)
        z = _chunk_tile(z_ptr, r64, row_ok, cc, Vc, stride_zr, stride_zv, inv_temp)
        # one Philox counter per (row, column) of the whole call: independent uniforms for every logit
        r = tl.randint(seed, grow * V + cols[None, :])
        u = ((r >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08     # (2k+1) 2^-24 in (0, 1)
        y = tl.where(ok[None, :], z - tl.log(-tl.log(u)), float("-inf"))
        tile_best = tl.max(y, axis=1)
        tile_arg = tl.argmax(y, axis=1).to(tl.int32)
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, v0 + c0 + tile_arg, best_idx)
    tl.store(best_ptr + rows, best, mask=row_ok)
    tl.store(idx_ptr + rows, best_idx, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# backward kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _grad_chunk_kernel(
    z_ptr, target_ptr, banned_ptr, lse_ptr, g_ptr,
    R, Vc, v0, V, n_banned, inv_temp, ignore_index,
    stride_zr, stride_zv, stride_t, stride_g,
    HAS_BANNED: tl.constexpr, HAS_IGNORE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Overwrite a logit chunk with G = g (onehot(target) - softmax(z)) / tau (0 on banned columns and
    ignored rows), in the chunk's dtype."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cc = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v0 + cc
    row_ok = rows < R
    mask = row_ok[:, None] & (cc < Vc)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    tgt = tl.load(target_ptr + rows * stride_t, mask=row_ok, other=-1)
    g = tl.load(g_ptr + rows * stride_g, mask=row_ok, other=0.0).to(tl.float32) * inv_temp
    if HAS_IGNORE:
        g = tl.where(tgt == ignore_index, 0.0, g)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    offs = r64 * stride_zr + cc[None, :] * stride_zv
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_temp
    p = tl.exp(z - lse[:, None])
    G = g[:, None] * (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - p)
    if HAS_BANNED:
        banned = _load_banned(banned_ptr, n_banned, BLOCK_B)
        G = tl.where(_allowed_cols(cols, V, banned, HAS_BANNED)[None, :], G, 0.0)
    tl.store(z_ptr + offs, G.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mix_grad_kernel(
    dmix_ptr, h_ptr, h2_ptr, w_ptr, dh_ptr, dh2_ptr, dw_part_ptr, N, d,
    stride_mn, stride_md, stride_hn, stride_hd, stride_h2n, stride_h2d, stride_w,
    stride_dhn, stride_dhd, stride_dh2n, stride_dh2d, stride_pd,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """From the fp32 dh_mix: dh_talk = w dh_mix, dh_base = (1 - w) dh_mix, and per-d-block partial dots
    of dw_i = <dh_mix_i, h_talk_i - h_base_i> (summed by the launcher in a fixed order)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    pid_d = tl.program_id(1)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    mask = row_ok[:, None] & (ds[None, :] < d)
    r64 = rows.to(tl.int64)[:, None]
    dm = tl.load(dmix_ptr + r64 * stride_mn + ds[None, :] * stride_md, mask=mask, other=0.0)
    w = tl.load(w_ptr + rows * stride_w, mask=row_ok, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + r64 * stride_hn + ds[None, :] * stride_hd, mask=mask, other=0.0).to(tl.float32)
    hb = tl.load(h2_ptr + r64 * stride_h2n + ds[None, :] * stride_h2d, mask=mask, other=0.0).to(tl.float32)
    tl.store(dh_ptr + r64 * stride_dhn + ds[None, :] * stride_dhd,
             (w[:, None] * dm).to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dh2_ptr + r64 * stride_dh2n + ds[None, :] * stride_dh2d,
             ((1.0 - w)[:, None] * dm).to(dh2_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + pid_d * stride_pd + rows, tl.sum(dm * (h - hb), axis=1), mask=row_ok)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _configs(interpret: bool) -> dict:
    """Tiles of the memory-bound row kernels. Interpreter: small tiles, so the CPU tests run every
    loop (row blocks, column blocks, the column loop inside a chunk) several times."""
    if interpret:
        return {"rows": dict(BLOCK_R=4, BLOCK_V=64, num_warps=4, num_stages=1),
                "grad": dict(BLOCK_R=4, BLOCK_V=64, num_warps=4, num_stages=1),
                "mix": dict(BLOCK_R=4, BLOCK_D=32, num_warps=4, num_stages=1)}
    return {"rows": dict(BLOCK_R=8, BLOCK_V=512, num_warps=4, num_stages=2),
            "grad": dict(BLOCK_R=16, BLOCK_V=256, num_warps=4, num_stages=2),
            "mix": dict(BLOCK_R=16, BLOCK_D=256, num_warps=4, num_stages=2)}


def _chunk_plan(N: int, V: int, elem: int) -> tuple[int, int]:
    """(R rows, Vc columns) per logit chunk: R x Vc x elem <= _CHUNK_BYTES, all rows at once unless that
    leaves fewer than _MIN_VC columns; Vc a multiple of _MIN_VC (or V)."""
    cap = max(1, _CHUNK_BYTES // elem)
    R = N if N * _MIN_VC <= cap else max(1, cap // _MIN_VC)
    Vc = max(_MIN_VC, (cap // R) // _MIN_VC * _MIN_VC)
    return R, min(V, Vc)


def _banned_block(n_banned: int) -> int:
    return max(16, triton.next_power_of_2(max(n_banned, 1)))


_ADDMM_F32: dict = {}


def _acc_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b for 16-bit a, b: one cuBLAS call with an fp32 output where torch has it
    (torch.addmm(..., out_dtype=float32), CUDA), else the product in a's dtype added in fp32."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    key = a.device.type
    if _ADDMM_F32.get(key, True) and a.device.type == "cuda":
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _ADDMM_F32[key] = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _ADDMM_F32[key] = False       # this torch has no fp32-out addmm for these dtypes
    acc += (a @ b).to(acc.dtype)


class _NoAutocast:
    """Run the GEMMs in the dtypes chosen here (W's), whatever autocast region the op is called in."""

    def __init__(self, device: torch.device):
        self.ctx = torch.autocast(device.type, enabled=False) if device.type in ("cuda", "cpu") else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _hidden(h, h2, w, weight, mix):
    """h_mix (or h) as a contiguous (N, d) tensor in W's dtype."""
    if not mix:
        return h.to(weight.dtype).contiguous()
    N, d = h.shape
    out = torch.empty((N, d), device=h.device, dtype=weight.dtype)
    cfg = _configs(_interpreting())["mix"]
    _mix_kernel[(triton.cdiv(N, cfg["BLOCK_R"]), triton.cdiv(d, cfg["BLOCK_D"]))](
        h, h2, w, out, N, d, h.stride(0), h.stride(1), h2.stride(0), h2.stride(1), w.stride(0),
        out.stride(0), out.stride(1), **cfg)
    return out


def _chunks(N, V, weight):
    """Yield (r0, r1, v0, v1) over the logit chunks, rows outer, vocabulary inner."""
    R, Vc = _chunk_plan(N, V, weight.element_size())
    for r0 in range(0, N, R):
        for v0 in range(0, V, Vc):
            yield r0, min(N, r0 + R), v0, min(V, v0 + Vc)


def _chunk_buffer(N, V, weight):
    """The one (R x Vc) logit buffer every chunk of a call reuses, in W's dtype."""
    R, Vc = _chunk_plan(N, V, weight.element_size())
    return torch.empty(R * Vc, device=weight.device, dtype=weight.dtype)


def _logit_chunk(buf, hm, weight, r0, r1, v0, v1):
    Z = buf[: (r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0)
    torch.mm(hm[r0:r1], weight[v0:v1].T, out=Z)
    return Z


def _lm_head_forward(h, h2, w, weight, target, banned, inv_temp, ignore_index, mix):
    """logp and lse, both float32 (N,)."""
    N, d = h.shape
    V = weight.shape[0]
    dev = h.device
    cfg = _configs(_interpreting())["rows"]
    n_banned = banned.numel()
    banned_arg = banned if n_banned else target
    with _NoAutocast(dev):
        hm = _hidden(h, h2, w, weight, mix)
        buf = _chunk_buffer(N, V, weight)
        m = torch.full((N,), float("-inf"), device=dev, dtype=torch.float32)
        s = torch.zeros(N, device=dev, dtype=torch.float32)
        t = torch.zeros(N, device=dev, dtype=torch.float32)
        for r0, r1, v0, v1 in _chunks(N, V, weight):
            Z = _logit_chunk(buf, hm, weight, r0, r1, v0, v1)
            tc = target[r0:r1]
            _lse_chunk_kernel[(triton.cdiv(r1 - r0, cfg["BLOCK_R"]),)](
                Z, tc, banned_arg, m[r0:r1], s[r0:r1], t[r0:r1],
                r1 - r0, v1 - v0, v0, V, n_banned, inv_temp,
                Z.stride(0), Z.stride(1), tc.stride(0),
                HAS_BANNED=n_banned > 0, BLOCK_B=_banned_block(n_banned), **cfg)
        lse = m + torch.log(s)
        logp = torch.where((target >= 0) & (target < V), t - lse, torch.full_like(lse, float("nan")))
        if mix:
            logp = torch.where(target == ignore_index, torch.zeros_like(logp), logp)
    return logp, lse


def _lm_head_backward(g, h, h2, w, weight, target, banned, lse, inv_temp, ignore_index, mix):
    """(dh, dh2 or None, dw or None, dW)."""
    N, d = h.shape
    V = weight.shape[0]
    dev = h.device
    cfgs = _configs(_interpreting())
    gcfg = cfgs["grad"]
    R, _ = _chunk_plan(N, V, weight.element_size())
    n_banned = banned.numel()
    banned_arg = banned if n_banned else target
    with _NoAutocast(dev):
        hm = _hidden(h, h2, w, weight, mix)
        buf = _chunk_buffer(N, V, weight)
        # dW is written once per vocabulary chunk when all rows are in one chunk; else summed in fp32
        dW = torch.empty((V, d), device=dev, dtype=weight.dtype) if R >= N else \
            torch.zeros((V, d), device=dev, dtype=torch.float32)
        dmix = torch.zeros((N, d), device=dev, dtype=torch.float32)
        for r0, r1, v0, v1 in _chunks(N, V, weight):
            Z = _logit_chunk(buf, hm, weight, r0, r1, v0, v1)
            tc, gc = target[r0:r1], g[r0:r1]
            _grad_chunk_kernel[(triton.cdiv(r1 - r0, gcfg["BLOCK_R"]), triton.cdiv(v1 - v0, gcfg["BLOCK_V"]))](
                Z, tc, banned_arg, lse[r0:r1], gc,
                r1 - r0, v1 - v0, v0, V, n_banned, inv_temp, ignore_index,
                Z.stride(0), Z.stride(1), tc.stride(0), gc.stride(0),
                HAS_BANNED=n_banned > 0, HAS_IGNORE=mix, BLOCK_B=_banned_block(n_banned), **gcfg)
            if R >= N:
                torch.mm(Z.T, hm[r0:r1], out=dW[v0:v1])
            else:
                _acc_mm(dW[v0:v1], Z.T, hm[r0:r1])
            _acc_mm(dmix[r0:r1], Z, weight[v0:v1])
        del Z, buf, hm      # before the gradients are allocated: the peak is the loop's or the epilogue's, not both
        if dW.dtype != weight.dtype:
            dW = dW.to(weight.dtype)
        if not mix:
            return dmix.to(h.dtype), None, None, dW
        mcfg = cfgs["mix"]
        dh = torch.empty((N, d), device=dev, dtype=h.dtype)
        dh2 = torch.empty((N, d), device=dev, dtype=h2.dtype)
        num_db = triton.cdiv(d, mcfg["BLOCK_D"])
        dw_part = torch.empty((num_db, N), device=dev, dtype=torch.float32)
        _mix_grad_kernel[(triton.cdiv(N, mcfg["BLOCK_R"]), num_db)](
            dmix, h, h2, w, dh, dh2, dw_part, N, d,
            dmix.stride(0), dmix.stride(1), h.stride(0), h.stride(1), h2.stride(0), h2.stride(1), w.stride(0),
            dh.stride(0), dh.stride(1), dh2.stride(0), dh2.stride(1), dw_part.stride(0), **mcfg)
        return dh, dh2, dw_part.sum(0), dW



_BANNED_CACHE: dict = {}


def _banned_on_device(banned_ids, V: int, device) -> torch.Tensor:
    """Banned ids as int64 on ``device``, cached by value, so the host-to-device copy (a sync) happens once per
    distinct list; a CUDA tensor is read back to find its value (one sync per call): pass a tuple in hot loops."""
    key = (banned_id_list(banned_ids), V, str(device))
    ids = _BANNED_CACHE.get(key)
    if ids is None:
        ids = banned_ids_tensor(key[0], V, device)
        if len(_BANNED_CACHE) > 64:
            _BANNED_CACHE.clear()
        _BANNED_CACHE[key] = ids
    if ids.numel() > _MAX_BANNED:
        raise ValueError(f"banned_ids holds {ids.numel()} ids; the kernels take at most {_MAX_BANNED}")
    return ids


def _check_kernel_tensors(**tensors) -> None:
    for name, x in tensors.items():
        if x.dtype == torch.float64:
            raise TypeError(f"{name} is float64; the Triton LM-head kernels take float32, float16 or bfloat16 "
                            f"(use kernels.reference or kernels.lm_head_chunked for float64)")
        check_triton_device(name, x, "LM-head", "kernels.lm_head_chunked")


def _draw_seed(generator, device) -> torch.Tensor:
    """A (1,) int64 Philox key drawn on ``device`` from ``generator`` (or the device's default one).

    A one-element torch.randint on the device: no host sync, and it advances the generator, so
    consecutive calls draw fresh noise and the same generator state reproduces the same tokens.
    """
    if generator is not None and torch.device(generator.device).type != torch.device(device).type:
        raise ValueError(f"generator is on {generator.device} but h is on {device}")
    return torch.randint(0, 2**62, (1,), generator=generator, device=device, dtype=torch.int64)


def _check_seed(seed, generator, device) -> None:
    if generator is not None:
        raise ValueError("pass either seed or generator to sample_thought_tokens, not both")
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or tuple(seed.shape) != (1,):
        raise ValueError(f"seed must be a (1,) int64 tensor, got "
                         f"{tuple(seed.shape) if isinstance(seed, torch.Tensor) else type(seed).__name__} "
                         f"{getattr(seed, 'dtype', '')}")
    if seed.device != device:
        raise ValueError(f"seed is on {seed.device} but h is on {device}")


def _sample(h, weight, banned, inv_temp, generator, seed=None):
    N, d = h.shape
    V = weight.shape[0]
    dev = h.device
    cfg = _configs(_interpreting())["rows"]
    if seed is None:
        seed = _draw_seed(generator, dev)
    n_banned = banned.numel()
    banned_arg = banned if n_banned else seed
    with _NoAutocast(dev):
        hm = h.to(weight.dtype).contiguous()
        buf = _chunk_buffer(N, V, weight)
        best = torch.full((N,), float("-inf"), device=dev, dtype=torch.float32)
        idx = torch.zeros(N, device=dev, dtype=torch.int32)
        for r0, r1, v0, v1 in _chunks(N, V, weight):
            Z = _logit_chunk(buf, hm, weight, r0, r1, v0, v1)
            _sample_chunk_kernel[(triton.cdiv(r1 - r0, cfg["BLOCK_R"]),)](
                Z, banned_arg, seed, best[r0:r1], idx[r0:r1],
                r1 - r0, v1 - v0, v0, V, r0, n_banned, inv_temp,
                Z.stride(0), Z.stride(1),
                HAS_BANNED=n_banned > 0, BLOCK_B=_banned_block(n_banned), **cfg)
    return idx.to(torch.int64)


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
class MixedLogprobFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_talk, h_base, w, weight, target, ignore_index):
        none = target.new_empty(0, dtype=torch.int64)
        logp, lse = _lm_head_forward(h_talk, h_base, w, weight, target, none, 1.0, ignore_index, mix=True)
        ctx.save_for_backward(h_talk, h_base, w, weight, target, lse)
        ctx.ignore_index = ignore_index
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        refuse_double_backward("mixed_logprob")
        h_talk, h_base, w, weight, target, lse = ctx.saved_tensors
        none = target.new_empty(0, dtype=torch.int64)
        dh_talk, dh_base, dw, dW = _lm_head_backward(
            grad_logp, h_talk, h_base, w, weight, target, none, lse, 1.0, ctx.ignore_index, mix=True)
        return dh_talk, dh_base, dw.to(w.dtype), dW, None, None


class TokenLogprobFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, target, inv_temp, banned):
        logp, lse = _lm_head_forward(h, h, h, weight, target, banned, inv_temp, 0, mix=False)
        ctx.save_for_backward(h, weight, target, banned, lse)
        ctx.inv_temp = inv_temp
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        refuse_double_backward("token_logprob")
        h, weight, target, banned, lse = ctx.saved_tensors
        dh, _, _, dW = _lm_head_backward(grad_logp, h, h, h, weight, target, banned, lse, ctx.inv_temp, 0,
                                         mix=False)
        return dh, dW, None, None, None


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------
def mixed_logprob(h_talk, h_base, w, weight, target, ignore_index=-100):
    """log_softmax((1 - w_i) W h_base_i + w_i W h_talk_i)[target_i], 0 where ignored; float32 (N,).

    Equals ``mixed_logprob_ref`` without allocating the (N, V) logits; differentiable in h_talk,
    h_base, w and weight with per-row upstream gradients.
    """
    N, d, V = check_mixed_logprob_inputs(h_talk, h_base, w, weight, target, ignore_index)
    _check_kernel_tensors(h_talk=h_talk, h_base=h_base, w=w, weight=weight)
    if N == 0:      # no rows: the chunked path's empty result, with its (zero) gradients; no kernel launch
        return mixed_logprob_chunked(h_talk, h_base, w, weight, target, ignore_index)
    return MixedLogprobFunction.apply(h_talk, h_base, w, weight, target, check_ignore_index(ignore_index))


def token_logprob(h, weight, target, temperature=1.0, banned_ids=()):
    """log_softmax(W h / temperature, banned ids' logits at -inf)[target]; float32 (N,), differentiable.

    Equals ``token_logprob_ref`` without allocating the (N, V) logits.
    """
    N, d, V = check_lm_head_inputs(h, weight, target)
    temperature = check_temperature(temperature)
    _check_kernel_tensors(h=h, weight=weight)
    banned = _banned_on_device(banned_ids, V, h.device)
    if N == 0:
        return token_logprob_chunked(h, weight, target, temperature, banned_ids)
    return TokenLogprobFunction.apply(h, weight, target, 1.0 / temperature, banned)


@torch.no_grad()
def sample_thought_tokens(h, weight, temperature=1.0, banned_ids=(), generator=None, *, seed=None):
    """One exact sample per row from softmax(W h / temperature) without the banned ids; int64 (N,).

    In law equal to ``sample_thought_tokens_ref`` (Gumbel-max), without the (N, V) logits; the
    Gumbel noise is Philox inside the kernel, keyed by a seed drawn from ``generator`` on device,
    or by ``seed`` when given: a (1,) int64 tensor on h's device (what a CUDA graph captures; the
    generator path equals ``seed=torch.randint(0, 2**62, (1,), generator=generator, device=h.device)``).
    """
    N, d, V = check_lm_head_inputs(h, weight)
    temperature = check_temperature(temperature)
    _check_kernel_tensors(h=h, weight=weight)
    if seed is not None:
        _check_seed(seed, generator, h.device)
    banned = _banned_on_device(banned_ids, V, h.device)
    if N == 0:      # nothing to draw; a generator still advances, as for any N
        if seed is None:
            _draw_seed(generator, h.device)
        return torch.empty(0, device=h.device, dtype=torch.int64)
    return _sample(h, weight, banned, 1.0 / temperature, generator, seed)


# ----------------------------------------------------------------------------------------------
# H100 compile cases (for benchmarks/h100_static_check.py)
# ----------------------------------------------------------------------------------------------
_TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                 torch.int64: "i64", torch.int32: "i32"}


class _LaunchRecorder:
    """Stands in for a @triton.jit kernel: ``rec[grid](*args, **kw)`` records what the JIT would see."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            kwargs = dict(kwargs)
            num_warps, num_stages = kwargs.pop("num_warps"), kwargs.pop("num_stages")
            names = [p.name for p in self.fn.params]
            signature, constexprs, div16 = {}, dict(kwargs), []
            for name, a in zip(names, args):
                if isinstance(a, torch.Tensor):
                    signature[name] = "*" + _TRITON_DTYPE[a.dtype]
                    div16.append(name)                      # fresh allocations and chunk views are aligned
                elif isinstance(a, bool) or not isinstance(a, (int, float)):
                    raise TypeError(f"unexpected argument {name}={a!r}")
                elif isinstance(a, float):
                    signature[name] = "fp32"
                elif a == 1:
                    constexprs[name] = 1                    # the JIT specialises ints equal to 1
                else:
                    signature[name] = "i32" if -2**31 <= a < 2**31 else "i64"
                    if a % 16 == 0:
                        div16.append(name)
            self.log.append(dict(fn=self.fn, signature=signature, constexprs=constexprs, divisible_by_16=div16,
                                 num_warps=num_warps, num_stages=num_stages))
        return launch


_KERNELS = ("_mix_kernel", "_lse_chunk_kernel", "_sample_chunk_kernel", "_grad_chunk_kernel", "_mix_grad_kernel")


def h100_compile_cases() -> list:
    """Every (kernel, configuration) the launchers launch at the benchmark shapes, for sm_90.

    Shapes: N in {8192, 32768}, (d, V) in {(4096, 32000), (576, 49152)}, bf16 and fp16; the mixed
    op's forward + backward, token_logprob's (with and without banned ids) and the sampler. The
    launchers themselves run, on "meta" tensors (no memory, no GPU; torch.mm on meta only computes
    shapes), with every Triton kernel swapped for a recorder, so the cases are exactly what they
    launch: tiles from ``_configs``, runtime ints as the JIT specialises them (value 1 -> constexpr,
    multiples of 16 -> divisible). Deduplicated on (kernel, signature, constexprs, divisibility,
    warps, stages).
    """
    g = globals()
    saved = {n: g[n] for n in _KERNELS}
    saved_interp = g["_interpreting"]
    cases, seen = [], set()
    try:
        g["_interpreting"] = lambda: False
        for dtype in (torch.bfloat16, torch.float16):
            for N in (8192, 32768):
                for d, V in ((4096, 32000), (576, 49152)):
                    log = []
                    for n in _KERNELS:
                        g[n] = _LaunchRecorder(saved[n], log)
                    meta = dict(device="meta", dtype=dtype)
                    ht, hb, W = torch.empty(N, d, **meta), torch.empty(N, d, **meta), torch.empty(V, d, **meta)
                    w = torch.empty(N, **meta)
                    t = torch.empty(N, device="meta", dtype=torch.int64)
                    gr = torch.empty(N, device="meta", dtype=torch.float32)
                    lse = torch.empty(N, device="meta", dtype=torch.float32)
                    seed = torch.empty(1, device="meta", dtype=torch.int64)
                    none = torch.empty(0, device="meta", dtype=torch.int64)
                    banned = torch.empty(3, device="meta", dtype=torch.int64)
                    _lm_head_forward(ht, hb, w, W, t, none, 1.0, -100, mix=True)
                    _lm_head_backward(gr, ht, hb, w, W, t, none, lse, 1.0, -100, mix=True)
                    for b in (none, banned):
                        _lm_head_forward(ht, ht, ht, W, t, b, 1 / 3, 0, mix=False)
                        _lm_head_backward(gr, ht, ht, ht, W, t, b, lse, 1 / 3, 0, mix=False)
                        _sample(ht, W, b, 1.0, None, seed)
                    shape = f"{_TRITON_DTYPE[dtype]} N={N} d={d} V={V}"
                    for rec in log:
                        key = (rec["fn"].__name__, tuple(sorted(rec["signature"].items())),
                               tuple(sorted((k, str(v)) for k, v in rec["constexprs"].items())),
                               tuple(sorted(rec["divisible_by_16"])), rec["num_warps"], rec["num_stages"])
                        if key in seen:
                            continue
                        seen.add(key)
                        tiles = ", ".join(f"{k}={v}" for k, v in rec["constexprs"].items() if k.isupper())
                        cases.append(dict(rec, kernel=rec["fn"].__name__, config=f"first at {shape}: {tiles}",
                                          has_dot=False))
    finally:
        g.update(saved)
        g["_interpreting"] = saved_interp
    return cases
