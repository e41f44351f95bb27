"""Memory plan for training Mistral-7B with Quiet-STaR: measured on CPU, extrapolated per GPU rank.

    python benchmarks/memory_plan.py                 # measure (a child process per point, ~10-20 min on 2 cores)
    python benchmarks/memory_plan.py --smoke         # tiny shapes, seconds: the same code path

What is measured (one child process per point, so nothing of one point is left in another): a random-init
Mistral with Mistral-7B's layer shape (d=4096, H=32, H_KV=8, D=128, MLP 14336, V=32000, untied head) and
1 or 2 decoder layers, the Quiet-STaR extras, at the paper's thought shape (M=9, K=4, P=2, L=14) and
B=1 row of T tokens, one training step: M no-grad sampling steps, then the forward and backward of the
sample-then-train schedule (the CPU backends: `split` attention, `chunked` LM head), under bf16 autocast
with the parameters themselves in bf16 (what FSDP2's MixedPrecisionPolicy all-gathers: compute never
holds a second, autocast copy of a weight). Gradient buffers exist before the step (as from the step
before), so the step's transient memory is

    transient = peak RSS during the step - RSS before it      (Linux VmHWM, reset via /proc/self/clear_refs)

i.e. activations saved for the backward, the sampling caches and the temporaries of the LM head and
attention. Part of it does not grow with the batch (weight-sized buffers: the chunked LM head's fp32
dW accumulator...): F, measured as 2 t(B=1) - t(B=2) at one T. The rest is per row: with n layers
`r0(T) + n r1(T)` (r1: per decoder layer, r0: embedding, LM head, mixing head, sampling), solved from
n = 1 and 2. T=256 (7,424 trained tokens per row) is too slow on a shared 2-core CPU, so T is 16..128
and fitted by least squares: r1 as a + bT (what a layer keeps for the backward is proportional to its
tokens: all its activations, or with checkpointing only its input), r0 as a + bT + cT^2 (it holds
the transient peak of one layer, whose attention score blocks are quadratic in T); r1's line is
checked by predicting the largest T from the others; both are evaluated at T=128/256/512. RSS moves in steps of glibc's arenas: tens of MiB of noise per point, which matters for
r1 with checkpointing (a few MiB per layer at these T) and is why the fit uses every T.

The plan per GPU rank (FSDP2 over N ranks, fp32 master weights, AdamW, bf16 compute):

    step = 16 B x params / N             fp32 parameters + fp32 gradients + AdamW's two moments, sharded
         + 2 B x (root + 2 layers)       unsharded bf16: the root (embedding, LM head, extras; kept from
                                         forward to backward) and the current + prefetched layer
         + 6 B x max(root, layer)        one group's unsharded bf16 gradient + its fp32 copy to reduce
         + F + B x (r0(T) + 32 r1(T))    activations and temporaries (measured on CPU, above)
    optimizer = 20 B x params / N        AdamW (foreach) holds one more fp32 temporary per parameter
    peak = max(step, optimizer)

Everything but the measured line is counted from parameter counts. Known gaps between the CPU
measurement and a GPU: the GPU runs the Triton attention / LM head (they save less than `split` /
`chunked`: the plan errs high), the CUDA caching allocator's fragmentation (the plan keeps 10% of the
card free), NCCL buffers (hundreds of MB).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MISTRAL_7B = dict(hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336,
                  vocab_size=32000, tie_word_embeddings=False)
SMOKE = dict(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=160, vocab_size=512,
             tie_word_embeddings=False)
THOUGHT = dict(M=9, K=4, P=2)
GIB = 1024 ** 3
GPU_BYTES = 80e9          # an 80 GB card (H100 SXM: 79.6 GiB usable... 80e9 bytes is the marketing number)
HEADROOM = 0.9            # keep 10% of the card for fragmentation, NCCL, the CUDA context


# ----------------------------------------------------------------------------------------------
# one point (child process)
# ----------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_point(shape: dict, layers: int, T: int, B: int, ac: bool) -> dict:
    """One training step's transient memory (bytes) and time at one point: see the module docstring."""
    import torch
    sys.path.insert(0, str(ROOT))
    from quietstar import parallel
    from quietstar.config import LossConfig, ModelConfig, ThoughtConfig
    from quietstar.model import QuietStarModel, build_decoder
    from quietstar.thoughts import Backends, quietstar_forward
    torch.manual_seed(0)
    mc = ModelConfig(num_layers=layers, max_position_embeddings=4096, **shape)
    model = QuietStarModel(build_decoder(mc, dtype=torch.bfloat16), ThoughtConfig(**THOUGHT), marker_init_id=3)
    model.to(torch.bfloat16).train()
    if ac:
        parallel.apply_activation_checkpointing(model)
    for p in model.parameters():                    # the gradient buffers of the step before
        p.grad = torch.zeros_like(p)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(3, shape["vocab_size"], (B, T))
    g = torch.Generator().manual_seed(1)
    rss0 = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:   # reset VmHWM (the peak RSS) to the current RSS
        f.write("5")
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = quietstar_forward(model, ids, None, LossConfig(), "sample-then-train",
                                       Backends("split", "chunked"), g)
        loss.backward()
    secs = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    return {"layers": layers, "T": T, "B": B, "ac": ac, "params": n_params, "rss_before": rss0 * 1024,
            "peak": peak * 1024, "transient": (peak - rss0) * 1024, "secs": secs, "loss": float(loss.detach())}


def run_child(shape_name: str, layers: int, T: int, B: int, ac: bool, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps([shape_name, layers, T, B, ac])]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"point layers={layers} T={T} ac={ac} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# fit and plan
# ----------------------------------------------------------------------------------------------
def fixed_part(points: list[dict], ac: bool) -> float:
    """F: the transient memory that does not grow with B, 2 t(B=1) - t(B=2) at the T measured with B=2
    (the mean over n = 1, 2 layers: it holds weight-sized buffers of the root, not of the layers)."""
    by = {(p["T"], p["layers"], p["B"]): p["transient"] for p in points if p["ac"] == ac}
    fs = [2 * by[(T, n, 1)] - by[(T, n, 2)] for (T, n, B) in by if B == 2 and (T, n, 1) in by]
    if not fs:
        raise ValueError("no B=2 point: F (the part that does not grow with B) cannot be measured")
    return float(np.mean(fs))


def per_layer(points: list[dict], fixed: dict) -> dict:
    """{(T, ac): (r0, r1)} per row: the least-squares line t - F = r0 + n r1 through the B=1 points of
    n = 1, 2 (, 4...) layers at each (T, ac)."""
    by: dict = {}
    for p in points:
        if p["B"] == 1:
            by.setdefault((p["T"], p["ac"]), []).append((p["layers"], p["transient"] - fixed[p["ac"]]))
    out = {}
    for key, nt in by.items():
        if len({n for n, _ in nt}) >= 2:
            r0, r1 = fit_poly([n for n, _ in nt], [t for _, t in nt], 1)[:2]
            out[key] = (float(r0), float(r1))
    return out


def fit_poly(Ts, ys, degree: int = 2) -> np.ndarray:
    """Least-squares coefficients (a, b, c) of a + bT + cT^2 (c = 0 for degree 1)."""
    T = np.asarray(Ts, float)
    A = np.stack([T ** k for k in range(degree + 1)], axis=1)
    return np.concatenate([np.linalg.lstsq(A, np.asarray(ys, float), rcond=None)[0], np.zeros(2 - degree)])



def mistral7b_params(shape: dict, layers: int = 32) -> dict:
    d, H, H_KV, D, F, V = (shape[k] for k in ("hidden_size", "num_heads", "num_kv_heads", "head_dim",
                                             "intermediate_size", "vocab_size"))
    layer = d * (H * D) + 2 * d * (H_KV * D) + (H * D) * d + 3 * d * F + 2 * d     # attention, MLP, 2 norms
    extras = 2 * d + (2 * d * d + d) + (d * d + d) + (d + 1)                       # markers, mixing head
    root = 2 * V * d + d + extras                                                  # embedding, head, final norm
    return {"layer": layer, "root": root, "total": root + layers * layer}


def act_row(fit, T: int, layers: int = 32) -> float:
    """Per-row activation bytes of `layers` layers at base length T from the fits (r0, r1)."""
    r0f, r1f = fit
    return float(np.polyval(r0f[::-1], T) + layers * np.polyval(r1f[::-1], T))


def plan(fits: dict, fixed: dict, shape: dict, layers: int = 32, ranks=(1, 2, 4, 8), batches=(1, 2, 4, 8),
         Ts=(128, 256, 512)) -> list[dict]:
    n = mistral7b_params(shape, layers)
    rows = []
    for N in ranks:
        state = 16 * n["total"] / N
        buffers = 2 * (n["root"] + 2 * n["layer"]) + 6 * max(n["root"], n["layer"])
        optimizer = 20 * n["total"] / N
        for ac in (False, True):
            for T in Ts:
                per_row = act_row(fits[ac], T, layers)
                for B in batches:
                    step = state + buffers + fixed[ac] + B * per_row
                    peak = max(step, optimizer)
                    rows.append({"ranks": N, "B": B, "T": T, "ac": ac, "state_gb": state / 1e9,
                                 "buffers_gb": buffers / 1e9, "act_gb": (fixed[ac] + B * per_row) / 1e9,
                                 "optimizer_gb": optimizer / 1e9, "peak_gb": peak / 1e9,
                                 "fits_80gb": bool(peak <= HEADROOM * GPU_BYTES)})
    return rows


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def write_report(res: dict, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    s = res["shape"]
    L = THOUGHT["M"] + THOUGHT["K"] + 1
    lines = [f"# Memory plan: Quiet-STaR on Mistral-7B, per GPU rank (FSDP2), from CPU measurements",
             "", f"{res['date']} | {res['machine']} | torch {res['torch']} | `python benchmarks/memory_plan.py"
             f"{' --smoke' if res['smoke'] else ''}`", "",
             f"Measured: d={s['hidden_size']}, H={s['num_heads']}/{s['num_kv_heads']}, D={s['head_dim']}, "
             f"MLP {s['intermediate_size']}, V={s['vocab_size']}, 1 and 2 decoder layers, M={THOUGHT['M']} "
             f"K={THOUGHT['K']} P={THOUGHT['P']} (L={L}), B=1, bf16 (autocast, bf16 parameters), `split` attention, "
             "`chunked` LM head, sample-then-train. transient = peak RSS of the step - RSS before it.", "",
             "| layers | B | T | tokens/row T(1+PL) | checkpointing | transient MiB | step s |",
             "|---|---|---|---|---|---|---|"]
    for p in res["points"]:
        lines.append(f"| {p['layers']} | {p['B']} | {p['T']} | {p['T'] * (1 + THOUGHT['P'] * L)} | "
                     f"{'on' if p['ac'] else 'off'} | {p['transient'] / 2**20:.0f} | {p['secs']:.1f} |")
    lines += ["", "F (does not grow with B): " + ", ".join(
        f"checkpointing {'on' if ac == 'True' else 'off'} {v / 2**20:.0f} MiB" for ac, v in res["fixed"].items())
        + ". Per row: r0 (embedding, LM head, mixing head, sampling) and r1 (per decoder layer), MiB; "
          "the least-squares fit on all T, and its prediction of the largest T from the others:", "",
        "| T | checkpointing | r0 | r1 | r1 fitted | r1 predicted without this T |", "|---|---|---|---|---|---|"]
    for r in res["per_layer"]:
        hold = f"{r['r1_holdout'] / 2**20:.1f}" if r.get("r1_holdout") is not None else ""
        lines.append(f"| {r['T']} | {'on' if r['ac'] else 'off'} | {r['r0'] / 2**20:.0f} | {r['r1'] / 2**20:.1f} | "
                     f"{r['r1_fit'] / 2**20:.1f} | {hold} |")
    n = res["params"]
    lines += ["", f"Mistral-7B: {n['total'] / 1e9:.3f} B parameters ({n['layer'] / 1e6:.1f} M per layer, "
              f"{n['root'] / 1e6:.1f} M root incl. the extras). Extrapolated activations per row of 32 layers: "
              + ", ".join(f"T={T}: {res['act_row_gb'][f'{T}/{ac}']:.1f} GB ({'with' if ac else 'without'} "
                          f"checkpointing)" for T in (128, 256) for ac in (False, True)) + ".", "",
              f"Per rank peak (GB) = max(sharded state 16 B x params / N + buffers + F + B x activations, "
              f"AdamW 20 B x params / N); fits = under {HEADROOM:.0%} of 80 GB. Rows: ranks N, columns: B per rank.",
              ""]
    for T in sorted({r["T"] for r in res["plan"]}):
        for ac in (False, True):
            sub = [r for r in res["plan"] if r["T"] == T and r["ac"] == ac]
            Bs = sorted({r["B"] for r in sub})
            lines += [f"**T={T}, activation checkpointing {'on' if ac else 'off'}**", "",
                      "| N ranks | state GB | " + " | ".join(f"B={b}" for b in Bs) + " |",
                      "|---|---|" + "---|" * len(Bs)]
            for N in sorted({r["ranks"] for r in sub}):
                cells = {r["B"]: r for r in sub if r["ranks"] == N}
                lines.append(f"| {N} | {cells[Bs[0]]['state_gb']:.0f} | " + " | ".join(
                    f"{cells[b]['peak_gb']:.0f} {'fits' if cells[b]['fits_80gb'] else 'no'}" for b in Bs) + " |")
            lines.append("")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: the code path in seconds, not a measurement")
    ap.add_argument("--Ts", type=int, nargs="+", default=None, help="base lengths measured (default 16 32 64 128)")
    ap.add_argument("--out", default=str(RESULTS), help="folder of the result files")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per point")
    ap.add_argument("--B2-T", type=int, default=None, help="T of the B=2 points that measure F (default: the 2nd T)")
    ap.add_argument("--reuse", nargs="+", default=(), help="previous result JSONs: their points of the same shape "
                                                            "are not measured again")
    ap.add_argument("--layers-ac", type=int, nargs="+", default=[1, 2],
                    help="layer counts measured with checkpointing (its per-layer memory is small: a longer lever)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        name, layers, T, B, ac = json.loads(args.child)
        import torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
        print(json.dumps(measure_point(SMOKE if name == "smoke" else MISTRAL_7B, layers, T, B, ac)))
        return 0
    if not Path("/proc/self/clear_refs").exists():
        ap.error("needs Linux (/proc/self/clear_refs and VmHWM measure the peak RSS of one step)")
    name = "smoke" if args.smoke else "mistral7b"
    shape = SMOKE if args.smoke else MISTRAL_7B
    Ts = args.Ts or ([8, 16, 32] if args.smoke else [16, 32, 64, 128])
    if len(Ts) < 3:
        ap.error("--Ts: at least 3 base lengths (the fit is a + bT + cT^2)")
    old = {}
    for f in args.reuse:
        prev = json.loads(Path(f).read_text())
        if prev["shape"] == shape:
            old.update({(p["layers"], p["T"], p["B"], p["ac"]): p for p in prev["points"]})
    grid = [(layers, T, 1, ac) for ac in (False, True) for T in Ts for layers in ((1, 2) if not ac else args.layers_ac)]
    grid += [(layers, args.B2_T or Ts[1], 2, ac) for ac in (False, True) for layers in (1, 2)]
    points = []
    for key in grid:
        p = old.get(key) or run_child(name, key[0], key[1], key[2], key[3], args.timeout)
        print(f"layers={key[0]} T={key[1]} B={key[2]} ac={key[3]}: transient {p['transient'] / 2**20:.0f} MiB, "
              f"{p['secs']:.1f} s{' (reused)' if key in old else ''}", flush=True)
        points.append(p)
    fixed = {ac: fixed_part(points, ac) for ac in (False, True)}
    pl = per_layer(points, fixed)
    fits, rows = {}, []
    for ac in (False, True):
        ts = sorted(T for (T, a) in pl if a == ac)
        r0f = fit_poly(ts, [pl[(T, ac)][0] for T in ts])
        r1f = fit_poly(ts, [pl[(T, ac)][1] for T in ts], 1)
        hold = fit_poly(ts[:-1], [pl[(T, ac)][1] for T in ts[:-1]], 1) if len(ts) > 2 else None
        fits[ac] = (r0f, r1f)
        for T in ts:
            rows.append({"T": T, "ac": ac, "r0": pl[(T, ac)][0], "r1": pl[(T, ac)][1],
                         "r1_fit": float(np.polyval(r1f[::-1], T)),
                         "r1_holdout": float(np.polyval(hold[::-1], T)) if hold is not None and T == ts[-1] else None})
    import torch
    n = mistral7b_params(shape)
    res = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "torch": torch.__version__, "smoke": args.smoke, "shape": shape, "thought": THOUGHT, "points": points,
           "per_layer": rows, "fits": {str(ac): [list(map(float, f)) for f in fits[ac]] for ac in fits},
           "fixed": {str(ac): fixed[ac] for ac in fixed}, "params": n,
           "act_row_gb": {f"{T}/{ac}": act_row(fits[ac], T) / 1e9 for T in (128, 256, 512) for ac in (False, True)},
           "plan": plan(fits, fixed, shape)}
    stem = "memory_plan_smoke" if args.smoke else "memory_plan_mistral7b_cpu"
    write_report(res, Path(args.out), stem)
    print((Path(args.out) / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
