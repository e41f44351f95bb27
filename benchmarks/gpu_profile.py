"""Where the time goes on a GPU, in one short call: per-kernel times and block-size sweeps of our
kernels, and a check of the train-step gradients for non-finite values.

    python3 benchmarks/gpu_profile.py --out "$OUT" [--parts nan,attn,lm] [--budget-s 220]

Parts (each guarded: one that raises is reported and the others go on; a part is skipped once the
time budget is spent):
  nan   the train-step benchmark's model and rows (SmolLM2-135M shape, random init, B=8 T=256, bf16
        autocast): loss and gradients of the reference and the fused path on the same thoughts;
        counts of non-finite gradient entries per parameter, and the gradient cosine over the
        finite entries.
  attn  thought attention fwd+bwd at the paper shape and at B=2 T=1024 (H=32, H_KV=8, D=128, bf16):
        per-kernel CUDA times (torch.profiler), then one launcher's block config at a time swept
        (the others at their defaults), each timed by triton.testing.do_bench (median).
  lm    mixed_logprob fwd+bwd and sampling at N=8192 with (d, V) = (4096, 32000) and (576, 49152) (bf16):
        per-kernel times, the cuBLAS time of one logits GEMM (a third of the fwd+bwd floor), and a sweep
        of the logit chunk size.
Writes OUT/profile.json and prints one line per measurement.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import triton

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

ta = importlib.import_module("kernels.thought_attention")
lmh = importlib.import_module("kernels.lm_head")

RESULTS: dict = {}


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def kernel_times(fn, n_iter=3) -> list[tuple[str, float]]:
    """(kernel name, mean CUDA ms per call) from torch.profiler, largest first."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n_iter):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((e.key[:70], t / 1e3 / n_iter))
    return sorted(rows, key=lambda r: -r[1])[:10]


def log(msg):
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------
def part_nan(args):
    import bench_train_step as bts
    from quietstar import Backends, LossConfig
    from quietstar.thoughts import quietstar_forward, sample_thoughts
    ns = argparse.Namespace(model="smollm2-135m-random", seed=0, M=9, K=4, P=2, B=8, T=256)
    tmp = Path("/tmp/qs_profile")
    tmp.mkdir(exist_ok=True)
    for f in tmp.glob("*"):
        f.unlink()
    dev = torch.device("cuda")
    model, ids, vn, data = bts.build(ns, dev, tmp)
    ac = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    with ac():
        thoughts = sample_thoughts(model, ids, Backends("reference", "reference"),
                                   torch.Generator(device=dev).manual_seed(0))
    out = {"data": data, "valid_frac": float(vn.float().mean())}
    grads = {}
    for name, sched, be in (("fused", "sample-then-train", Backends("triton", "triton")),
                            ("fused-chunked-head", "sample-then-train", Backends("triton", "chunked")),
                            ("reference", "sequential", Backends("reference", "reference"))):
        model.zero_grad(set_to_none=True)
        with ac():
            loss, metrics, _ = quietstar_forward(model, ids, vn, LossConfig(), sched, be, thoughts=thoughts)
        loss.backward()
        bad = {}
        flat = []
        for n, p in model.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            nf = int((~torch.isfinite(g)).sum())
            if nf:
                bad[n] = nf
            flat.append(g.detach().float().flatten())
        grads[name] = torch.cat(flat).cpu()
        out[name] = {"loss": float(loss), "nonfinite_params": len(bad), "nonfinite_entries": sum(bad.values()),
                     "first_bad": dict(list(bad.items())[:6]),
                     "metrics": {k: float(v) for k, v in metrics.items() if torch.is_tensor(v) and v.numel() == 1}}
        log(f"nan: {name}: loss {float(loss):.6f}; non-finite grad entries {sum(bad.values())} in {len(bad)} params "
            f"{list(bad)[:4]}")
        torch.cuda.empty_cache()
    r = grads["reference"]
    for name in ("fused", "fused-chunked-head"):
        g = grads[name]
        ok = torch.isfinite(g) & torch.isfinite(r)
        cos = torch.nn.functional.cosine_similarity(g[ok].double(), r[ok].double(), dim=0).item()
        out[name]["cosine_over_finite"] = cos
        log(f"nan: {name} vs reference: cosine over {int(ok.sum())} finite entries = {cos:.6f}")
    return out


# ----------------------------------------------------------------------------------------------
ATTN_SWEEP = {
    "_fwd_config": [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in
                    ((64, 64, 8, 3), (64, 64, 4, 3), (64, 128, 8, 3), (64, 32, 4, 4), (128, 32, 8, 3),
                     (128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 4, 3), (128, 128, 8, 2))],
    "_bwd_dq_config": [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in
                       ((64, 32, 8, 2), (64, 64, 8, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 32, 8, 3),
                        (64, 128, 8, 2))],
    "_bwd_chain_config": [dict(BLOCK_M=m, num_warps=w, num_stages=2) for m, w in ((32, 8), (32, 4), (64, 8), (64, 4))],
    "_bwd_base_config": [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in
                         ((64, 32, 8, 2), (32, 64, 8, 2), (64, 64, 8, 2), (64, 64, 4, 3), (128, 64, 8, 2),
                          (64, 128, 8, 2), (32, 128, 8, 2))],
}


def part_attn(args, deadline):
    out = {}
    for (B, T, L) in ((8, 256, 14), (2, 1024, 16)):
        H, HK, D = 32, 8, 128
        key = f"B={B} T={T} L={L}"
        g = torch.Generator(device="cuda").manual_seed(0)
        r = lambda *s: torch.randn(*s, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa: E731
        xs = [r(B, H, T, L, D), r(B, HK, T, D), r(B, HK, T, D), r(B, HK, T, L, D), r(B, HK, T, L, D)]
        xs = [x.requires_grad_() for x in xs]
        do = r(B, H, T, L, D)

        def fwdbwd():
            torch.autograd.grad(ta.thought_attention(*xs), xs, do)
        res = {"fwdbwd_ms": bench(fwdbwd), "fwd_ms": bench(lambda: ta.thought_attention_fwd(*[x.detach() for x in xs]))}
        res["kernels"] = kernel_times(fwdbwd)
        log(f"attn {key}: fwd+bwd {res['fwdbwd_ms']:.3f} ms, fwd {res['fwd_ms']:.3f} ms; per kernel: " +
            ", ".join(f"{k.split('(')[0]} {v:.3f}" for k, v in res["kernels"][:6]))
        o, lse = ta.thought_attention_fwd(*[x.detach() for x in xs])
        det = [x.detach() for x in xs]
        sweeps = {}
        for fname, cfgs in ATTN_SWEEP.items():
            orig = getattr(ta, fname)
            for cfg in cfgs:
                if time.time() > deadline:
                    log("attn: budget spent, sweep cut")
                    break
                if fname == "_bwd_chain_config" and cfg["BLOCK_M"] < L:
                    continue
                setattr(ta, fname, lambda *a, _c=cfg: dict(_c))
                tag = f"{fname} {cfg}"
                try:
                    if fname == "_fwd_config":
                        ms = bench(lambda: ta.thought_attention_fwd(*det))
                    else:
                        ms = bench(lambda: ta.thought_attention_bwd(do, *det, o, lse, 1 / D ** 0.5))
                    sweeps[tag] = ms
                    log(f"attn {key} sweep {fname[1:-7]} {cfg}: {ms:.3f} ms ({'fwd' if 'fwd' in fname else 'bwd'})")
                except Exception as e:  # noqa: BLE001
                    sweeps[tag] = f"{type(e).__name__}: {str(e)[:100]}"
                    log(f"attn {key} sweep {fname[1:-7]} {cfg}: {type(e).__name__}")
                finally:
                    setattr(ta, fname, orig)
        res["bwd_default_ms"] = bench(lambda: ta.thought_attention_bwd(do, *det, o, lse, 1 / D ** 0.5))
        log(f"attn {key}: bwd at defaults {res['bwd_default_ms']:.3f} ms")
        res["sweeps"] = sweeps
        out[key] = res
        del xs, do, o, lse, det
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------------------------
def part_lm(args, deadline):
    out = {}
    for N, d, V in ((8192, 4096, 32000), (8192, 576, 49152)):
        key = f"N={N} d={d} V={V}"
        g = torch.Generator(device="cuda").manual_seed(0)
        ht = torch.randn(N, d, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
        hb = torch.randn(N, d, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
        w = (torch.rand(N, device="cuda", generator=g) * 0.5).to(torch.bfloat16).requires_grad_()
        W = (torch.randn(V, d, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02).requires_grad_()
        tgt = torch.randint(0, V, (N,), device="cuda", generator=g)
        gl = torch.randn(N, device="cuda", generator=g)
        leaves = [ht, hb, w, W]

        def fwdbwd():
            torch.autograd.grad(lmh.mixed_logprob(ht, hb, w, W, tgt), leaves, gl)
        res = {"fwdbwd_ms": bench(fwdbwd),
               "fwd_ms": bench(lambda: lmh.mixed_logprob(ht.detach(), hb.detach(), w.detach(), W.detach(), tgt)),
               "sample_ms": bench(lambda: lmh.sample_thought_tokens(hb.detach(), W.detach(), 1.0, (0, 1)))}
        res["kernels"] = kernel_times(fwdbwd)
        log(f"lm {key}: fwd+bwd {res['fwdbwd_ms']:.3f} ms, fwd {res['fwd_ms']:.3f}, sample {res['sample_ms']:.3f}; "
            "per kernel: " + ", ".join(f"{k.split('(')[0][:40]} {v:.3f}" for k, v in res["kernels"][:6]))
        a, b = ht.detach(), W.detach()
        flops = 2 * N * d * V
        res["cublas_ms"] = {"h@W.T (N,V)": bench(lambda: a @ b.T)}
        log(f"lm {key} cuBLAS h@W.T: {res['cublas_ms']['h@W.T (N,V)']:.3f} ms "
            f"({flops / res['cublas_ms']['h@W.T (N,V)'] / 1e9:.0f} TFLOP/s)")
        orig = lmh._CHUNK_BYTES
        sweeps = {}
        for mib in (32, 128, 256):
            if time.time() > deadline:
                log("lm: budget spent, sweep cut")
                break
            lmh._CHUNK_BYTES = mib * 2**20
            try:
                sweeps[f"chunk {mib} MiB"] = ms = bench(fwdbwd)
                log(f"lm {key} chunk {mib} MiB {lmh._chunk_plan(N, V, 2)}: fwd+bwd {ms:.3f} ms")
            except Exception as e:  # noqa: BLE001
                sweeps[f"chunk {mib} MiB"] = f"{type(e).__name__}: {str(e)[:100]}"
                log(f"lm {key} chunk {mib} MiB: {type(e).__name__}: {str(e)[:100]}")
            finally:
                lmh._CHUNK_BYTES = orig
        res["sweeps"] = sweeps
        res["addmm_fp32_out"] = dict(lmh._ADDMM_F32)
        out[key] = res
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="nan,attn,lm")
    ap.add_argument("--budget-s", type=float, default=220)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: gpu_profile needs a CUDA GPU", file=sys.stderr)
        return 2
    t0 = time.time()
    deadline = t0 + args.budget_s
    RESULTS["env"] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                      "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    failed = 0
    for part in args.parts.split(","):
        if time.time() > deadline:
            log(f"{part}: skipped, budget spent")
            continue
        t = time.time()
        try:
            RESULTS[part] = {"nan": lambda: part_nan(args), "attn": lambda: part_attn(args, deadline),
                             "lm": lambda: part_lm(args, deadline)}[part]()
        except Exception as e:  # noqa: BLE001
            failed += 1
            RESULTS[part] = {"error": traceback.format_exc()[-2000:]}
            log(f"{part}: ERROR {type(e).__name__}: {str(e)[:300]}")
        log(f"== {part} done in {time.time() - t:.0f} s")
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "profile.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
