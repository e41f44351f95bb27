"""FSDP2 at world size 1 on one GPU: step time and peak memory with and without activation checkpointing.

    python3 benchmarks/bench_fsdp.py --out DIR             # GPU: ~1.1B random-init Mistral, B=8, T=256
    python3 benchmarks/bench_fsdp.py --out DIR --dry-run   # CPU rehearsal: the same code at a tiny shape

The model is a random-init Mistral of ~1.1B parameters (d=2048, 16 layers, H=16, H_KV=4, D=128, MLP 8192,
V=32000, untied head; speed needs no weights), with the Quiet-STaR extras, trained exactly as
`quietstar-train --parallel fsdp [--activation-checkpointing]` trains it: FSDP2 on every decoder layer
and the root (bf16 compute, fp32 master weights and reduction), AdamW, bf16 autocast, the Triton attention
and LM head, sample-then-train, M=9 K=4 P=2, on random token ids (B rows of T tokens).

Each configuration runs in its own process (an out-of-memory one cannot disturb the next): 2 warm-up
steps (Triton compiles), then `--steps` timed steps; reported: median step ms, tokens/s (B T (1 + P L)
trained tokens per step), `torch.cuda.max_memory_allocated` / `max_memory_reserved` over the timed steps,
or OOM. Default configurations: checkpointing on and off at B=8; if off runs out of memory, off again at
B=4, 2, 1 until it fits, then on at that B for a like-for-like time ratio. The CPU memory plan
(benchmarks/memory_plan.py, live bytes) measured 209,032 bytes per trained token and decoder layer without
checkpointing at Mistral-7B's layer shape; about half of that at d=2048 puts B=8 x 7,424 tokens x 16 layers
near 100 GB: off should run out of memory at B=8 on an 80 GB H100 and may fit a 141 GB H200.
Without CUDA (and without --dry-run) it exits 2 at once.
`--budget-s S` bounds the whole run (each configuration gets the rest, one with under 20 s left is
reported SKIPPED): so it can close another device call (benchmarks/learn_experiment.sh measure).
Writes `fsdp_ws1.json` and `fsdp_ws1.md` into --out, after every configuration.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL_1B = dict(hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=4, head_dim=128, intermediate_size=8192,
                vocab_size=32000, tie_word_embeddings=False)
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
            vocab_size=512, tie_word_embeddings=False)
THOUGHT = dict(M=9, K=4, P=2)
MIN_CONFIG_S = 20        # a configuration needs at least this (process start, model, a compiled step)


def child(args) -> dict:
    """One configuration in this process; returns its record."""
    import torch
    sys.path.insert(0, str(REPO))
    from quietstar import parallel
    from quietstar.config import LossConfig, ModelConfig, ThoughtConfig
    from quietstar.model import QuietStarModel, build_decoder
    from quietstar.thoughts import Backends
    dev = torch.device("cpu" if args.dry_run else "cuda")
    torch.manual_seed(0)
    shape = TINY if args.dry_run else MODEL_1B
    def build():
        with dev:                               # initialise on the device: 1.1B normal_ draws on a CPU take long
            lm = build_decoder(ModelConfig(max_position_embeddings=4096, **shape), dtype=torch.float32)
            return QuietStarModel(lm, ThoughtConfig(**THOUGHT), marker_init_id=3)
    # as quietstar-train --parallel fsdp on one rank (shard_from_rank0 is then apply_fsdp of the built model),
    # but built on the GPU for speed where quietstar-train builds it on the CPU
    model = parallel.shard_from_rank0(build, build, dev, activation_checkpointing=args.ac).train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    backends = Backends("split", "chunked") if args.dry_run else Backends("triton", "triton")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=not args.dry_run)
    g = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(3, shape["vocab_size"], (args.B, args.T), device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rec = {"ac": args.ac, "B": args.B, "T": args.T, "params": n_params, "device": str(dev)}
    times = []
    try:
        for i in range(args.warmup + args.steps):
            if i == args.warmup and dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            with autocast:
                loss, _, _ = model(ids, None, LossConfig(), "sample-then-train", backends, g)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError as e:
        rec.update(status="OOM", error=str(e).splitlines()[0][:300])
    else:
        rec.update(status="ok", ms=1000 * statistics.median(times), loss=float(loss.detach()))
        rec["tok_per_s"] = args.B * args.T * (1 + THOUGHT["P"] * (THOUGHT["M"] + THOUGHT["K"] + 1)) / (rec["ms"] / 1e3)
    if dev.type == "cuda":
        rec["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rec["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        rec["gpu"] = torch.cuda.get_device_name()
    return rec


def run(ac: bool, B: int, args, cap_s: float) -> dict:
    cmd = [sys.executable, __file__, "--child", "--B", str(B), "--T", str(args.T), "--steps", str(args.steps),
           "--warmup", str(args.warmup)] + (["--ac"] if ac else []) + (["--dry-run"] if args.dry_run else [])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if not args.dry_run:
        env.pop("TRITON_INTERPRET", None)      # compiled kernels on the GPU
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=cap_s, env=env, cwd=REPO)
    except subprocess.TimeoutExpired as e:       # a record printed before a slow exit still counts
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        try:
            rec = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
        except (IndexError, ValueError):         # nothing printed, or a line cut by the kill
            return {"ac": ac, "B": B, "T": args.T, "status": f"TIMEOUT after {cap_s:.0f} s"}
        rec["wall_s"] = time.time() - t0
        return rec
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    try:
        rec = json.loads(lines[-1])
    except (IndexError, ValueError):
        # an allocation that fails outside PyTorch's allocator (NCCL, cuBLAS) is out of memory all the same
        oom = "out of memory" in r.stderr.lower()
        return {"ac": ac, "B": B, "T": args.T, "status": "OOM" if oom else f"FAILED rc={r.returncode}",
                "stderr": r.stderr[-2000:]}
    if r.returncode != 0:       # the measurement was printed; the process failed after it (in its teardown)
        rec["exit"] = f"rc={r.returncode} after printing its record"
        rec["stderr"] = r.stderr[-2000:]
    rec["wall_s"] = time.time() - t0
    return rec


def write(out: Path, recs: list[dict], args) -> str:
    import torch
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "dry_run": args.dry_run,
            "model": TINY if args.dry_run else MODEL_1B, "thought": THOUGHT}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    out.mkdir(parents=True, exist_ok=True)
    (out / "fsdp_ws1.json").write_text(json.dumps({"info": info, "runs": recs}, indent=1) + "\n")
    gpu = next((r["gpu"] for r in recs if "gpu" in r), "CPU (dry run: not a measurement)")
    lines = ["# FSDP2, world size 1: activation checkpointing on/off", "",
             f"{info['date']} | {gpu} | torch {info['torch']} | triton {info.get('triton', '-')} | "
             f"params {next((r['params'] for r in recs if 'params' in r), 0) / 1e6:.1f} M | M=9 K=4 P=2", "",
             "| checkpointing | B | T | status | step ms | tok/s | peak allocated GiB | peak reserved GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in recs:
        lines.append(f"| {'on' if r['ac'] else 'off'} | {r['B']} | {r['T']} | {r['status']} | "
                     f"{r.get('ms', float('nan')):.0f} | {r.get('tok_per_s', float('nan')):.0f} | "
                     f"{r.get('peak_alloc_gib', float('nan')):.1f} | {r.get('peak_reserved_gib', float('nan')):.1f} |")
    text = "\n".join(lines) + "\n"
    (out / "fsdp_ws1.md").write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/fsdp_ws1", help="folder of fsdp_ws1.{json,md}")
    ap.add_argument("--dry-run", action="store_true", help="CPU rehearsal at a tiny shape (not a measurement)")
    ap.add_argument("--B", type=int, default=None, help="rows per step (default 8; 2 with --dry-run)")
    ap.add_argument("--T", type=int, default=None, help="base length (default 256; 16 with --dry-run)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (Triton compiles)")
    ap.add_argument("--cap-s", type=int, default=200, help="seconds per configuration before it is killed")
    ap.add_argument("--budget-s", type=float, default=0,
                    help="seconds for all configurations together (0: no limit): each runs under the budget's "
                         f"rest, and one with under {MIN_CONFIG_S} s left is reported SKIPPED")
    ap.add_argument("--ac", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.B = args.B or (2 if args.dry_run else 8)
    args.T = args.T or (16 if args.dry_run else 256)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        from quietstar.parallel import exit_process
        exit_process()      # the 1-rank group apply_fsdp started, ended without the interpreter's teardown
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("bench_fsdp.py: no CUDA GPU (use --dry-run for the CPU rehearsal)", file=sys.stderr)
        return 2
    t_end = time.time() + (args.budget_s or float("inf"))
    recs = []

    def add(ac: bool, B: int) -> bool:
        """Run one configuration within the budget's rest; write the tables. False: the budget is spent."""
        left = t_end - time.time()
        if left < MIN_CONFIG_S:
            recs.append({"ac": ac, "B": B, "T": args.T, "status": f"SKIPPED ({left:.0f} s of --budget-s left)"})
        else:
            recs.append(run(ac, B, args, min(args.cap_s, left)))
        write(Path(args.out), recs, args)      # after every configuration: a cut call keeps what ran
        return not recs[-1]["status"].startswith("SKIPPED")

    B = args.B
    if add(True, B) and add(False, B):
        while recs[-1]["status"] == "OOM" and B > 1:  # halve B until no checkpointing fits: a like-for-like pair
            B //= 2
            if not add(False, B):
                break
        if B != args.B and recs[-1]["status"] == "ok":
            add(True, B)
    print(write(Path(args.out), recs, args))
    return 0 if all(r["status"] in ("ok", "OOM") for r in recs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
