"""Held-out loss with and without thoughts.

- without: the base pass's NLL of x_{t+1} (the model as an ordinary LM);
- with: the NLL of x_{t+1} under the mixed prediction of talk k = 1 (the thought's own next-token
  prediction mixed with the base by the learned w), averaged over the P sampled thoughts.
Both over the same scored targets of the held-out rows.
"""
from __future__ import annotations

import math

import torch

from .config import LossConfig
from .thoughts import Backends, quietstar_forward


@torch.no_grad()
def heldout_losses(model, rows: torch.Tensor, valid: torch.Tensor, backends: Backends, batch_size: int,
                   generator: torch.Generator | None = None, device=None, autocast=None) -> dict:
    was_training = model.training
    model.eval()
    device = device or model.lm_head_weight.device
    s_base = s_thought = 0.0
    n = 0
    for i in range(0, rows.shape[0], batch_size):
        ids, vn = rows[i:i + batch_size].to(device), valid[i:i + batch_size].to(device)
        ctx = autocast if autocast is not None else torch.autocast(device.type, enabled=False)
        with ctx:
            _, _, ex = quietstar_forward(model, ids, vn, LossConfig(), "sample-then-train", backends, generator)
        vn = vn.clone()
        vn[:, -1] = False
        s_base += float(-(ex.lp_base * vn).sum())
        s_thought += float(-(ex.lp_mix[..., 0].mean(1) * vn).sum())       # (B, T): k = 1, mean over passes
        n += int(vn.sum())
    model.train(was_training)
    return {"heldout_nll_base": s_base / max(n, 1), "heldout_nll_thought": s_thought / max(n, 1),
            "heldout_targets": n}


# ----------------------------------------------------------------------------------------------
# quietstar-eval: held-out text NLL / bits per byte with and without thoughts, hard tokens
# ----------------------------------------------------------------------------------------------
HARD_FRACTION = 0.10


def document_rows(docs_token_ids, T: int, sep_id: int, pad_id: int | None = None):
    """One row per document: the separator, then the document's first T - 1 tokens, padded on the right.
    Returns (input_ids (R, T), valid_next (R, T) bool: every document token is a target)."""
    R = len(docs_token_ids)
    pad = sep_id if pad_id is None else pad_id
    ids = torch.full((R, T), pad, dtype=torch.long)
    valid = torch.zeros(R, T, dtype=torch.bool)
    for r, toks in enumerate(docs_token_ids):
        toks = list(toks)[: T - 1]
        ids[r, 0] = sep_id
        ids[r, 1:1 + len(toks)] = torch.tensor(toks, dtype=torch.long)
        valid[r, :len(toks)] = True                    # position t predicts x_{t+1}, a document token
    return ids, valid


@torch.no_grad()
def token_nll(model, rows, valid, backends: Backends, batch_size: int, thoughts: bool = True,
              generator: torch.Generator | None = None, device=None, autocast=None, progress: bool = False):
    """Per-target NLL (R, T) of the base prediction and (with `thoughts`) of the k = 1 mixed prediction after a
    sampled thought, averaged over the P thoughts; 0 where not scored."""
    model.eval()
    device = device or model.lm_head_weight.device
    base = torch.zeros(rows.shape, dtype=torch.float32)
    mixed = torch.zeros(rows.shape, dtype=torch.float32) if thoughts else None
    it = range(0, rows.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="held-out rows" + (" (thinking)" if thoughts else ""), unit="batch")
    for i in it:
        ids, vn = rows[i:i + batch_size].to(device), valid[i:i + batch_size].to(device)
        ctx = autocast if autocast is not None else torch.autocast(device.type, enabled=False)
        with ctx:
            if thoughts:
                _, _, ex = quietstar_forward(model, ids, vn, LossConfig(), "sample-then-train", backends, generator)
                lp_base, lp_mix = ex.lp_base, ex.lp_mix[..., 0].mean(1)          # (B, T)
            else:
                h = model.lm.model(input_ids=ids).last_hidden_state
                lp = torch.log_softmax((h @ model.lm_head_weight.T).float(), dim=-1)
                tgt = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)
                lp_base, lp_mix = lp.gather(-1, tgt[..., None])[..., 0], None
        m = vn.float()
        base[i:i + batch_size] = (-lp_base.float() * m).cpu()
        if thoughts:
            mixed[i:i + batch_size] = (-lp_mix.float() * m).cpu()
    return base, mixed


def hard_mask(nll: torch.Tensor, valid: torch.Tensor, fraction: float = HARD_FRACTION) -> torch.Tensor:
    """The hardest `fraction` of the scored targets by `nll` (ties broken by position), as a (R, T) bool mask."""
    scores = torch.where(valid, nll, torch.full_like(nll, float("-inf"))).flatten()
    k = max(1, int(round(fraction * int(valid.sum()))))
    idx = torch.topk(scores, k, sorted=False).indices
    out = torch.zeros_like(scores, dtype=torch.bool)
    out[idx] = True
    return out.view(nll.shape)


def summarize(nll: torch.Tensor, mask: torch.Tensor, n_bytes: int | None) -> dict:
    n = int(mask.sum())
    total = float(nll[mask].double().sum())
    res = {"targets": n, "nll": total / max(n, 1)}
    if n_bytes:
        res["bits_per_byte"] = total / math.log(2) / n_bytes
    return res


def build_eval_parser():
    import argparse
    p = argparse.ArgumentParser(prog="quietstar-eval", description="Held-out NLL and bits per byte, with and "
                                "without thoughts, overall and on the hardest tokens.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="an export folder (QuietStarModel.save_pretrained / quietstar-train's "
                                 "OUT_DIR/export), or smollm2-135m (the stock model: zero mixing head)")
    p.add_argument("--data", default="default", help="default|math (the MATH held-out split) or text/JSONL files")
    p.add_argument("--limit", type=int, default=None, help="the first N documents only")
    p.add_argument("--seq-len", type=int, default=256, help="T: the separator + the first T-1 document tokens")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--no-thoughts", action="store_true", help="the base prediction only (no thought sampled)")
    p.add_argument("--save-hard-mask", default=None, help="store the hardest 10%% of targets by base NLL here")
    p.add_argument("--hard-mask", default=None, help="score exactly the targets stored by --save-hard-mask")
    p.add_argument("--out", default="eval_out", help="folder for eval.json and eval.md")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def eval_main(argv=None) -> int:
    import datetime
    import json
    from pathlib import Path

    from . import data as qdata
    from .model import QuietStarModel, load_export_tokenizer
    args = build_eval_parser().parse_args(argv)
    device = torch.device(args.device)
    if args.model == "smollm2-135m":
        from . import assets
        from .config import ModelConfig, ThoughtConfig
        from .model import build_decoder
        from .train import marker_init_id
        tok = assets.smollm2_tokenizer()
        model = QuietStarModel(build_decoder(ModelConfig(name="smollm2-135m")), ThoughtConfig(),
                               marker_init_id=marker_init_id(tok, ThoughtConfig().marker_init_text))
    else:
        model = QuietStarModel.from_pretrained(args.model)
        tok = load_export_tokenizer(args.model)
    model = model.to(device).eval()
    from .train import document_separator
    spec = args.data if args.data in ("default", "math") else [args.data]
    docs = qdata.load_documents(spec, split="heldout")
    if args.limit is not None:
        docs = docs[: args.limit]
    toks = qdata.tokenize_documents(docs, tok)
    rows, valid = document_rows(toks, args.seq_len, document_separator(tok))
    n_bytes = sum(len(tok.decode(t[: args.seq_len - 1]).encode("utf-8")) for t in toks)
    cuda = device.type == "cuda"
    backends = Backends("triton", "triton") if cuda else Backends("split", "chunked")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else None
    gen = torch.Generator(device=device).manual_seed(args.seed)
    base, mixed = token_nll(model, rows, valid, backends, args.batch_size, not args.no_thoughts, gen, device,
                            autocast, progress=True)
    hard = None
    if args.hard_mask:
        saved = torch.load(args.hard_mask)
        if tuple(saved["mask"].shape) != tuple(valid.shape) or saved["seq_len"] != args.seq_len:
            raise ValueError(f"--hard-mask {args.hard_mask}: saved for {tuple(saved['mask'].shape)} rows x positions "
                             f"(T={saved['seq_len']}), this run has {tuple(valid.shape)}: use the same --data, "
                             "--limit and --seq-len")
        hard = saved["mask"] & valid
    elif args.save_hard_mask:
        hard = hard_mask(base, valid)
        torch.save({"mask": hard, "seq_len": args.seq_len, "data": args.data, "limit": args.limit,
                    "chosen_by": args.model}, args.save_hard_mask)
    res = {"meta": {"model": args.model, "data": args.data, "documents": len(docs), "seq_len": args.seq_len,
                    "thoughts": not args.no_thoughts, "M": model.thought.M, "P": model.thought.P, "seed": args.seed,
                    "device": str(device), "bytes": n_bytes,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
           "without_thoughts": summarize(base, valid, n_bytes)}
    if mixed is not None:
        res["with_thoughts"] = summarize(mixed, valid, n_bytes)
    if hard is not None:
        res["hard_tokens"] = {"without_thoughts": summarize(base, hard, None)}
        if mixed is not None:
            res["hard_tokens"]["with_thoughts"] = summarize(mixed, hard, None)
        res["hard_tokens"]["mask"] = args.hard_mask or args.save_hard_mask
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(res, indent=1))
    lines = [f"# quietstar-eval: {args.model}", "", f"{res['meta']['date']}, {device}; {len(docs)} held-out documents "
             f"({args.data}), one row each (separator + first {args.seq_len - 1} tokens), {res['meta']['bytes']} "
             f"bytes scored; thoughts: M={model.thought.M}, P={model.thought.P}, seed {args.seed}", "",
             "| | targets | NLL (nats/token) | bits per byte |", "|---|---|---|---|"]
    for key in ("without_thoughts", "with_thoughts"):
        if key in res:
            r = res[key]
            lines.append(f"| {key.replace('_', ' ')} | {r['targets']} | {r['nll']:.4f} | {r['bits_per_byte']:.4f} |")
    if "hard_tokens" in res:
        for key in ("without_thoughts", "with_thoughts"):
            if key in res["hard_tokens"]:
                r = res["hard_tokens"][key]
                lines.append(f"| hard tokens, {key.replace('_', ' ')} | {r['targets']} | {r['nll']:.4f} | - |")
    (out / "eval.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(eval_main())
