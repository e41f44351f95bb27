"""Memory plan for training Mistral-7B with Quiet-STaR: measured on CPU, extrapolated per GPU rank.

    python benchmarks/memory_plan.py                 # measure live bytes (a child process per point, ~25 min
                                                     # on 2 cores; --Ts 16 32 64 128 256: ~40 min)
    python benchmarks/memory_plan.py --metrics live rss --reuse A.json B.json --only-reuse   # re-analyse
    python benchmarks/memory_plan.py --smoke         # tiny shapes, seconds: the same code path

What is measured (one child process per point, so nothing of one point is left in another): a random-init
Mistral with Mistral-7B's layer shape (d=4096, H=32, H_KV=8, D=128, MLP 14336, V=32000, untied head) and
1 or 2 decoder layers, the Quiet-STaR extras, at the paper's thought shape (M=9, K=4, P=2, L=14) and
B=1 row of T tokens, one training step: M no-grad sampling steps, then the forward and backward of the
sample-then-train schedule (the CPU backends: `split` attention, `chunked` LM head), under bf16 autocast
with the parameters themselves in bf16 (what FSDP2's MixedPrecisionPolicy all-gathers: compute never
holds a second, autocast copy of a weight). Gradient buffers exist before the step (as from the step
before), so the step's memory t is that of activations saved for the backward, the sampling caches and
the temporaries of the LM head and attention. Two ways to measure it (--metrics; the first is the plan's):

    live (default): the profiler's memory events (`torch.profiler`, profile_memory=True): every allocation
        and free of PyTorch's CPU allocator with its size, summed in time order. t = the peak of that sum
        (live_peak); also kept: live_saved, the sum when the backward starts (what the forward keeps for
        it), and live_end. Bytes requested, independent of the allocator: exact and repeatable (two
        layers minus one, with checkpointing, is a layer's bf16 input to the byte: tests/test_memory_plan.py).
    rss: t = peak RSS during the step - RSS before it (Linux VmHWM, reset via /proc/self/clear_refs), in a
        run without the profiler. The first method; it over-counts. glibc raises its mmap threshold
        (up to 32 MiB) after a large block is freed, so later blocks come from its arenas, which keep
        freed memory resident and fragment: tens of MiB of steps per point, and per layer with
        checkpointing 165 MiB at T=128 where a layer keeps 29 MiB. The check: with a fixed threshold
        (MALLOC_MMAP_THRESHOLD_=131072, every block >= 128 KiB mapped and unmapped on free) the RSS of
        2 layers minus 1 at T=128 with checkpointing is 28.9 MiB, the live count's 29.0.

Part of t does not grow with the batch (weight-sized buffers: the chunked LM head's fp32 dW
accumulator...): F, measured as 2 t(B=1) - t(B=2) at one T. The rest is per row: with n layers
`r0(T) + n r1(T)` (r1: per decoder layer, r0: embedding, LM head, mixing head, sampling), solved from
n = 1 and 2. RSS was measured at T = 16..128 (T=256, 7,424 trained tokens per row, took too long with
RSS's slower runs on a shared 2-core CPU); live bytes at T = 16..256, so the paper's T=256 is measured.
r1 is a least-squares line a + bT: what a layer keeps for the backward is proportional to its tokens
(live bytes: exactly 209,032 bytes per trained token without checkpointing, 8,192 = d x 2 with it, at
every T). r0 is the root part of the peak, a maximum over phases whose terms saturate (the chunked LM
head's blocks) or grow linearly: its measured values, and beyond the largest T the line through the two
largest (r0_model). Each model is checked by predicting the largest T from the others.

With checkpointing, the step's peak holds every layer's input and, once, either the LM head's backward
temporaries or the last layer's recompute and backward. The measured line r0 + n r1 is the first (at
n = 1, 2 the peak is in the LM head's phase: r0 is the same with and without checkpointing). The
second, unmeasurable at n <= 2 behind the first, is bounded by the plain one-layer peak plus the other
layers' inputs (on a toy stack it equals that: tests/test_memory_plan.py). Per row of n layers with
checkpointing the plan takes the larger: max(r0 + n r1, r0' + r1' + (n - 1) r1), ' = without checkpointing.

The plan per GPU rank (FSDP2 over N ranks, fp32 master weights, AdamW, bf16 compute):

    step = 16 B x params / N             fp32 parameters + fp32 gradients + AdamW's two moments, sharded
         + 2 B x (root + 2 layers)       unsharded bf16: the root (embedding, LM head, extras; kept from
                                         forward to backward) and the current + prefetched layer
         + 6 B x max(root, layer)        one group's unsharded bf16 gradient + its fp32 copy to reduce
         + F + B x (r0(T) + 32 r1(T))    activations and temporaries (measured on CPU, above; with
                                         checkpointing the max above)
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


def live_bytes(forward) -> dict:
    """`loss = forward(); loss.backward()` under the profiler's memory events (every allocation and free
    of PyTorch's CPU allocator, in bytes requested: no allocator, no arena, no page in it). Bytes
    relative to the start: `saved` live when the backward starts (what the forward keeps for it),
    `peak` the most live at any time, `end` live after it (new gradients); `events` counted."""
    from torch.profiler import ProfilerActivity, profile, record_function
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = forward()
        with record_function("memory_plan::backward"):
            loss.backward()
        del loss
    events = prof.profiler.kineto_results.events()
    t_backward = min(e.start_ns() for e in events if e.name() == "memory_plan::backward")
    live = peak = saved = 0
    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    for t, nbytes in mem:                       # frees are negative
        live += nbytes
        peak = max(peak, live)
        if t < t_backward:
            saved = live
    return {"saved": saved, "peak": peak, "end": live, "events": len(mem)}


def measure_point(shape: dict, layers: int, T: int, B: int, ac: bool, metric: str = "live") -> dict:
    """One training step's memory (bytes) and time at one point, `metric` live (the profiler's live bytes)
    or rss (peak RSS): see the module docstring."""
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
    out = {}

    def forward():
        out["loss"] = quietstar_forward(model, ids, None, LossConfig(), "sample-then-train",
                                        Backends("split", "chunked"), g)[0]
        return out["loss"]

    if metric == "live":
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            live = live_bytes(forward)
        return {"layers": layers, "T": T, "B": B, "ac": ac, "params": n_params, "live_peak": live["peak"],
                "live_saved": live["saved"], "live_end": live["end"], "mem_events": live["events"],
                "secs_live": time.perf_counter() - t0, "loss": float(out["loss"].detach())}
    rss0 = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:   # reset VmHWM (the peak RSS) to the current RSS
        f.write("5")
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        forward().backward()
    secs = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    return {"layers": layers, "T": T, "B": B, "ac": ac, "params": n_params, "rss_before": rss0 * 1024,
            "peak": peak * 1024, "transient": (peak - rss0) * 1024, "secs": secs, "loss": float(out["loss"].detach())}


def run_child(shape_name: str, layers: int, T: int, B: int, ac: bool, metric: str, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps([shape_name, layers, T, B, ac, metric])]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"point layers={layers} T={T} ac={ac} metric={metric} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# fit and plan
# ----------------------------------------------------------------------------------------------
def fixed_part(points: list[dict], ac: bool, key: str) -> float:
    """F: the memory `key` (live_peak or transient) that does not grow with B, 2 t(B=1) - t(B=2) at the T
    measured with B=2 (the mean over n = 1, 2 layers: it holds weight-sized buffers of the root)."""
    by = {(p["T"], p["layers"], p["B"]): p[key] for p in points if p["ac"] == ac and key in p}
    fs = [2 * by[(T, n, 1)] - by[(T, n, 2)] for (T, n, B) in by if B == 2 and (T, n, 1) in by]
    if not fs:
        raise ValueError("no B=2 point: F (the part that does not grow with B) cannot be measured")
    return float(np.mean(fs))


def per_layer(points: list[dict], fixed: dict, key: str) -> dict:
    """{(T, ac): (r0, r1)} per row: the least-squares line t - F = r0 + n r1 through the B=1 points of
    n = 1, 2 (, 4...) layers at each (T, ac), t the memory `key` (F: 0 for live_saved)."""
    by: dict = {}
    for p in points:
        if p["B"] == 1 and key in p:
            by.setdefault((p["T"], p["ac"]), []).append((p["layers"], p[key] - fixed[p["ac"]]))
    out = {}
    for key, nt in by.items():
        if len({n for n, _ in nt}) >= 2:
            r0, r1 = fit_line([n for n, _ in nt], [t for _, t in nt])
            out[key] = (float(r0), float(r1))
    return out


def fit_line(Ts, ys) -> np.ndarray:
    """Least-squares coefficients (a, b) of a + bT (np.polyval(fit[::-1], T) evaluates it)."""
    T = np.asarray(Ts, float)
    return np.linalg.lstsq(np.stack([np.ones_like(T), T], axis=1), np.asarray(ys, float), rcond=None)[0]


METRIC_KEY = {"live": "live_peak", "rss": "transient"}


def analyse(points: list[dict], key: str) -> dict:
    """F, the per-row models (r0: measured values, a line beyond them; r1 a line in T) and the
    per-layer table of the memory `key`; each model is checked by predicting the largest T from the others."""
    fixed = {ac: fixed_part(points, ac, key) for ac in (False, True)}
    pl = per_layer(points, fixed, key)
    fits, rows = {}, []
    for ac in (False, True):
        ts = sorted(T for (T, a) in pl if a == ac)
        r0s, r1s = [pl[(T, ac)][0] for T in ts], [pl[(T, ac)][1] for T in ts]
        fits[ac] = (r0_model(ts, r0s), fit_line(ts, r1s))
        hold = (r0_model(ts[:-1], r0s[:-1]), fit_line(ts[:-1], r1s[:-1])) if len(ts) > 3 else None
        for T in ts:
            last = hold is not None and T == ts[-1]
            rows.append({"T": T, "ac": ac, "r0": pl[(T, ac)][0], "r1": pl[(T, ac)][1],
                         "r1_fit": float(np.polyval(fits[ac][1][::-1], T)),
                         "r0_holdout": r0_at(hold[0], T) if last else None,
                         "r1_holdout": float(np.polyval(hold[1][::-1], T)) if last else None})
    return {"fixed": {str(ac): fixed[ac] for ac in fixed}, "per_layer": rows, "fits_np": fits,
            "fits": {str(ac): {**fits[ac][0], "r1": list(map(float, fits[ac][1]))} for ac in fits}}


def r0_model(Ts, r0s) -> dict:
    """r0 per row: the measured values (linear interpolation between them) and, beyond the largest T, the
    line through the two largest. Not a parabola through all: r0 is the root part of the peak, whose
    terms saturate (the chunked LM head's (chunk, V) blocks stop growing at 524 rows, T ~ 64) or grow
    linearly; the parabola through T=32, 64, 128 predicts -60 MiB at T=256 (measured: 574), the line
    through 64, 128 predicts 582."""
    if len(Ts) < 2:
        raise ValueError(f"r0 needs at least 2 base lengths, got {list(Ts)}")
    return {"T": [float(t) for t in Ts], "r0": [float(r) for r in r0s],
            "beyond": [float(c) for c in fit_line(Ts[-2:], r0s[-2:])]}


def r0_at(model: dict, T: float) -> float:
    if T <= model["T"][-1]:
        return float(np.interp(T, model["T"], model["r0"]))
    return float(np.polyval(model["beyond"][::-1], T))


def saved_per_layer(points: list[dict], shape: dict) -> list[dict]:
    """What one decoder layer keeps from its forward to the backward, per row (live_saved of n = 2 minus
    n = 1 layers at B=1), beside the hand count of a checkpointed layer: its bf16 input, tokens x d x 2 B."""
    by = {(p["T"], p["ac"], p["layers"]): p["live_saved"] for p in points if p["B"] == 1 and "live_saved" in p}
    L = THOUGHT["M"] + THOUGHT["K"] + 1
    return [{"T": T, "ac": ac, "saved": by[(T, ac, 2)] - by[(T, ac, 1)],
             "input_bf16": T * (1 + THOUGHT["P"] * L) * shape["hidden_size"] * 2}
            for (T, ac, n) in sorted(by) if n == 1 and (T, ac, 2) in by]


def mistral7b_params(shape: dict, layers: int = 32) -> dict:
    d, H, H_KV, D, F, V = (shape[k] for k in ("hidden_size", "num_heads", "num_kv_heads", "head_dim",
                                             "intermediate_size", "vocab_size"))
    layer = d * (H * D) + 2 * d * (H_KV * D) + (H * D) * d + 3 * d * F + 2 * d     # attention, MLP, 2 norms
    extras = 2 * d + (2 * d * d + d) + (d * d + d) + (d + 1)                       # markers, mixing head
    root = 2 * V * d + d + extras                                                  # embedding, head, final norm
    return {"layer": layer, "root": root, "total": root + layers * layer}


def act_row(fits: dict, ac: bool, T: int, layers: int = 32) -> float:
    """Per-row activation bytes of `layers` layers at base length T from the models {ac: (r0, r1)}.
    With checkpointing the measured line r0 + n r1 holds the peak of the LM head's phase; the last
    layer's recompute and backward, once, can peak higher, bounded by the plain one-layer peak plus the
    other layers' inputs (tests/test_memory_plan.py): the larger of the two."""
    def line(a, n):
        r0m, r1f = fits[a]
        return r0_at(r0m, T) + n * float(np.polyval(r1f[::-1], T))
    if not ac:
        return line(False, layers)
    return max(line(True, layers), line(False, 1) + line(True, layers - 1) - r0_at(fits[True][0], T))


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
                per_row = act_row(fits, ac, T, layers)
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
def _mib(x) -> str:
    return "" if x is None else f"{x / 2**20:.0f}"


def write_report(res: dict, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    s, ms = res["shape"], res["metrics"]
    L = THOUGHT["M"] + THOUGHT["K"] + 1
    name = {"live": "live bytes (profiler)", "rss": "peak RSS"}
    lines = ["# Memory plan: Quiet-STaR on Mistral-7B, per GPU rank (FSDP2), from CPU measurements",
             "", f"{res['date']} | {res['machine']} | torch {res['torch']} | `{res['command']}`", "",
             f"Measured: d={s['hidden_size']}, H={s['num_heads']}/{s['num_kv_heads']}, D={s['head_dim']}, "
             f"MLP {s['intermediate_size']}, V={s['vocab_size']}, 1 and 2 decoder layers, M={THOUGHT['M']} "
             f"K={THOUGHT['K']} P={THOUGHT['P']} (L={L}), B=1, bf16 (autocast, bf16 parameters), `split` attention, "
             "`chunked` LM head, sample-then-train, one step. live: the running sum of the profiler's allocation "
             "and free events (bytes PyTorch asked its CPU allocator for; peak = the most live at once, saved = "
             "live when the backward starts). RSS: peak RSS of the step - RSS before it, a separate run without "
             "the profiler (glibc's arenas keep freed memory: noise and excess; the evidence is in the module "
             "docstring). "
             f"The plan's basis: {name[res['basis']]}.", "",
             "| layers | B | T | tokens/row T(1+PL) | checkpointing | live peak MiB | live saved MiB | RSS MiB | "
             "step s (RSS run) |", "|---|---|---|---|---|---|---|---|---|"]
    for p in res["points"]:
        secs = f"{p['secs']:.1f}" if "secs" in p else ""
        lines.append(f"| {p['layers']} | {p['B']} | {p['T']} | {p['T'] * (1 + THOUGHT['P'] * L)} | "
                     f"{'on' if p['ac'] else 'off'} | {_mib(p.get('live_peak'))} | {_mib(p.get('live_saved'))} | "
                     f"{_mib(p.get('transient'))} | {secs} |")
    if res["saved_per_layer"]:
        lines += ["", "Kept by one decoder layer from its forward to its backward, per row (live saved, 2 layers "
                  "minus 1), and a checkpointed layer's bf16 input counted by hand (tokens x d x 2 bytes):", "",
                  "| T | checkpointing | saved per layer MiB | bytes per token | input by hand MiB |",
                  "|---|---|---|---|---|"]
        for r in res["saved_per_layer"]:
            tokens = r["T"] * (1 + THOUGHT["P"] * L)
            lines.append(f"| {r['T']} | {'on' if r['ac'] else 'off'} | {r['saved'] / 2**20:.1f} | "
                         f"{r['saved'] / tokens:.0f} | {r['input_bf16'] / 2**20:.1f} |")
    for m, r in ms.items():
        lines += ["", f"**{name[m]}**. F (does not grow with B): " + ", ".join(
            f"checkpointing {'on' if ac == 'True' else 'off'} {v / 2**20:.0f} MiB" for ac, v in r["fixed"].items())
            + ". Per row: r0 (embedding, LM head, mixing head, sampling) and r1 (per decoder layer) of the peak, "
              "MiB; r1's least-squares line on all T; each model's prediction of the largest T from the others "
              "(r0: the line through the two T below it):", "",
            "| T | checkpointing | r0 | r0 predicted without this T | r1 | r1 fitted | r1 predicted without this T |",
            "|---|---|---|---|---|---|---|"]
        for q in r["per_layer"]:
            hold = f"{q['r1_holdout'] / 2**20:.1f}" if q.get("r1_holdout") is not None else ""
            lines.append(f"| {q['T']} | {'on' if q['ac'] else 'off'} | {q['r0'] / 2**20:.0f} | "
                         f"{_mib(q.get('r0_holdout'))} | {q['r1'] / 2**20:.1f} | {q['r1_fit'] / 2**20:.1f} | {hold} |")
    n = res["params"]
    lines += ["", f"Mistral-7B: {n['total'] / 1e9:.3f} B parameters ({n['layer'] / 1e6:.1f} M per layer, "
              f"{n['root'] / 1e6:.1f} M root incl. the extras). Extrapolated activations per row of 32 layers "
              "(with checkpointing max(r0 + 32 r1, the plain one-layer peak + 31 inputs): the last layer's "
              f"recompute once; T beyond {max(p['T'] for p in res['points'])}: r0 on its line, less certain):", "",
              "| T | checkpointing | " + " | ".join(f"{name[m]} GB" for m in ms) + " |",
              "|---|---|" + "---|" * len(ms)]
    for T in (128, 256, 512):
        for ac in (False, True):
            lines.append(f"| {T} | {'on' if ac else 'off'} | "
                         + " | ".join(f"{ms[m]['act_row_gb'][f'{T}/{ac}']:.1f}" for m in ms) + " |")
    lines += ["", f"Per rank peak (GB) = max(sharded state 16 B x params / N + buffers + F + B x activations, "
              f"AdamW 20 B x params / N); fits = under {HEADROOM:.0%} of 80 GB. Rows: ranks N, columns: B per rank; "
              + (" / ".join(name[m] for m in ms) + " where they differ." if len(ms) > 1 else name[res["basis"]] + "."),
              ""]
    plans = {m: {(q["ranks"], q["B"], q["T"], q["ac"]): q for q in ms[m]["plan"]} for m in ms}
    first = ms[res["basis"]]["plan"]
    for T in sorted({r["T"] for r in first}):
        for ac in (False, True):
            sub = [r for r in first if r["T"] == T and r["ac"] == ac]
            Bs = sorted({r["B"] for r in sub})
            lines += [f"**T={T}, activation checkpointing {'on' if ac else 'off'}**", "",
                      "| N ranks | state GB | " + " | ".join(f"B={b}" for b in Bs) + " |",
                      "|---|---|" + "---|" * len(Bs)]
            for N in sorted({r["ranks"] for r in sub}):
                cells = []
                for b in Bs:
                    cs = [plans[m][(N, b, T, ac)] for m in ms]
                    txt = [f"{c['peak_gb']:.0f} {'fits' if c['fits_80gb'] else 'no'}" for c in cs]
                    cells.append(txt[0] if len(set(txt)) == 1 else " / ".join(txt))
                lines.append(f"| {N} | {plans[res['basis']][(N, Bs[0], T, ac)]['state_gb']:.0f} | "
                             + " | ".join(cells) + " |")
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
    ap.add_argument("--only-reuse", action="store_true",
                    help="measure nothing: analyse the --reuse points (a metric missing at a point stays missing)")
    ap.add_argument("--layers-ac", type=int, nargs="+", default=[1, 2],
                    help="layer counts measured with checkpointing (its per-layer memory is small: a longer lever)")
    ap.add_argument("--metrics", nargs="+", choices=("live", "rss"), default=["live"],
                    help="live: the profiler's live bytes (the plan's basis when listed first); rss: peak RSS, "
                         "the first method (allocator noise; see the docstring)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        name, layers, T, B, ac, metric = json.loads(args.child)
        import torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
        print(json.dumps(measure_point(SMOKE if name == "smoke" else MISTRAL_7B, layers, T, B, ac, metric)))
        return 0
    if "rss" in args.metrics and not Path("/proc/self/clear_refs").exists():
        ap.error("needs Linux (/proc/self/clear_refs and VmHWM measure the peak RSS of one step)")
    name = "smoke" if args.smoke else "mistral7b"
    shape = SMOKE if args.smoke else MISTRAL_7B
    Ts = args.Ts or ([8, 16, 32] if args.smoke else [16, 32, 64, 128])
    if len(Ts) < 3:
        ap.error("--Ts: at least 3 base lengths (the per-row lines need 2, and their check one more)")
    old: dict = {}
    for f in args.reuse:
        prev = json.loads(Path(f).read_text())
        if prev["shape"] == shape:
            for p in prev["points"]:
                old.setdefault((p["layers"], p["T"], p["B"], p["ac"]), {}).update(p)
    grid = [(layers, T, 1, ac) for ac in (False, True) for T in Ts for layers in ((1, 2) if not ac else args.layers_ac)]
    grid += [(layers, args.B2_T or Ts[1], 2, ac) for ac in (False, True) for layers in (1, 2)]
    points = []
    for key in grid:
        p = dict(old.get(key, {}))
        for metric in args.metrics:
            field = METRIC_KEY[metric]
            reused = field in p
            if not reused and args.only_reuse:
                continue
            if not reused:
                p.update(run_child(name, *key, metric, args.timeout))
            print(f"layers={key[0]} T={key[1]} B={key[2]} ac={key[3]}: {metric} {p[field] / 2**20:.0f} MiB"
                  f"{' (reused)' if reused else ''}", flush=True)
        if any(METRIC_KEY[m] in p for m in args.metrics):
            points.append(p)
    metrics = {m: analyse(points, METRIC_KEY[m]) for m in args.metrics}
    basis = args.metrics[0]
    import torch
    n = mistral7b_params(shape)
    res = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "torch": torch.__version__, "smoke": args.smoke, "command": " ".join(
               ["python benchmarks/memory_plan.py"] + [a for a in (argv if argv is not None else sys.argv[1:])]),
           "shape": shape, "thought": THOUGHT, "points": points, "params": n, "basis": basis,
           "saved_per_layer": saved_per_layer(points, shape) if "live" in args.metrics else [],
           "metrics": {m: {**{k: v for k, v in r.items() if k != "fits_np"},
                           "act_row_gb": {f"{T}/{ac}": act_row(r["fits_np"], ac, T) / 1e9
                                          for T in (128, 256, 512) for ac in (False, True)},
                           "plan": plan(r["fits_np"], {ac: r["fixed"][str(ac)] for ac in (False, True)}, shape)}
                       for m, r in metrics.items()}}
    stem = "memory_plan_smoke" if args.smoke else "memory_plan_mistral7b_cpu"
    write_report(res, Path(args.out), stem)
    print((Path(args.out) / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
