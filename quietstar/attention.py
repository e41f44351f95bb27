"""Thought attention plugged into a stock Hugging Face decoder through `AttentionInterface`.

The model is never forked: `register()` adds an attention function named "quietstar", and every
call of `model.model(...)` passes a `qs_layout` keyword (a `Layout`) that reaches the attention
function of every layer. The layout says what the tokens of this call are:

- ``causal``: ordinary text; plain causal attention. A call without a layout (`generate`, a padded
  batch, a KV cache) is exactly transformers' SDPA attention, masks included.
- ``parallel``: [T base tokens | P x T x L chain tokens], chain of pass p, position t, index l at
  T + (p*T + t)*L + l. Base tokens attend causally to base tokens; chain token (p, t, l) attends
  to base tokens 0..t and to chain tokens (p, t, 0..l) (DESIGN.md section 3). One forward over everything.
- ``base`` (with a `ThoughtCache`): the base pass of a step-by-step schedule; causal attention,
  and the layer's base K/V go into the cache.
- ``step`` (with a `ThoughtCache`): P x T chain tokens of chain index `step` ([p, t] order);
  their K/V go into the cache, then each attends to base tokens 0..t and its own chain 0..step.

Packed documents: a layout may carry `Documents` (one per batch: a (B, T) int32 ``doc_start``, the
first position of each position's document). Then every base token and every chain token of position
t attends only to base tokens of t's own document (doc_start[t] <= s <= t), in every mode and backend;
``docs=None`` is one document per row, exactly the code path without it. The masks a backend needs
(the dense T x T base mask, FlexAttention block masks) are built once per batch and kept in it.

Backends (the same math, DESIGN.md section 7): ``reference`` (dense boolean masks + SDPA with K/V expanded),
``flex`` (FlexAttention with a block mask built once per shape), ``triton`` (our kernels), and
``split`` (PyTorch only, no T*L x T*L mask: SDPA of the chain queries over the base keys, an L x L
chain block, merged by log-sum-exp).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels
from kernels import reference as ref

NAME = "quietstar"


# ----------------------------------------------------------------------------------------------
# documents, layout and cache
# ----------------------------------------------------------------------------------------------
class Documents:
    """The packed documents of one batch, shared by every model call and layer of its step.

    doc_start (B, T) int32: the first position of position t's document in its row (quietstar/data.py
    builds it from the packing layout). Masks derived from it are built on first use and cached here,
    so a batch builds each once, whatever the number of layers, steps and passes. A plain class, not a
    dataclass, for the reason ThoughtCache gives: under FSDP2 every layer must see this one object."""

    def __init__(self, doc_start: torch.Tensor):
        ds = doc_start
        if not isinstance(ds, torch.Tensor) or ds.dim() != 2:
            raise ValueError(f"doc_start must be a (B, T) tensor, got {getattr(ds, 'shape', type(ds).__name__)}")
        ref.check_doc_start(ds, ds.shape[0], ds.shape[1], ds.device)
        self.doc_start = ds.to(torch.int32)       # no copy when it is int32 already
        self.cache: dict = {}

    def __repr__(self) -> str:
        return f"Documents(doc_start={tuple(self.doc_start.shape)})"

    def base_mask(self) -> torch.Tensor:
        """(B, 1, T, T) bool for SDPA: causal within documents."""
        if "base" not in self.cache:
            self.cache["base"] = ref.document_mask(self.doc_start)[:, None]
        return self.cache["base"]


class ThoughtCache:
    """Per-layer K/V of the base pass and of the chain steps so far, for step-by-step schedules.

    With gradients (the sequential schedule), chain K/V are kept as per-step lists and stacked, so
    autograd sees every step; without, they are written in place into preallocated buffers
    (B, H_KV, P, T, L, D), the layout the step kernel reads as [pos, step] per pass.

    A plain class on purpose, not a dataclass: FSDP2 rebuilds the dataclasses, dicts and lists it finds in
    a module's inputs when they hold tensors that need gradients, which would hand every decoder layer
    its own copy of the cache (quietstar/parallel.py); an opaque object is passed through as it is.
    """

    def __init__(self, P: int, T: int, L: int):
        self.P, self.T, self.L = P, T, L
        self.base_k: dict = {}
        self.base_v: dict = {}
        self.chain_k: dict = {}
        self.chain_v: dict = {}

    def put_chain(self, layer: int, step: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's chain K/V (B, H_KV, P*T, D); return the caches (B, H_KV, P, T, n, D)."""
        B, H_KV, _, D = k.shape
        k = k.view(B, H_KV, self.P, self.T, D)
        v = v.view(B, H_KV, self.P, self.T, D)
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            ks = self.chain_k.setdefault(layer, [])
            vs = self.chain_v.setdefault(layer, [])
            if len(ks) > step:
                # activation checkpointing recomputes this layer's forward in the backward: the cache
                # already holds every step, the recomputed k/v equal the stored ones (deterministic)
                return torch.stack(ks[:step] + [k], dim=4), torch.stack(vs[:step] + [v], dim=4)
            if len(ks) != step:
                raise RuntimeError(f"chain steps must come in order: layer {layer} has {len(ks)} steps, got step {step}")
            ks.append(k)
            vs.append(v)
            return torch.stack(ks, dim=4), torch.stack(vs, dim=4)
        if layer not in self.chain_k or step == 0:
            self.chain_k[layer] = k.new_empty(B, H_KV, self.P, self.T, self.L, D)
            self.chain_v[layer] = v.new_empty(B, H_KV, self.P, self.T, self.L, D)
        self.chain_k[layer][:, :, :, :, step] = k
        self.chain_v[layer][:, :, :, :, step] = v
        return self.chain_k[layer], self.chain_v[layer]


@dataclass
class Layout:
    """What the tokens of one model call are (see the module docstring)."""
    mode: str                      # "causal" | "parallel" | "base" | "step"
    backend: str = "reference"
    T: int = 0
    L: int = 0
    P: int = 1
    step: int = 0
    cache: ThoughtCache | None = None
    docs: Documents | None = None

    def __post_init__(self):
        if self.mode not in ("causal", "parallel", "base", "step"):
            raise ValueError(f"Layout.mode must be causal, parallel, base or step, got {self.mode!r}")
        if self.backend not in ("reference", "flex", "triton", "split"):
            raise ValueError(f"Layout.backend must be reference, flex, triton or split, got {self.backend!r}")
        if self.mode in ("base", "step") and self.cache is None:
            raise ValueError(f"Layout mode {self.mode!r} needs a ThoughtCache")


# ----------------------------------------------------------------------------------------------
# per-backend primitives
# ----------------------------------------------------------------------------------------------
def causal_attention(q, k, v, scale, docs: Documents | None = None):
    """Causal self-attention with GQA: q (B, H, S, D), k/v (B, H_KV, S, D) -> (B, H, S, D).
    K/V are not expanded to all heads (SDPA's enable_gqa), so the flash kernels run and nothing is copied.
    With `docs`, causal within documents: SDPA with the batch's (B, 1, S, S) mask (built once per batch)."""
    gqa = q.shape[1] != k.shape[1]
    if docs is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=docs.base_mask(), scale=scale, enable_gqa=gqa)


def _split_scores(q, kbx, kcx, scale, docs=None):
    """Masked fp32 scores of the split pattern: base (B, H, T*L, T) and chain (B, H, T, L, L).
    The base mask is the (T, T) causal one, or the batch's cached (B, 1, T, T) document mask,
    broadcast over the L thought steps (no T*L x T mask is built)."""
    B, H, T, L, D = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    sb = torch.matmul(q.reshape(B, H, T * L, D), kbx.transpose(-1, -2)).to(acc) * scale
    if docs is None:    # (t, l) sees s <= t
        base = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[:, None, :]           # (T, 1, T)
    else:               # (t, l) sees doc_start[t] <= s <= t
        base = docs.base_mask()[:, :, :, None, :]                                                # (B, 1, T, 1, T)
    sb = sb.view(B, H, T, L, T).masked_fill(~base, float("-inf")).view(B, H, T * L, T)
    li = torch.arange(L, device=q.device)
    sc = torch.matmul(q, kcx.transpose(-1, -2)).to(acc) * scale
    sc = sc.masked_fill(~(li[None, :] <= li[:, None]), float("-inf"))                      # (t, l) sees (t, m <= l)
    return sb, sc


class SplitThoughtAttention(torch.autograd.Function):
    """Thought attention in plain PyTorch without any mask over T*L keys, and memory-lean like flash
    attention: the base part is a (T*L, T) causal block, the chain part an L x L block per position,
    merged by their log-sum-exps; backward recomputes the scores from (q, k, v, o, lse) instead of
    keeping them (which would cost B*H*T*L*T floats per layer)."""

    @staticmethod
    def forward(ctx, q, kb, vb, kc, vc, scale, docs=None):
        B, H, T, L, D = q.shape
        g = H // kb.shape[1]
        kbx, vbx, kcx, vcx = (ref._expand_kv(x, g) for x in (kb, vb, kc, vc))
        sb, sc = _split_scores(q, kbx, kcx, scale, docs)
        lse = torch.logaddexp(torch.logsumexp(sb, -1), torch.logsumexp(sc, -1).reshape(B, H, T * L))   # (B, H, T*L)
        pb = torch.exp(sb - lse[..., None]).to(q.dtype)
        pc = torch.exp(sc - lse.view(B, H, T, L)[..., None]).to(q.dtype)
        o = torch.matmul(pb, vbx).view(B, H, T, L, D) + torch.matmul(pc, vcx)
        ctx.save_for_backward(q, kb, vb, kc, vc, o, lse)
        ctx.scale, ctx.docs = scale, docs
        return o

    @staticmethod
    def backward(ctx, do):
        q, kb, vb, kc, vc, o, lse = ctx.saved_tensors
        scale = ctx.scale
        B, H, T, L, D = q.shape
        H_KV = kb.shape[1]
        g = H // H_KV
        kbx, vbx, kcx, vcx = (ref._expand_kv(x, g) for x in (kb, vb, kc, vc))
        sb, sc = _split_scores(q, kbx, kcx, scale, ctx.docs)
        pb = torch.exp(sb - lse[..., None])                                   # (B, H, T*L, T) fp32
        pc = torch.exp(sc - lse.view(B, H, T, L)[..., None])                  # (B, H, T, L, L)
        del sb, sc
        do = do.contiguous()
        delta = (do.to(lse.dtype) * o.to(lse.dtype)).sum(-1)                  # (B, H, T, L)
        dof = do.reshape(B, H, T * L, D)
        # dS = P * (dO V^T - delta); dQ = scale dS K; dK = scale dS^T Q; dV = P^T dO
        dsb = pb * (torch.matmul(dof, vbx.transpose(-1, -2)).float() - delta.reshape(B, H, T * L, 1))
        dsc = pc * (torch.matmul(do, vcx.transpose(-1, -2)).float() - delta[..., None])
        dvb = torch.matmul(pb.to(do.dtype).transpose(-1, -2), dof)            # (B, H, T, D)
        dvc = torch.matmul(pc.to(do.dtype).transpose(-1, -2), do)             # (B, H, T, L, D)
        del pb, pc
        dsb, dsc = dsb.to(q.dtype), dsc.to(q.dtype)
        dq = (torch.matmul(dsb, kbx).view(B, H, T, L, D) + torch.matmul(dsc, kcx)) * scale
        dkb = torch.matmul(dsb.transpose(-1, -2), q.reshape(B, H, T * L, D)) * scale
        dkc = torch.matmul(dsc.transpose(-1, -2), q) * scale
        # sum the G query heads of each KV head
        fold = lambda x: x.unflatten(1, (H_KV, g)).sum(2) if g > 1 else x
        return dq, fold(dkb), fold(dvb), fold(dkc), fold(dvc), None, None


def _split_parallel(q, kb, vb, kc, vc, scale, docs: Documents | None = None):
    return SplitThoughtAttention.apply(q, kb, vb, kc, vc, scale, docs)


_FLEX = {}


def _flex_fn():
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention
        import torch._dynamo
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        # Compiled on CUDA (eager flex materialises the scores); on CPU eager keeps tests fast.
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    return _FLEX["fn"]


def _flex_block_mask(T: int, n: int, L_rows: int, device, docs: Documents | None = None):
    """Block mask for queries (t, l) (L_rows per position; l = row index, or fixed step when
    L_rows == 1) over [T base | T*n chain] keys. Built once per shape and cached; with `docs`, the
    base keys also need s >= doc_start[b, t]: a per-row mask, built once per batch and cached in
    `docs`. Its mask_mod is one closure per shape reading a persistent doc_start buffer (compiled
    flex guards on the mask_mod: a closure per batch would recompile every step); the buffer is
    refilled from `docs` on every call, so each call reads its own batch's documents."""
    key = (T, n, L_rows, str(device))
    ds = None
    if docs is not None:
        key += (docs.doc_start.shape[0],)
        ds = _FLEX.setdefault(("doc_start",) + key, torch.zeros_like(docs.doc_start))
        ds.copy_(docs.doc_start)
    if ("mod",) + key not in _FLEX:
        def mask_mod(b, h, q_idx, kv_idx):
            qt = q_idx // L_rows
            ql = (q_idx % L_rows) if L_rows > 1 else (n - 1)
            is_base = kv_idx < T
            ct = (kv_idx - T) // n
            cm = (kv_idx - T) % n
            base_ok = kv_idx <= qt
            if ds is not None:
                base_ok = base_ok & (kv_idx >= ds[b, qt])
            return (is_base & base_ok) | (~is_base & (ct == qt) & (cm <= ql))
        _FLEX[("mod",) + key] = mask_mod
    cache = _FLEX if docs is None else docs.cache
    if key not in cache:
        from torch.nn.attention.flex_attention import create_block_mask
        B = None if ds is None else ds.shape[0]
        cache[key] = create_block_mask(_FLEX[("mod",) + key], B, None, T * L_rows, T + T * n, device=device)
    return cache[key]


def _flex_parallel(q, kb, vb, kc, vc, scale, docs=None):
    B, H, T, L, D = q.shape
    H_KV = kb.shape[1]
    if q.requires_grad and q.device.type == "cpu":
        raise RuntimeError("the flex attention backend cannot train on CPU: FlexAttention has no CPU backward in "
                           "this torch; use attention='reference', 'split' or 'triton' on CPU")
    k = torch.cat([kb, kc.reshape(B, H_KV, T * L, D)], dim=2)
    v = torch.cat([vb, vc.reshape(B, H_KV, T * L, D)], dim=2)
    o = _flex_fn()(q.reshape(B, H, T * L, D).contiguous(), k.contiguous(), v.contiguous(),
                   block_mask=_flex_block_mask(T, L, L, q.device, docs), scale=scale, enable_gqa=H != H_KV)
    return o.view(B, H, T, L, D)


def _flex_step(q, kb, vb, kc, vc, step, scale, docs=None):
    B, H, T, D = q.shape
    H_KV = kb.shape[1]
    if q.requires_grad and q.device.type == "cpu":
        raise RuntimeError("the flex attention backend cannot train on CPU: FlexAttention has no CPU backward in "
                           "this torch; use attention='reference' for the sequential schedule on CPU")
    n = step + 1
    k = torch.cat([kb, kc[:, :, :, :n].reshape(B, H_KV, T * n, D)], dim=2)
    v = torch.cat([vb, vc[:, :, :, :n].reshape(B, H_KV, T * n, D)], dim=2)
    return _flex_fn()(q.contiguous(), k.contiguous(), v.contiguous(),
                      block_mask=_flex_block_mask(T, n, 1, q.device, docs), scale=scale, enable_gqa=H != H_KV)


def _split_step(q, kb, vb, kc, vc, step, scale, docs=None):
    # the step is the parallel pattern's last row of a chain of length step + 1
    n = step + 1
    o = _split_parallel(q.unsqueeze(3).expand(-1, -1, -1, n, -1), kb, vb, kc[:, :, :, :n], vc[:, :, :, :n], scale, docs)
    return o[:, :, :, -1]


def _doc_start(docs: Documents | None):
    return None if docs is None else docs.doc_start


def parallel_fn(backend: str):
    """fn(q, kb, vb, kc, vc, scale, docs) of one backend (docs: Documents or None)."""
    return {"reference": lambda q, kb, vb, kc, vc, s, docs: ref.thought_attention_ref(
                q, kb, vb, kc, vc, scale=s, doc_start=_doc_start(docs)),
            "triton": lambda q, kb, vb, kc, vc, s, docs: kernels.thought_attention(
                q, kb, vb, kc, vc, scale=s, doc_start=_doc_start(docs)),
            "flex": _flex_parallel,
            "split": _split_parallel}[backend]


def step_fn(backend: str):
    """fn(q, kb, vb, kc, vc, step, scale, docs) of one backend."""
    return {"reference": lambda q, kb, vb, kc, vc, st, s, docs: ref.thought_attention_step_ref(
                q, kb, vb, kc, vc, st, scale=s, doc_start=_doc_start(docs)),
            "triton": _triton_step, "flex": _flex_step, "split": _split_step}[backend]


def _triton_step(q, kb, vb, kc, vc, step, scale, docs=None):
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, kb, vb, kc, vc)):
        raise RuntimeError("the triton step kernel has no backward: the sequential schedule needs gradients "
                           "through every step; use attention='reference' or 'flex' with schedule='sequential'")
    return kernels.thought_attention_step(q, kb, vb, kc, vc, step, scale=scale, doc_start=_doc_start(docs))


# ----------------------------------------------------------------------------------------------
# the function registered with transformers
# ----------------------------------------------------------------------------------------------
def attention_dtype(query, key, value) -> torch.dtype:
    """The one dtype the attention backends get. Under autocast RoPE hands over fp32 q and k (the
    residual stream's cos/sin times the bf16 projections) with a bf16 v; SDPA would cast all three to
    the autocast dtype itself, the Triton kernels and FlexAttention need it done: the autocast dtype,
    else the promoted dtype of the three."""
    dev = query.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)


_LAYOUT_MASK: dict = {}


def layout_mask(device) -> torch.Tensor:
    """The attention_mask a Quiet-STaR layout call passes: an empty 4D tensor. transformers returns a 4D mask
    as it is, so no mask is built and the position ids are not inspected for packed sequences (which reads
    them back to the host: a sync per call, and an error inside a CUDA-graph capture); the layout says
    everything the attention needs, and padding is handled by the target mask."""
    key = str(device)
    if key not in _LAYOUT_MASK:
        _LAYOUT_MASK[key] = torch.empty((1, 1, 0, 0), dtype=torch.bool, device=device)
    return _LAYOUT_MASK[key]


def quietstar_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        qs_layout: Layout | None = None, **kwargs):
    """query (B, H, S, D), key/value (B, H_KV, S, D) after RoPE -> (B, S, H, D), None.

    Without a layout (plain use of the decoder: a forward with padding, `generate` with a KV cache) this
    is exactly transformers' own SDPA attention, with the mask transformers built for it (register()
    registers SDPA's mask function too). With a layout, the thought-attention patterns below."""
    if qs_layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        raise ValueError("quietstar attention does not support attention dropout")
    if attention_mask is not None and attention_mask.numel():
        raise ValueError("a Quiet-STaR layout call takes no attention_mask (pass attention.layout_mask(device)): "
                         "padding is handled by the target mask")
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    dt = attention_dtype(query, key, value)
    if (query.dtype, key.dtype, value.dtype) != (dt, dt, dt):
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    lay = qs_layout
    window = kwargs.get("sliding_window")      # passed by Mistral's attention module (None: no window)
    if window is not None:
        span = (lay.T + lay.L if lay.mode == "parallel" else lay.cache.T + lay.step + 1 if lay.mode == "step"
                else query.shape[2])
        if span > window:   # QuietStarModel.check_lengths refuses this earlier; a direct layout call lands here
            raise ValueError(f"a {lay.mode!r} layout call needs a window of at least {span} tokens, but the model has "
                             f"sliding_window={window}, which thought attention does not implement")
    if lay.mode == "causal":
        o = causal_attention(query, key, value, scale, lay.docs)
    elif lay.mode == "base":
        lay.cache.base_k[module.layer_idx] = key
        lay.cache.base_v[module.layer_idx] = value
        o = causal_attention(query, key, value, scale, lay.docs)
    elif lay.mode == "parallel":
        T, L, P = lay.T, lay.L, lay.P
        S = query.shape[2]
        if S != T + P * T * L:
            raise ValueError(f"parallel layout expects T + P*T*L = {T + P * T * L} tokens, got {S}")
        kb, vb = key[:, :, :T], value[:, :, :T]
        outs = [causal_attention(query[:, :, :T], kb, vb, scale, lay.docs)]
        fn = parallel_fn(lay.backend)
        qc = query[:, :, T:].unflatten(2, (P, T, L))                      # (B, H, P, T, L, D) views
        kc = key[:, :, T:].unflatten(2, (P, T, L))
        vc = value[:, :, T:].unflatten(2, (P, T, L))
        for p in range(P):
            outs.append(fn(qc[:, :, p], kb, vb, kc[:, :, p], vc[:, :, p], scale, lay.docs).flatten(2, 3))
        o = torch.cat(outs, dim=2)
    else:  # step
        c = lay.cache
        B, H, S, D = query.shape
        if S != c.P * c.T:
            raise ValueError(f"step layout expects P*T = {c.P * c.T} tokens, got {S}")
        kb, vb = c.base_k[module.layer_idx], c.base_v[module.layer_idx]
        kc, vc = c.put_chain(module.layer_idx, lay.step, key, value)      # (B, H_KV, P, T, n|L, D)
        fn = step_fn(lay.backend)
        qs = query.unflatten(2, (c.P, c.T))                                # (B, H, P, T, D)
        outs = [fn(qs[:, :, p], kb, vb, kc[:, :, p], vc[:, :, p], lay.step, scale, lay.docs) for p in range(c.P)]
        o = torch.cat(outs, dim=2)
    return o.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the "quietstar" attention, with SDPA's mask function, and return its name.

    Plain calls of the decoder thus get the masks stock SDPA gets (causal with a KV-cache offset, padding)
    and SDPA itself. Layout calls pass `layout_mask()` (an empty 4D tensor), which transformers returns
    as it is: no mask is built for them and their position ids (chain positions are not consecutive) are
    not inspected for packed sequences, a host sync per call that would stall the launch-bound sampling
    loop on a GPU and break its CUDA-graph capture."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(NAME, quietstar_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
