"""Thought attention: ours against dense-mask SDPA, FlexAttention and a no-mask flash proxy (DESIGN.md section 8).

Providers (every one in the same process, same inputs, one run):
  dense  SDPA with a dense boolean mask and K/V expanded to all heads: the reference pattern of
         kernels.reference.thought_attention_ref / _step_ref. The masks and the [base | chain]
         key buffer are built once per shape outside the timing (a model builds them once per
         batch); the K/V expansion (repeat_interleave) is timed, as a model does it every layer.
  flex   torch.nn.attention.flex_attention in torch.compile(dynamic=False), GQA native, block masks
         built once per shape outside the timing (their build time is reported apart), dynamo's
         recompile limits raised. Sampling uses one compiled kernel for all steps: the full
         [base | chain] cache is passed every step and the step is read from a 1-element tensor
         inside mask_mod (filling it is a tiny kernel inside the timed loop).
  proxy  flash SDPA with no mask over the same useful work: causal attention over the T base keys
         for sampling (omits the chain keys: a slight under-count), and a rectangle of T*L queries
         x ceil(useful pairs / (T*L)) keys for the parallel pass. The floor for a flash kernel.
  ours   kernels.thought_attention / kernels.thought_attention_step (the public names, whatever
         they point at; the report says which function that was).
Layouts: peers get the chain cache step-major ([base | step 0 | step 1 ...], so a step's keys are a
prefix); ours gets its native (B, H_KV, T, L, D) [pos, step] tensors. Same values.

Cases: sampling (one call per chain step, steps summed), parallel fwd, bwd (backward of a retained
graph), fwd+bwd. Shapes: every row of DESIGN.md section 8 (H=32, H_KV=8, D=128), the paper's
(B=8, T=256, L=14) and SmolLM2's heads (H=9, H_KV=3, D=64), and packed rows of MATH-length documents
(``doc_len`` tokens each, rows starting at a different offset into the document stream) under
document masking: dense gets the per-row mask, flex a per-row block mask, ours ``doc_start``; the
proxy has no document form (skipped); useful FLOPs count the pairs the document mask keeps.

Useful FLOPs (only unmasked QK^T and PV work; 2*D for QK^T + 2*D for PV per query-key pair):
  parallel:  pairs = B*H * sum_{t<T} sum_{l<L} ((t + 1) + (l + 1)) = B*H*L*T*(T+1)/2 + B*H*T*L*(L+1)/2
             fwd = 4*D*pairs;  bwd = 2.5 * fwd (dQ, dK, dV and the recomputed QK^T, P);  fwd+bwd = 3.5 * fwd
  sampling:  step l (0-based) has B*H*T queries, query t sees t+1 base keys and l+1 chain keys:
             pairs_l = B*H*(T*(T+1)/2 + T*(l+1));  flops = 4*D*sum_{l<L} pairs_l
Reported: median ms of triton.testing.do_bench, useful TFLOP/s = flops / median, peak MiB = growth
of torch.cuda.max_memory_allocated over the allocation before one call, first-call seconds (JIT /
torch.compile included; depends on the caches), and max |provider - dense| on the outputs.

Usage:
  python benchmarks/bench_thought_attention.py [--out benchmarks/results] [--cases sampling,fwd,bwd,fwdbwd]
                                               [--providers dense,flex,proxy,ours] [--shapes SUBSTR]
  python benchmarks/bench_thought_attention.py --smoke     # CPU: every path at tiny shapes, checked
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported (by kernels)

import torch.nn.functional as F  # noqa: E402
import warnings  # noqa: E402

import kernels  # noqa: E402
from bench_common import Skip, begin_report, environment, measure, sync as _sync  # noqa: E402
from bench_common import fmt as _f  # noqa: E402
from kernels.reference import thought_attention_ref, thought_attention_step_ref  # noqa: E402

PROVIDERS = ("dense", "flex", "proxy", "ours")
CASES = ("sampling", "fwdbwd", "fwd", "bwd")


# ----------------------------------------------------------------------------------------------
# workloads
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    T: int
    L: int        # chain length (parallel) or number of sampling steps = L_max (sampling)
    H: int = 32
    H_KV: int = 8
    D: int = 128
    doc_len: int = 0   # packed documents of this many tokens (document masking); 0: one document per row


# most important first: a run cut short by a timeout still has these (results are written row by row)
SAMPLING_SHAPES = (
    Shape("paper B=8 T=256 14 steps", 8, 256, 14),
    Shape("SmolLM2 B=8 T=256 14 steps H=9/3 D=64", 8, 256, 14, 9, 3, 64),
    Shape("B=4 T=256 16 steps", 4, 256, 16),
    Shape("B=2 T=1024 16 steps", 2, 1024, 16),
)
PARALLEL_SHAPES = (
    Shape("paper B=8 T=256 L=14", 8, 256, 14),
    Shape("SmolLM2 B=8 T=256 L=14 H=9/3 D=64", 8, 256, 14, 9, 3, 64),
    Shape("B=4 T=256 L=16", 4, 256, 16),
    Shape("B=2 T=1024 L=16", 2, 1024, 16),
    Shape("B=1 T=2048 L=8", 1, 2048, 8),
)
# the median document of the default corpus (MATH problem + solution + separator): 224 tokens with SmolLM2's
# tokenizer, 221 with Mistral's (mean ~300); a 256-token row holds parts of 2
MATH_DOC = 224
SAMPLING_SHAPES += (
    Shape("paper B=8 T=256 14 steps MATH docs", 8, 256, 14, doc_len=MATH_DOC),
    Shape("SmolLM2 B=8 T=256 14 steps H=9/3 D=64 MATH docs", 8, 256, 14, 9, 3, 64, doc_len=MATH_DOC),
    Shape("B=2 T=1024 16 steps MATH docs", 2, 1024, 16, doc_len=MATH_DOC),
)
PARALLEL_SHAPES += (
    Shape("paper B=8 T=256 L=14 MATH docs", 8, 256, 14, doc_len=MATH_DOC),
    Shape("SmolLM2 B=8 T=256 L=14 H=9/3 D=64 MATH docs", 8, 256, 14, 9, 3, 64, doc_len=MATH_DOC),
    Shape("B=2 T=1024 L=16 MATH docs", 2, 1024, 16, doc_len=MATH_DOC),
)
SMOKE_SAMPLING = (Shape("smoke T=21 4 steps", 1, 21, 4, 4, 2, 16), Shape("smoke T=13 3 steps H=3/1", 2, 13, 3, 3, 1, 16),
                  Shape("smoke T=37 3 steps docs of 9", 2, 37, 3, 4, 2, 16, doc_len=9))
SMOKE_PARALLEL = (Shape("smoke T=19 L=5", 1, 19, 5, 4, 2, 16), Shape("smoke T=11 L=3 H=3/1", 2, 11, 3, 3, 1, 16),
                  Shape("smoke T=37 L=3 docs of 9", 2, 37, 3, 4, 2, 16, doc_len=9))


def doc_start(s: Shape, device="cpu"):
    """(B, T) int32 for packed documents of s.doc_len tokens, row b entering the stream at offset 37*b; None
    when s.doc_len == 0."""
    if not s.doc_len:
        return None
    t = torch.arange(s.T, device=device)[None, :]
    off = (37 * torch.arange(s.B, device=device)[:, None]) % s.doc_len
    return (((t + off) // s.doc_len) * s.doc_len - off).clamp_min(0).to(torch.int32)


def _base_keys(s: Shape) -> int:
    """Base (query position, key) pairs per (b, h) summed over b: causal, within documents."""
    ds = doc_start(s)
    if ds is None:
        return s.B * s.T * (s.T + 1) // 2
    return int((torch.arange(s.T)[None, :] - ds + 1).sum())


def parallel_pairs(s: Shape) -> int:
    return s.H * (s.L * _base_keys(s) + s.B * s.T * s.L * (s.L + 1) // 2)


def sampling_pairs(s: Shape) -> int:
    return sum(s.H * (_base_keys(s) + s.B * s.T * (l + 1)) for l in range(s.L))


def useful_flops(case: str, s: Shape) -> float:
    if case == "sampling":
        return 4.0 * s.D * sampling_pairs(s)
    fwd = 4.0 * s.D * parallel_pairs(s)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwdbwd": 3.5 * fwd}[case]


# ----------------------------------------------------------------------------------------------
# inputs, masks
# ----------------------------------------------------------------------------------------------
def make_inputs(s: Shape, case: str, dtype, device, seed=0):
    """Canonical inputs: q (B,H,T,L,D) [or (L,B,H,T,D) per-step queries], k/v_base, k/v_chain (B,H_KV,T,L,D)."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
    B, T, L, H, HK, D = s.B, s.T, s.L, s.H, s.H_KV, s.D
    q = r(L, B, H, T, D) if case == "sampling" else r(B, H, T, L, D)
    return {"q": q, "k_base": r(B, HK, T, D), "v_base": r(B, HK, T, D),
            "k_chain": r(B, HK, T, L, D), "v_chain": r(B, HK, T, L, D)}


def step_major(base, chain):
    """[base | chain step 0 | chain step 1 | ...]: (B, H_KV, T + L*T, D); a step's keys are a prefix."""
    B, HK, T, L, D = chain.shape
    return torch.cat([base, chain.transpose(2, 3).reshape(B, HK, L * T, D)], dim=2).contiguous()


def pos_major(base, chain):
    """[base | chain (0,0) (0,1) .. (T-1,L-1)]: (B, H_KV, T + T*L, D), the reference's key order."""
    B, HK, T, L, D = chain.shape
    return torch.cat([base, chain.reshape(B, HK, T * L, D)], dim=2).contiguous()


def sampling_dense_mask(T, n, device, ds=None):
    """(T, T + n*T) for step-major keys: base s <= t, chain (m, s) with s == t (m < n); with doc_start ds
    (B, T): (B, 1, T, T + n*T), base keys also s >= ds[t]."""
    t = torch.arange(T, device=device)
    base = t[None, :] <= t[:, None]
    chain = t[:, None] == t.repeat(n)[None, :]
    if ds is None:
        return torch.cat([base, chain], dim=1)
    B = ds.shape[0]
    return torch.cat([kernels.reference.document_mask(ds), chain[None].expand(B, -1, -1)], dim=2)[:, None]


def _expand(x, g):
    return x.repeat_interleave(g, dim=1) if g > 1 else x


# ----------------------------------------------------------------------------------------------
# providers: setup() builds layouts/masks outside the timing and returns a state with
#   run() -> output (canonical shape), leaves (grad inputs), grads() -> canonical 5 grads
# ----------------------------------------------------------------------------------------------
_FLEX = {}


def flex_compiled(smoke: bool):
    from torch.nn.attention.flex_attention import flex_attention
    if smoke:
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")   # inductor's CPU compile of flex takes ~30 s: smoke runs the same mask_mod/block mask eagerly
        return flex_attention
    if "fn" not in _FLEX:
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(int(getattr(cfg, name)), 1024))
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def make_proxy(k, v, causal):
    """Flash SDPA without a mask as fn(q). GQA by flash itself when it accepts enable_gqa (probed once
    here, not in the timed loop), else by expanding K/V to all heads first."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if not k.is_cuda:   # CPU (smoke): whatever backend SDPA picks
        return lambda q: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    def gqa(q):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    def expanded(q):
        g = q.shape[1] // k.shape[1]
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, _expand(k, g), _expand(v, g), is_causal=causal)
    try:
        with torch.no_grad():
            gqa(torch.zeros(k.shape[0], 2 * k.shape[1], 1, k.shape[-1], device=k.device, dtype=k.dtype))
        return gqa
    except RuntimeError:
        return expanded


# One mask_mod closure (and block mask) per shape, shared by every case and call: torch.compile guards
# on the mask_mod's identity, so a new closure per setup would recompile flex for each case.
_MASKS = {}


def parallel_block_mask(T, L, device, ds=None):
    key = ("parallel", T, L, str(device), None if ds is None else ds.shape[0])
    if key not in _MASKS:
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, qi, kv):       # query (t, l) = qi; keys [base 0..T-1 | chain (s, m) at T + s*L + m]
            t, l = qi // L, qi % L
            c = kv - T
            base = kv <= t if ds is None else (kv <= t) & (kv >= ds[b, t])
            return torch.where(kv < T, base, ((c // L) == t) & ((c % L) <= l))
        t0 = time.perf_counter()
        bm = create_block_mask(mask_mod, None if ds is None else ds.shape[0], None, T * L, T + T * L, device=device)
        _sync(torch.device(device))
        _MASKS[key] = (bm, time.perf_counter() - t0)
    return _MASKS[key]


def sampling_block_masks(T, L, device, ds=None):
    """(step_buf, [block mask of step l], build s): one mask_mod for all steps, the step read from step_buf."""
    key = ("sampling", T, L, str(device), None if ds is None else ds.shape[0])
    if key not in _MASKS:
        from torch.nn.attention.flex_attention import create_block_mask
        step_buf = torch.zeros((), dtype=torch.int32, device=device)

        def mask_mod(b, h, qi, kv):       # keys [base | step 0 | step 1 ...], chain (m, s) at T + m*T + s
            c = kv - T
            base = kv <= qi if ds is None else (kv <= qi) & (kv >= ds[b, qi])
            return torch.where(kv < T, base, ((c % T) == qi) & ((c // T) <= step_buf))
        masks, t0 = [], time.perf_counter()
        for l in range(L):
            step_buf.fill_(l)
            masks.append(create_block_mask(mask_mod, None if ds is None else ds.shape[0], None, T, T + L * T,
                                           device=device))
        _sync(torch.device(device))
        _MASKS[key] = (step_buf, masks, time.perf_counter() - t0)
    return _MASKS[key]


class State:
    def __init__(self, run, leaves=(), grads=None, mask_build_s=None, note=""):
        self.run, self.leaves, self.grads, self.mask_build_s, self.note = run, list(leaves), grads, mask_build_s, note


def setup_parallel(provider, x, s: Shape, need_grad: bool, smoke: bool) -> State:
    B, T, L, H, HK, D = s.B, s.T, s.L, s.H, s.H_KV, s.D
    g = H // HK
    ds = doc_start(s, x["q"].device)
    leaf = lambda t: t.detach().clone().requires_grad_(need_grad)  # noqa: E731
    if provider == "ours":
        ins = [leaf(x[n]) for n in ("q", "k_base", "v_base", "k_chain", "v_chain")]
        docs = {} if ds is None else {"doc_start": ds}
        return State(lambda: kernels.thought_attention(*ins, **docs), ins, lambda: [t.grad for t in ins])
    if provider == "proxy" and ds is not None:
        raise Skip("no document-masked proxy")
    if provider in ("dense", "flex"):
        q = leaf(x["q"].reshape(B, H, T * L, D))
        k, v = leaf(pos_major(x["k_base"], x["k_chain"])), leaf(pos_major(x["v_base"], x["v_chain"]))

        def grads():   # back to the canonical (q, k_base, v_base, k_chain, v_chain) layout
            kb, kc = k.grad[:, :, :T], k.grad[:, :, T:].reshape(B, HK, T, L, D)
            vb, vc = v.grad[:, :, :T], v.grad[:, :, T:].reshape(B, HK, T, L, D)
            return [q.grad.reshape(B, H, T, L, D), kb, vb, kc, vc]
        t0 = time.perf_counter()
        if provider == "dense":
            mask = kernels.reference.thought_attention_mask(T, L, q.device, ds)   # ((B,) T*L, T + T*L)
            if ds is not None:
                mask = mask[:, None]
            _sync(q.device)
            build = time.perf_counter() - t0

            def run():
                o = F.scaled_dot_product_attention(q, _expand(k, g), _expand(v, g), attn_mask=mask)
                return o.reshape(B, H, T, L, D)
            return State(run, [q, k, v], grads, build)
        bm, build = parallel_block_mask(T, L, q.device, ds)    # build time of its first construction
        fx = flex_compiled(smoke)
        run = lambda: fx(q, k, v, block_mask=bm, enable_gqa=True).reshape(B, H, T, L, D)  # noqa: E731
        return State(run, [q, k, v], grads, build)
    if provider == "proxy":
        pairs_per_query = math.ceil(parallel_pairs(s) / (B * H * T * L))
        q = leaf(x["q"].reshape(B, H, T * L, D))
        k = leaf(torch.randn(B, HK, pairs_per_query, D, device=q.device, dtype=q.dtype))
        v = leaf(torch.randn_like(k))
        proxy = make_proxy(k, v, causal=False)
        return State(lambda: proxy(q), [q, k, v], None, None,
                     f"rectangle {T * L} x {pairs_per_query} keys; flash {proxy.__name__}")
    raise ValueError(provider)


def setup_sampling(provider, x, s: Shape, smoke: bool) -> State:
    B, T, L, H, HK, D = s.B, s.T, s.L, s.H, s.H_KV, s.D
    g = H // HK
    qs = x["q"]                                         # (L, B, H, T, D): the queries of each step
    ds = doc_start(s, qs.device)
    if provider == "ours":
        kb, vb, kc, vc = (x[n].contiguous() for n in ("k_base", "v_base", "k_chain", "v_chain"))
        docs = {} if ds is None else {"doc_start": ds}

        def run():
            return [kernels.thought_attention_step(qs[l], kb, vb, kc, vc, l, **docs) for l in range(L)]
        return State(run)
    if provider == "proxy" and ds is not None:
        raise Skip("no document-masked proxy")
    if provider == "proxy":
        kb, vb = x["k_base"].contiguous(), x["v_base"].contiguous()
        proxy = make_proxy(kb, vb, causal=True)
        return State(lambda: [proxy(qs[l]) for l in range(L)],
                     note=f"causal over the T base keys only; flash {proxy.__name__}")
    K, V = step_major(x["k_base"], x["k_chain"]), step_major(x["v_base"], x["v_chain"])   # (B, HK, T + L*T, D)
    t0 = time.perf_counter()
    if provider == "dense":
        masks = [sampling_dense_mask(T, l + 1, qs.device, ds) for l in range(L)]
        _sync(qs.device)
        build = time.perf_counter() - t0

        def run():
            outs = []
            for l in range(L):
                n = T + (l + 1) * T          # prefix of the step-major cache: a view, no copy
                outs.append(F.scaled_dot_product_attention(
                    qs[l], _expand(K[:, :, :n], g), _expand(V[:, :, :n], g), attn_mask=masks[l]))
            return outs
        return State(run, mask_build_s=build)
    if provider == "flex":
        step_buf, masks, build = sampling_block_masks(T, L, qs.device, ds)
        fx = flex_compiled(smoke)

        def run():
            outs = []
            for l in range(L):
                step_buf.fill_(l)
                outs.append(fx(qs[l], K, V, block_mask=masks[l], enable_gqa=True))
            return outs
        return State(run, mask_build_s=build)
    raise ValueError(provider)


def run_one(case, provider, s, x, device, smoke, dense_out):
    """One (case, shape, provider) row. dense_out: the dense provider's output for the error column."""
    row = {"case": case, "shape": s.name, **{k: v for k, v in asdict(s).items() if k != "name"},
           "provider": provider, "median_ms": None, "tflops": None, "peak_mib": None, "first_call_s": None,
           "mask_build_s": None, "max_err_vs_dense": None, "max_err_vs_ref": None, "status": "ok", "note": ""}
    need_grad = case in ("bwd", "fwdbwd")
    if smoke and provider == "flex" and need_grad and device.type == "cpu":
        row["status"] = "skipped: flex backward: no CPU backward in torch 2.13 (NotImplementedError)"
        return row, None
    try:
        st = (setup_sampling(provider, x, s, smoke) if case == "sampling"
              else setup_parallel(provider, x, s, need_grad, smoke))
        row["mask_build_s"], row["note"] = st.mask_build_s, st.note
        t0 = time.perf_counter()    # the very first call: JIT / torch.compile happen here
        with torch.set_grad_enabled(need_grad):
            out = st.run()
        _sync(device)
        first_fwd = time.perf_counter() - t0
        if isinstance(out, list):   # sampling: one output per step; stacked outside the timing
            out = torch.stack(out)
        dout, derived = None, None
        if not need_grad:
            fn, leaves = torch.no_grad()(lambda: st.run()), []
            first_call = first_fwd
        else:
            dout, leaves = torch.randn_like(out), st.leaves

            def fn_fwdbwd():
                st.run().backward(dout)
            t0 = time.perf_counter()
            out.backward(dout, retain_graph=case == "bwd")
            _sync(device)
            first_call = first_fwd + time.perf_counter() - t0
        res_grads = [gr.detach().clone() for gr in st.grads()] if (need_grad and st.grads) else None
        if case == "fwdbwd":
            fn = fn_fwdbwd
        elif case == "bwd":   # the backward of one retained graph
            def fn():
                out.backward(dout, retain_graph=True)
            try:
                fn()   # some compiled backwards refuse a second call on a retained graph
            except RuntimeError as e:
                derived = f"bwd = (fwd+bwd) - fwd: a retained backward raised {str(e).splitlines()[0][:120]}"
        out_cmp = out.detach()
        for t in st.leaves:
            t.grad = None
        if derived is None:
            _, ms, peak = measure(fn, device, leaves, smoke)
        else:
            _, ms_fb, peak = measure(fn_fwdbwd, device, leaves, smoke)
            _, ms_f, _ = measure(lambda: st.run(), device, [], smoke)
            ms = ms_fb - ms_f
            row["note"] = (row["note"] + "; " if row["note"] else "") + derived
        row.update(first_call_s=round(first_call, 3), median_ms=round(ms, 4),
                   peak_mib=None if peak is None else round(peak, 1))
        row["tflops"] = round(useful_flops(case, s) / (ms * 1e-3) / 1e12, 2)
        if provider != "proxy" and dense_out is not None:
            row["max_err_vs_dense"] = float((out_cmp.float() - dense_out.float()).abs().max())
        return row, (out_cmp, res_grads, dout)
    except Skip as e:
        row["status"] = f"skipped: {e}"
    except Exception as e:  # noqa: BLE001 - one broken provider must not stop the others
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        row["traceback"] = traceback.format_exc()[-3000:]
    return row, None


def reference_check(case, s, x, result, row, tol):
    """Smoke: compare a provider's output (and its five input grads) with kernels.reference in float64."""
    out, grads, dout = result
    ds = doc_start(s, out.device)
    if case == "sampling":
        xs = {k: v.double() for k, v in x.items()}
        ref = torch.stack([thought_attention_step_ref(xs["q"][l], xs["k_base"], xs["v_base"], xs["k_chain"],
                                                      xs["v_chain"], l, doc_start=ds) for l in range(s.L)])
        err = float((out.double() - ref).abs().max())
    else:
        ins = [x[n].double().requires_grad_() for n in ("q", "k_base", "v_base", "k_chain", "v_chain")]
        ref = thought_attention_ref(*ins, doc_start=ds)
        err = float((out.double() - ref.detach()).abs().max())
        if grads is not None:
            ref.backward(dout.double())
            err = max([err] + [float((g.double() - i.grad).abs().max()) for g, i in zip(grads, ins)])
    row["max_err_vs_ref"] = err
    if not err <= tol:
        row["status"] = f"FAILED check: max |out or grad - ref| = {err:.3g} > {tol}"
        return False
    return True


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def write_results(rows, env, out_dir: Path, stem: str):
    lines = begin_report(out_dir, stem, env, rows, "Thought attention benchmark",
                          f"`{env['ours_thought_attention']}` / `{env['ours_thought_attention_step']}`",
                          "ms = median of triton.testing.do_bench; TFLOP/s = useful FLOPs (unmasked QK^T and PV "
                          "only, see the script's docstring) / median; peak MiB = max_memory_allocated growth during "
                          "one call (gradients reset before it); first s = first call incl. compile; mask s = "
                          "block/dense mask build time, outside the timing.")
    cases = [c for c in CASES if any(r["case"] == c for r in rows)]
    for case in cases:
        sub = [r for r in rows if r["case"] == case]
        provs = [p for p in PROVIDERS if any(r["provider"] == p for r in sub)]
        lines += [f"## {case}", "", "| shape | " + " | ".join(f"{p} ms" for p in provs) + " | ours / best peer |",
                  "|---|" + "---|" * (len(provs) + 1)]
        for shape in dict.fromkeys(r["shape"] for r in sub):
            by = {r["provider"]: r for r in sub if r["shape"] == shape}
            cells = [_f(by[p]["median_ms"], "{:.4g}") if p in by else "-" for p in provs]
            peers = [by[p]["median_ms"] for p in ("dense", "flex") if p in by and by[p]["median_ms"]]
            ours = by.get("ours", {}).get("median_ms")
            ratio = f"{ours / min(peers):.2f}x" if ours and peers else "-"
            lines.append(f"| {shape} | " + " | ".join(cells) + f" | {ratio} |")
        lines += ["", "| shape | provider | ms | TFLOP/s | peak MiB | first s | mask s | max err vs dense | "
                  "max err vs ref | status | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sub:
            lines.append(f"| {r['shape']} | {r['provider']} | {_f(r['median_ms'], '{:.4g}')} | {_f(r['tflops'])} | "
                         f"{_f(r['peak_mib'], '{:.1f}')} | {_f(r['first_call_s'])} | {_f(r['mask_build_s'])} | "
                         f"{_f(r['max_err_vs_dense'])} | {_f(r['max_err_vs_ref'])} | {r['status']} | {r['note']} |")
        lines.append("")
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")


def compile_only(cases, providers, shape_filter, device, smoke) -> int:
    """First calls only (compile / JIT), untimed; returns the number of paths that raised."""
    dtype = torch.float32 if smoke else torch.bfloat16
    failed = 0
    for case in cases:
        shapes = (SMOKE_SAMPLING if case == "sampling" else SMOKE_PARALLEL) if smoke else \
                 (SAMPLING_SHAPES if case == "sampling" else PARALLEL_SHAPES)
        for s in shapes:
            if shape_filter and shape_filter not in s.name:
                continue
            x = make_inputs(s, case, dtype, device)
            for provider in providers:
                if smoke and provider == "flex" and case in ("bwd", "fwdbwd") and device.type == "cpu":
                    continue
                need_grad = case in ("bwd", "fwdbwd")
                t0 = time.perf_counter()
                try:
                    st = (setup_sampling(provider, x, s, smoke) if case == "sampling"
                          else setup_parallel(provider, x, s, need_grad, smoke))
                    with torch.set_grad_enabled(need_grad):
                        out = st.run()
                    if need_grad:
                        out.backward(torch.randn_like(out))
                    _sync(device)
                    status = "compiled"
                except Exception as e:  # noqa: BLE001 - the timed run reports it properly
                    failed += 1
                    status = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                print(f"compile-only {case:<9} {s.name:<40} {provider:<5} {time.perf_counter() - t0:6.1f}s {status}",
                      flush=True)
            del x
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU: every provider path at tiny shapes, checked")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--shapes", default="", help="only shapes whose name contains this substring")
    ap.add_argument("--compile-only", action="store_true",
                    help="GPU: only the first call (and backward) of flex and ours per selected case and shape, "
                         "untimed, nothing written: fills torch.compile's and Triton's on-disk caches, e.g. in "
                         "the background while other work runs (the GPU suite does this during its tests)")
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    providers = [p for p in args.providers.split(",") if p]
    bad = [c for c in cases if c not in CASES] + [p for p in providers if p not in PROVIDERS]
    if bad:
        ap.error(f"unknown case/provider {bad}")
    cuda = torch.cuda.is_available()
    if not args.smoke and not cuda:
        print("error: the benchmark needs a CUDA GPU; use --smoke on CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    smoke = args.smoke
    if args.compile_only:
        return compile_only(cases, [p for p in providers if p in ("flex", "ours")], args.shapes, device, smoke)
    dtype = torch.float32 if smoke else torch.bfloat16     # bf16 tl.dot is wrong in the interpreter
    stem = "thought_attention_smoke" if smoke else "thought_attention"
    env = environment(device, smoke, thought_attention=kernels.thought_attention,
                      thought_attention_step=kernels.thought_attention_step)
    print(json.dumps(env))
    rows, failed = [], 0
    skipped_paths = []
    if smoke:
        skipped_paths.append("flex backward (bwd, fwdbwd): no CPU backward in torch 2.13 (NotImplementedError)")
        skipped_paths.append("flex torch.compile: inductor's CPU compile of flex takes ~30 s; smoke runs flex eagerly")
        if not cuda:
            skipped_paths.append("proxy flash backend forcing and do_bench/peak memory: need CUDA (CPU SDPA and "
                                 "one perf_counter call instead)")
    for case in cases:
        shapes = (SMOKE_SAMPLING if case == "sampling" else SMOKE_PARALLEL) if smoke else \
                 (SAMPLING_SHAPES if case == "sampling" else PARALLEL_SHAPES)
        for s in shapes:
            if args.shapes and args.shapes not in s.name:
                continue
            x = make_inputs(s, case, dtype, device)
            dense_out = None
            order = ["dense"] + [p for p in providers if p != "dense"] if "dense" in providers else providers
            for provider in order:
                row, result = run_one(case, provider, s, x, device, smoke, dense_out)
                if provider == "dense" and result is not None:
                    dense_out = result[0]
                if smoke and result is not None and provider != "proxy":
                    if not reference_check(case, s, x, result, row, tol=2e-4):
                        failed += 1
                if row["status"].startswith("error"):
                    failed += 1
                    print(row.get("traceback", ""), file=sys.stderr)
                rows.append(row)
                print(f"{case:<9} {s.name:<40} {provider:<6} ms={_f(row['median_ms'], '{:.4g}'):>8} "
                      f"TFLOP/s={_f(row['tflops']):>6} MiB={_f(row['peak_mib'], '{:.0f}'):>6} "
                      f"first={_f(row['first_call_s'])}s err_dense={_f(row['max_err_vs_dense'])} "
                      f"err_ref={_f(row['max_err_vs_ref'])} {row['status']}", flush=True)
                write_results(rows, {**env, "skipped_paths": skipped_paths}, Path(args.out), stem)
            del x, dense_out
            if cuda:
                torch.cuda.empty_cache()
    if skipped_paths:
        print("skipped paths:\n  " + "\n  ".join(skipped_paths))
    print(f"results: {Path(args.out) / stem}.json / .md; {failed} failure(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
