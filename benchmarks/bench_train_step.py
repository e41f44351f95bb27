"""One full Quiet-STaR optimizer step, path by path, against the reference and against the floor.

Paths (schedule / attention backend / LM-head backend):
  reference  sequential / reference / reference    the reference algorithm: dense masks, full logits
  fast       the device's fast path: sample-then-train / triton / triton on CUDA,
             sample-then-train / split / chunked on CPU
  fast-gpu-graphs  the GPU fast path with the sampling loop replayed from a CUDA graph (--cuda-graphs)
  mixed      other combinations (see PATHS)
  floor      the stock model's own causal-LM forward+backward (cross-entropy by kernels.token_logprob on
             CUDA since 2026-11-26, by the chunked PyTorch one on CPU and in the first GPU rows) over the same
             number of trained tokens, B*T + B*P*T*L, plus M no-grad forwards over B*P*T tokens (the
             sampling passes): what training those tokens plainly costs.

Every path runs in its own child process (so its peak memory is its own: peak RSS on CPU,
torch.cuda.max_memory_allocated on CUDA), on the same model, rows and seed. Peak memory is
measured over the timed steps only (from the memory in use when they start), not over model loading
nor over the agreement pass below, which the floor does not have. Agreement with the
reference is measured on the same sampled thoughts (sampled once, by the reference sampler): the
relative difference of the loss and the cosine of the flattened gradients. Step time includes the
path's own sampling, the forward+backward and the AdamW step (median of --repeats after a warm-up).

Model FLOPs (MFU, GPU only; quietstar/flops.py, the same as the training log's): with N the number of
non-embedding parameters plus the LM head's d*V, a trained token costs 6N and a sampled token 2N
(matmul FLOPs only, attention scores ignored), so
  FLOPs/step = 6 N (B*T + B*P*T*L) + 2 N (M * B*P*T);  MFU = FLOPs/step / time / peak (989 TFLOP/s
  dense bf16 for an H100 SXM).

    python benchmarks/bench_train_step.py --model smollm2-135m --B 1 --T 128     # CPU, as committed (B=2: the
                                                                                 # reference needs > 24 GiB)
    python benchmarks/bench_train_step.py --model smollm2-135m --B 8 --T 256     # GPU, paper shape

Document masking (--document-mask, the default, as in training; --no-document-mask for rows that
attend across their packed documents): every Quiet-STaR path gets the rows' doc_start; the floor is
the stock model's plain causal pass either way.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PATHS = {
    # name: (schedule, attention, lm_head)
    "reference": ("sequential", "reference", "reference"),
    "fast-cpu": ("sample-then-train", "split", "chunked"),
    "fast-gpu": ("sample-then-train", "triton", "triton"),
    "fast-gpu-graphs": ("sample-then-train", "triton", "triton"),      # + the sampling loop in a CUDA graph
    "stt-reference": ("sample-then-train", "reference", "reference"),
    "stt-split-reference": ("sample-then-train", "split", "reference"),
    "stt-reference-chunked": ("sample-then-train", "reference", "chunked"),
    "sequential-chunked": ("sequential", "reference", "chunked"),
    "stt-flex-chunked": ("sample-then-train", "flex", "chunked"),
    "stt-triton-chunked": ("sample-then-train", "triton", "chunked"),
    "floor": None,
}
CPU_PATHS = ["floor", "fast-cpu", "stt-split-reference", "stt-reference-chunked", "stt-reference", "reference"]
GRAPHED = {"fast-gpu-graphs"}
GPU_PATHS = ["floor", "fast-gpu", "fast-gpu-graphs", "stt-triton-chunked", "stt-flex-chunked", "stt-reference", "reference"]


def _status_mib(key: str) -> float:
    """A memory line of /proc/self/status (VmHWM: peak RSS, VmRSS: current RSS) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def start_peak_window(cuda: bool) -> float:
    """Start measuring peak memory for the timed steps only (after loading and the agreement pass,
    which the floor does not have); return the memory in use now (MiB).

    CPU: freed heap is first handed back to the OS (glibc malloc_trim), so that the resident set is
    what is live; then VmHWM (peak RSS) is reset to VmRSS. GPU: the allocator's peak is reset."""
    import gc
    import torch
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_mib("VmRSS")


def build(args, device, tmp: Path):
    """The model, B rows of T tokens, their target mask and doc_start (None without --document-mask or
    on random tokens); the same in every child process.

    The first child caches the decoder's weights under `tmp` (SmolLM2's GGUF takes ~15 s to
    dequantise), the others load them. Rows come from the embedded corpus (the training part of the MATH test set's text); where it
    has not been prepared (a bare GPU machine), random tokens stand in, and the results say so."""
    import torch
    from quietstar import ModelConfig, QuietStarModel, ThoughtConfig, build_decoder
    from quietstar import data as qdata
    from quietstar.train import document_separator, load_tokenizer, marker_init_id
    torch.manual_seed(args.seed)
    if args.model == "mistral-1b":   # the issue's ~1B random-init Mistral-style model
        mc = ModelConfig(name="tiny", hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                         intermediate_size=5632, vocab_size=32000, tie_word_embeddings=False)
    else:
        mc = ModelConfig(name=args.model)
    cache = tmp / "decoder.pt"
    if cache.exists():
        from transformers import AutoModelForCausalLM
        from quietstar import attention
        from quietstar.model import check_decoder
        attention.register()              # the saved config names the "quietstar" attention
        cfg = torch.load(tmp / "decoder_config.pt", weights_only=False)
        with torch.device(device):
            lm = AutoModelForCausalLM.from_config(cfg)
        lm.load_state_dict(torch.load(cache, weights_only=True, map_location=device))
        check_decoder(lm)
        lm.config._attn_implementation = attention.register()
    else:
        lm = build_decoder(mc)
        torch.save(lm.state_dict(), cache)
        torch.save(lm.config, tmp / "decoder_config.pt")
    lm = lm.to(device)
    th = ThoughtConfig(M=args.M, K=args.K, P=args.P)
    try:
        tok = load_tokenizer(mc)
        docs = qdata.load_documents("default", "train")[:64]
        rows, valid, doc_start = qdata.pack_rows(qdata.tokenize_documents(docs, tok), args.T,
                                                 sep_id=document_separator(tok), with_doc_start=True)
        init_id, data = marker_init_id(tok, th.marker_init_text), "MATH test-set text rows (training part)"
    except (FileNotFoundError, ImportError) as e:
        g = torch.Generator().manual_seed(args.seed)
        rows = torch.randint(3, lm.config.vocab_size, (args.B, args.T), generator=g)
        valid = torch.ones(args.B, args.T, dtype=torch.bool)
        doc_start = torch.zeros(args.B, args.T, dtype=torch.int32)
        init_id, data = 3, f"random tokens ({type(e).__name__}: {e})"
    model = QuietStarModel(lm, th, marker_init_id=init_id).to(device)
    ds = doc_start[: args.B].to(device) if args.document_mask else None
    return model, rows[: args.B].to(device), valid[: args.B].to(device), ds, data


def agreement(args, model, ids, vn, ds, loss_cfg, schedule, backends, autocast, tmp: Path) -> dict:
    """Loss and flattened gradients on the shared thoughts; the reference saves its gradients, the
    other paths compare with them (relative loss difference, cosine). All buffers die on return."""
    import torch
    from quietstar.thoughts import quietstar_forward
    thoughts = torch.load(tmp / "thoughts.pt").to(ids.device)
    with autocast:
        loss, _, _ = quietstar_forward(model, ids, vn, loss_cfg, schedule, backends, thoughts=thoughts, doc_start=ds)
    loss.backward()
    g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten()
                   for p in model.parameters()])
    res = {"loss": float(loss), "grad_nonfinite": int((~torch.isfinite(g)).sum())}
    if args.child == "reference":
        torch.save(g.cpu(), tmp / "ref_grad.pt")
    elif (tmp / "ref_grad.pt").exists():
        gr = torch.load(tmp / "ref_grad.pt").to(ids.device)
        res["grad_cosine"] = float(torch.nn.functional.cosine_similarity(g.double(), gr.double(), dim=0))
        res["ref_loss"] = json.loads((tmp / "reference.json").read_text())["loss"]
        res["loss_rel_diff"] = abs(res["loss"] - res["ref_loss"]) / abs(res["ref_loss"])
    return res


def child(args) -> dict:
    import torch
    from quietstar import Backends, LossConfig
    from quietstar.thoughts import lm_head_ops, quietstar_forward, sample_thoughts
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model, ids, vn, ds, data = build(args, device, Path(args.tmp))
    params = [p for p in model.parameters()]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    loss_cfg = LossConfig()
    tmp = Path(args.tmp)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    res = {"path": args.child, "data": data}
    if ds is not None:   # documents per row and the share of (query, base key) pairs the mask keeps
        from kernels.reference import document_mask
        res["documents_per_row"] = float((ds == torch.arange(ds.shape[1], device=ds.device)).sum()) / ds.shape[0]
        res["attended_fraction"] = float(document_mask(ds).sum()) / (ds.shape[0] * ds.shape[1] * (ds.shape[1] + 1) / 2)
    th = model.thought
    B, T = ids.shape

    if args.child == "sample":
        with autocast:
            thoughts = sample_thoughts(model, ids, Backends("reference", "reference"),
                                       torch.Generator(device=device).manual_seed(args.seed), docs=ds)
        torch.save(thoughts.cpu(), tmp / "thoughts.pt")
        return res

    opt = torch.optim.AdamW(params, lr=1e-6)
    if args.child == "floor":
        # the fastest cross-entropy this project has for the device: the fused kernel on CUDA (the fast path
        # uses it too; the GPU rows committed on 2026-11-26 were measured with the chunked PyTorch one, which
        # made the floor slower), the chunked PyTorch one on CPU
        # on CUDA through the fast path's own wrapper: the autocast dtype in, as an nn.Linear LM head gets (called
        # bare, the fp32 final-norm output and master weight made the floor's three LM-head GEMMs fp32)
        floor_logprob = lm_head_ops("triton" if cuda else "chunked").token_logprob
        lm = model.lm
        n_rows = B * (1 + th.P * th.L)
        rows = ids.repeat(1 + th.P * th.L, 1)                         # (B*(1+P*L), T): the trained tokens
        tgt = torch.roll(rows, -1, dims=1)

        def step():
            with torch.no_grad(), autocast:
                for _ in range(th.M):
                    lm.model(input_ids=ids.repeat(th.P, 1))           # M no-grad passes over B*P*T tokens
            with autocast:
                h = lm.model(input_ids=rows).last_hidden_state.reshape(n_rows * T, -1)
                lp = floor_logprob(h, lm.lm_head.weight, tgt.reshape(-1))
                loss = -lp.mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        schedule, attn, head = PATHS[args.child]
        backends = Backends(attn, head)
        res.update(agreement(args, model, ids, vn, ds, loss_cfg, schedule, backends, autocast, tmp))
        opt.zero_grad(set_to_none=True)
        gen = torch.Generator(device=device).manual_seed(args.seed + 1)
        sampler = None
        if args.child in GRAPHED:
            from quietstar.graphs import GraphedSampler
            sampler = GraphedSampler(model, backends, gen)

        def step():
            with autocast:
                thoughts = sampler(ids, ds) if sampler is not None else None
                loss, _, _ = quietstar_forward(model, ids, vn, loss_cfg, schedule, backends, gen, thoughts=thoughts,
                                               doc_start=ds)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    base_mem = start_peak_window(cuda)
    times = []
    for i in range(args.warmup + args.repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    res["step_ms"] = 1000 * statistics.median(times)
    res["step_ms_all"] = [1000 * t for t in times]
    trained = B * T + B * th.P * T * th.L
    res["trained_tokens"] = trained
    res["tok_per_s"] = trained / (res["step_ms"] / 1000)
    if cuda:
        res["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        res["peak_extra_mib"] = res["peak_mib"] - base_mem
        from quietstar.flops import peak_bf16_flops, step_flops
        peak = peak_bf16_flops(device)
        if peak:
            res["mfu"] = step_flops(model.lm, B, T, th.M, th.P, th.L) / (res["step_ms"] / 1000) / peak
    else:
        res["peak_rss_mib"] = _status_mib("VmHWM")
        res["peak_extra_mib"] = res["peak_rss_mib"] - base_mem
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m, smollm2-135m-random (its shape, random init: no GGUF needed), "
                        "mistral-1b (random init), tiny, or a folder")
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--T", type=int, default=128)
    p.add_argument("--M", type=int, default=9)
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--P", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--document-mask", action=argparse.BooleanOptionalAction, default=True,
                   help="mask attention by the rows' packed documents (as training does by default)")
    p.add_argument("--paths", default=None, help="comma-separated; default: the device's list")
    p.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES", "x") != "" and
                   __import__("torch").cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default=None, help="file name stem of the results")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        import torch
        try:
            res = child(args)
        except torch.OutOfMemoryError as e:   # an explicit row, not a crash: the reference does not fit an H100 at B=8
            res = {"path": args.child, "oom": f"out of memory at B={args.B} T={args.T}: "
                                              f"{str(e).splitlines()[0][:200]}"}
        Path(args.tmp, f"{args.child}.json").write_text(json.dumps(res))
        return 0

    import tempfile
    paths = args.paths.split(",") if args.paths else (GPU_PATHS if args.device == "cuda" else CPU_PATHS)
    for name in paths:
        if name not in PATHS:
            raise SystemExit(f"--paths: unknown path {name!r}; known: {', '.join(PATHS)}")
    # the reference runs first among the Quiet-STaR paths: the others compare with its gradients
    paths = sorted(paths, key=lambda n: (n != "floor", n != "reference"))
    tmp = tempfile.mkdtemp(prefix="qs_bench_")
    base = [sys.executable, __file__] + [a for a in sys.argv[1:]]
    results = []
    for name in ["sample"] + paths:
        t0 = time.time()
        r = subprocess.run(base + ["--child", name, "--tmp", tmp], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"[{name}] FAILED\n{r.stderr[-3000:]}", file=sys.stderr)
            results.append({"path": name, "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "?"})
            continue
        res = json.loads(Path(tmp, f"{name}.json").read_text())
        if name == "sample":
            if "oom" in res:
                print(f"[sample] {res['oom']}", file=sys.stderr)
                results.append({"path": name, "error": res["oom"]})
            continue
        res["config"] = "floor" if PATHS[name] is None else "/".join(PATHS[name])
        if not math.isfinite(res.get("loss", 0.0)) or res.get("grad_nonfinite"):
            # a measured time is kept, but the path fails: its numbers are not what the algorithm computes
            res["error"] = (f"non-finite agreement pass: loss {res.get('loss')}, "
                            f"{res.get('grad_nonfinite', 0)} non-finite gradient entries")
            print(f"[{name}] {res['error']}", file=sys.stderr)
        res["wall_s"] = time.time() - t0
        results.append(res)
        print(json.dumps(res), flush=True)
        write_results(args, results)          # after every path: a timed-out run keeps what it measured
    print(write_results(args, results))
    failed = [r["path"] for r in results if "error" in r]
    ooms = [r["path"] for r in results if "oom" in r]
    measured = [r["path"] for r in results if "step_ms" in r]
    print(f"measured: {', '.join(measured) or 'none'}; out of memory: {', '.join(ooms) or 'none'}; "
          f"failed: {', '.join(failed) or 'none'}")
    return 1 if failed or not measured else 0


def write_results(args, results: list) -> str:
    """Ratios to the floor and the reference, then `<stem>.json` and `<stem>.md`; returns the table."""
    import torch
    floor = next((r for r in results if r["path"] == "floor" and "step_ms" in r), None)
    ref = next((r for r in results if r["path"] == "reference" and "step_ms" in r), None)
    for r in results:
        if "step_ms" in r and floor:
            r["time_vs_floor"] = r["step_ms"] / floor["step_ms"]
            r["mem_vs_floor"] = r["peak_extra_mib"] / floor["peak_extra_mib"]
        if "step_ms" in r and ref:
            r["speedup_vs_reference"] = ref["step_ms"] / r["step_ms"]
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "transformers": __import__("transformers").__version__,
            "shape": {k: getattr(args, k) for k in ("model", "B", "T", "M", "K", "P")},
            "document_mask": args.document_mask,
            "documents_per_row": next((r["documents_per_row"] for r in results if "documents_per_row" in r), None),
            "attended_fraction": next((r["attended_fraction"] for r in results if "attended_fraction" in r), None),
            "repeats": args.repeats, "warmup": args.warmup,
            "data": next((r["data"] for r in results if "data" in r), "?")}
    stem = args.tag or f"train_step_{args.device}_{args.model}_B{args.B}_T{args.T}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    cuda = args.device == "cuda"
    docs = ("document masking on" + (f" ({meta['documents_per_row']:.1f} documents per row, "
                                     f"{meta['attended_fraction']:.0%} of the causal base pairs kept)"
                                     if meta["documents_per_row"] is not None else "")
            if args.document_mask else "document masking off")
    lines = [f"# Quiet-STaR train step: {meta['shape']}", "",
             f"{meta['date']}, {meta['device']} ({meta['cpu_count']} cores), torch {meta['torch']}, "
             f"triton {meta['triton']}, transformers {meta['transformers']}; median of {args.repeats} after "
             f"{args.warmup} warm-up; data: {meta['data']}; {docs}", "",
             "| path | schedule/attention/lm-head | step ms | tok/s | peak extra MiB | x floor time | x floor mem "
             "| x faster than reference | loss rel diff | grad cosine |" + (" MFU |" if cuda else ""),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cuda else "")]
    for r in results:
        if "step_ms" not in r:
            why = f"OUT OF MEMORY: {r['oom']}" if "oom" in r else f"FAILED: {r.get('error', '?')}"
            lines.append(f"| {r['path']} | {why} |")
            continue
        f = lambda k, fmt: (fmt.format(r[k]) if k in r else "-")  # noqa: E731
        if "error" in r:
            lines.append(f"| {r['path']} | FAILED: {r['error']} |")
        lines.append(f"| {r['path']} | {r['config']} | {r['step_ms']:.0f} | {r['tok_per_s']:.0f} | "
                     f"{r['peak_extra_mib']:.0f} | {f('time_vs_floor', '{:.2f}')} | {f('mem_vs_floor', '{:.2f}')} | "
                     f"{f('speedup_vs_reference', '{:.2f}')} | {f('loss_rel_diff', '{:.1e}')} | "
                     f"{f('grad_cosine', '{:.6f}')} |" + (f" {f('mfu', '{:.1%}')} |" if cuda else ""))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
