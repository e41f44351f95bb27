"""Fused LM-head kernels that never materialise the (N, V) logits (SPEC sections 4, 5, 7).

Three ops on hidden states h (N, d) and the LM-head weight W (V, d) (``weight``):

* ``mixed_logprob(h_talk, h_base, w, weight, target, ignore_index=-100)``
  equals ``torch.log_softmax(((1 - w)[:, None] * h_base + w[:, None] * h_talk).float() @ weight.float().T,
  -1).gather(1, target[:, None])[:, 0]`` (0 where target == ignore_index), float32 (N,).
  Mixing is linear in the logits, so the kernels mix the hidden states in their prologue,
  h_mix = h_base + w * (h_talk - h_base), and run one GEMM over W tiles.
* ``token_logprob(h, weight, target, temperature=1.0, banned_ids=())``
  equals ``torch.log_softmax((h.float() @ weight.float().T / temperature).index_fill(1, banned, -inf),
  -1).gather(1, target[:, None])[:, 0]``, float32 (N,).
* ``sample_thought_tokens(h, weight, temperature=1.0, banned_ids=(), generator=None, *, seed=None)``: one exact
  sample per row of softmax(W h / temperature) over the non-banned ids, by Gumbel-max, int64 (N,).

Math. z = W h_mix / tau (tau = temperature, 1 for the mixed op), lse = log sum_v exp z_v,
logp = z_target - lse. With an upstream gradient g_i per row (REINFORCE advantages are per row):
    dL/dz_iv = G_iv = g_i (1[v = t_i] - softmax(z_i)_v) / tau     (0 on banned ids and ignored rows)
    dh_mix = G W,  dW = G^T h_mix  (accumulated in fp32, then cast to W's dtype)
    dh_talk = w dh_mix,  dh_base = (1 - w) dh_mix,  dw_i = <dh_mix_i, h_talk_i - h_base_i>.
w may have any sign (it is not clamped).

Forward (``_lm_head_fwd_kernel``): a GEMM grid over (row block, group of V blocks), launched in
grouped order (GROUP row blocks sweep the V groups together so their h rows and W tiles stay in
L2). Each program loops over its V blocks; each logit tile (BLOCK_N, BLOCK_V) is a tl.dot loop over
d in BLOCK_K chunks (bf16/fp16 tensor cores, fp32 accumulate) and feeds an online (max, sum-exp)
and the target-logit gather (a compare against the column ids of the tile, never an indirect
load). Per-(V group, row) partials, (N * V / (BLOCK_V * blocks_per_prog)) floats, are merged by
``_lse_combine_kernel``, which writes lse (saved for backward) and logp.

Backward: the upstream gradient is only known in backward and differs per row, so the grad-logit
tile has to be recomputed (4 GEMMs in all: forward, recompute, dh, dW; the floor at N=8192,
d=4096, V=32000 is 4 x 2.7 ms at 798 TFLOP/s). dh reduces G over V and dW reduces G over rows,
and neither a (BLOCK_N, d) nor a (BLOCK_V, d) fp32 accumulator fits on chip at d=4096, so a
single fused kernel would need fp32 atomics for both (about 67 GB of atomic traffic at the
Mistral shape) or a logit recompute per d block. We chose instead, per chunk of C rows
(C x V x elem <= _GRAD_CHUNK_BYTES, 256 MiB; C = N when that fits, i.e. the buffer is then the
small N x V of a small problem):
  1. ``_lm_head_grad_logits_kernel``: recompute the logit tile (tl.dot over d), write G in W's
     dtype into a (C, V) buffer (reused across chunks);
  2. ``_lm_head_dh_kernel``: dh_mix = G @ W, a GEMM grid over (row block, d block) looping over V,
     with the epilogue writing dh_talk, dh_base and per-d-block partial dots for dw (summed
     afterwards: deterministic, no atomics);
  3. ``_lm_head_dw_kernel``: dW (+)= G^T @ h_mix, a GEMM grid over (V block, d block) looping over
     the chunk's rows, mixing h in its prologue, accumulating into an fp32 buffer across chunks
     (written straight in W's dtype when there is one chunk).
Peak extra memory: C x V in W's dtype + V x d fp32 (only when W is 16-bit and N > C).

Sampling (``_sample_kernel``): same GEMM grid; Gumbel noise is drawn inside the kernel with
counter-based Philox (tl.randint) at counter offset row * V + col (int64), keyed by a 64-bit seed
read from device memory. The seed is drawn from ``generator`` by a one-element torch.randint on the
device of h (no host sync; it advances the generator, so the same generator state gives the same
tokens), or passed in as ``seed`` (a (1,) int64 device tensor: a CUDA graph reads its keys from a
static buffer filled before each replay). u = (2k + 1) 2^-24 with k the top 23 bits of the Philox
output lies strictly inside (0, 1), G = -log(-log u). Each program keeps a running (max, argmax)
per row over its V blocks; ``_sample_combine_kernel`` takes the argmax over the partial maxima
(first index on ties).

Banned ids (at most _MAX_BANNED) are loaded once per program as a small vector and each tile's
columns are compared against it. Launchers validate; kernels validate nothing. Target values are not
range-checked on the host (that would sync): an out-of-range target that is not ignore_index gives
NaN; a banned target gives -inf (as the reference).

Limits: fp32/fp16/bf16 (W's dtype sets the tensor-core dtype; h is cast to it in the prologue);
fp32 dots use input_precision="ieee" (as torch's default fp32 matmul); CUDA tensors, or CPU tensors
under TRITON_INTERPRET=1 (there tl.dot on bf16 is wrong: test fp32/fp16 on CPU). Offsets are int64.
Compiled for sm_90 without spills (see ``h100_compile_cases``); speed is measured on the GPU by
the benchmarks, not here.
"""
from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

from .reference import banned_ids_tensor, check_lm_head_inputs, check_mixed_logprob_inputs, check_temperature

__all__ = [
    "mixed_logprob",
    "token_logprob",
    "sample_thought_tokens",
    "MixedLogprobFunction",
    "TokenLogprobFunction",
    "h100_compile_cases",
]

_MAX_BANNED = 128                      # banned ids are one (BLOCK_B,) vector per program
_GRAD_CHUNK_BYTES = 256 * 2**20        # cap on the (C, V) grad-logit buffer of the backward
_NUM_SMS_H100 = 132


# ----------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _grouped_tile(pid, num_a, num_b, GROUP: tl.constexpr):
    """Map a flat program id to (a, b) tiles so GROUP consecutive a-tiles sweep all b together."""
    per_group = GROUP * num_b
    group = pid // per_group
    first_a = group * GROUP
    size = tl.minimum(num_a - first_a, GROUP)
    a = first_a + (pid % per_group) % size
    b = (pid % per_group) // size
    return a, b


@triton.jit
def _hidden_tile(h_ptr, h2_ptr, w_row, rows, ks, N, d,
                 stride_hn, stride_hd, stride_h2n, stride_h2d, MIX: tl.constexpr):
    """(len(rows), len(ks)) tile of h, or of h_mix = h2 + w (h - h2) in fp32 when MIX (h = h_talk, h2 = h_base)."""
    mask = (rows[:, None] < N) & (ks[None, :] < d)
    r64 = rows.to(tl.int64)[:, None]
    h = tl.load(h_ptr + r64 * stride_hn + ks[None, :] * stride_hd, mask=mask, other=0.0)
    if MIX:
        hb = tl.load(h2_ptr + r64 * stride_h2n + ks[None, :] * stride_h2d, mask=mask, other=0.0).to(tl.float32)
        return hb + w_row[:, None] * (h.to(tl.float32) - hb)
    else:
        return h


@triton.jit
def _logits_tile(h_ptr, h2_ptr, w_row, weight_ptr, rows, cols, N, V, d,
                 stride_hn, stride_hd, stride_h2n, stride_h2d, stride_wv, stride_wd,
                 MIX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """fp32 (BLOCK_N, BLOCK_V) tile of h_mix W^T, looping over d in BLOCK_K chunks."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    c64 = cols.to(tl.int64)[None, :]
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        h = _hidden_tile(h_ptr, h2_ptr, w_row, rows, ks, N, d,
                         stride_hn, stride_hd, stride_h2n, stride_h2d, MIX)
        wt = tl.load(weight_ptr + c64 * stride_wv + ks[:, None] * stride_wd,
                     mask=(cols[None, :] < V) & (ks[:, None] < d), other=0.0)      # (BLOCK_K, BLOCK_V)
        acc = tl.dot(h.to(wt.dtype), wt, acc, input_precision=DOT_PRECISION)
    return acc


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


# ----------------------------------------------------------------------------------------------
# forward kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _lm_head_fwd_kernel(
    h_ptr, h2_ptr, w_ptr, weight_ptr, target_ptr, banned_ptr,
    m_part_ptr, s_part_ptr, t_part_ptr,
    N, V, d, n_banned, blocks_per_prog, inv_temp,
    stride_hn, stride_hd, stride_h2n, stride_h2d, stride_w, stride_wv, stride_wd, stride_t, stride_pg,
    MIX: tl.constexpr, HAS_BANNED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
    GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Partial (max, sum exp(z - max), z_target) of rows' logits over one group of V blocks."""
    num_vb = tl.cdiv(V, BLOCK_V)
    num_groups = tl.cdiv(num_vb, blocks_per_prog)
    pid_n, pid_g = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_groups, GROUP)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    if MIX:
        w_row = tl.load(w_ptr + rows * stride_w, mask=row_ok, other=0.0).to(tl.float32)
    else:
        w_row = tl.zeros((BLOCK_N,), dtype=tl.float32)
    tgt = tl.load(target_ptr + rows * stride_t, mask=row_ok, other=-1)
    banned = _load_banned(banned_ptr, n_banned, BLOCK_B)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # a constant trip count (the last group's blocks past V are fully masked): the loop bounds
    # stay free of the grouped-order division, which triton-sanitizer cannot evaluate symbolically
    for j in range(0, blocks_per_prog):
        vb = pid_g * blocks_per_prog + j
        cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        z = _logits_tile(h_ptr, h2_ptr, w_row, weight_ptr, rows, cols, N, V, d,
                         stride_hn, stride_hd, stride_h2n, stride_h2d, stride_wv, stride_wd,
                         MIX, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION) * inv_temp
        ok = _allowed_cols(cols, V, banned, HAS_BANNED)
        z = tl.where(ok[None, :], z, float("-inf"))
        # online log-sum-exp; m_ref keeps exp() finite while a row has seen only -inf
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref[:, None]), axis=1)
        m = m_new
        t += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    out = pid_g * stride_pg + rows
    tl.store(m_part_ptr + out, m, mask=row_ok)
    tl.store(s_part_ptr + out, s, mask=row_ok)
    tl.store(t_part_ptr + out, t, mask=row_ok)


@triton.jit
def _lse_combine_kernel(
    m_part_ptr, s_part_ptr, t_part_ptr, target_ptr, lse_ptr, out_ptr,
    N, V, n_parts, ignore_index, stride_t, stride_pg,
    HAS_IGNORE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """lse = log sum_p s_p exp(m_p), logp = z_target - lse (0 if ignored, NaN if target out of range)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = (ps[:, None] < n_parts) & row_ok[None, :]
        offs = ps[:, None] * stride_pg + rows[None, :]
        mp = tl.load(m_part_ptr + offs, mask=mask, other=float("-inf"))
        sp = tl.load(s_part_ptr + offs, mask=mask, other=0.0)
        tp = tl.load(t_part_ptr + offs, mask=mask, other=0.0)
        m_new = tl.maximum(m, tl.max(mp, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(sp * tl.exp(mp - m_ref[None, :]), axis=0)
        m = m_new
        t += tl.sum(tp, axis=0)
    lse = m + tl.log(tl.where(row_ok, s, 1.0))
    tgt = tl.load(target_ptr + rows * stride_t, mask=row_ok, other=0)
    logp = tl.where((tgt >= 0) & (tgt < V), t - lse, float("nan"))
    if HAS_IGNORE:
        logp = tl.where(tgt == ignore_index, 0.0, logp)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(out_ptr + rows, logp, mask=row_ok)


@triton.jit
def _sample_kernel(
    h_ptr, weight_ptr, banned_ptr, seed_ptr, val_part_ptr, idx_part_ptr,
    N, V, d, n_banned, blocks_per_prog, inv_temp,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_pg,
    HAS_BANNED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
    GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Partial Gumbel-max (max of z / tau + G, its column) of rows over one group of V blocks."""
    num_vb = tl.cdiv(V, BLOCK_V)
    num_groups = tl.cdiv(num_vb, blocks_per_prog)
    pid_n, pid_g = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_groups, GROUP)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    no_w = tl.zeros((BLOCK_N,), dtype=tl.float32)
    banned = _load_banned(banned_ptr, n_banned, BLOCK_B)
    seed = tl.load(seed_ptr)
    best = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros((BLOCK_N,), dtype=tl.int32)
    # a constant trip count (the last group's blocks past V are fully masked): the loop bounds
    # stay free of the grouped-order division, which triton-sanitizer cannot evaluate symbolically
    for j in range(0, blocks_per_prog):
        vb = pid_g * blocks_per_prog + j
        cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        z = _logits_tile(h_ptr, h_ptr, no_w, weight_ptr, rows, cols, N, V, d,
                         stride_hn, stride_hd, stride_hn, stride_hd, stride_wv, stride_wd,
                         False, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION) * inv_temp
        # one Philox counter per (row, col): independent uniforms for every logit of the call
        offs = rows.to(tl.int64)[:, None] * V + cols[None, :]
        r = tl.randint(seed, offs)
        u = ((r >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08     # (2k+1) 2^-24 in (0, 1)
        y = z - tl.log(-tl.log(u))
        ok = _allowed_cols(cols, V, banned, HAS_BANNED)
        y = tl.where(ok[None, :], y, float("-inf"))
        tile_best = tl.max(y, axis=1)
        tile_arg = tl.argmax(y, axis=1).to(tl.int32)
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, vb * BLOCK_V + tile_arg, best_idx)
    out = pid_g * stride_pg + rows
    tl.store(val_part_ptr + out, best, mask=row_ok)
    tl.store(idx_part_ptr + out, best_idx, mask=row_ok)


@triton.jit
def _sample_combine_kernel(
    val_part_ptr, idx_part_ptr, token_ptr, N, n_parts, stride_pg,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """token = idx of the largest partial maximum (first partial on ties: the lowest column)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    best = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for p0 in range(0, n_parts, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = (ps[:, None] < n_parts) & row_ok[None, :]
        offs = ps[:, None] * stride_pg + rows[None, :]
        vp = tl.load(val_part_ptr + offs, mask=mask, other=float("-inf"))
        ip = tl.load(idx_part_ptr + offs, mask=mask, other=0)
        chunk_best = tl.max(vp, axis=0)
        chunk_arg = tl.argmax(vp, axis=0)
        chunk_idx = tl.sum(tl.where(ps[:, None] == p0 + chunk_arg[None, :], ip, 0), axis=0)
        better = chunk_best > best
        best = tl.where(better, chunk_best, best)
        best_idx = tl.where(better, chunk_idx, best_idx)
    tl.store(token_ptr + rows, best_idx.to(tl.int64), mask=row_ok)


# ----------------------------------------------------------------------------------------------
# backward kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _lm_head_grad_logits_kernel(
    h_ptr, h2_ptr, w_ptr, weight_ptr, target_ptr, banned_ptr, lse_ptr, g_ptr, G_ptr,
    N, V, d, n_banned, inv_temp, ignore_index,
    stride_hn, stride_hd, stride_h2n, stride_h2d, stride_w, stride_wv, stride_wd, stride_t, stride_g,
    stride_Gn, stride_Gv,
    MIX: tl.constexpr, HAS_BANNED: tl.constexpr, HAS_IGNORE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
    GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """G = g (onehot(target) - softmax(z)) / tau on one (BLOCK_N, BLOCK_V) tile, z recomputed."""
    pid_n, pid_v = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    if MIX:
        w_row = tl.load(w_ptr + rows * stride_w, mask=row_ok, other=0.0).to(tl.float32)
    else:
        w_row = tl.zeros((BLOCK_N,), dtype=tl.float32)
    tgt = tl.load(target_ptr + rows * stride_t, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows * stride_g, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_IGNORE:
        g = tl.where(tgt == ignore_index, 0.0, g)
    z = _logits_tile(h_ptr, h2_ptr, w_row, weight_ptr, rows, cols, N, V, d,
                     stride_hn, stride_hd, stride_h2n, stride_h2d, stride_wv, stride_wd,
                     MIX, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION) * inv_temp
    p = tl.exp(z - lse[:, None])
    onehot = (cols[None, :] == tgt[:, None]).to(tl.float32)
    grad = (g * inv_temp)[:, None] * (onehot - p)
    banned = _load_banned(banned_ptr, n_banned, BLOCK_B)
    ok = _allowed_cols(cols, V, banned, HAS_BANNED)
    grad = tl.where(ok[None, :], grad, 0.0)   # banned logits are constants (-inf): no gradient
    offs = rows.to(tl.int64)[:, None] * stride_Gn + cols[None, :] * stride_Gv
    tl.store(G_ptr + offs, grad.to(G_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < V))


@triton.jit
def _lm_head_dh_kernel(
    G_ptr, weight_ptr, h_ptr, h2_ptr, w_ptr, dh_ptr, dh2_ptr, dw_part_ptr,
    N, V, d,
    stride_Gn, stride_Gv, stride_wv, stride_wd, stride_hn, stride_hd, stride_h2n, stride_h2d, stride_w,
    stride_dhn, stride_dhd, stride_dh2n, stride_dh2d, stride_pd,
    MIX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dh_mix = G @ W on one (BLOCK_N, BLOCK_D) tile; epilogue splits it into dh_talk, dh_base, dw."""
    pid_n, pid_d = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(d, BLOCK_D), GROUP)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = ds < d
    r64 = rows.to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_K):
        vs = v0 + tl.arange(0, BLOCK_K)
        a = tl.load(G_ptr + r64 * stride_Gn + vs[None, :] * stride_Gv,
                    mask=row_ok[:, None] & (vs[None, :] < V), other=0.0)
        b = tl.load(weight_ptr + vs.to(tl.int64)[:, None] * stride_wv + ds[None, :] * stride_wd,
                    mask=(vs[:, None] < V) & d_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    mask = row_ok[:, None] & d_ok[None, :]
    if MIX:
        w_row = tl.load(w_ptr + rows * stride_w, mask=row_ok, other=0.0).to(tl.float32)
        ht = tl.load(h_ptr + r64 * stride_hn + ds[None, :] * stride_hd, mask=mask, other=0.0).to(tl.float32)
        hb = tl.load(h2_ptr + r64 * stride_h2n + ds[None, :] * stride_h2d, mask=mask, other=0.0).to(tl.float32)
        tl.store(dh_ptr + r64 * stride_dhn + ds[None, :] * stride_dhd,
                 (w_row[:, None] * acc).to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dh2_ptr + r64 * stride_dh2n + ds[None, :] * stride_dh2d,
                 ((1.0 - w_row)[:, None] * acc).to(dh2_ptr.dtype.element_ty), mask=mask)
        # dw_i = <dh_mix_i, h_talk_i - h_base_i>, one partial per d block (summed by the launcher)
        tl.store(dw_part_ptr + pid_d * stride_pd + rows, tl.sum(acc * (ht - hb), axis=1), mask=row_ok)
    else:
        tl.store(dh_ptr + r64 * stride_dhn + ds[None, :] * stride_dhd, acc.to(dh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lm_head_dw_kernel(
    G_ptr, h_ptr, h2_ptr, w_ptr, dW_ptr,
    N, V, d,
    stride_Gn, stride_Gv, stride_hn, stride_hd, stride_h2n, stride_h2d, stride_w, stride_dWv, stride_dWd,
    MIX: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dW (+)= G^T @ h_mix on one (BLOCK_V, BLOCK_D) tile, looping over the chunk's rows."""
    pid_v, pid_d = _grouped_tile(tl.program_id(0), tl.cdiv(V, BLOCK_V), tl.cdiv(d, BLOCK_D), GROUP)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < V
    d_ok = ds < d
    acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        ns = n0 + tl.arange(0, BLOCK_K)
        gt = tl.load(G_ptr + ns.to(tl.int64)[None, :] * stride_Gn + cols[:, None] * stride_Gv,
                     mask=col_ok[:, None] & (ns[None, :] < N), other=0.0)            # (BLOCK_V, BLOCK_K)
        if MIX:
            w_row = tl.load(w_ptr + ns * stride_w, mask=ns < N, other=0.0).to(tl.float32)
        else:
            w_row = tl.zeros((BLOCK_K,), dtype=tl.float32)
        hm = _hidden_tile(h_ptr, h2_ptr, w_row, ns, ds, N, d,
                          stride_hn, stride_hd, stride_h2n, stride_h2d, MIX)        # (BLOCK_K, BLOCK_D)
        acc = tl.dot(gt, hm.to(gt.dtype), acc, input_precision=DOT_PRECISION)
    offs = cols.to(tl.int64)[:, None] * stride_dWv + ds[None, :] * stride_dWd
    mask = col_ok[:, None] & d_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(dW_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dW_ptr + offs, acc.to(dW_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# launch configuration (one heuristic, shared by the launchers and h100_compile_cases)
# ----------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"      # "tf32" is ignored for 16-bit operands


def _configs(dtype: torch.dtype, interpret: bool) -> dict:
    """Tile sizes, warps and stages per kernel for W's dtype (shape-independent constexprs).

    GPU: 128-wide tensor-core tiles, d looped in 64 (16-bit) or 32 (fp32) chunks, 3 stages
    (16-bit: 3 * (128*64 + 64*128) * 2 B = 96 KiB of shared memory). Interpreter: the smallest
    tiles tl.dot takes, so that the CPU tests run every loop (rows, V blocks, d chunks) several times.
    """
    prec = _dot_precision(dtype)
    if interpret:
        tile = dict(BLOCK_N=16, BLOCK_V=64, BLOCK_K=32, GROUP=2, DOT_PRECISION=prec)
        return {
            "fwd": dict(tile, num_warps=4, num_stages=1),
            "grad": dict(tile, num_warps=4, num_stages=1),
            "dh": dict(BLOCK_N=16, BLOCK_D=32, BLOCK_K=64, GROUP=2, DOT_PRECISION=prec, num_warps=4, num_stages=1),
            "dw": dict(BLOCK_V=64, BLOCK_D=32, BLOCK_K=16, GROUP=2, DOT_PRECISION=prec, num_warps=4, num_stages=1),
            "sample": dict(tile, num_warps=4, num_stages=1),
            "combine": dict(BLOCK_N=16, BLOCK_P=4, num_warps=4, num_stages=1),
        }
    wide = dtype != torch.float32
    bk = 64 if wide else 32
    stages = 3 if wide else 2
    tile = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=bk, GROUP=8, DOT_PRECISION=prec)
    return {
        "fwd": dict(tile, num_warps=8, num_stages=stages),
        "grad": dict(tile, num_warps=8, num_stages=stages),
        "dh": dict(BLOCK_N=128, BLOCK_D=128, BLOCK_K=bk, GROUP=8, DOT_PRECISION=prec, num_warps=8, num_stages=stages),
        "dw": dict(BLOCK_V=128, BLOCK_D=128, BLOCK_K=bk, GROUP=8, DOT_PRECISION=prec, num_warps=8, num_stages=stages),
        # Philox on a 128x128 tile spills (255 registers + stack); 128x64 does not
        "sample": dict(tile, BLOCK_V=64, num_warps=8, num_stages=stages),
        "combine": dict(BLOCK_N=128, BLOCK_P=8, num_warps=4, num_stages=1),
    }


def _blocks_per_prog(N: int, V: int, cfg: dict, interpret: bool) -> int:
    """V blocks per forward/sampling program: enough programs for ~8 per SM, fewer partials beyond."""
    num_rb = triton.cdiv(N, cfg["BLOCK_N"])
    num_vb = triton.cdiv(V, cfg["BLOCK_V"])
    if interpret:
        return min(3, num_vb)
    bpp = max(1, min(8, num_rb * num_vb // (8 * _NUM_SMS_H100)))
    return triton.cdiv(num_vb, triton.cdiv(num_vb, bpp))     # balanced groups: < 1 masked block per group


def _grad_chunk_rows(N: int, V: int, elem: int, block_n: int) -> int:
    rows = (_GRAD_CHUNK_BYTES // (V * elem)) // block_n * block_n
    return min(N, max(block_n, rows))


def _banned_block(n_banned: int) -> int:
    return max(16, triton.next_power_of_2(max(n_banned, 1)))


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
_BANNED_CACHE: dict = {}


def _banned_on_device(banned_ids, V: int, device) -> torch.Tensor:
    """Banned ids as int64 on ``device``. Sequences and CPU tensors are cached by value, so the
    host-to-device copy (a sync) happens once per distinct list; a CUDA tensor is range-checked,
    which reads it back (one sync per call): pass a tuple in hot loops."""
    if isinstance(banned_ids, torch.Tensor) and banned_ids.device.type != "cpu":
        ids = banned_ids_tensor(banned_ids, V, device)
    else:
        key = (tuple(int(i) for i in (banned_ids.tolist() if isinstance(banned_ids, torch.Tensor)
                                      else banned_ids)), V, str(device))
        ids = _BANNED_CACHE.get(key)
        if ids is None:
            ids = banned_ids_tensor(list(key[0]), V, device)
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
        if x.device.type != "cuda" and not _interpreting() and "triton_viz" not in sys.modules:
            raise ValueError(f"{name} is on {x.device}; the Triton LM-head kernels need CUDA tensors "
                             f"(or TRITON_INTERPRET=1); use kernels.lm_head_chunked on CPU")


def _lm_head_forward(h, h2, w, weight, target, banned, inv_temp, ignore_index, mix):
    """Launch forward + combine; returns (logp, lse), both float32 (N,)."""
    N, d = h.shape
    V = weight.shape[0]
    interpret = _interpreting()
    cfgs = _configs(weight.dtype, interpret)
    cfg, ccfg = cfgs["fwd"], cfgs["combine"]
    bpp = _blocks_per_prog(N, V, cfg, interpret)
    num_groups = triton.cdiv(triton.cdiv(V, cfg["BLOCK_V"]), bpp)
    m_part = torch.empty((num_groups, N), device=h.device, dtype=torch.float32)
    s_part = torch.empty_like(m_part)
    t_part = torch.empty_like(m_part)
    n_banned = banned.numel()
    banned_arg = banned if n_banned else target
    grid = (triton.cdiv(N, cfg["BLOCK_N"]) * num_groups,)
    _lm_head_fwd_kernel[grid](
        h, h2, w, weight, target, banned_arg, m_part, s_part, t_part,
        N, V, d, n_banned, bpp, inv_temp,
        h.stride(0), h.stride(1), h2.stride(0), h2.stride(1), w.stride(0), weight.stride(0), weight.stride(1),
        target.stride(0), m_part.stride(0),
        MIX=mix, HAS_BANNED=n_banned > 0, BLOCK_B=_banned_block(n_banned), **cfg)
    lse = torch.empty(N, device=h.device, dtype=torch.float32)
    logp = torch.empty(N, device=h.device, dtype=torch.float32)
    _lse_combine_kernel[(triton.cdiv(N, ccfg["BLOCK_N"]),)](
        m_part, s_part, t_part, target, lse, logp, N, V, num_groups, ignore_index,
        target.stride(0), m_part.stride(0), HAS_IGNORE=mix, **ccfg)
    return logp, lse


def _lm_head_backward(g, h, h2, w, weight, target, banned, lse, inv_temp, ignore_index, mix):
    """Launch the chunked backward; returns (dh, dh2 or None, dw or None, dW)."""
    N, d = h.shape
    V = weight.shape[0]
    dev = h.device
    cfgs = _configs(weight.dtype, _interpreting())
    gcfg, hcfg, wcfg = cfgs["grad"], cfgs["dh"], cfgs["dw"]
    C = _grad_chunk_rows(N, V, weight.element_size(), gcfg["BLOCK_N"])
    n_chunks = triton.cdiv(N, C)
    G_buf = torch.empty((C, V), device=dev, dtype=weight.dtype)
    dh = torch.empty((N, d), device=dev, dtype=h.dtype)
    dh2 = torch.empty((N, d), device=dev, dtype=h2.dtype) if mix else dh
    num_db = triton.cdiv(d, hcfg["BLOCK_D"])
    dw_part = torch.empty((num_db, C), device=dev, dtype=torch.float32)
    dw = torch.empty(N, device=dev, dtype=torch.float32) if mix else None
    # one chunk, or fp32 W: accumulate straight into dW; else an fp32 buffer cast at the end
    direct = n_chunks == 1 or weight.dtype == torch.float32
    dW = torch.empty((V, d), device=dev, dtype=weight.dtype if direct else torch.float32)
    n_banned = banned.numel()
    banned_arg = banned if n_banned else target
    for c in range(n_chunks):
        r0, r1 = c * C, min(N, (c + 1) * C)
        n = r1 - r0
        hc, h2c, tc, gc = h[r0:r1], h2[r0:r1], target[r0:r1], g[r0:r1]
        wc = w[r0:r1] if mix else w
        G = G_buf[:n]
        grid = (triton.cdiv(n, gcfg["BLOCK_N"]) * triton.cdiv(V, gcfg["BLOCK_V"]),)
        _lm_head_grad_logits_kernel[grid](
            hc, h2c, wc, weight, tc, banned_arg, lse[r0:r1], gc, G,
            n, V, d, n_banned, inv_temp, ignore_index,
            hc.stride(0), hc.stride(1), h2c.stride(0), h2c.stride(1), wc.stride(0),
            weight.stride(0), weight.stride(1), tc.stride(0), gc.stride(0), G.stride(0), G.stride(1),
            MIX=mix, HAS_BANNED=n_banned > 0, HAS_IGNORE=mix, BLOCK_B=_banned_block(n_banned), **gcfg)
        dhc, dh2c = dh[r0:r1], dh2[r0:r1]
        grid = (triton.cdiv(n, hcfg["BLOCK_N"]) * num_db,)
        _lm_head_dh_kernel[grid](
            G, weight, hc, h2c, wc, dhc, dh2c, dw_part,
            n, V, d,
            G.stride(0), G.stride(1), weight.stride(0), weight.stride(1), hc.stride(0), hc.stride(1),
            h2c.stride(0), h2c.stride(1), wc.stride(0), dhc.stride(0), dhc.stride(1),
            dh2c.stride(0), dh2c.stride(1), dw_part.stride(0),
            MIX=mix, **hcfg)
        if mix:
            torch.sum(dw_part[:, :n], dim=0, out=dw[r0:r1])
        grid = (triton.cdiv(V, wcfg["BLOCK_V"]) * triton.cdiv(d, wcfg["BLOCK_D"]),)
        _lm_head_dw_kernel[grid](
            G, hc, h2c, wc, dW,
            n, V, d,
            G.stride(0), G.stride(1), hc.stride(0), hc.stride(1), h2c.stride(0), h2c.stride(1), wc.stride(0),
            dW.stride(0), dW.stride(1),
            MIX=mix, ACCUMULATE=c > 0, **wcfg)
    if not direct:
        dW = dW.to(weight.dtype)
    return dh, (dh2 if mix else None), dw, dW


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
    interpret = _interpreting()
    cfgs = _configs(weight.dtype, interpret)
    cfg, ccfg = cfgs["sample"], cfgs["combine"]
    bpp = _blocks_per_prog(N, V, cfg, interpret)
    num_groups = triton.cdiv(triton.cdiv(V, cfg["BLOCK_V"]), bpp)
    if seed is None:
        seed = _draw_seed(generator, h.device)
    val_part = torch.empty((num_groups, N), device=h.device, dtype=torch.float32)
    idx_part = torch.empty((num_groups, N), device=h.device, dtype=torch.int32)
    n_banned = banned.numel()
    banned_arg = banned if n_banned else seed
    grid = (triton.cdiv(N, cfg["BLOCK_N"]) * num_groups,)
    _sample_kernel[grid](
        h, weight, banned_arg, seed, val_part, idx_part,
        N, V, d, n_banned, bpp, inv_temp,
        h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), val_part.stride(0),
        HAS_BANNED=n_banned > 0, BLOCK_B=_banned_block(n_banned), **cfg)
    tokens = torch.empty(N, device=h.device, dtype=torch.int64)
    _sample_combine_kernel[(triton.cdiv(N, ccfg["BLOCK_N"]),)](
        val_part, idx_part, tokens, N, num_groups, val_part.stride(0), **ccfg)
    return tokens


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
    return MixedLogprobFunction.apply(h_talk, h_base, w, weight, target, ignore_index)


def token_logprob(h, weight, target, temperature=1.0, banned_ids=()):
    """log_softmax(W h / temperature, banned ids' logits at -inf)[target]; float32 (N,), differentiable.

    Equals ``token_logprob_ref`` without allocating the (N, V) logits.
    """
    N, d, V = check_lm_head_inputs(h, weight, target)
    temperature = check_temperature(temperature)
    _check_kernel_tensors(h=h, weight=weight)
    banned = _banned_on_device(banned_ids, V, h.device)
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


def h100_compile_cases() -> list:
    """Every (kernel, configuration) the launchers launch at the benchmark shapes, for sm_90.

    Shapes: N in {8192, 32768}, (d, V) in {(4096, 32000), (576, 49152)}, bf16 and fp16; the mixed
    op's forward + backward, token_logprob's (with and without banned ids) and the sampler. The
    launchers themselves run, on "meta" tensors (no memory, no GPU), with every kernel swapped for a
    recorder, so the cases are exactly what they launch: tile constexprs from ``_configs``,
    runtime ints as the JIT specialises them (value 1 -> constexpr, multiples of 16 -> divisible).
    Deduplicated on (kernel, signature, constexprs, divisibility, warps, stages).
    """
    names = ("_lm_head_fwd_kernel", "_lse_combine_kernel", "_sample_kernel", "_sample_combine_kernel",
             "_lm_head_grad_logits_kernel", "_lm_head_dh_kernel", "_lm_head_dw_kernel")
    g = globals()
    saved = {n: g[n] for n in names}
    saved_interp = g["_interpreting"]
    cases, seen = [], set()
    try:
        g["_interpreting"] = lambda: False
        for dtype in (torch.bfloat16, torch.float16):
            for N in (8192, 32768):
                for d, V in ((4096, 32000), (576, 49152)):
                    log = []
                    for n in names:
                        g[n] = _LaunchRecorder(saved[n], log)
                    meta = dict(device="meta", dtype=dtype)
                    ht, hb, W = torch.empty(N, d, **meta), torch.empty(N, d, **meta), torch.empty(V, d, **meta)
                    w = torch.empty(N, **meta)
                    t = torch.empty(N, device="meta", dtype=torch.int64)
                    gr = torch.empty(N, device="meta", dtype=torch.float32)
                    lse = torch.empty(N, device="meta", dtype=torch.float32)
                    none = torch.empty(0, device="meta", dtype=torch.int64)
                    banned = torch.empty(3, device="meta", dtype=torch.int64)
                    _lm_head_forward(ht, hb, w, W, t, none, 1.0, -100, mix=True)
                    _lm_head_backward(gr, ht, hb, w, W, t, none, lse, 1.0, -100, mix=True)
                    for b in (none, banned):
                        _lm_head_forward(ht, ht, ht, W, t, b, 1 / 3, 0, mix=False)
                        _lm_head_backward(gr, ht, ht, ht, W, t, b, lse, 1 / 3, 0, mix=False)
                        _sample(ht, W, b, 1.0, None)
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
                                          has_dot=rec["fn"].__name__ not in ("_lse_combine_kernel",
                                                                             "_sample_combine_kernel")))
    finally:
        g.update(saved)
        g["_interpreting"] = saved_interp
    return cases
