"""Pure-PyTorch references for every kernel in this package (DESIGN.md section 7).

Built the obvious way, for clarity and as the ground truth the Triton kernels are tested against:
the attention references build the dense boolean mask and call SDPA with K/V expanded to all
heads; the LM-head references build the full (N, V) logits in float32. They are slow and
memory-hungry on purpose; never use them on large shapes.

Layouts (DESIGN.md sections 2-3): B batch, H query heads, H_KV key/value heads (H % H_KV == 0), T base length,
L chain length, D head dim; the chain of base position t is contiguous ([pos, step] order).

Documents (packed rows): ``doc_start`` (B, T) int32/int64, the first position of position t's
document in its row (0 for the document the row starts in). With it, a query at position t (a base
token or any chain token of t) sees base keys s with doc_start[t] <= s <= t only; ``None`` means one
document per row (today's masks, exactly).
"""
from __future__ import annotations

import math
import numbers
import os
import sys
from collections.abc import Iterable
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "thought_attention_ref",
    "thought_attention_step_ref",
    "mixed_logprob_ref",
    "token_logprob_ref",
    "sample_thought_tokens_ref",
    "thought_attention_mask",
    "check_doc_start",
    "document_mask",
]


# ----------------------------------------------------------------------------------------------
# input checks shared by references and kernels' launchers
# ----------------------------------------------------------------------------------------------
def _check_float(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def check_thought_attention_inputs(q, k_base, v_base, k_chain, v_chain, step=None):
    """Validate shapes/dtypes/devices of the thought-attention inputs; returns (B, H, H_KV, T, L, D).

    For the parallel op q is (B, H, T, L, D) and k_chain (B, H_KV, T, L, D); for the step op
    (``step`` given) q is (B, H, T, D) and k_chain (B, H_KV, T, L_max, D) with 0 <= step < L_max.
    """
    names = ("q", "k_base", "v_base", "k_chain", "v_chain")
    tensors = (q, k_base, v_base, k_chain, v_chain)
    for n, x in zip(names, tensors):
        _check_float(n, x)
    for n, x in zip(names[1:], tensors[1:]):
        if x.dtype != q.dtype:
            raise TypeError(f"{n} has dtype {x.dtype} but q has {q.dtype}; all inputs must share one dtype")
        if x.device != q.device:
            raise ValueError(f"{n} is on {x.device} but q is on {q.device}")
    q_dims = 4 if step is not None else 5
    if q.dim() != q_dims:
        want = "(B, H, T, D)" if step is not None else "(B, H, T, L, D)"
        raise ValueError(f"q must be {want}, got shape {tuple(q.shape)}")
    # each key tensor against q first, then its value tensor against it: a mismatch names the tensor that is off
    if k_base.dim() != 4:
        raise ValueError(f"k_base must be (B, H_KV, T, D), got shape {tuple(k_base.shape)}")
    B, H, T = q.shape[:3]
    D = q.shape[-1]
    Bk, H_KV, Tk, Dk = k_base.shape
    if (Bk, Tk, Dk) != (B, T, D):
        raise ValueError(
            f"k_base must be (B={B}, H_KV, T={T}, D={D}) to match q, got shape {tuple(k_base.shape)}")
    if H_KV == 0 or H % H_KV != 0:
        raise ValueError(f"the number of query heads H={H} (q) must be a multiple of H_KV={H_KV} (k_base)")
    if v_base.shape != k_base.shape:
        raise ValueError(f"v_base must have k_base's shape {tuple(k_base.shape)}, got {tuple(v_base.shape)}")
    if k_chain.dim() != 5:
        raise ValueError(f"k_chain must be (B, H_KV, T, L, D), got shape {tuple(k_chain.shape)}")
    L = k_chain.shape[3]
    if tuple(k_chain.shape) != (B, H_KV, T, L, D):
        raise ValueError(
            f"k_chain must be (B={B}, H_KV={H_KV}, T={T}, L, D={D}), got shape {tuple(k_chain.shape)}")
    if L < 1:
        raise ValueError("k_chain must hold at least one chain step (L >= 1)")
    if step is None and q.shape[3] != L:
        raise ValueError(f"q and k_chain disagree on the chain length: q has L={q.shape[3]}, k_chain L={L}")
    if v_chain.shape != k_chain.shape:
        raise ValueError(f"v_chain must have k_chain's shape {tuple(k_chain.shape)}, got {tuple(v_chain.shape)}")
    if step is not None:
        if not isinstance(step, int) or isinstance(step, bool):
            raise TypeError(f"step must be a Python int, got {type(step).__name__}")
        if not 0 <= step < L:
            raise ValueError(f"step={step} is outside the chain cache k_chain of length L_max={L}")
    return B, H, H_KV, T, L, D


def triton_interpreting() -> bool:
    """Triton kernels run on CPU tensors: TRITON_INTERPRET=1, or the triton-viz sanitizer."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or "triton_viz" in sys.modules


def check_triton_device(name: str, x: torch.Tensor, kernels: str, cpu_alternative: str) -> None:
    """A Triton kernel's input must be a CUDA tensor, or a CPU one in the interpreter; anything else would
    fail inside Triton with "0 active drivers"."""
    if x.device.type != "cuda" and not (x.device.type == "cpu" and triton_interpreting()):
        raise ValueError(f"{name} is on {x.device}; the Triton {kernels} kernels need CUDA tensors (or CPU ones "
                         f"under TRITON_INTERPRET=1, slow): on CPU use {cpu_alternative}")


def check_doc_start(doc_start, B: int, T: int, device, values: bool = True):
    """Validate a (B, T) integer ``doc_start`` (see the module docstring); returns it (None stays None).

    Its values are checked (doc_start[:, 0] == 0; doc_start[:, t] is doc_start[:, t - 1] or t) only
    for a tensor on the CPU: on a GPU that would read it back to the host, a sync per call (and an
    error inside a CUDA-graph capture)."""
    if doc_start is None:
        return None
    if not isinstance(doc_start, torch.Tensor) or doc_start.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"doc_start must be an int32 or int64 tensor, got "
                        f"{getattr(doc_start, 'dtype', type(doc_start).__name__)}")
    if tuple(doc_start.shape) != (B, T):
        raise ValueError(f"doc_start must be (B={B}, T={T}), got shape {tuple(doc_start.shape)}")
    if doc_start.device != torch.device(device):
        raise ValueError(f"doc_start is on {doc_start.device} but the inputs are on {device}")
    if values and doc_start.device.type == "cpu" and T > 0:
        t = torch.arange(T)
        ok = bool((doc_start[:, 0] == 0).all()) and bool(
            ((doc_start[:, 1:] == doc_start[:, :-1]) | (doc_start[:, 1:] == t[1:])).all())
        if not ok:
            raise ValueError("doc_start must give each position's document start: doc_start[:, 0] == 0 and "
                             "doc_start[:, t] equal to doc_start[:, t - 1] (same document) or to t (a new one)")
    return doc_start


def document_mask(doc_start: torch.Tensor) -> torch.Tensor:
    """(B, T, T) bool: query t sees base key s iff doc_start[t] <= s <= t (causal within documents)."""
    T = doc_start.shape[1]
    s = torch.arange(T, device=doc_start.device)
    return (s[None, None, :] <= s[None, :, None]) & (s[None, None, :] >= doc_start[:, :, None])


# ----------------------------------------------------------------------------------------------
# thought attention
# ----------------------------------------------------------------------------------------------
def thought_attention_mask(T: int, L: int, device=None, doc_start=None) -> torch.Tensor:
    """Dense boolean mask (T*L, T + T*L): query (t, l) -> [base keys 0..T-1 | chain keys (s, m)].

    True where attention is allowed: base key s <= t, or chain key (s, m) with s == t and m <= l.
    With ``doc_start`` (B, T): (B, T*L, T + T*L), base keys also need s >= doc_start[t].
    """
    t = torch.arange(T, device=device)
    l = torch.arange(L, device=device)
    qt = t.repeat_interleave(L)                      # (T*L,) position of each query row
    ql = l.repeat(T)                                 # (T*L,) chain index of each query row
    base = t[None, :] <= qt[:, None]                 # (T*L, T)
    chain = (qt[:, None] == qt[None, :]) & (ql[None, :] <= ql[:, None])  # (T*L, T*L)
    if doc_start is None:
        return torch.cat([base, chain], dim=1)
    B = doc_start.shape[0]
    base = document_mask(doc_start).repeat_interleave(L, dim=1)          # (B, T*L, T)
    return torch.cat([base, chain[None].expand(B, -1, -1)], dim=2)


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


def thought_attention_ref(q, k_base, v_base, k_chain, v_chain, scale=None, doc_start=None):
    """o = softmax(q K^T * scale + mask) V over [base | chain] keys with the thought mask.

    q (B, H, T, L, D); k_base, v_base (B, H_KV, T, D); k_chain, v_chain (B, H_KV, T, L, D).
    Query (t, l) sees base keys s <= t (and s >= doc_start[b, t] with ``doc_start`` (B, T)) and
    chain keys (t, m), m <= l. Returns (B, H, T, L, D).
    """
    B, H, H_KV, T, L, D = check_thought_attention_inputs(q, k_base, v_base, k_chain, v_chain)
    check_doc_start(doc_start, B, T, q.device)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    g = H // H_KV
    k = torch.cat([k_base, k_chain.reshape(B, H_KV, T * L, D)], dim=2)   # (B, H_KV, T + T*L, D)
    v = torch.cat([v_base, v_chain.reshape(B, H_KV, T * L, D)], dim=2)
    mask = thought_attention_mask(T, L, q.device, doc_start)             # ((B,) T*L, T + T*L)
    if doc_start is not None:
        mask = mask[:, None]                                             # (B, 1, T*L, T + T*L)
    o = F.scaled_dot_product_attention(
        q.reshape(B, H, T * L, D), _expand_kv(k, g), _expand_kv(v, g), attn_mask=mask, scale=scale)
    return o.reshape(B, H, T, L, D)


def thought_attention_step_ref(q, k_base, v_base, k_chain, v_chain, step, scale=None, doc_start=None):
    """The queries of chain index ``step``: thought_attention_ref(...)[:, :, :, step] over chain 0..step.

    q (B, H, T, D); k_base, v_base (B, H_KV, T, D); k_chain, v_chain (B, H_KV, T, L_max, D) caches
    whose chain indices 0..step are valid (later ones are ignored); ``doc_start`` (B, T) as in
    thought_attention_ref. Returns (B, H, T, D).
    Plain PyTorch, so it is differentiable (the sequential schedule's reference path uses that);
    the kernel of the same contract is forward-only.
    """
    B, H, H_KV, T, L_max, D = check_thought_attention_inputs(q, k_base, v_base, k_chain, v_chain, step=step)
    check_doc_start(doc_start, B, T, q.device)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    g = H // H_KV
    n = step + 1
    k = torch.cat([k_base, k_chain[:, :, :, :n].reshape(B, H_KV, T * n, D)], dim=2)
    v = torch.cat([v_base, v_chain[:, :, :, :n].reshape(B, H_KV, T * n, D)], dim=2)
    t = torch.arange(T, device=q.device)
    base = t[None, :] <= t[:, None]                                        # (T, T)
    chain = (t[:, None] == t.repeat_interleave(n)[None, :])                # (T, T*n)
    if doc_start is None:
        mask = torch.cat([base, chain], dim=1)
    else:                                                                  # (B, 1, T, T + T*n)
        mask = torch.cat([document_mask(doc_start), chain[None].expand(B, -1, -1)], dim=2)[:, None]
    return F.scaled_dot_product_attention(q, _expand_kv(k, g), _expand_kv(v, g), attn_mask=mask, scale=scale)


# ----------------------------------------------------------------------------------------------
# LM head
# ----------------------------------------------------------------------------------------------
def check_lm_head_inputs(h, weight, target=None, *, h_name="h"):
    """Validate (N, d) hidden states, a (V, d) weight and an optional (N,) integer target."""
    _check_float(h_name, h)
    _check_float("weight", weight)
    if h.dim() != 2:
        raise ValueError(f"{h_name} must be (N, d), got shape {tuple(h.shape)}")
    if weight.dim() != 2 or weight.shape[1] != h.shape[1]:
        raise ValueError(f"weight must be (V, d={h.shape[1]}), got shape {tuple(weight.shape)}")
    if weight.device != h.device:
        raise ValueError(f"weight is on {weight.device} but {h_name} is on {h.device}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must have V >= 1 rows and d >= 1 columns, got shape {tuple(weight.shape)}")
    if target is not None:
        if not isinstance(target, torch.Tensor) or target.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"target must be an int64 or int32 tensor, got "
                            f"{getattr(target, 'dtype', type(target).__name__)}")
        if target.shape != (h.shape[0],):
            raise ValueError(f"target must be (N={h.shape[0]},), got shape {tuple(target.shape)}")
        if target.device != h.device:
            raise ValueError(f"target is on {target.device} but {h_name} is on {h.device}")
    return h.shape[0], h.shape[1], weight.shape[0]


def check_mixed_logprob_inputs(h_talk, h_base, w, weight, target, ignore_index):
    """Validate the inputs of mixed_logprob (any implementation); returns (N, d, V)."""
    N, d, V = check_lm_head_inputs(h_talk, weight, target, h_name="h_talk")
    check_lm_head_inputs(h_base, weight, h_name="h_base")
    if h_base.shape != h_talk.shape:
        raise ValueError(f"h_base must have h_talk's shape {tuple(h_talk.shape)}, got {tuple(h_base.shape)}")
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if w.shape != (N,):
        raise ValueError(f"w must be (N={N},), got shape {tuple(w.shape)}")
    if w.device != h_talk.device:
        raise ValueError(f"w is on {w.device} but h_talk is on {h_talk.device}")
    check_ignore_index(ignore_index)
    return N, d, V


def refuse_double_backward(op: str) -> None:
    """First thing in a custom backward that is not itself differentiable: under create_graph=True (grad mode is
    on in the backward) the gradients it returns would be cut off from the graph, so a second derivative (a
    gradient penalty, a Hessian-vector product) would silently be zero. Refused instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}: double backward (create_graph=True) is not supported: its backward is not "
                           "differentiable")


def check_temperature(temperature) -> float:
    """A positive real number (Python or NumPy scalar) as a float; a tensor is refused (reading it would sync)."""
    if isinstance(temperature, torch.Tensor):
        raise TypeError(f"temperature must be a number, not a tensor (pass float(t)); got a {temperature.dtype} "
                        f"tensor of shape {tuple(temperature.shape)}")
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    return float(temperature)


def check_ignore_index(ignore_index) -> int:
    """An integer (Python or NumPy; not bool) as an int."""
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return int(ignore_index)


def banned_id_list(banned_ids, name: str = "banned_ids") -> tuple[int, ...]:
    """Banned ids (a sequence of ints, or a 1-D integer tensor or array: a CUDA tensor is read back, one sync) as a
    tuple of ints without duplicates, in first-occurrence order. A string, a single int, floats, bools (a bool tensor
    is a mask, not ids) and nested sequences are refused, naming `name`, rather than read as something else ("12" as
    ids 1 and 2, [1.7] as 1, a mask as ids 0 and 1)."""
    if isinstance(banned_ids, torch.Tensor) and (banned_ids.dtype == torch.bool or banned_ids.is_floating_point()
                                                 or banned_ids.is_complex()):
        raise TypeError(f"{name} must hold integer ids, got a {banned_ids.dtype} tensor (for a mask over the "
                        "vocabulary pass mask.nonzero()[:, 0])")
    if hasattr(banned_ids, "ndim") and hasattr(banned_ids, "tolist"):           # a torch tensor or NumPy array
        if banned_ids.ndim != 1:
            raise ValueError(f"{name} must be a flat sequence of ids, got shape {tuple(banned_ids.shape)}")
        banned_ids = banned_ids.tolist()
    if isinstance(banned_ids, (str, bytes)) or not isinstance(banned_ids, Iterable):
        raise TypeError(f"{name} must be a sequence of token ids (e.g. (0, 5)), got {type(banned_ids).__name__} "
                        f"{banned_ids!r}")
    ids = list(banned_ids)
    for i in ids:
        if not isinstance(i, numbers.Integral) or isinstance(i, bool):
            raise TypeError(f"{name} must hold int token ids, got {type(i).__name__} {i!r} in {ids!r}")
    return tuple(dict.fromkeys(int(i) for i in ids))


def banned_ids_tensor(banned_ids: Sequence[int] | torch.Tensor, V: int, device) -> torch.Tensor:
    """The banned ids as an int64 tensor on ``device``, without duplicates, checked to lie in [0, V) and to leave
    at least one id (`banned_id_list`: a tensor on a GPU is read back for the checks, one sync)."""
    ids = torch.as_tensor(banned_id_list(banned_ids), dtype=torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise ValueError(f"banned_ids must lie in [0, V={V}), got {ids.tolist()}")
    if ids.numel() >= V:
        raise ValueError(f"banned_ids bans all V={V} ids; nothing would be left to sample")
    return ids.to(device)


def mixed_logprob_ref(h_talk, h_base, w, weight, target, ignore_index=-100):
    """logp[i] = log_softmax((1 - w_i) W h_base_i + w_i W h_talk_i)[target_i], 0 where ignored. float32 (N,)."""
    check_mixed_logprob_inputs(h_talk, h_base, w, weight, target, ignore_index)
    wf = w.float()[:, None]
    logits = (1 - wf) * (h_base.float() @ weight.float().T) + wf * (h_talk.float() @ weight.float().T)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    lp = torch.log_softmax(logits, dim=-1).gather(1, safe[:, None])[:, 0]
    return torch.where(valid, lp, torch.zeros_like(lp))


def token_logprob_ref(h, weight, target, temperature=1.0, banned_ids=()):
    """log_softmax(W h / temperature, banned ids at -inf)[target]. float32 (N,), differentiable."""
    N, d, V = check_lm_head_inputs(h, weight, target)
    temperature = check_temperature(temperature)
    banned = banned_ids_tensor(banned_ids, V, h.device)
    logits = (h.float() @ weight.float().T) / temperature
    if banned.numel():
        logits = logits.index_fill(1, banned, float("-inf"))
    return torch.log_softmax(logits, dim=-1).gather(1, target.long()[:, None])[:, 0]


def sample_thought_tokens_ref(h, weight, temperature=1.0, banned_ids=(), generator=None):
    """One exact sample per row from softmax(W h / temperature) with banned ids excluded. int64 (N,).

    Gumbel-max over the full logits: argmax(z / temperature + G), G ~ Gumbel(0, 1) i.i.d.
    """
    N, d, V = check_lm_head_inputs(h, weight)
    temperature = check_temperature(temperature)
    banned = banned_ids_tensor(banned_ids, V, h.device)
    with torch.no_grad():
        logits = (h.float() @ weight.float().T) / temperature
        if banned.numel():
            logits = logits.index_fill(1, banned, float("-inf"))
        u = torch.rand(logits.shape, generator=generator, device=h.device, dtype=torch.float32)
        gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float32).tiny)))
        return torch.argmax(logits + gumbel, dim=-1)
