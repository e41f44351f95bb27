"""Host memory of building an FSDP2 model: only rank 0 reads the weights, or every rank builds the model.

    python3 benchmarks/bench_fsdp_load.py --ranks 4 --out DIR       # CPU, 4 ranks (gloo), 0.62B random Mistral
    python3 benchmarks/bench_fsdp_load.py --out DIR --tiny          # a few seconds: the rehearsal (tests)

`quietstar-train --parallel fsdp` builds its model with `quietstar.parallel.shard_from_rank0`: rank 0 builds
it on the CPU (from the weight files, or at random), every other rank builds only the architecture on the
meta device, `fully_shard` keeps each rank's shards and rank 0 broadcasts its state dict. The other way,
the one before it, is every rank building the whole model and sharding it (`apply_fsdp`). For each way this
starts `--ranks` processes under torchrun (gloo on the CPU: the mesh is the CPU, so the shards stay in host
memory) and each rank reports the growth of its peak RSS while it builds and shards the model (the
memory a node must have), its RSS after, and a checksum of its shards: the two ways must give every rank
the same shards (exit 1 otherwise). Model: a random-init Mistral with d=2048, H=16/4, D=128, MLP 8192,
V=32000, untied, `--layers` decoder layers (8: 0.62 B parameters, 2.5 GB in fp32).
Writes `fsdp_load.json` and `fsdp_load.md` into --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import tempfile
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=2048, num_heads=16, num_kv_heads=4, head_dim=128, intermediate_size=8192, vocab_size=32000,
             tie_word_embeddings=False)
TINY = dict(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128, vocab_size=512,
            tie_word_embeddings=False)
MODES = {"rank0": "rank 0 builds, the others on meta (shard_from_rank0: quietstar-train)",
         "every": "every rank builds the whole model, then shards it (apply_fsdp)"}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> None:
    import torch
    import torch.distributed as dist
    sys.path.insert(0, str(REPO))
    from quietstar import parallel
    from quietstar.config import ModelConfig, ThoughtConfig
    from quietstar.model import QuietStarModel, build_decoder
    dist.init_process_group("gloo")
    rank, dev = dist.get_rank(), torch.device("cpu")
    cfg = ModelConfig(num_layers=args.layers, **(TINY if args.tiny else SHAPE))

    def build(weights=True):
        torch.manual_seed(0)
        return QuietStarModel(build_decoder(cfg, dtype=torch.float32, weights=weights), ThoughtConfig(), marker_init_id=3)

    from transformers import AutoModelForCausalLM, MistralForCausalLM  # noqa: F401  (imported before the baseline)
    before = _rss_bytes()
    if args.mode == "rank0":
        model = parallel.shard_from_rank0(build, lambda: build(weights=False), dev)
    else:
        model = parallel.apply_fsdp(build(), dev)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # KiB on Linux
    after = _rss_bytes()
    with torch.no_grad():
        local = [p.to_local().double() for p in model.parameters()]
        checksum = [float(sum(t.sum() for t in local)), float(sum((t * t).sum() for t in local))]
        full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())   # DTensor: global sizes
    rec = {"mode": args.mode, "rank": rank, "peak_growth_bytes": max(0, peak - before),
           "rss_after_growth_bytes": after - before, "model_bytes": full_bytes,
           "shard_bytes": sum(t.numel() * 4 for t in local), "checksum": checksum}
    Path(args.records, f"{args.mode}.{rank}.json").write_text(json.dumps(rec))
    dist.barrier()
    dist.destroy_process_group()


def run(mode: str, args, records: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}", __file__,
           "--child", "--mode", mode, "--records", str(records), "--layers", str(args.layers)] + (["--tiny"] if args.tiny else [])
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    recs = [json.loads(f.read_text()) for f in records.glob(f"{mode}.*.json")]
    if r.returncode != 0 or len(recs) != args.ranks:
        raise RuntimeError(f"{mode}: torchrun exited {r.returncode} with {len(recs)} of {args.ranks} records\n"
                           + r.stderr[-3000:])
    return sorted(recs, key=lambda x: x["rank"])


def write(out: Path, runs: dict, args) -> str:
    import torch
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "ranks": args.ranks, "layers": args.layers,
            "model": TINY if args.tiny else SHAPE, "cpus": os.cpu_count()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "fsdp_load.json").write_text(json.dumps({"info": info, "runs": runs}, indent=1) + "\n")
    gib = 2 ** 30
    m = runs["rank0"][0]["model_bytes"]
    lines = ["# Building an FSDP2 model: host memory per rank", "",
             f"{info['date']} | CPU, gloo, {args.ranks} ranks | torch {info['torch']} | random-init Mistral, "
             f"{args.layers} layers, d={info['model']['hidden_size']}, V={info['model']['vocab_size']} | "
             f"fp32 model {m / gib:.2f} GiB", "",
             "Growth of each rank's peak RSS while it builds and shards the model, and of its RSS after "
             f"(`python3 benchmarks/bench_fsdp_load.py --ranks {args.ranks} --layers {args.layers}"
             f"{' --tiny' if args.tiny else ''}`). Both ways give every rank the same shards (checksums).", "",
             "| way | rank | peak RSS growth GiB | RSS after GiB | its shards GiB |", "|---|---|---|---|---|"]
    for mode, recs in runs.items():
        for r in recs:
            lines.append(f"| {mode}: {MODES[mode]} | {r['rank']} | {r['peak_growth_bytes'] / gib:.2f} | "
                         f"{r['rss_after_growth_bytes'] / gib:.2f} | {r['shard_bytes'] / gib:.2f} |")
    lines += ["", "Sum over the ranks of the peak RSS growth (what one node must hold at most): "
              + "; ".join(f"{mode} {sum(r['peak_growth_bytes'] for r in recs) / gib:.2f} GiB"
                          for mode, recs in runs.items()) + ".",
              "", "On the CPU the mesh is the host, so rank 0 holds its shards beside the full model until the "
              "broadcast ends. On GPUs (read from the code path, not measured here) its shards are GPU memory: "
              "rank 0's host holds the full model alone and the other ranks' hosts nothing of it; rank 0's GPU "
              "holds its shards and one module unsharded at a time, the others' GPUs their shards and one "
              "broadcast tensor, where every rank building the model moved all of it to its GPU first."]
    text = "\n".join(lines) + "\n"
    (out / "fsdp_load.md").write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/fsdp_load_cpu", help="folder of fsdp_load.{json,md}")
    ap.add_argument("--ranks", type=int, default=2, help="processes (gloo on the CPU)")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the d=2048 model")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (d=64): the rehearsal, not a measurement")
    ap.add_argument("--mode", choices=tuple(MODES), help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--records", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ranks < 2:
        ap.error(f"--ranks {args.ranks}: needs at least 2 (with one rank there is nobody to broadcast to)")
    if args.layers < 1:
        ap.error(f"--layers {args.layers}: needs at least 1")
    if args.child:
        child(args)
        return 0
    with tempfile.TemporaryDirectory() as records:      # one JSON record per rank and way
        runs = {mode: run(mode, args, Path(records)) for mode in MODES}
    print(write(Path(args.out), runs, args))
    bad = [a["rank"] for a, b in zip(runs["rank0"], runs["every"]) if a["checksum"] != b["checksum"]]
    if bad:
        print(f"bench_fsdp_load.py: rank(s) {bad} hold other shards when only rank 0 builds the model", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
