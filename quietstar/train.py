"""Quiet-STaR training loop: `quietstar-train` / `python -m quietstar.train`.

Reads top to bottom: parse the config -> data -> model -> optimizer -> (resume) -> steps -> checkpoint.
AdamW on fp32 master weights (bf16 autocast on CUDA), linear warmup, gradient clipping, gradient
accumulation, a log line per step (every loss term, mean/spread of w, mean reward, tok/s), a tqdm
bar, checkpoints that `--resume` continues exactly, and a JSON-lines metrics file per run.

With no arguments it trains a small random-init Mistral with the real Mistral-7B tokenizer on the
embedded MATH corpus for a few minutes on a CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data
from .config import (ATTENTION_BACKENDS, LM_HEAD_BACKENDS, SCHEDULES, TINY_PRESET, Config, LossConfig,
                     ModelConfig, ThoughtConfig, TrainConfig)
from .flops import peak_bf16_flops, step_flops
from .model import QuietStarModel, build_decoder
from .thoughts import Backends, check_batch, target_counts


# ----------------------------------------------------------------------------------------------
# config from the command line (one parse)
# ----------------------------------------------------------------------------------------------
def _add_fields(parser: argparse.ArgumentParser, cls, prefix: str = "", skip=()):
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        name = "--" + prefix + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            parser.add_argument(name, dest=prefix.replace("-", "_") + f.name, action=argparse.BooleanOptionalAction,
                                default=None)
        elif isinstance(default, tuple):
            parser.add_argument(name, dest=prefix.replace("-", "_") + f.name, nargs="+", default=None,
                                type=type(default[0]) if default else int)
        else:
            parser.add_argument(name, dest=prefix.replace("-", "_") + f.name, type=type(default), default=None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quietstar-train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", dest="model_name", default=None,
                   help='"tiny" (random-init Mistral), "smollm2-135m", "smollm2-135m-random" (its shape, random '
                        'weights: for speed runs), or a Hugging Face Mistral/Llama folder')
    p.add_argument("--attention", choices=ATTENTION_BACKENDS, default=None)
    p.add_argument("--lm-head", dest="lm_head", choices=LM_HEAD_BACKENDS, default=None)
    p.add_argument("--schedule", choices=SCHEDULES, default=None)
    p.add_argument("--data", nargs="+", default=None, help='"default", "math", or text / JSON-lines files')
    g = p.add_argument_group("model (random-init tiny model)")
    _add_fields(g, ModelConfig, "model-", skip=("name",))
    g = p.add_argument_group("thoughts")
    _add_fields(g, ThoughtConfig)
    g = p.add_argument_group("loss")
    _add_fields(g, LossConfig)
    g = p.add_argument_group("training")
    _add_fields(g, TrainConfig, skip=("attention", "lm_head", "schedule", "data"))
    return p


def config_from_args(argv=None) -> Config:
    args = vars(build_parser().parse_args(argv))

    def pick(cls, prefix=""):
        kw = {}
        for f in dataclasses.fields(cls):
            v = args.get(prefix + f.name)
            if v is not None:
                kw[f.name] = tuple(v) if isinstance(v, list) else v
        return kw

    mkw = pick(ModelConfig, "model_")
    if args["model_name"]:
        mkw["name"] = args["model_name"]
    tkw, lkw = pick(TrainConfig), pick(LossConfig)
    for k in ("attention", "lm_head", "schedule", "data"):
        if args[k] is not None:
            tkw[k] = tuple(args[k]) if k == "data" else args[k]
    if mkw.get("name", "tiny") == "tiny":
        tkw = {**TINY_PRESET["train"], **tkw}
        lkw = {**TINY_PRESET["loss"], **lkw}
    train = TrainConfig(**tkw)
    # Defaults that depend on the machine: the fused path on CUDA, the fastest CPU path on CPU.
    cuda = resolve_device(train.device).type == "cuda"
    if args["attention"] is None:
        train.attention = "triton" if cuda else "split"
    if args["lm_head"] is None:
        train.lm_head = "triton" if cuda else "chunked"
    if train.cuda_graphs:
        from .graphs import GRAPH_ATTENTION
        if not cuda:
            raise ValueError("--cuda-graphs needs a CUDA GPU (and --device cuda or auto)")
        if train.lm_head != "triton" or train.attention not in GRAPH_ATTENTION:
            raise ValueError(f"--cuda-graphs needs --lm-head triton and --attention in {GRAPH_ATTENTION}, got "
                             f"--lm-head {train.lm_head} --attention {train.attention}")
    return Config(model=ModelConfig(**mkw), thought=ThoughtConfig(**pick(ThoughtConfig)),
                  loss=LossConfig(**lkw), train=train)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------
# data and tokenizer
# ----------------------------------------------------------------------------------------------
def load_tokenizer(model_cfg: ModelConfig):
    from . import assets
    if model_cfg.name == "tiny":
        return assets.mistral_tokenizer()
    if model_cfg.name in ("smollm2-135m", "smollm2-135m-random"):
        return assets.smollm2_tokenizer()
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_cfg.name)


def document_separator(tok) -> int:
    """Documents are packed as [sep] + doc + [sep] + doc ... (quietstar/data.py): `<|endoftext|>` where
    the vocabulary has it (SmolLM2's id 0), else BOS (Mistral's <s>), else EOS."""
    eot = tok.convert_tokens_to_ids("<|endoftext|>") if hasattr(tok, "convert_tokens_to_ids") else None
    if isinstance(eot, int) and eot != getattr(tok, "unk_token_id", None):
        return eot
    if getattr(tok, "bos_token_id", None) is not None:
        return int(tok.bos_token_id)
    return int(tok.eos_token_id)


def load_rows(data_spec, tok, T: int, split: str = "train", with_doc_start: bool = False):
    """Tokenize the documents and pack them into rows: (input_ids (R, T), valid_next (R, T)[, doc_start (R, T)])."""
    from . import data
    spec = data_spec[0] if len(data_spec) == 1 and data_spec[0] in ("default", "math") else list(data_spec)
    docs = data.load_documents(spec, split=split)
    return data.pack_rows(data.tokenize_documents(docs, tok), T, sep_id=document_separator(tok),
                          with_doc_start=with_doc_start)


def marker_init_id(tok, text: str) -> int:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"ThoughtConfig.marker_init_text={text!r} tokenizes to nothing")
    return int(ids[0])


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
def rng_state(generator: torch.Generator) -> dict:
    s = {"torch": torch.get_rng_state(), "sampler": generator.get_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(s["torch"])
    generator.set_state(s["sampler"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(path: Path, model, opt, sched, step: int, generator, cfg: Config) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "step": step, "rng": rng_state(generator), "config": dataclasses.asdict(cfg)}, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def init_distributed(device_name: str):
    """Under `torchrun` (WORLD_SIZE > 1): start the process group (NCCL on CUDA, gloo on CPU) and
    return (rank, world, device); else (0, 1, the resolved device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def train(cfg: Config, rank: int = 0, world: int = 1, progress: bool = True, device=None) -> dict:
    """Run `cfg`; with world > 1 (a started process group) as data-parallel rank `rank` (DDP)."""
    tc = cfg.train
    device = device if device is not None else resolve_device(tc.device)
    torch.manual_seed(tc.seed)
    out = Path(tc.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # data
    tok = load_tokenizer(cfg.model)
    packed = load_rows(tc.data, tok, tc.seq_len, with_doc_start=tc.document_mask)   # (rows, valid[, doc_start])
    rows, valid = packed[:2]
    if rows.shape[0] < tc.batch_size * world:
        raise ValueError(f"--data gives {rows.shape[0]} rows of T={tc.seq_len} tokens; need at least "
                         f"batch_size*world_size={tc.batch_size * world}")

    # model: fp32 master weights
    lm = build_decoder(cfg.model, dtype=torch.float32)
    if lm.config.vocab_size < len(tok):
        raise ValueError(f"the tokenizer has {len(tok)} ids but the model's vocab_size is {lm.config.vocab_size}")
    model = QuietStarModel(lm, cfg.thought, marker_init_id=marker_init_id(tok, cfg.thought.marker_init_text))
    model.check_lengths(tc.seq_len)
    model.to(device).train()
    backends = Backends(tc.attention, tc.lm_head)

    fwd = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        fwd = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, tc.warmup_steps)))
    generator = torch.Generator(device=device).manual_seed(tc.seed + 1 + rank)
    sampler = None
    if tc.cuda_graphs:
        from .graphs import GraphedSampler
        sampler = GraphedSampler(model, backends, generator)
    start = 0
    if tc.resume:
        ck = torch.load(tc.resume, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"], generator)
        start = ck["step"]
    metrics_path = out / "metrics.jsonl"
    if rank == 0 and not tc.resume and metrics_path.exists():
        metrics_path.unlink()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    tokens_per_micro = tc.batch_size * tc.seq_len * (1 + cfg.thought.P * cfg.thought.L)
    th = cfg.thought
    flops_per_rank_step = step_flops(lm, tc.batch_size, tc.seq_len, th.M, th.P, th.L) * tc.grad_accum
    peak = peak_bf16_flops(device)                 # None off CUDA or on an unknown GPU: no MFU
    bar = tqdm(range(start, tc.steps), desc="quietstar", disable=not progress or rank != 0, initial=start,
               total=tc.steps)
    last = {}
    eval_rows = None
    if tc.eval_rows > 0:
        eval_rows = [x[: tc.eval_rows] for x in load_rows(tc.data, tok, tc.seq_len, split="heldout",
                                                          with_doc_start=tc.document_mask)]

    def evaluate(step: int) -> None:
        from .evaluate import heldout_losses
        g = torch.Generator(device=device).manual_seed(tc.seed + 12345)   # same thoughts' randomness each time
        ev = heldout_losses(model, *eval_rows[:2], backends, tc.batch_size, g, device, autocast,
                            doc_start=eval_rows[2] if len(eval_rows) > 2 else None)
        ev["step"] = step
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"eval": ev}) + "\n")
            tqdm.write(f"eval @ step {step}: held-out NLL without thoughts {ev['heldout_nll_base']:.4f}, "
                       f"with thoughts {ev['heldout_nll_thought']:.4f} ({ev['heldout_targets']} targets)")

    if eval_rows is not None and start == 0:
        evaluate(0)
    # micro-batch i of the run is a pure function of (seed, i, rank): a resumed run reads the same rows
    stream = data.batches(packed, tc.batch_size, tc.seed, rank, world, start_step=start * tc.grad_accum)
    for step in bar:
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        for micro in range(tc.grad_accum):
            ids, vn, *ds = (x.to(device) for x in next(stream))
            ds = ds[0] if ds else None               # doc_start (B, T) with --document-mask
            den = None
            if world > 1:   # divide by global counts / world: the averaged gradient is the big batch's
                import torch.distributed as dist
                c = target_counts(check_batch(ids, vn, ds), cfg.thought.K, cfg.thought.P, ds)
                flat = torch.stack([c["n_base"], c["n_talk"], c["n_pol"]])
                dist.all_reduce(flat)
                den = dict(zip(("n_base", "n_talk", "n_pol"), flat / world))
            sync = world == 1 or micro == tc.grad_accum - 1
            with autocast, (contextlib.nullcontext() if sync else fwd.no_sync()):
                thoughts = sampler(ids, ds) if sampler is not None else None  # else sampled inside
                loss, m, _ = fwd(ids, vn, cfg.loss, tc.schedule, backends, generator, thoughts=thoughts,
                                 denominators=den, doc_start=ds)
                (loss / tc.grad_accum).backward()
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v.float() / tc.grad_accum
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if world > 1:   # log the mean over ranks
            import torch.distributed as dist
            keys = sorted(sums)
            flat = torch.stack([torch.as_tensor(sums[k], device=device, dtype=torch.float32) for k in keys])
            dist.all_reduce(flat)
            sums = dict(zip(keys, flat / world))
        # one host sync per step, for the log line
        rec = {k: float(v) for k, v in sums.items()}
        dt = time.perf_counter() - t0
        rec.update(step=step + 1, lr=sched.get_last_lr()[0], grad_norm=float(gnorm), ms=1000 * dt,
                   tok_per_s=tokens_per_micro * tc.grad_accum * world / dt)
        if peak:
            rec["mfu"] = flops_per_rank_step / dt / peak
        last = rec
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if (step + 1) % tc.log_every == 0:
                tqdm.write(f"step {step + 1:5d} | loss {rec['loss']:.4f} | base {rec['nll_base']:.4f} | "
                           f"talk {rec['nll_talk']:.4f} | policy {rec['policy']:+.3e} | "
                           f"w {rec['w_mean']:+.3f}±{rec['w_std']:.3f} | reward {rec['reward']:+.3f} | "
                           f"{rec['ms']:.0f} ms | {rec['tok_per_s']:.0f} tok/s"
                           + (f" | MFU {rec['mfu']:.1%}" if "mfu" in rec else ""))
            if tc.ckpt_every and (step + 1) % tc.ckpt_every == 0 and step + 1 < tc.steps:
                save_checkpoint(out / f"step{step + 1:06d}.pt", model, opt, sched, step + 1, generator, cfg)
    if eval_rows is not None:
        evaluate(tc.steps)
    ckpt = out / "final.pt"
    export = out / "export"
    if rank == 0:
        save_checkpoint(ckpt, model, opt, sched, tc.steps, generator, cfg)
        model.save_pretrained(export, tokenizer=tok)    # a Hugging Face folder + the Quiet-STaR extras
        print(f"checkpoint: {ckpt}\nexport:     {export}\nmetrics:    {metrics_path}")
    return {"checkpoint": str(ckpt), "export": str(export), "metrics": str(metrics_path), "last": last,
            "model": model}


def main(argv=None) -> int:
    cfg = config_from_args(argv)
    rank, world, device = init_distributed(cfg.train.device)
    try:
        train(cfg, rank, world, device=device)
    finally:
        if world > 1:
            import torch.distributed as dist
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
