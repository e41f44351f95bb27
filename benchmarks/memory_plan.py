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
attention. With n layers it is `c0(T) + n c1(T)` (c1: per decoder layer, c0: embedding, LM head,
mixing head, sampling), solved from n = 1 and 2. T=256 (7,424 trained tokens per row) is too slow on
a shared 2-core CPU, so T is 16..128 and c0, c1 are fitted as a + bT + cT^2 (the split attention's
score blocks are quadratic in T; everything else linear), checked by leaving the largest T out, and
evaluated at T=256/512.

The plan per GPU rank (FSDP2 over N ranks, fp32 master weights, AdamW, bf16 compute):

    peak = 16 B x params / N             fp32 parameters + fp32 gradients + AdamW's two moments, sharded
         + 2 B x (root + 2 layers)       unsharded bf16: the root (embedding, LM head, extras; kept from
                                         forward to backward) and the current + prefetched layer
         + 4 B x 1 layer                 one layer's fp32 gradient before its reduce-scatter
         + B x (c0(T) + 32 c1(T))        this rank's rows' activations (measured on CPU, above)

Everything but the last line is counted from parameter counts (exact). Known gaps between the CPU
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
def per_layer(points: list[dict]) -> dict:
    """{(T, ac): (c0, c1)} from the n = 1 and n = 2 points at each (T, ac)."""
    by = {(p["T"], p["ac"], p["layers"]): p["transient"] / p["B"] for p in points}
    out = {}
    for (T, ac, n) in by:
        if n == 1 and (T, ac, 2) in by:
            c1 = by[(T, ac, 2)] - by[(T, ac, 1)]
            out[(T, ac)] = (by[(T, ac, 1)] - c1, c1)
    return out


def fit_quadratic(Ts, ys) -> np.ndarray:
    """Least-squares a + bT + cT^2 (exact through 3 points)."""
    A = np.stack([np.ones(len(Ts)), np.asarray(Ts, float), np.asarray(Ts, float) ** 2], axis=1)
    return np.linalg.lstsq(A, np.asarray(ys, float), rcond=None)[0]


def mistral7b_params(shape: dict, layers: int = 32) -> dict:
    d, H, H_KV, D, F, V = (shape[k] for k in ("hidden_size", "num_heads", "num_kv_heads", "head_dim",
                                             "intermediate_size", "vocab_size"))
    layer = d * (H * D) + 2 * d * (H_KV * D) + (H * D) * d + 3 * d * F + 2 * d     # attention, MLP, 2 norms
    extras = 2 * d + (2 * d * d + d) + (d * d + d) + (d + 1)                       # markers, mixing head
    root = 2 * V * d + d + extras                                                  # embedding, head, final norm
    return {"layer": layer, "root": root, "total": root + layers * layer}


def plan(fits: dict, shape: dict, layers: int = 32, ranks=(1, 2, 4, 8), batches=(1, 2, 4, 8),
         Ts=(128, 256, 512)) -> list[dict]:
    n = mistral7b_params(shape, layers)
    rows = []
    for N in ranks:
        state = 16 * n["total"] / N
        buffers = 2 * (n["root"] + 2 * n["layer"]) + 4 * n["layer"]
        for ac in (False, True):
            c0f, c1f = fits[ac]
            for T in Ts:
                act_row = np.polyval(c0f[::-1], T) + layers * np.polyval(c1f[::-1], T)
                for B in batches:
                    peak = state + buffers + B * act_row
                    rows.append({"ranks": N, "B": B, "T": T, "ac": ac, "state_gb": state / 1e9,
                                 "buffers_gb": buffers / 1e9, "act_gb": B * act_row / 1e9, "peak_gb": peak / 1e9,
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
             "| layers | T | tokens/row T(1+PL) | checkpointing | transient MiB | step s |", "|---|---|---|---|---|---|"]
    for p in res["points"]:
        lines.append(f"| {p['layers']} | {p['T']} | {p['T'] * (1 + THOUGHT['P'] * L)} | {'on' if p['ac'] else 'off'} "
                     f"| {p['transient'] / 2**20:.0f} | {p['secs']:.1f} |")
    lines += ["", "Per row: c0 (embedding, LM head, mixing head, sampling) and c1 (per decoder layer), MiB; "
              "the fit a + bT + cT^2 on all T, and its prediction of the largest T from the others:", "",
              "| T | checkpointing | c0 | c1 | c1 fitted | c1 predicted without this T |", "|---|---|---|---|---|---|"]
    for r in res["per_layer"]:
        lines.append(f"| {r['T']} | {'on' if r['ac'] else 'off'} | {r['c0'] / 2**20:.0f} | {r['c1'] / 2**20:.1f} | "
                     f"{r['c1_fit'] / 2**20:.1f} | {r['c1_holdout'] / 2**20:.1f} |" if r.get("c1_holdout") is not None
                     else f"| {r['T']} | {'on' if r['ac'] else 'off'} | {r['c0'] / 2**20:.0f} | "
                          f"{r['c1'] / 2**20:.1f} | {r['c1_fit'] / 2**20:.1f} | |")
    n = res["params"]
    lines += ["", f"Mistral-7B: {n['total'] / 1e9:.3f} B parameters ({n['layer'] / 1e6:.1f} M per layer, "
              f"{n['root'] / 1e6:.1f} M root incl. the extras). Extrapolated per-row activations of 32 layers: "
              + ", ".join(f"T={T}: {res['act_row_gb'][f'{T}/{ac}']:.1f} GB ({'with' if ac else 'without'} "
                          f"checkpointing)" for T in (256,) for ac in (False, True)) + ".", "",
              f"Per rank peak (GB) = sharded state 16 B x params / N + bf16/fp32 buffers + B x activations; "
              f"fits = under {HEADROOM:.0%} of 80 GB. Rows: ranks N, columns: B per rank.", ""]
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
    points = []
    for ac in (False, True):
        for T in Ts:
            for layers in (1, 2):
                p = run_child(name, layers, T, 1, ac, args.timeout)
                print(f"layers={layers} T={T} ac={ac}: transient {p['transient'] / 2**20:.0f} MiB, "
                      f"{p['secs']:.1f} s", flush=True)
                points.append(p)
    pl = per_layer(points)
    fits, rows = {}, []
    for ac in (False, True):
        ts = sorted(T for (T, a) in pl if a == ac)
        c0f = fit_quadratic(ts, [pl[(T, ac)][0] for T in ts])
        c1f = fit_quadratic(ts, [pl[(T, ac)][1] for T in ts])
        hold = fit_quadratic(ts[:-1], [pl[(T, ac)][1] for T in ts[:-1]]) if len(ts) > 3 else None
        fits[ac] = (c0f, c1f)
        for T in ts:
            rows.append({"T": T, "ac": ac, "c0": pl[(T, ac)][0], "c1": pl[(T, ac)][1],
                         "c1_fit": float(np.polyval(c1f[::-1], T)),
                         "c1_holdout": float(np.polyval(hold[::-1], T)) if hold is not None and T == ts[-1] else None})
    import torch
    n = mistral7b_params(shape)
    res = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "torch": torch.__version__, "smoke": args.smoke, "shape": shape, "thought": THOUGHT, "points": points,
           "per_layer": rows, "fits": {str(ac): [list(map(float, f)) for f in fits[ac]] for ac in fits},
           "params": n, "act_row_gb": {f"{T}/{ac}": float(np.polyval(fits[ac][0][::-1], T)
                                                         + 32 * np.polyval(fits[ac][1][::-1], T)) / 1e9
                                       for T in (128, 256, 512) for ac in (False, True)},
           "plan": plan(fits, shape)}
    stem = "memory_plan_smoke" if args.smoke else "memory_plan_mistral7b_cpu"
    write_report(res, Path(args.out), stem)
    print((Path(args.out) / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
