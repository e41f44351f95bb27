"""The evaluation's with-thought prediction: `quietstar.thought_predictions` (the k = 1 prediction alone) against
the training forward it replaced (`quietstar_forward` without gradients: the second pass over every chain token,
all K talk predictions and the REINFORCE log-probs), on the same batch and generator.

At SmolLM2-135M's shape with random weights (`smollm2-135m-random`: the same work), B rows of T tokens, M, K, P
as the paper. CPU: the plain-PyTorch backends (split attention, chunked LM head) in fp32; CUDA: the Triton
backends under bf16 autocast, with the peak memory. Reported: seconds per batch (median of --repeats) and the
largest difference of the k = 1 log-probs (exit status 1 unless the thoughts are the same tokens and the
log-probs agree: 1e-4 in fp32, 0.1 under bf16).

    python benchmarks/bench_eval.py                         # CPU (as committed): B=1 T=128
    python benchmarks/bench_eval.py --B 8 --T 256           # on a GPU
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from bench_common import begin_report, environment, fmt, sync  # noqa: E402

from quietstar import (Backends, LossConfig, ModelConfig, QuietStarModel, ThoughtConfig, build_decoder,  # noqa: E402
                       quietstar_forward, thought_predictions)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--M", type=int, default=9)
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--P", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m-random")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    model = QuietStarModel(build_decoder(ModelConfig(name=args.model)), ThoughtConfig(M=args.M, K=args.K, P=args.P),
                           marker_init_id=5).to(dev).eval()
    with torch.no_grad():      # a mixing head that mixes (w != 0), as after training
        model.mixing_head.net[-1].bias.fill_(0.3)
    V = model.lm_head_weight.shape[0]
    ids = torch.randint(3, V, (args.B, args.T), generator=torch.Generator().manual_seed(1)).to(dev)
    be = Backends("triton", "triton") if cuda else Backends("split", "chunked")
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else (  # noqa: E731
        lambda: torch.autocast("cpu", enabled=False))

    def training_forward():
        return quietstar_forward(model, ids, None, LossConfig(), "sample-then-train", be,
                                 torch.Generator(device=dev).manual_seed(1))[2]

    def eval_path():
        return thought_predictions(model, ids, None, be, torch.Generator(device=dev).manual_seed(1))

    rows, outs = [], {}
    for name, fn in (("training forward, no grad (the evaluation before)", training_forward),
                     ("thought_predictions (the evaluation now)", eval_path)):
        times, peak = [], None
        for r in range(args.repeats + cuda):          # on CUDA one untimed first call (Triton JIT)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            sync(dev)
            t0 = time.perf_counter()
            with ctx(), torch.no_grad():
                outs[name] = fn()
            sync(dev)
            if r or not cuda:
                times.append(time.perf_counter() - t0)
            if cuda:
                peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        rows.append({"path": name, "s": statistics.median(times), "peak_mib": peak})
        print(f"{name:<52} {rows[-1]['s']:8.3f} s per batch", flush=True)
    full, ev = outs[rows[0]["path"]], outs[rows[1]["path"]]
    same = torch.equal(full.thoughts, ev.thoughts)
    diff = float((ev.lp_mix.float() - full.lp_mix[..., 0].float()).abs().max())
    env = environment(dev, False, eval=thought_predictions)
    env.update(model=args.model, B=args.B, T=args.T, M=args.M, K=args.K, P=args.P, repeats=args.repeats,
               backends=f"{be.attention}/{be.lm_head}", dtype="bf16 autocast" if cuda else "fp32",
               thoughts_equal=same, max_abs_diff_lp_k1=diff, speedup=rows[0]["s"] / rows[1]["s"])
    stem = args.tag or f"eval_path_{dev.type}_{args.model}_B{args.B}_T{args.T}"
    lines = begin_report(Path(args.out), stem, env, rows, "The evaluation's with-thought prediction",
                         "quietstar.thought_predictions", f"s per batch of B={args.B} rows of T={args.T}, M={args.M} "
                         f"K={args.K} P={args.P}, {env['backends']}, {env['dtype']}; median of {args.repeats}")
    lines += ["| path | s per batch | peak MiB |", "|---|---|---|"]
    lines += [f"| {r['path']} | {r['s']:.3f} | {fmt(r['peak_mib'], '{:.0f}')} |" for r in rows]
    lines += ["", f"thought_predictions is {env['speedup']:.2f}x faster; the same thoughts: {same}; the k = 1 "
              f"log-probs differ by at most {diff:.1e}."]
    (Path(args.out) / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if same and diff < (0.1 if cuda else 1e-4) else 1        # bf16 rounding on CUDA, fp32 here


if __name__ == "__main__":
    sys.exit(main())
