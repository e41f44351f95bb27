"""LM head: log-prob of the true token under the mixed prediction, and thought-token sampling (DESIGN.md section 8).

mixed_logprob providers (same inputs, one process, one run):
  naive    full logits: hm = (1 - w) h_base + w h_talk; logits = (hm @ W.T).float();
           log_softmax(logits).gather(target) (the reference's math, with the GEMM in the model dtype
           as a model computes it; kernels.reference.mixed_logprob_ref upcasts to fp32 first)
  chunked  kernels.mixed_logprob_chunked (PyTorch, rows in chunks; skipped if the module is missing)
  liger    liger_kernel LigerFusedLinearCrossEntropyLoss(reduction="none") on the mixed hidden state
  cce      cut_cross_entropy.linear_cross_entropy(hm, W, target, reduction="none") on the mixed state
  ours     kernels.mixed_logprob
  Mixing in logits is linear, so (1 - w) W h_base + w W h_talk = W hm: the same problem for all.
  The mixing (hm) is inside the timed region for the peers (ours fuses it). Liger and CCE return
  -logp; fwd+bwd backpropagates sum(-logp) (Liger's reduction="none" backward expects that).
Sampling providers: naive (full logits + Gumbel-argmax, as sample_thought_tokens_ref), chunked
(kernels.sample_thought_tokens_chunked), ours (kernels.sample_thought_tokens); banned ids = 2 ids.

Shapes: N in {8192, 32768} x (d, V) in {(4096, 32000) Mistral-7B, (576, 49152) SmolLM2}, bf16.
FLOPs (the GEMMs with W; softmax work ignored):
  fwd      = 2*N*d*V            (logits)
  fwd+bwd  = 6*N*d*V            (logits, dH = dZ W, dW = dZ^T H; a recompute of the logits not counted)
  sampling = 2*N*d*V
Reported: median ms (triton.testing.do_bench), TFLOP/s = FLOPs / median, peak extra MiB (growth of
torch.cuda.max_memory_allocated over the allocation before one call), first-call seconds, and the
max |logp - naive logp|.

Modes:
  python benchmarks/bench_lm_head.py [--out DIR] [--cases fwd,fwdbwd,sampling] [--providers ...] [--N 8192]
  python benchmarks/bench_lm_head.py --smoke   # CPU, tiny shapes (TRITON_INTERPRET=1 for ours), checked
  python benchmarks/bench_lm_head.py --cpu     # CPU: chunked vs naive, N=2048 d=576 V=49152 fwd+bwd,
                                               # time and peak RSS, each provider in a fresh subprocess
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported (by kernels)
if "--cpu" in sys.argv or "--cpu-child" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # kernels imports triton; nothing Triton runs here

import triton  # noqa: E402

import kernels  # noqa: E402
from bench_common import Skip, begin_report, environment, measure, sync as _sync  # noqa: E402
from bench_common import fmt as _f  # noqa: E402
from kernels.reference import mixed_logprob_ref  # noqa: E402

LOGPROB_PROVIDERS = ("naive", "chunked", "liger", "cce", "ours")
SAMPLE_PROVIDERS = ("naive", "chunked", "ours")
CASES = ("fwd", "fwdbwd", "sampling")
SHAPES = tuple((N, d, V) for (d, V) in ((4096, 32000), (576, 49152)) for N in (8192, 32768))
SMOKE_SHAPES = ((37, 48, 1003), (64, 32, 515))
BANNED = (1, 2)
IGNORE = -100


# ----------------------------------------------------------------------------------------------
# providers
# ----------------------------------------------------------------------------------------------
def mix(h_talk, h_base, w):
    return (1 - w)[:, None] * h_base + w[:, None] * h_talk


def naive_logprob(h_talk, h_base, w, weight, target, ignore_index=IGNORE):
    logits = (mix(h_talk, h_base, w) @ weight.T).float()                    # (N, V): what the others avoid
    valid = target != ignore_index
    lp = torch.log_softmax(logits, dim=-1).gather(1, torch.where(valid, target, 0)[:, None])[:, 0]
    return torch.where(valid, lp, torch.zeros_like(lp))


def naive_sample(h, weight, temperature, banned_ids, generator):
    logits = (h @ weight.T).float() / temperature
    logits[:, list(banned_ids)] = float("-inf")
    u = torch.rand(logits.shape, generator=generator, device=h.device)
    return torch.argmax(logits - torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float32).tiny))), dim=-1)


def _chunked(name):
    fn = getattr(kernels, name, None)
    if fn is None:
        try:
            import kernels.lm_head_chunked as m
            fn = getattr(m, name)
        except (ImportError, AttributeError) as e:
            raise Skip(f"kernels.{name} not available ({type(e).__name__}: {e})")
    return fn


def logprob_provider(name, device):
    """A callable (h_talk, h_base, w, weight, target) -> logp (N,) (higher is better, 0 if ignored)."""
    if name == "naive":
        return naive_logprob
    if name == "ours":
        return kernels.mixed_logprob
    if name == "chunked":
        return _chunked("mixed_logprob_chunked")
    if name == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except Exception as e:  # noqa: BLE001
            raise Skip(f"liger-kernel not importable ({type(e).__name__}: {str(e)[:80]})")
        if device.type != "cuda":
            raise Skip("liger-kernel needs CUDA")
        loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="none")

        def liger(h_talk, h_base, w, weight, target):
            out = loss(weight, mix(h_talk, h_base, w), target)
            return -(out[0] if isinstance(out, tuple) else out)
        return liger
    if name == "cce":
        try:
            from cut_cross_entropy import linear_cross_entropy
        except Exception as e:  # noqa: BLE001
            raise Skip(f"cut-cross-entropy not importable ({type(e).__name__}: {str(e)[:80]})")
        if device.type != "cuda":
            raise Skip("cut-cross-entropy needs CUDA")

        def cce(h_talk, h_base, w, weight, target):
            return -linear_cross_entropy(mix(h_talk, h_base, w), weight, target, ignore_index=IGNORE,
                                         reduction="none")
        return cce
    raise ValueError(name)


def sample_provider(name):
    if name == "naive":
        return naive_sample
    if name == "ours":
        return kernels.sample_thought_tokens
    if name == "chunked":
        return _chunked("sample_thought_tokens_chunked")
    raise ValueError(name)


# ----------------------------------------------------------------------------------------------
# inputs and measuring
# ----------------------------------------------------------------------------------------------
def make_inputs(N, d, V, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g, device=device)).to(dtype)  # noqa: E731
    target = torch.randint(0, V, (N,), generator=g, device=device)
    target[torch.rand(N, generator=g, device=device) < 0.05] = IGNORE          # some ignored rows
    return {"h_talk": r(N, d), "h_base": r(N, d), "w": (0.5 * torch.rand(N, generator=g, device=device)).to(dtype),
            "weight": r(V, d, scale=d ** -0.5), "target": target}


def flops(case, N, d, V):
    return (6.0 if case == "fwdbwd" else 2.0) * N * d * V


def run_logprob(case, name, x, device, smoke, naive_out):
    N, d = x["h_talk"].shape
    V = x["weight"].shape[0]
    row = {"case": case, "N": N, "d": d, "V": V, "provider": name, "median_ms": None, "tflops": None,
           "peak_mib": None, "first_call_s": None, "max_err_vs_naive": None, "max_err_vs_ref": None,
           "status": "ok"}
    try:
        f = logprob_provider(name, device)
        grad = case == "fwdbwd"
        leaves = [x[k].detach().clone().requires_grad_(grad) for k in ("h_talk", "h_base", "w", "weight")]
        args = (*leaves, x["target"])
        if grad:
            def fn():
                f(*args).sum().backward()     # d(sum logp): a per-row upstream gradient of ones
        else:
            fn = torch.no_grad()(lambda: f(*args))
        t0 = time.perf_counter()    # the very first call: Triton JIT happens here
        with torch.set_grad_enabled(grad):
            out = f(*args)
            grads = None
            if grad:
                out.sum().backward()
        _sync(device)
        first = time.perf_counter() - t0
        if grad:
            grads = [t.grad.detach().clone() for t in leaves]
            for t in leaves:
                t.grad = None
        out = out.detach().float()
        _, ms, peak = measure(fn, device, leaves if grad else [], smoke)
        row.update(first_call_s=round(first, 3), median_ms=round(ms, 4),
                   peak_mib=None if peak is None else round(peak, 1),
                   tflops=round(flops(case, N, d, V) / (ms * 1e-3) / 1e12, 2))
        if naive_out is not None:
            row["max_err_vs_naive"] = float((out - naive_out).abs().max())
        return row, (out, grads)
    except Skip as e:
        row["status"] = f"skipped: {e}"
    except Exception as e:  # noqa: BLE001 - one broken provider must not stop the others
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        row["traceback"] = traceback.format_exc()[-3000:]
    return row, None


def run_sampling(name, x, device, smoke):
    h, weight = x["h_talk"], x["weight"]
    N, d = h.shape
    V = weight.shape[0]
    row = {"case": "sampling", "N": N, "d": d, "V": V, "provider": name, "median_ms": None, "tflops": None,
           "peak_mib": None, "first_call_s": None, "max_err_vs_naive": None, "max_err_vs_ref": None,
           "status": "ok"}
    try:
        f = sample_provider(name)
        gen = torch.Generator(device=device).manual_seed(1)
        with torch.no_grad():
            first, ms, peak = measure(lambda: f(h, weight, 1.0, BANNED, gen), device, [], smoke)
            tokens = f(h, weight, 1.0, BANNED, gen)
            # near-zero temperature: Gumbel noise is negligible, the sample must be the allowed argmax
            greedy = f(h, weight, 1e-4, BANNED, gen)
        row.update(first_call_s=round(first, 3), median_ms=round(ms, 4),
                   peak_mib=None if peak is None else round(peak, 1),
                   tflops=round(flops("sampling", N, d, V) / (ms * 1e-3) / 1e12, 2))
        return row, (tokens, greedy)
    except Skip as e:
        row["status"] = f"skipped: {e}"
    except Exception as e:  # noqa: BLE001
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        row["traceback"] = traceback.format_exc()[-3000:]
    return row, None


def check_logprob(x, result, row, tol=1e-4):
    """Smoke: logp and its grads against kernels.reference.mixed_logprob_ref in float64."""
    out, grads = result
    ins = [x[k].double().requires_grad_(grads is not None) for k in ("h_talk", "h_base", "w", "weight")]
    ref = mixed_logprob_ref(*ins, x["target"])
    err = float((out.double() - ref.detach()).abs().max())
    if grads is not None:
        ref.sum().backward()
        err = max([err] + [float((g.double() - i.grad).abs().max()) for g, i in zip(grads, ins)])
    row["max_err_vs_ref"] = err
    if not err <= tol:
        row["status"] = f"FAILED check: max |logp or grad - ref| = {err:.3g} > {tol}"
        return False
    return True


def check_sample(x, result, row):
    """Smoke: tokens in range and never banned; at temperature 1e-4 exactly the allowed argmax."""
    tokens, greedy = result
    V = x["weight"].shape[0]
    logits = x["h_talk"].double() @ x["weight"].double().T
    logits[:, list(BANNED)] = float("-inf")
    want = logits.argmax(-1)
    problems = []
    if tokens.shape != (x["h_talk"].shape[0],) or tokens.min() < 0 or tokens.max() >= V:
        problems.append("tokens out of range")
    if any(int((tokens == b).sum()) for b in BANNED):
        problems.append("a banned id was sampled")
    mism = int((greedy.cpu() != want.cpu()).sum())
    if mism:
        problems.append(f"{mism} rows differ from the argmax at temperature 1e-4")
    row["max_err_vs_ref"] = float(mism)
    if problems:
        row["status"] = "FAILED check: " + "; ".join(problems)
        return False
    return True


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def write_results(rows, env, out_dir: Path, stem: str):
    lines = begin_report(out_dir, stem, env, rows, "LM head benchmark",
                          f"`{env['ours_mixed_logprob']}` / `{env['ours_sample_thought_tokens']}`",
                          "ms = median of triton.testing.do_bench; TFLOP/s: fwd and sampling 2*N*d*V, fwd+bwd "
                          "6*N*d*V; peak MiB = max_memory_allocated growth during one call (gradients reset before "
                          "it); first s = first call incl. JIT.")
    for case in [c for c in CASES if any(r["case"] == c for r in rows)]:
        sub = [r for r in rows if r["case"] == case]
        provs = [p for p in (SAMPLE_PROVIDERS if case == "sampling" else LOGPROB_PROVIDERS)
                 if any(r["provider"] == p for r in sub)]
        lines += [f"## {case}", "", "| N, d, V | " + " | ".join(f"{p} ms / MiB" for p in provs) + " |",
                  "|---|" + "---|" * len(provs)]
        for key in dict.fromkeys((r["N"], r["d"], r["V"]) for r in sub):
            by = {r["provider"]: r for r in sub if (r["N"], r["d"], r["V"]) == key}
            cells = [(f"{_f(by[p]['median_ms'], '{:.4g}')} / {_f(by[p]['peak_mib'], '{:.0f}')}"
                      if by[p]["median_ms"] is not None else by[p]["status"].split(":")[0]) if p in by else "-"
                     for p in provs]
            lines.append(f"| {key[0]}, {key[1]}, {key[2]} | " + " | ".join(cells) + " |")
        lines += ["", "| N | d | V | provider | ms | TFLOP/s | peak MiB | first s | max err vs naive | "
                  "check vs ref | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sub:
            lines.append(f"| {r['N']} | {r['d']} | {r['V']} | {r['provider']} | {_f(r['median_ms'], '{:.4g}')} | "
                         f"{_f(r['tflops'])} | {_f(r['peak_mib'], '{:.1f}')} | {_f(r['first_call_s'])} | "
                         f"{_f(r['max_err_vs_naive'])} | {_f(r['max_err_vs_ref'])} | {r['status']} |")
        lines.append("")
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------
# --cpu: chunked vs naive on CPU, each provider in a fresh process for an honest peak RSS
# ----------------------------------------------------------------------------------------------
def _vm(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024          # kB -> bytes
    raise RuntimeError(f"{key} not in /proc/self/status")


def cpu_child(provider, N, d, V, reps):
    """Runs in a fresh process: peak RSS growth of one fwd+bwd over the inputs, then timed reps."""
    x = make_inputs(N, d, V, torch.float32, torch.device("cpu"))
    f = {"naive": mixed_logprob_ref, "chunked": _chunked("mixed_logprob_chunked")}[provider]
    leaves = [x[k].requires_grad_() for k in ("h_talk", "h_base", "w", "weight")]
    try:   # reset the peak RSS to the current RSS (Linux >= 4.0), so imports' peaks do not count
        with open("/proc/self/clear_refs", "w") as f_:
            f_.write("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    base_hwm, base_rss = _vm("VmHWM"), _vm("VmRSS")
    t0 = time.perf_counter()
    f(*leaves, x["target"]).sum().backward()
    first = time.perf_counter() - t0
    peak = _vm("VmHWM") - max(base_hwm, base_rss)   # without the reset: a lower bound
    times = []
    for _ in range(reps):
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        f(*leaves, x["target"]).sum().backward()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"provider": provider, "first_s": first, "median_s": statistics.median(times),
                      "times_s": times, "peak_extra_mib": peak / 2**20, "baseline_rss_mib": base_rss / 2**20, "hwm_reset": hwm_reset,
                      "threads": torch.get_num_threads()}))


def cpu_mode(out_dir: Path, N, d, V, reps) -> int:
    env = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "torch": torch.__version__,
           "triton": triton.__version__, "python": platform.python_version(), "host": platform.node(),
           "cpu": platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
           "loadavg_start": os.getloadavg(), "N": N, "d": d, "V": V, "dtype": "float32", "reps": reps,
           "naive": "kernels.reference.mixed_logprob_ref (full fp32 logits)",
           "chunked": "kernels.mixed_logprob_chunked"}
    rows, failed = [], 0
    for provider in ("naive", "chunked"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--cpu-child", provider, "--N", str(N), "--d", str(d),
               "--V", str(V), "--reps", str(reps)]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if res.returncode != 0:
            failed += 1
            rows.append({"provider": provider, "status": f"error (rc={res.returncode}): {res.stderr[-500:]}"})
            print(res.stderr, file=sys.stderr)
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        r["status"] = "ok"
        rows.append(r)
        print(f"{provider:<8} first {r['first_s']:.2f}s median {r['median_s']:.3f}s peak extra {r['peak_extra_mib']:.0f} MiB")
    env["loadavg_end"] = os.getloadavg()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "lm_head_cpu.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    lines = ["# LM head on CPU: chunked PyTorch vs full logits (mixed_logprob fwd+bwd)", "",
             f"date {env['date']} | torch {env['torch']} | python {env['python']} | {env['cpus']} CPUs, "
             f"{env['threads']} torch threads | load average {env['loadavg_start'][0]:.2f} at start, "
             f"{env['loadavg_end'][0]:.2f} at end (a shared machine: busy when well above 0)", "",
             f"N={N}, d={d}, V={V}, float32; each provider in a fresh subprocess; peak extra = VmHWM growth over the "
             f"RSS with the inputs allocated, during the first fwd+bwd; time = median of {reps} fwd+bwd after it.", "",
             "| provider | median s | first s | peak extra MiB | status |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['provider']} | {_f(r.get('median_s'), '{:.3f}')} | {_f(r.get('first_s'), '{:.3f}')} | "
                     f"{_f(r.get('peak_extra_mib'), '{:.0f}')} | {r['status']} |")
    ok = [r for r in rows if r["status"] == "ok"]
    if len(ok) == 2:
        lines += ["", f"chunked / naive: time {ok[1]['median_s'] / ok[0]['median_s']:.2f}x, "
                  f"peak memory {ok[1]['peak_extra_mib'] / max(ok[0]['peak_extra_mib'], 1e-9):.3f}x"]
    (out_dir / "lm_head_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU: every provider path at tiny shapes, checked")
    ap.add_argument("--cpu", action="store_true", help="CPU: chunked vs naive time and peak memory")
    ap.add_argument("--cpu-child", choices=("naive", "chunked"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--providers", default=",".join(LOGPROB_PROVIDERS))
    ap.add_argument("--N", type=int, default=None, help="only this N (default: 8192 and 32768; --cpu: 2048)")
    ap.add_argument("--d", type=int, default=576, help="--cpu only")
    ap.add_argument("--V", type=int, default=49152, help="--cpu only")
    ap.add_argument("--reps", type=int, default=3, help="--cpu only")
    args = ap.parse_args(argv)
    if args.cpu_child:
        cpu_child(args.cpu_child, args.N or 2048, args.d, args.V, args.reps)
        return 0
    if args.cpu:
        return cpu_mode(Path(args.out), args.N or 2048, args.d, args.V, args.reps)

    cases = [c for c in args.cases.split(",") if c]
    providers = [p for p in args.providers.split(",") if p]
    bad = [c for c in cases if c not in CASES] + [p for p in providers if p not in LOGPROB_PROVIDERS]
    if bad:
        ap.error(f"unknown case/provider {bad}")
    cuda = torch.cuda.is_available()
    if not args.smoke and not cuda:
        print("error: the benchmark needs a CUDA GPU; use --smoke or --cpu on CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    smoke = args.smoke
    dtype = torch.float32 if smoke else torch.bfloat16   # bf16 tl.dot is wrong in the interpreter
    stem = "lm_head_smoke" if smoke else "lm_head"
    env = environment(device, smoke, mixed_logprob=kernels.mixed_logprob,
                      sample_thought_tokens=kernels.sample_thought_tokens)
    print(json.dumps(env))
    shapes = SMOKE_SHAPES if smoke else [s for s in SHAPES if args.N is None or s[0] == args.N]
    rows, failed = [], 0
    for case in cases:
        for (N, d, V) in shapes:
            x = make_inputs(N, d, V, dtype, device)
            naive_out = None
            provs = [p for p in providers if p in SAMPLE_PROVIDERS] if case == "sampling" else providers
            if "naive" in provs:
                provs = ["naive"] + [p for p in provs if p != "naive"]
            for p in provs:
                if case == "sampling":
                    row, result = run_sampling(p, x, device, smoke)
                    if smoke and result is not None and not check_sample(x, result, row):
                        failed += 1
                else:
                    row, result = run_logprob(case, p, x, device, smoke, naive_out)
                    if p == "naive" and result is not None:
                        naive_out = result[0]
                    if smoke and result is not None and not check_logprob(x, result, row):
                        failed += 1
                if row["status"].startswith("error"):
                    failed += 1
                    print(row.get("traceback", ""), file=sys.stderr)
                rows.append(row)
                print(f"{case:<8} N={N:<6} d={d:<5} V={V:<6} {p:<8} ms={_f(row['median_ms'], '{:.4g}'):>8} "
                      f"TFLOP/s={_f(row['tflops']):>6} MiB={_f(row['peak_mib'], '{:.0f}'):>6} "
                      f"first={_f(row['first_call_s'])}s err_naive={_f(row['max_err_vs_naive'])} "
                      f"ref={_f(row['max_err_vs_ref'])} {row['status']}", flush=True)
                write_results(rows, env, Path(args.out), stem)
            del x, naive_out
            if cuda:
                torch.cuda.empty_cache()
    print(f"results: {Path(args.out) / stem}.json / .md; {failed} failure(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
