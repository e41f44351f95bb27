"""Thought attention (DESIGN.md sections 3 and 7): Triton forward, backward and incremental step kernels.

Math. For every batch row b, query head h (key/value head hk = h // G, G = H // H_KV) and chain
query (t, l), with scale = 1/sqrt(D) unless given:

    keys(t, l) = { base key s : s <= t }  U  { chain key (t, m) : m <= l }
    o[t, l]    = sum_{k in keys(t, l)} softmax_k(scale * q[t, l] . k) v_k
    lse[t, l]  = log sum_{k in keys(t, l)} exp(scale * q[t, l] . k)          (natural log, fp32)

i.e. ``thought_attention_ref`` in kernels/reference.py, without ever building its mask.

Documents (packed rows). With ``doc_start`` (B, T) int32 (the first position of t's document; see
kernels/reference.py), keys(t, l) keeps only base keys s >= doc_start[t]. The kernels are compiled
with HAS_DOCS=True then; ``doc_start=None`` compiles today's kernels (HAS_DOCS=False) unchanged.
Forward, dQ and step start their base-key loop at the block of the tile's earliest document start
(doc_start[t_lo], one scalar load): key blocks wholly before it are never read. The base dK/dV
kernel stops its query rows at the end of the last key's document (``document_ends``, computed once
per backward by a searchsorted): rows of later documents never see the block.

Layout. q, o (B, H, T, L, D); k_base, v_base (B, H_KV, T, D); k_chain, v_chain (B, H_KV, T, L, D);
the chain of position t is contiguous in the [pos, step] sense only logically: every tensor is
addressed through its own strides (runtime arguments), so strided views of bigger buffers are
fine. lse and delta (backward) are fp32 (B, H, T*L), allocated here.

Tiling.
- Forward and dQ: one program = one (b, h) and a query tile of POS = BLOCK_M // L whole positions,
  i.e. rows r = p * L + l (p < POS), padded to BLOCK_M rows. Each base K/V tile is loaded once for
  all L chain steps of the POS positions (the shared-prefix trick of Hydragen / cascade attention).
  The base loop runs over keys 0..t_hi, unmasked below the tile's first position and causally
  masked above. The chain keys of the tile's positions have the same index set as its rows, so the
  chain part is ONE (BLOCK_M x BLOCK_M) block with the block-diagonal lower-triangular mask
  (pos(j) == pos(r) and m <= l); the online softmax runs over both parts. Cost of the chain part is
  about BLOCK_M / (T / 2) of the base part (dense dot over a block-diagonal pattern).
- Backward = preprocess delta = rowsum(dO * O) (fp32), then three kernels, none with atomics, in
  this order: (1) base dK/dV (below), (2) dQ by query tiles (base + chain keys), (3) chain dK/dV by
  the same position-aligned tiles, one program per (b, hk) looping over the G query heads of the
  group, so every chain key's gradient is complete inside one program. (1) goes first so that its
  fp32 partials are summed and freed before the largest gradients are allocated: never alive
  together with dQ (tests/test_kernel_memory.py). Base dK/dV runs by key tiles of BLOCK_N base keys:
  base key s receives gradient from every query row (t, l) with t >= s, i.e. the flattened rows
  s*L .. T*L-1 of every head of its group. When B * H_KV * ceil(T / BLOCK_N) programs would not
  fill the GPU, the G heads are split over SPLIT programs that write fp32 partials
  (SPLIT, B, H_KV, T, D), summed afterwards by torch in a fixed order. Everything is therefore
  deterministic (bitwise run to run on one GPU and config).
- Step (sampling): one program = one (b, hk) and POS = BLOCK_M // G positions with the G query
  heads of the group packed as rows (one base K/V load serves G heads); base keys as in the
  forward, then a per-row loop over the step + 1 chain keys of the row's own position (a gather,
  no tensor cores: only step + 1 keys per row). No allocation but the output, no host sync: it can
  be captured in a CUDA graph (step is a runtime integer argument).

Limits. D a multiple of 16 in [16, 128] (padded to a power of two with masks: 48 -> 64, 96 -> 128);
L <= 64 for the parallel op (a tile must hold one whole chain; the step op has no limit on L_max);
fp32 / fp16 / bf16 (fp32 dots use IEEE fp32, not tf32); softmax statistics, lse and accumulation
in fp32. Tested under the CPU interpreter in fp32/fp16 and compiled (not run) for sm_90; bf16 and
speed are only checked on a GPU. Block sizes are a fixed heuristic per (D, dtype), see
``_fwd_config`` etc., not autotuned and not yet tuned on an H100.
"""
from __future__ import annotations

import inspect
import math

import torch
import triton
import triton.language as tl

from .reference import (check_doc_start, check_thought_attention_inputs, check_triton_device,
                        refuse_double_backward)

__all__ = [
    "thought_attention",
    "thought_attention_step",
    "ThoughtAttentionFunction",
    "thought_attention_fwd",
    "h100_compile_cases",
]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_MAX_L = 64


# ----------------------------------------------------------------------------------------------
# @triton.jit helpers
# ----------------------------------------------------------------------------------------------
# Loop bounds round with `x - x % B` instead of `(x // B) * B` (same value for x >= 0): triton-sanitizer
# (triton-viz 3.0) must evaluate loop bounds concretely and has no integer division for that.
@triton.jit
def _online_softmax_update(acc, m_i, l_i, qk, v, DOT_PREC: tl.constexpr, MAY_BE_EMPTY: tl.constexpr = False):
    """Fold one block of log2-domain scores qk (BLOCK_M, BLOCK_N) and values v (BLOCK_N, D) in.

    MAY_BE_EMPTY: a row may have seen no key yet and have none in this block (a document mask):
    its max stays -inf and the block adds exactly 0 (subtracting -inf would give NaN)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if MAY_BE_EMPTY:
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    alpha = tl.math.exp2(m_i - m_sub)
    p = tl.math.exp2(qk - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _tile_rows(tile, POS, L, T, BLOCK_M: tl.constexpr):
    """Rows r = p * L + l of a position-aligned tile: (t, l, row valid, p)."""
    r = tl.arange(0, BLOCK_M)
    p = r // L
    l = r - p * L
    t = tile * POS + p
    valid = (p < POS) & (t < T)
    return t, l, valid, p


@triton.jit
def _doc_key_start(DS, b64, stride_dsb, stride_dst, t_lo, BLOCK_N: tl.constexpr, HAS_DOCS: tl.constexpr):
    """First base key block a tile of positions t_lo.. must visit: keys below the earliest document
    start of the tile, DS[t_lo] (doc_start does not decrease along a row), are masked for every row,
    so their blocks are skipped. One scalar load (loop bounds must not depend on a divided index, for
    triton-sanitizer), clamped to [0, t_lo] so that no doc_start value can move a load out of bounds."""
    if HAS_DOCS:
        ds_lo = tl.load(DS + b64 * stride_dsb + t_lo.to(tl.int64) * stride_dst)
        ds_lo = tl.minimum(tl.maximum(ds_lo, 0), t_lo)
        lo = ds_lo - ds_lo % BLOCK_N
    else:
        lo = 0
    return lo


@triton.jit
def _attend_base_prefix(acc, m_i, l_i, q, t, doc0, key_lo, kb_base, vb_base, stride_kbt, stride_kbd, stride_vbt,
                        stride_vbd, d, d_ok, t_lo, t_hi, T, qk_scale, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
                        HAS_DOCS: tl.constexpr):
    """Fold base keys 0..t_hi-1 into the online softmax of rows at positions t (t_lo <= t < t_hi).

    Keys strictly below the tile's first position t_lo are visible to every row: no mask. The
    blocks from there to t_hi get the causal mask s <= t; key 0 of the first block is visible to
    every row, so no row is ever fully masked and m_i stays finite.
    HAS_DOCS: row t sees only keys s >= doc0[t] (its document's start); the blocks below key_lo
    (``_doc_key_start``) are skipped, the rest masked, and a row may see nothing in a block (its own
    key s = t is always visible, so it ends with a finite max)."""
    n = tl.arange(0, BLOCK_N)
    n_full = t_lo - t_lo % BLOCK_N     # (t_lo // BLOCK_N) * BLOCK_N
    for start in range(key_lo, n_full, BLOCK_N):
        s = start + n
        k = tl.load(kb_base + s[:, None].to(tl.int64) * stride_kbt + d[None, :] * stride_kbd,
                    mask=d_ok[None, :], other=0.0)
        v = tl.load(vb_base + s[:, None].to(tl.int64) * stride_vbt + d[None, :] * stride_vbd,
                    mask=d_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if HAS_DOCS:
            qk = tl.where(s[None, :] >= doc0[:, None], qk, float("-inf"))
        acc, m_i, l_i = _online_softmax_update(acc, m_i, l_i, qk, v, DOT_PREC, HAS_DOCS)
    for start in range(n_full, t_hi, BLOCK_N):
        s = start + n
        s_ok = s < T
        k = tl.load(kb_base + s[:, None].to(tl.int64) * stride_kbt + d[None, :] * stride_kbd,
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(vb_base + s[:, None].to(tl.int64) * stride_vbt + d[None, :] * stride_vbd,
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        vis = s[None, :] <= t[:, None]
        if HAS_DOCS:
            vis = vis & (s[None, :] >= doc0[:, None])
        qk = tl.where(vis, qk, float("-inf"))
        acc, m_i, l_i = _online_softmax_update(acc, m_i, l_i, qk, v, DOT_PREC, HAS_DOCS)
    return acc, m_i, l_i


@triton.jit
def _load_doc_start(DS, b64, stride_dsb, stride_dst, t, row_ok, t_lo, HAS_DOCS: tl.constexpr):
    """Document start of each row's position (int32); rows outside the tile get t_lo."""
    if HAS_DOCS:
        doc0 = tl.load(DS + b64 * stride_dsb + t.to(tl.int64) * stride_dst, mask=row_ok, other=t_lo)
    else:
        doc0 = t_lo
    return doc0


# ----------------------------------------------------------------------------------------------
# forward kernel
# ----------------------------------------------------------------------------------------------
@triton.jit
def _thought_attn_fwd_kernel(
    Q, KB, VB, KC, VC, O, LSE, DS,
    sm_scale,
    stride_qb, stride_qh, stride_qt, stride_ql, stride_qd,
    stride_kbb, stride_kbh, stride_kbt, stride_kbd,
    stride_vbb, stride_vbh, stride_vbt, stride_vbd,
    stride_kcb, stride_kch, stride_kct, stride_kcl, stride_kcd,
    stride_vcb, stride_vch, stride_vct, stride_vcl, stride_vcd,
    stride_ob, stride_oh, stride_ot, stride_ol, stride_od,
    stride_dsb, stride_dst,
    H, G, T, L, POS, NUM_TILES,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    # heaviest tiles (largest t, most base keys) first
    tile = NUM_TILES - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh - b * H
    hk = h // G
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)

    t, l, row_ok, p = _tile_rows(tile, POS, L, T, BLOCK_M)
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    t_lo = tile * POS
    t_hi = tl.minimum(t_lo + POS, T)          # exclusive

    q_ptrs = (Q + b64 * stride_qb + h64 * stride_qh + t[:, None].to(tl.int64) * stride_qt
              + l[:, None] * stride_ql + d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qk_scale = sm_scale * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    kb_base = KB + b64 * stride_kbb + hk64 * stride_kbh
    vb_base = VB + b64 * stride_vbb + hk64 * stride_vbh
    doc0 = _load_doc_start(DS, b64, stride_dsb, stride_dst, t, row_ok, t_lo, HAS_DOCS)
    key_lo = _doc_key_start(DS, b64, stride_dsb, stride_dst, t_lo, BLOCK_N, HAS_DOCS)
    acc, m_i, l_i = _attend_base_prefix(acc, m_i, l_i, q, t, doc0, key_lo, kb_base, vb_base, stride_kbt, stride_kbd,
                                        stride_vbt, stride_vbd, d, d_ok, t_lo, t_hi, T, qk_scale, BLOCK_N, DOT_PREC,
                                        HAS_DOCS)

    # chain keys of the tile's positions: same index set as the rows (j = p' * L + m)
    kc_ptrs = (KC + b64 * stride_kcb + hk64 * stride_kch + t[:, None].to(tl.int64) * stride_kct
               + l[:, None] * stride_kcl + d[None, :] * stride_kcd)
    vc_ptrs = (VC + b64 * stride_vcb + hk64 * stride_vch + t[:, None].to(tl.int64) * stride_vct
               + l[:, None] * stride_vcl + d[None, :] * stride_vcd)
    kc = tl.load(kc_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    vc = tl.load(vc_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qk = tl.dot(q, tl.trans(kc), input_precision=DOT_PREC) * qk_scale
    chain_ok = (p[None, :] == p[:, None]) & (l[None, :] <= l[:, None]) & row_ok[None, :]
    qk = tl.where(chain_ok, qk, float("-inf"))
    acc, m_i, l_i = _online_softmax_update(acc, m_i, l_i, qk, vc, DOT_PREC)

    o = acc / l_i[:, None]
    o_ptrs = (O + b64 * stride_ob + h64 * stride_oh + t[:, None].to(tl.int64) * stride_ot
              + l[:, None] * stride_ol + d[None, :] * stride_od)
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + bh.to(tl.int64) * T * L + t * L + l, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# backward kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _thought_attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_ot, stride_ol, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dol, stride_dod,
    H, T, L,
    D: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr,
):
    """delta[b, h, t*L + l] = sum_d dO * O (fp32), the softmax-backward row correction."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < T * L
    t = (r // L).to(tl.int64)
    l = r % L
    d = tl.arange(0, D_PAD)
    mask = r_ok[:, None] & (d[None, :] < D)
    o = tl.load(O + b * stride_ob + h * stride_oh + t[:, None] * stride_ot + l[:, None] * stride_ol
                + d[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + t[:, None] * stride_dot + l[:, None] * stride_dol
                 + d[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * T * L + r, tl.sum(o * do, 1), mask=r_ok)


@triton.jit
def _thought_attn_bwd_dq_kernel(
    Q, KB, VB, KC, VC, DO, LSE, DELTA, DQ, DS,
    sm_scale,
    stride_qb, stride_qh, stride_qt, stride_ql, stride_qd,
    stride_kbb, stride_kbh, stride_kbt, stride_kbd,
    stride_vbb, stride_vbh, stride_vbt, stride_vbd,
    stride_kcb, stride_kch, stride_kct, stride_kcl, stride_kcd,
    stride_vcb, stride_vch, stride_vct, stride_vcl, stride_vcd,
    stride_dob, stride_doh, stride_dot, stride_dol, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dql, stride_dqd,
    stride_dsb, stride_dst,
    H, G, T, L, POS, NUM_TILES,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    """dQ = scale * sum_k dS_k k with P = exp(scale q.k - lse), dS = P * (dO.v - delta)."""
    tile = NUM_TILES - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh - b * H
    hk = h // G
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)

    t, l, row_ok, p = _tile_rows(tile, POS, L, T, BLOCK_M)
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    t_lo = tile * POS
    t_hi = tl.minimum(t_lo + POS, T)
    t64 = t[:, None].to(tl.int64)
    qmask = row_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + t64 * stride_qt + l[:, None] * stride_ql
                + d[None, :] * stride_qd, mask=qmask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + t64 * stride_dot + l[:, None] * stride_dol
                 + d[None, :] * stride_dod, mask=qmask, other=0.0)
    row_lin = bh.to(tl.int64) * T * L + t * L + l
    # lse = +inf on padding rows makes their P exactly 0
    lse2 = tl.load(LSE + row_lin, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row_lin, mask=row_ok, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    kb_base = KB + b64 * stride_kbb + hk64 * stride_kbh
    vb_base = VB + b64 * stride_vbb + hk64 * stride_vbh
    n = tl.arange(0, BLOCK_N)
    n_full = t_lo - t_lo % BLOCK_N     # (t_lo // BLOCK_N) * BLOCK_N
    doc0 = _load_doc_start(DS, b64, stride_dsb, stride_dst, t, row_ok, t_lo, HAS_DOCS)
    for start in range(_doc_key_start(DS, b64, stride_dsb, stride_dst, t_lo, BLOCK_N, HAS_DOCS), n_full, BLOCK_N):
        s = start + n
        k = tl.load(kb_base + s[:, None].to(tl.int64) * stride_kbt + d[None, :] * stride_kbd,
                    mask=d_ok[None, :], other=0.0)
        v = tl.load(vb_base + s[:, None].to(tl.int64) * stride_vbt + d[None, :] * stride_vbd,
                    mask=d_ok[None, :], other=0.0)
        pr = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale - lse2[:, None])
        if HAS_DOCS:
            pr = tl.where(s[None, :] >= doc0[:, None], pr, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = pr * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    for start in range(n_full, t_hi, BLOCK_N):
        s = start + n
        s_ok = s < T
        k = tl.load(kb_base + s[:, None].to(tl.int64) * stride_kbt + d[None, :] * stride_kbd,
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(vb_base + s[:, None].to(tl.int64) * stride_vbt + d[None, :] * stride_vbd,
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        pr = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale - lse2[:, None])
        vis = s[None, :] <= t[:, None]
        if HAS_DOCS:
            vis = vis & (s[None, :] >= doc0[:, None])
        pr = tl.where(vis, pr, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = pr * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)

    kc = tl.load(KC + b64 * stride_kcb + hk64 * stride_kch + t64 * stride_kct + l[:, None] * stride_kcl
                 + d[None, :] * stride_kcd, mask=qmask, other=0.0)
    vc = tl.load(VC + b64 * stride_vcb + hk64 * stride_vch + t64 * stride_vct + l[:, None] * stride_vcl
                 + d[None, :] * stride_vcd, mask=qmask, other=0.0)
    pr = tl.math.exp2(tl.dot(q, tl.trans(kc), input_precision=DOT_PREC) * qk_scale - lse2[:, None])
    chain_ok = (p[None, :] == p[:, None]) & (l[None, :] <= l[:, None]) & row_ok[None, :]
    pr = tl.where(chain_ok, pr, 0.0)
    dp = tl.dot(do, tl.trans(vc), input_precision=DOT_PREC)
    ds = pr * (dp - delta[:, None])
    dq += tl.dot(ds.to(kc.dtype), kc, input_precision=DOT_PREC)

    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + t64 * stride_dqt + l[:, None] * stride_dql
             + d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=qmask)


@triton.jit
def _thought_attn_bwd_dkv_chain_kernel(
    Q, KC, VC, DO, LSE, DELTA, DKC, DVC,
    sm_scale,
    stride_qb, stride_qh, stride_qt, stride_ql, stride_qd,
    stride_kcb, stride_kch, stride_kct, stride_kcl, stride_kcd,
    stride_vcb, stride_vch, stride_vct, stride_vcl, stride_vcd,
    stride_dob, stride_doh, stride_dot, stride_dol, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkl, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvl, stride_dvd,
    H, H_KV, G, T, L, POS,
    D: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Chain dK/dV of the tile's positions, summed over the G query heads of the group.

    Chain key (t, m) is seen only by rows (t, l >= m), all inside this position-aligned tile, so
    the sum is complete here: no atomics, no partials.
    """
    tile = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // H_KV
    hk = bhk - b * H_KV
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)

    t, l, row_ok, p = _tile_rows(tile, POS, L, T, BLOCK_M)
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    t64 = t[:, None].to(tl.int64)
    mask = row_ok[:, None] & d_ok[None, :]
    kc = tl.load(KC + b64 * stride_kcb + hk64 * stride_kch + t64 * stride_kct + l[:, None] * stride_kcl
                 + d[None, :] * stride_kcd, mask=mask, other=0.0)
    vc = tl.load(VC + b64 * stride_vcb + hk64 * stride_vch + t64 * stride_vct + l[:, None] * stride_vcl
                 + d[None, :] * stride_vcd, mask=mask, other=0.0)
    # transposed view: key j (rows of kc) x query row r; key j visible to row r iff same position
    # and m(j) <= l(r)
    chain_ok_t = (p[:, None] == p[None, :]) & (l[:, None] <= l[None, :]) & row_ok[None, :]
    qk_scale = sm_scale * 1.4426950408889634

    dk = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for g in range(0, G):
        h64 = (hk * G + g).to(tl.int64)
        q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + t64 * stride_qt + l[:, None] * stride_ql
                    + d[None, :] * stride_qd, mask=mask, other=0.0)
        do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + t64 * stride_dot
                     + l[:, None] * stride_dol + d[None, :] * stride_dod, mask=mask, other=0.0)
        row_lin = (b64 * H + h64) * T * L + t * L + l
        lse2 = tl.load(LSE + row_lin, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + row_lin, mask=row_ok, other=0.0)
        pt = tl.math.exp2(tl.dot(kc, tl.trans(q), input_precision=DOT_PREC) * qk_scale - lse2[None, :])
        pt = tl.where(chain_ok_t, pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
        dpt = tl.dot(vc, tl.trans(do), input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)
    dk = dk * sm_scale
    tl.store(DKC + b64 * stride_dkb + hk64 * stride_dkh + t64 * stride_dkt + l[:, None] * stride_dkl
             + d[None, :] * stride_dkd, dk.to(DKC.dtype.element_ty), mask=mask)
    tl.store(DVC + b64 * stride_dvb + hk64 * stride_dvh + t64 * stride_dvt + l[:, None] * stride_dvl
             + d[None, :] * stride_dvd, dv.to(DVC.dtype.element_ty), mask=mask)


@triton.jit
def _thought_attn_bwd_dkv_base_kernel(
    Q, KB, VB, DO, LSE, DELTA, DK, DV, DS, DE,
    sm_scale,
    stride_qb, stride_qh, stride_qt, stride_ql, stride_qd,
    stride_kbb, stride_kbh, stride_kbt, stride_kbd,
    stride_vbb, stride_vbh, stride_vbt, stride_vbd,
    stride_dob, stride_doh, stride_dot, stride_dol, stride_dod,
    stride_dks, stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvs, stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    stride_dsb, stride_dst, stride_deb, stride_det,
    H, H_KV, G, T, L, HEADS_PER_PROG,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    """Base dK/dV of BLOCK_N base keys from every query row (t, l), t >= s, of HEADS_PER_PROG heads.

    Rows are walked in flattened order r = t * L + l from s0 * L; the first BLOCK_N * L rows hold
    the causal diagonal and are masked, the rest see every key of the block. Split programs
    (program_id(2)) write fp32 partials at DK + split * stride_dks.
    HAS_DOCS: row t sees key s only if s >= DS[t]; the rows stop at DE[last key of the block] * L
    (DE[s]: the end of s's document, exclusive), since no later row sees any key of the block.
    """
    kblk = tl.program_id(0)
    bhk = tl.program_id(1)
    split = tl.program_id(2)
    b = bhk // H_KV
    hk = bhk - b * H_KV
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)

    s0 = kblk * BLOCK_N
    s = s0 + tl.arange(0, BLOCK_N)
    s_ok = s < T
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    kmask = s_ok[:, None] & d_ok[None, :]
    s64 = s[:, None].to(tl.int64)
    k = tl.load(KB + b64 * stride_kbb + hk64 * stride_kbh + s64 * stride_kbt + d[None, :] * stride_kbd,
                mask=kmask, other=0.0)
    v = tl.load(VB + b64 * stride_vbb + hk64 * stride_vbh + s64 * stride_vbt + d[None, :] * stride_vbd,
                mask=kmask, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634

    TL = T * L
    row0 = s0 * L
    diag_end = tl.minimum(s0 + BLOCK_N, T) * L
    # first row block that lies entirely below the diagonal
    n_diag = diag_end - row0 + BLOCK_M - 1
    unmasked_start = row0 + n_diag - n_diag % BLOCK_M     # row0 + cdiv(diag_end - row0, BLOCK_M) * BLOCK_M
    if HAS_DOCS:
        s_last = tl.minimum(s0 + BLOCK_N, T) - 1
        row_end = tl.minimum(tl.load(DE + b64 * stride_deb + s_last.to(tl.int64) * stride_det), T) * L
        diag_stop = tl.minimum(unmasked_start, row_end)
    else:
        row_end = TL
        diag_stop = unmasked_start
    rr = tl.arange(0, BLOCK_M)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    for hh in range(0, HEADS_PER_PROG):
        h64 = (hk * G + split * HEADS_PER_PROG + hh).to(tl.int64)
        q_base = Q + b64 * stride_qb + h64 * stride_qh
        do_base = DO + b64 * stride_dob + h64 * stride_doh
        row_base = (b64 * H + h64) * TL
        for start in range(row0, diag_stop, BLOCK_M):
            r = start + rr
            r_ok = r < TL
            t = r // L
            l = r - t * L
            mask = r_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + t[:, None].to(tl.int64) * stride_qt + l[:, None] * stride_ql
                        + d[None, :] * stride_qd, mask=mask, other=0.0)
            do = tl.load(do_base + t[:, None].to(tl.int64) * stride_dot + l[:, None] * stride_dol
                         + d[None, :] * stride_dod, mask=mask, other=0.0)
            lse2 = tl.load(LSE + row_base + r, mask=r_ok, other=float("inf")) * 1.4426950408889634
            delta = tl.load(DELTA + row_base + r, mask=r_ok, other=0.0)
            pt = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale - lse2[None, :])
            vis = s[:, None] <= t[None, :]
            if HAS_DOCS:
                doc0 = tl.load(DS + b64 * stride_dsb + t.to(tl.int64) * stride_dst, mask=r_ok, other=0)
                vis = vis & (s[:, None] >= doc0[None, :])
            pt = tl.where(vis, pt, 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)
        for start in range(unmasked_start, row_end, BLOCK_M):
            r = start + rr
            r_ok = r < TL
            t = r // L
            l = r - t * L
            mask = r_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + t[:, None].to(tl.int64) * stride_qt + l[:, None] * stride_ql
                        + d[None, :] * stride_qd, mask=mask, other=0.0)
            do = tl.load(do_base + t[:, None].to(tl.int64) * stride_dot + l[:, None] * stride_dol
                         + d[None, :] * stride_dod, mask=mask, other=0.0)
            # padding rows: lse = +inf gives P = 0, no explicit mask needed
            lse2 = tl.load(LSE + row_base + r, mask=r_ok, other=float("inf")) * 1.4426950408889634
            delta = tl.load(DELTA + row_base + r, mask=r_ok, other=0.0)
            pt = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale - lse2[None, :])
            if HAS_DOCS:
                doc0 = tl.load(DS + b64 * stride_dsb + t.to(tl.int64) * stride_dst, mask=r_ok, other=0)
                pt = tl.where(s[:, None] >= doc0[None, :], pt, 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)
    dk = dk * sm_scale
    split64 = split.to(tl.int64)
    tl.store(DK + split64 * stride_dks + b64 * stride_dkb + hk64 * stride_dkh + s64 * stride_dkt
             + d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + split64 * stride_dvs + b64 * stride_dvb + hk64 * stride_dvh + s64 * stride_dvt
             + d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kmask)


# ----------------------------------------------------------------------------------------------
# step kernel (sampling, no grad)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _thought_attn_step_kernel(
    Q, KB, VB, KC, VC, O, DS,
    sm_scale, step,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kbb, stride_kbh, stride_kbt, stride_kbd,
    stride_vbb, stride_vbh, stride_vbt, stride_vbd,
    stride_kcb, stride_kch, stride_kct, stride_kcl, stride_kcd,
    stride_vcb, stride_vch, stride_vct, stride_vcl, stride_vcd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dsb, stride_dst,
    H_KV, G, T, POS, NUM_TILES,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    """Rows r = p * G + g: position t0 + p, query head hk * G + g; keys: base s <= t, chain 0..step."""
    tile = NUM_TILES - 1 - tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // H_KV
    hk = bhk - b * H_KV
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)

    r = tl.arange(0, BLOCK_M)
    p = r // G
    g = r - p * G
    t_lo = tile * POS
    t = t_lo + p
    row_ok = (p < POS) & (t < T)
    t_hi = tl.minimum(t_lo + POS, T)
    h64 = (hk * G + g).to(tl.int64)
    t64 = t.to(tl.int64)
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b64 * stride_qb + h64[:, None] * stride_qh + t64[:, None] * stride_qt
                + d[None, :] * stride_qd, mask=mask, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    kb_base = KB + b64 * stride_kbb + hk64 * stride_kbh
    vb_base = VB + b64 * stride_vbb + hk64 * stride_vbh
    doc0 = _load_doc_start(DS, b64, stride_dsb, stride_dst, t, row_ok, t_lo, HAS_DOCS)
    key_lo = _doc_key_start(DS, b64, stride_dsb, stride_dst, t_lo, BLOCK_N, HAS_DOCS)
    acc, m_i, l_i = _attend_base_prefix(acc, m_i, l_i, q, t, doc0, key_lo, kb_base, vb_base, stride_kbt, stride_kbd,
                                        stride_vbt, stride_vbd, d, d_ok, t_lo, t_hi, T, qk_scale, BLOCK_N, DOT_PREC,
                                        HAS_DOCS)

    # chain keys (t, 0..step): one key per row per iteration, a gather on CUDA cores
    qf = q.to(tl.float32)
    kc_ptrs = KC + b64 * stride_kcb + hk64 * stride_kch + t64[:, None] * stride_kct + d[None, :] * stride_kcd
    vc_ptrs = VC + b64 * stride_vcb + hk64 * stride_vch + t64[:, None] * stride_vct + d[None, :] * stride_vcd
    for m in range(0, step + 1):
        kc = tl.load(kc_ptrs + m * stride_kcl, mask=mask, other=0.0).to(tl.float32)
        vc = tl.load(vc_ptrs + m * stride_vcl, mask=mask, other=0.0).to(tl.float32)
        sc = tl.sum(qf * kc, 1) * qk_scale
        m_new = tl.maximum(m_i, sc)
        alpha = tl.math.exp2(m_i - m_new)
        pc = tl.math.exp2(sc - m_new)
        l_i = l_i * alpha + pc
        acc = acc * alpha[:, None] + pc[:, None] * vc
        m_i = m_new

    o = acc / l_i[:, None]
    tl.store(O + b64 * stride_ob + h64[:, None] * stride_oh + t64[:, None] * stride_ot
             + d[None, :] * stride_od, o.to(O.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# launchers: configuration heuristic, validation, allocation, launch
# ----------------------------------------------------------------------------------------------
_SUPPORTED_D = tuple(range(16, 129, 16))


def _dot_prec(dtype: torch.dtype) -> str:
    # fp32 inputs: real fp32 products (tf32 would lose ~3 decimal digits); 16-bit: ignored
    return "ieee" if dtype == torch.float32 else "tf32"


def _d_pad(D: int) -> int:
    return triton.next_power_of_2(D)


def _fwd_config(D: int, dtype: torch.dtype, T: int) -> dict:
    """Forward tile: BLOCK_M rows of whole chains, BLOCK_N base keys per step.

    BLOCK_M = 64 keeps the dense chain block (cost ~ BLOCK_M / (T/2) of the base part) small.
    16-bit, D = 128: swept on an H200 (benchmarks/gpu_profile.py, H=32 H_KV=8, bf16; results in
    benchmarks/results/gpu_h200_2026-11-26/): 4 warps beat 8 at every tile (0.67 against 1.09 ms at
    B=8 T=256 L=14; 1.00 against 1.32 ms for the former 128-row tile at B=2 T=1024 L=16).
    D <= 64 (SmolLM2's heads): not swept yet; the T >= 1024 tile is the untimed 128-row one.
    """
    d_pad = _d_pad(D)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4 if d_pad <= 64 else 8, num_stages=2)
    if d_pad > 64:    # (64, 64, 4 warps, 3 stages) is 11% faster at T = 1024 but spills 48 bytes on sm_90
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=4)
    if T >= 1024:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)


def _bwd_dq_config(D: int, dtype: torch.dtype, T: int) -> dict:
    # 16-bit, D = 128, H200 sweep: a 128-row tile saves 15-20% of the dQ kernel at T = 256 and 1024
    if dtype != torch.float32 and _d_pad(D) > 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
    wide = dtype == torch.float32
    return dict(BLOCK_M=64, BLOCK_N=32 if (_d_pad(D) > 64 or wide) else 64,
                num_warps=4 if _d_pad(D) <= 64 else 8, num_stages=2)


def _bwd_chain_config(D: int, dtype: torch.dtype, L: int) -> dict:
    # the tile must hold a whole chain (BLOCK_M >= L); 32 rows avoid spills at D = 128, where 4 warps
    # beat 8 in the H200 sweep (16-bit)
    small = _d_pad(D) > 64 or dtype == torch.float32
    warps = 4 if (dtype != torch.float32 and _d_pad(D) > 64 and L <= 32) else 8
    return dict(BLOCK_M=32 if (small and L <= 32) else 64, num_warps=warps, num_stages=2)


def _bwd_base_config(D: int, dtype: torch.dtype, T: int) -> dict:
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2)
    if _d_pad(D) <= 64:
        return dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2)
    # D = 128, H200 sweep (whole backward, this kernel's config alone changed): 2.81 against 3.34 ms at
    # B=8 T=256 L=14 and 6.42 against 9.08 ms at B=2 T=1024 L=16 for the former (64, 32) tile. It keeps
    # 48 bytes of stack on sm_90 (every 64-key or 128-key tile at D = 128 does: 64x64 296 B, 64x128 248 B);
    # measured faster all the same, so the static check allows exactly that much here.
    return dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2, max_stack_bytes=48)


def _step_config(D: int, dtype: torch.dtype, G: int) -> dict:
    d_pad = _d_pad(D)
    return dict(BLOCK_M=max(64, triton.next_power_of_2(G)), BLOCK_N=64 if d_pad <= 64 else 32,
                num_warps=4 if d_pad <= 64 else 8, num_stages=2)


def _preprocess_config(D: int) -> dict:
    return dict(BLOCK_M=64 if _d_pad(D) <= 64 else 32, num_warps=4, num_stages=1)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 SXM; only used to pick the dK/dV head split


def _base_split(B: int, H_KV: int, G: int, T: int, block_n: int, num_sms: int) -> int:
    """How many programs share the G heads of one base key block (a divisor of G).

    Split until there are about two waves of programs; the heavy key blocks (small s) dominate,
    so more, smaller programs balance better. Split > 1 costs an fp32 partial buffer and a sum.
    """
    programs = B * H_KV * triton.cdiv(T, block_n)
    split = 1
    while programs * split < 2 * num_sms and split < G:
        split += 1
        while G % split:
            split += 1
    return split


def _check_head_dim(D: int) -> None:
    if D not in _SUPPORTED_D:
        raise ValueError(f"head dim D={D} of q (last dim) is not supported: D must be a multiple of 16 "
                         f"in [16, 128]")


def _check_scale(scale, D: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite Python float, got {scale!r}")
    return float(scale)


_ON_CPU = "kernels.reference.thought_attention_ref, or quietstar's attention backend 'split'"


def _check_parallel(q, k_base, v_base, k_chain, v_chain):
    B, H, H_KV, T, L, D = check_thought_attention_inputs(q, k_base, v_base, k_chain, v_chain)
    check_triton_device("q", q, "thought-attention", _ON_CPU)
    _check_head_dim(D)
    if q.dtype == torch.float64:
        raise TypeError("q is float64; the Triton kernels take float32, float16 or bfloat16 "
                        "(use thought_attention_ref for float64)")
    if L > _MAX_L:
        raise ValueError(f"chain length L={L} of q / k_chain exceeds the supported maximum {_MAX_L}")
    if T < 1 or B < 1:
        raise ValueError(f"q must have B >= 1 and T >= 1, got shape {tuple(q.shape)}")
    return B, H, H_KV, T, L, D


_NO_DOCS: dict = {}


def _docs_arg(doc_start, B: int, T: int, device):
    """(pointer tensor, its two strides, HAS_DOCS) for the kernels: doc_start as int32, or a one-element
    placeholder (never read: HAS_DOCS=False compiles today's kernels) when it is None."""
    if doc_start is None:
        key = str(device)
        if key not in _NO_DOCS:
            _NO_DOCS[key] = torch.zeros(1, 1, dtype=torch.int32, device=device)
        x = _NO_DOCS[key]
        return x, 0, 0, False
    check_doc_start(doc_start, B, T, device)
    ds = doc_start if doc_start.dtype == torch.int32 else doc_start.to(torch.int32)
    return ds, ds.stride(0), ds.stride(1), True


def document_ends(doc_start: torch.Tensor) -> torch.Tensor:
    """(B, T) int32: the end (exclusive) of position s's document, i.e. the number of positions t with
    doc_start[t] <= s (doc_start is non-decreasing along a row). The base dK/dV kernel stops its rows there."""
    B, T = doc_start.shape
    s = torch.arange(T, device=doc_start.device, dtype=doc_start.dtype).expand(B, T).contiguous()
    return torch.searchsorted(doc_start.contiguous(), s, right=True).to(torch.int32)


def thought_attention_fwd(q, k_base, v_base, k_chain, v_chain, scale=None, doc_start=None):
    """Forward launcher: returns (o (B, H, T, L, D) in q's dtype, lse (B, H, T, L) fp32, natural log)."""
    B, H, H_KV, T, L, D = _check_parallel(q, k_base, v_base, k_chain, v_chain)
    scale = _check_scale(scale, D)
    ds, stride_dsb, stride_dst, has_docs = _docs_arg(doc_start, B, T, q.device)
    G = H // H_KV
    o = torch.empty((B, H, T, L, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, T, L), device=q.device, dtype=torch.float32)
    cfg = _fwd_config(D, q.dtype, T)
    pos = cfg["BLOCK_M"] // L
    num_tiles = triton.cdiv(T, pos)
    _thought_attn_fwd_kernel[(num_tiles, B * H)](
        q, k_base, v_base, k_chain, v_chain, o, lse, ds,
        scale,
        *q.stride(), *k_base.stride(), *v_base.stride(), *k_chain.stride(), *v_chain.stride(), *o.stride(),
        stride_dsb, stride_dst,
        H, G, T, L, pos, num_tiles,
        D=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], D_PAD=_d_pad(D), DOT_PREC=_dot_prec(q.dtype),
        HAS_DOCS=has_docs, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return o, lse


def thought_attention_bwd(do, q, k_base, v_base, k_chain, v_chain, o, lse, scale, doc_start=None):
    """Backward launcher: (dq, dk_base, dv_base, dk_chain, dv_chain) in the inputs' dtype."""
    B, H, T, L, D = q.shape
    ds, stride_dsb, stride_dst, has_docs = _docs_arg(doc_start, B, T, q.device)
    de = document_ends(ds) if has_docs else ds
    H_KV = k_base.shape[1]
    G = H // H_KV
    dev, dt = q.device, q.dtype
    prec = _dot_prec(dt)
    d_pad = _d_pad(D)

    delta = torch.empty((B, H, T, L), device=dev, dtype=torch.float32)
    cfg = _preprocess_config(D)
    _thought_attn_bwd_preprocess_kernel[(triton.cdiv(T * L, cfg["BLOCK_M"]), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, T, L,
        D=D, BLOCK_M=cfg["BLOCK_M"], D_PAD=d_pad, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )

    # base dK/dV first: its fp32 partials (split > 1) are summed and freed before dQ and the chain
    # gradients, the largest outputs, are allocated, so they do not add to the peak
    cfg = _bwd_base_config(D, dt, T)
    split = _base_split(B, H_KV, G, T, cfg["BLOCK_N"], _num_sms(dev))
    if split == 1:
        dk_base = torch.empty((1, B, H_KV, T, D), device=dev, dtype=dt)
        dv_base = torch.empty((1, B, H_KV, T, D), device=dev, dtype=dt)
    else:  # fp32 partials, summed below in a fixed order (deterministic)
        dk_base = torch.empty((split, B, H_KV, T, D), device=dev, dtype=torch.float32)
        dv_base = torch.empty((split, B, H_KV, T, D), device=dev, dtype=torch.float32)
    _thought_attn_bwd_dkv_base_kernel[(triton.cdiv(T, cfg["BLOCK_N"]), B * H_KV, split)](
        q, k_base, v_base, do, lse, delta, dk_base, dv_base, ds, de,
        scale,
        *q.stride(), *k_base.stride(), *v_base.stride(), *do.stride(), *dk_base.stride(),
        *dv_base.stride(), stride_dsb, stride_dst, de.stride(0), de.stride(1),
        H, H_KV, G, T, L, G // split,
        D=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], D_PAD=d_pad, DOT_PREC=prec, HAS_DOCS=has_docs,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split == 1:
        dk_base, dv_base = dk_base[0], dv_base[0]
    else:
        dk_base, dv_base = dk_base.sum(0).to(dt), dv_base.sum(0).to(dt)

    dq = torch.empty((B, H, T, L, D), device=dev, dtype=dt)
    cfg = _bwd_dq_config(D, dt, T)
    pos = cfg["BLOCK_M"] // L
    num_tiles = triton.cdiv(T, pos)
    _thought_attn_bwd_dq_kernel[(num_tiles, B * H)](
        q, k_base, v_base, k_chain, v_chain, do, lse, delta, dq, ds,
        scale,
        *q.stride(), *k_base.stride(), *v_base.stride(), *k_chain.stride(), *v_chain.stride(),
        *do.stride(), *dq.stride(), stride_dsb, stride_dst,
        H, G, T, L, pos, num_tiles,
        D=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], D_PAD=d_pad, DOT_PREC=prec, HAS_DOCS=has_docs,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )

    dk_chain = torch.empty((B, H_KV, T, L, D), device=dev, dtype=dt)
    dv_chain = torch.empty((B, H_KV, T, L, D), device=dev, dtype=dt)
    cfg = _bwd_chain_config(D, dt, L)
    pos = cfg["BLOCK_M"] // L
    _thought_attn_bwd_dkv_chain_kernel[(triton.cdiv(T, pos), B * H_KV)](
        q, k_chain, v_chain, do, lse, delta, dk_chain, dv_chain,
        scale,
        *q.stride(), *k_chain.stride(), *v_chain.stride(), *do.stride(), *dk_chain.stride(),
        *dv_chain.stride(),
        H, H_KV, G, T, L, pos,
        D=D, BLOCK_M=cfg["BLOCK_M"], D_PAD=d_pad, DOT_PREC=prec,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return dq, dk_base, dv_base, dk_chain, dv_chain


def thought_attention_step_launch(q, k_base, v_base, k_chain, v_chain, step, scale=None, out=None, doc_start=None):
    """Step launcher: o (B, H, T, D) for chain index ``step``; writes into ``out`` when given."""
    B, H, H_KV, T, L_max, D = check_thought_attention_inputs(q, k_base, v_base, k_chain, v_chain, step=step)
    check_triton_device("q", q, "thought-attention", _ON_CPU)
    _check_head_dim(D)
    if T < 1 or B < 1:
        raise ValueError(f"q must have B >= 1 and T >= 1, got shape {tuple(q.shape)}")
    if q.dtype == torch.float64:
        raise TypeError("q is float64; the Triton kernels take float32, float16 or bfloat16")
    scale = _check_scale(scale, D)
    ds, stride_dsb, stride_dst, has_docs = _docs_arg(doc_start, B, T, q.device)
    G = H // H_KV
    if out is None:
        out = torch.empty((B, H, T, D), device=q.device, dtype=q.dtype)
    elif out.shape != (B, H, T, D) or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be a {q.dtype} tensor of shape {(B, H, T, D)} on {q.device}")
    cfg = _step_config(D, q.dtype, G)
    pos = cfg["BLOCK_M"] // G
    num_tiles = triton.cdiv(T, pos)
    _thought_attn_step_kernel[(num_tiles, B * H_KV)](
        q, k_base, v_base, k_chain, v_chain, out, ds,
        scale, step,
        *q.stride(), *k_base.stride(), *v_base.stride(), *k_chain.stride(), *v_chain.stride(), *out.stride(),
        stride_dsb, stride_dst,
        H_KV, G, T, pos, num_tiles,
        D=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], D_PAD=_d_pad(D), DOT_PREC=_dot_prec(q.dtype),
        HAS_DOCS=has_docs, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


# ----------------------------------------------------------------------------------------------
# autograd.Function
# ----------------------------------------------------------------------------------------------
class ThoughtAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves (q, k_base, v_base, k_chain, v_chain, o, lse[, doc_start]); lse is fp32."""

    @staticmethod
    def forward(ctx, q, k_base, v_base, k_chain, v_chain, scale=None, doc_start=None):
        o, lse = thought_attention_fwd(q, k_base, v_base, k_chain, v_chain, scale, doc_start)
        ctx.save_for_backward(q, k_base, v_base, k_chain, v_chain, o, lse,
                              *(() if doc_start is None else (doc_start,)))
        ctx.scale = _check_scale(scale, q.shape[-1])
        return o

    @staticmethod
    def backward(ctx, do):
        refuse_double_backward("thought_attention")
        q, k_base, v_base, k_chain, v_chain, o, lse, *docs = ctx.saved_tensors
        grads = thought_attention_bwd(do, q, k_base, v_base, k_chain, v_chain, o, lse, ctx.scale,
                                      docs[0] if docs else None)
        return (*grads, None, None)


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------
def thought_attention(q, k_base, v_base, k_chain, v_chain, scale=None, doc_start=None):
    """Equals ``thought_attention_ref(q, k_base, v_base, k_chain, v_chain, scale, doc_start)`` without any mask.

    q (B, H, T, L, D); k_base, v_base (B, H_KV, T, D); k_chain, v_chain (B, H_KV, T, L, D); any
    strides. Query (t, l) sees base keys s <= t and chain keys (t, m), m <= l; with ``doc_start``
    (B, T) int32 (packed documents: the first position of t's document) only base keys
    s >= doc_start[b, t], and key tiles wholly before a query tile's earliest document start are
    skipped. Differentiable in all five inputs. Returns o (B, H, T, L, D) in q's dtype.
    """
    return ThoughtAttentionFunction.apply(q, k_base, v_base, k_chain, v_chain, scale, doc_start)


@torch.no_grad()
def thought_attention_step(q, k_base, v_base, k_chain, v_chain, step, scale=None, doc_start=None):
    """Equals ``thought_attention(q_full, ..., doc_start=doc_start)[:, :, :, step]`` over the first step + 1
    chain keys.

    q (B, H, T, D) queries of chain index ``step``; k_chain, v_chain (B, H_KV, T, L_max, D) caches
    whose indices 0..step are valid; ``doc_start`` (B, T) as in thought_attention (int32: an int64
    one is converted, an allocation). No grad; no host sync and no allocation but the output, so it
    can be captured in a CUDA graph. Returns (B, H, T, D).
    """
    return thought_attention_step_launch(q, k_base, v_base, k_chain, v_chain, step, scale, doc_start=doc_start)


# ----------------------------------------------------------------------------------------------
# H100 static compile cases (benchmarks/h100_static_check.py)
# ----------------------------------------------------------------------------------------------
_TL_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# benchmark shapes, DESIGN.md section 8: (B, H, H_KV, T, L, D)
_BENCH_SHAPES = (
    (4, 32, 8, 256, 16, 128), (2, 32, 8, 1024, 16, 128), (8, 32, 8, 256, 14, 128),
    (1, 32, 8, 2048, 8, 128), (8, 9, 3, 256, 14, 64),
)


def _params(fn) -> list[tuple[str, bool]]:
    """(name, is tl.constexpr) of every argument of a @triton.jit function, also under TRITON_INTERPRET."""
    if hasattr(fn, "params"):
        return [(p.name, p.is_constexpr) for p in fn.params]
    sig = inspect.signature(fn.fn)            # triton's InterpretedFunction wraps the Python function
    return [(n, p.annotation is tl.constexpr or "constexpr" in str(p.annotation)) for n, p in sig.parameters.items()]


def _signature(fn, ptr_types: dict, float_args=("sm_scale",)) -> tuple[dict, list, dict, list]:
    """Mirror of the JIT's specialization of a launch at the benchmark shapes.

    Returns (signature of the non-constexpr args, names of the tl.constexpr args, runtime
    specializations, args divisible by 16). At runtime triton turns an int argument equal to 1
    into a constexpr and marks 16-byte-aligned pointers and ints divisible by 16 with
    tt.divisibility=16; at the benchmark shapes (contiguous or [pos, step]-strided tensors,
    D = 64 / 128) every head-dim stride is 1 and every other stride a multiple of 16, while sizes
    (T, L, G, POS, ...) need not be. Without these the static compile sees unaligned scalar loads
    that no real launch uses (255 registers and spills instead of ~170).
    """
    sig, constexpr_names, specialized, div16 = {}, [], {}, []
    for name, is_constexpr in _params(fn):
        if is_constexpr:
            constexpr_names.append(name)
        elif name.startswith("stride_") and (name.endswith("d") or name in ("stride_dst", "stride_det")):
            specialized[name] = 1       # head-dim strides, and the position stride of a (B, T) doc_start
        elif name in ("DS", "DE"):
            sig[name] = "*i32"
            div16.append(name)
        elif name in ptr_types:
            sig[name] = ptr_types[name]
            div16.append(name)
        elif name in float_args:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride_"):
                div16.append(name)
    return sig, constexpr_names, specialized, div16


def h100_compile_cases() -> list[dict]:
    """One case per (kernel, config the launchers choose at the benchmark shapes, bf16/fp16).

    Each case: kernel, config (readable), fn (the raw @triton.jit function), signature (triton
    type of every argument that is not a constexpr at runtime), constexprs (the tl.constexpr
    arguments plus the int arguments the JIT specializes to constexpr because they equal 1: the
    head-dim strides), divisible_by_16 (the args the JIT marks tt.divisibility=16 at these shapes:
    pointers and the other strides), num_warps, num_stages, has_dot. Configs come from the
    launchers' own heuristics, so they cannot drift.
    """
    cases, seen = [], set()

    def add(kernel, fn, ptr_types, constexprs, cfg, has_dot, dtype):
        constexprs = dict(D=D, **constexprs)
        sig, names, specialized, div16 = _signature(fn, ptr_types)
        docs_variants = (False, True) if "HAS_DOCS" in names else (None,)
        for docs in docs_variants:       # every kernel that takes doc_start: without and with documents
            cx = dict(constexprs) if docs is None else dict(constexprs, HAS_DOCS=docs)
            assert set(names) == set(cx), (kernel, names, cx)
            config = ",".join(f"{k}={v}" for k, v in cx.items() if k not in ("DOT_PREC", "HAS_DOCS"))
            config += f",warps={cfg['num_warps']},stages={cfg['num_stages']},{_TL_TYPE[dtype]}"
            if any(t == "*fp32" for n, t in ptr_types.items() if n in ("DK", "DV")):
                config += ",fp32-partials"
            if docs:
                config += ",docs"
            key = (kernel, config)
            if key in seen:
                continue
            seen.add(key)
            cases.append(dict(kernel=kernel, config=config, fn=fn, signature=sig,
                              constexprs={**cx, **specialized}, divisible_by_16=div16,
                              num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], has_dot=has_dot,
                              max_stack_bytes=cfg.get("max_stack_bytes", 0)))

    for dtype in (torch.bfloat16, torch.float16):
        x, f32 = "*" + _TL_TYPE[dtype], "*fp32"
        prec = _dot_prec(dtype)
        for (B, H, H_KV, T, L, D) in _BENCH_SHAPES:
            G, dp = H // H_KV, _d_pad(D)
            cfg = _fwd_config(D, dtype, T)
            add("thought_attn_fwd", _thought_attn_fwd_kernel,
                dict(Q=x, KB=x, VB=x, KC=x, VC=x, O=x, LSE=f32),
                dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], D_PAD=dp, DOT_PREC=prec), cfg, True, dtype)
            cfg = _preprocess_config(D)
            add("thought_attn_bwd_preprocess", _thought_attn_bwd_preprocess_kernel,
                dict(O=x, DO=x, DELTA=f32), dict(BLOCK_M=cfg["BLOCK_M"], D_PAD=dp), cfg, False, dtype)
            cfg = _bwd_dq_config(D, dtype, T)
            add("thought_attn_bwd_dq", _thought_attn_bwd_dq_kernel,
                dict(Q=x, KB=x, VB=x, KC=x, VC=x, DO=x, LSE=f32, DELTA=f32, DQ=x),
                dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], D_PAD=dp, DOT_PREC=prec), cfg, True, dtype)
            cfg = _bwd_chain_config(D, dtype, L)
            add("thought_attn_bwd_dkv_chain", _thought_attn_bwd_dkv_chain_kernel,
                dict(Q=x, KC=x, VC=x, DO=x, LSE=f32, DELTA=f32, DKC=x, DVC=x),
                dict(BLOCK_M=cfg["BLOCK_M"], D_PAD=dp, DOT_PREC=prec), cfg, True, dtype)
            cfg = _bwd_base_config(D, dtype, T)
            split = _base_split(B, H_KV, G, T, cfg["BLOCK_N"], 132)
            out_t = x if split == 1 else f32
            add("thought_attn_bwd_dkv_base", _thought_attn_bwd_dkv_base_kernel,
                dict(Q=x, KB=x, VB=x, DO=x, LSE=f32, DELTA=f32, DK=out_t, DV=out_t),
                dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], D_PAD=dp, DOT_PREC=prec), cfg, True, dtype)
            cfg = _step_config(D, dtype, G)
            add("thought_attn_step", _thought_attn_step_kernel,
                dict(Q=x, KB=x, VB=x, KC=x, VC=x, O=x),
                dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], D_PAD=dp, DOT_PREC=prec), cfg, True, dtype)
    return cases
