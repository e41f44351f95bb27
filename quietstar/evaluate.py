"""Held-out loss with and without thoughts.

- without: the base pass's NLL of x_{t+1} (the model as an ordinary LM);
- with: the NLL of x_{t+1} under the mixed prediction of talk k = 1 (the thought's own next-token
  prediction mixed with the base by the learned w), averaged over the P sampled thoughts.
Both over the same scored targets of the held-out rows.
"""
from __future__ import annotations

import contextlib
import math
import time

import torch

from .thoughts import Backends, plain_lm_forward, thought_predictions


def heldout_losses(model, rows: torch.Tensor, valid: torch.Tensor, backends: Backends, batch_size: int,
                   generator: torch.Generator | None = None, device=None, autocast=None,
                   doc_start: torch.Tensor | None = None, thoughts: bool = True, progress: bool = False) -> dict:
    """The training log's held-out evaluation: mean NLL without and (`thoughts`) with thoughts over the scored
    targets (`doc_start`: the packed rows' documents, attended within, as in training). Its progress bar is
    erased when done: the training log prints the result."""
    valid = valid.clone()
    valid[:, -1] = False                          # x_T does not exist
    base, mixed = token_nll(model, rows, valid, backends, batch_size, thoughts, generator, device, autocast,
                            doc_start=doc_start, progress=progress, desc="held-out eval", leave=False)
    n = int(valid.sum())
    res = {"heldout_nll_base": float(base.double().sum()) / max(n, 1), "heldout_targets": n}
    if mixed is not None:
        res["heldout_nll_thought"] = float(mixed.double().sum()) / max(n, 1)
    return res


# ----------------------------------------------------------------------------------------------
# quietstar-eval: held-out text NLL / bits per byte with and without thoughts, hard tokens
# ----------------------------------------------------------------------------------------------
HARD_FRACTION = 0.10
TASKS = ("heldout", "gsm8k", "csqa")


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
              generator: torch.Generator | None = None, device=None, autocast=None, progress: bool = False,
              desc: str = "rows", doc_start: torch.Tensor | None = None, leave: bool = True):
    """Per-target NLL (R, T) of the base prediction and (with `thoughts`) of the k = 1 mixed prediction after a
    sampled thought, averaged over the P thoughts (the mean of -log p_mix over the P thoughts: the expected NLL of
    one sampled thought, not -log of their mean probability); 0 where not scored. The base prediction is computed
    the same way with and without `thoughts` (the base pass's attention and the LM-head op of `backends`), so a
    model scored either way, a control and a Quiet-STaR model, get the same numerics. The model's train/eval mode is
    restored on return. `doc_start` (R, T): packed rows' documents, each position attending within its own.
    `progress`: a tqdm bar over the batches, erased when done unless `leave`."""
    was_training = model.training
    model.eval()
    device = device or model.lm_head_weight.device
    base = torch.zeros(rows.shape, dtype=torch.float32)
    mixed = torch.zeros(rows.shape, dtype=torch.float32) if thoughts else None
    it = range(0, rows.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=desc + (" (thinking)" if thoughts else ""), unit="batch", leave=leave)
    for i in it:
        # trim the batch's right padding: nothing after its last scored target affects a scored one (causal)
        vb = valid[i:i + batch_size]
        last = int(vb.any(0).nonzero().max()) + 2 if bool(vb.any()) else 2
        ids, vn = rows[i:i + batch_size, :last].to(device), vb[:, :last].to(device)
        ds = None if doc_start is None else doc_start[i:i + batch_size, :last].to(device)
        ctx = autocast if autocast is not None else torch.autocast(device.type, enabled=False)
        with ctx:
            if thoughts:               # the k = 1 prediction only, on the sampler's cache (not the training loss)
                ex = thought_predictions(model, ids, vn, backends, generator, doc_start=ds)
                lp_base, lp_mix = ex.lp_base, ex.lp_mix.mean(1)                  # (B, T): mean of log p over P
            else:   # the base pass as thought_predictions computes it (attention, LM-head op): the same numbers
                _, _, ex = plain_lm_forward(model, ids, vn, backends, doc_start=ds)
                lp_base, lp_mix = ex.lp_base, None
        m = vn.float()
        base[i:i + batch_size, :last] = (-lp_base.float() * m).cpu()
        if thoughts:
            mixed[i:i + batch_size, :last] = (-lp_mix.float() * m).cpu()
    model.train(was_training)
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


def scored_rows(items, tok, sep_id: int, max_len: int = 512):
    """Rows [sep] + context + continuation (each tokenized on its own), right-padded to the longest row (at
    most `max_len`, the context cut from the left if needed); valid_next marks the continuation's tokens as
    targets. Returns (input_ids (R, T), valid_next (R, T), continuation bytes per row)."""
    from . import data as qdata
    ctx = qdata.tokenize_documents([c for c, _ in items], tok)
    cont = qdata.tokenize_documents([x for _, x in items], tok)
    seqs, starts = [], []
    for c, x in zip(ctx, cont):
        x = x[: max_len - 2]
        c = c[max(0, len(c) - (max_len - 1 - len(x))):]
        seqs.append([sep_id] + c + x)
        starts.append(1 + len(c))
    T = max(len(q) for q in seqs)
    ids = torch.full((len(seqs), T), sep_id, dtype=torch.long)
    valid = torch.zeros(len(seqs), T, dtype=torch.bool)
    for r, (q, st) in enumerate(zip(seqs, starts)):
        ids[r, :len(q)] = torch.tensor(q, dtype=torch.long)
        valid[r, st - 1:len(q) - 1] = True           # position t predicts x_{t+1}, a continuation token
    n_bytes = [len(tok.decode(x[: max_len - 2]).encode("utf-8")) for x in cont]
    return ids, valid, n_bytes


def _qa_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def gsm8k_rows(problems, tok, sep_id):
    """One scored row per problem: the question prompt, then " " + the gold worked solution."""
    return scored_rows([(_qa_prompt(p["question"]), " " + p["answer"]) for p in problems], tok, sep_id)


def gsm8k_nll(model, tok, sep_id, problems, backends, batch_size, thoughts, gen, device, autocast) -> dict:
    """NLL (nats/token) and bits per byte of the gold worked solutions given the question."""
    ids, valid, n_bytes = gsm8k_rows(problems, tok, sep_id)
    base, mixed = token_nll(model, ids, valid, backends, batch_size, thoughts, gen, device, autocast, progress=True,
                            desc="GSM8K solutions")
    res = {"problems": len(problems), "without_thoughts": summarize(base, valid, sum(n_bytes))}
    if mixed is not None:
        res["with_thoughts"] = summarize(mixed, valid, sum(n_bytes))
    return res


def final_number(text: str):
    """The answer of a generated solution: after "####" when present, else the last number; None if none."""
    import re
    part = text.split("####", 1)[1] if "####" in text else text
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", part)
    if not nums:
        return None
    pick = nums[0] if "####" in text else nums[-1]
    return pick.replace(",", "").rstrip(".")


def _same_number(a, b) -> bool:
    try:
        return a is not None and abs(float(a) - float(b)) < 1e-9
    except ValueError:
        return False


@torch.no_grad()
def gsm8k_exact_match(model, tok, problems, max_new_tokens: int, gen, device, thoughts: bool = True,
                      autocast=None) -> dict:
    """Greedy generation (with thoughts, quietstar.generate) of a solution per problem; exact match of its
    final number with the gold one. One problem at a time (prompts differ in length). `autocast`: a context
    to decode under (quietstar-eval: bf16 on CUDA, as its likelihood metrics)."""
    from tqdm.auto import tqdm

    from .generate import ThinkingDecoder, end_token_ids
    ends = set(end_token_ids(tok))
    correct, outputs = 0, []
    for p in tqdm(problems, desc="GSM8K generation" + (" (thinking)" if thoughts else ""), unit="problem"):
        ids = torch.tensor([tok(_qa_prompt(p["question"]), add_special_tokens=False)["input_ids"]], device=device)
        new = []
        with autocast if autocast is not None else contextlib.nullcontext():
            dec = ThinkingDecoder(model, ids)
            for _ in range(max_new_tokens):
                logp = dec.think(gen).logp_mix if thoughts else dec.base_logprobs()
                nxt = logp.argmax(-1)
                new.append(int(nxt))
                text = tok.decode(new)
                if int(nxt) in ends or "\nQuestion:" in text or "\n\n\n" in text:
                    break
                dec.advance(nxt)
        text = tok.decode([t for t in new if t not in ends]).split("\nQuestion:")[0]
        pred = final_number(text)
        ok = _same_number(pred, p["short_answer"])
        correct += ok
        outputs.append({"prediction": pred, "gold": p["short_answer"], "correct": ok, "text": text})
    return {"problems": len(problems), "exact_match": correct / max(len(problems), 1), "correct": correct,
            "thoughts": thoughts, "max_new_tokens": max_new_tokens, "outputs": outputs}


def commonsense_qa(model, tok, sep_id, questions, backends, batch_size, thoughts, gen, device, autocast) -> dict:
    """Zero-shot multiple choice by the answer's log-likelihood: the sum over its tokens, and the sum per
    character of the answer text; accuracy of the argmax choice, with and without thoughts."""
    ids, valid, _ = commonsense_qa_rows(questions, tok, sep_id)
    base, mixed = token_nll(model, ids, valid, backends, batch_size, thoughts, gen, device, autocast, progress=True,
                            desc="CommonsenseQA answers")
    res = {"questions": len(questions)}
    for key, nll in (("without_thoughts", base), ("with_thoughts", mixed)):
        if nll is None:
            continue
        ok, ok_char = choice_correct(nll, questions)
        res[key] = {"accuracy": float(ok.double().mean()), "accuracy_per_char": float(ok_char.double().mean())}
    return res


def commonsense_qa_rows(questions, tok, sep_id):
    """One scored row per (question, choice): the prompt, then " " + the choice as the continuation."""
    return scored_rows([(_qa_prompt(q["question"]), " " + c) for q in questions for c in q["choices"]], tok, sep_id)


def choice_correct(nll: torch.Tensor, questions) -> tuple[torch.Tensor, torch.Tensor]:
    """Per question (bool): is the choice with the highest answer log-likelihood the labelled one, by the sum
    over its tokens and by the sum per character. `nll` is token_nll's (R, T) over commonsense_qa_rows. A choice
    whose text is the labelled one's counts as it (24 of CommonsenseQA's 1,221 validation questions list an answer
    twice: the two copies score the same without thoughts, and argmax would take the first)."""
    n_choice = len(questions[0]["choices"])
    chars = torch.tensor([len(c) for q in questions for c in q["choices"]], dtype=torch.float64).view(-1, n_choice)
    ll = -nll.double().sum(1).view(-1, n_choice)

    def right(pred: torch.Tensor) -> torch.Tensor:
        return torch.tensor([q["choices"][int(p)] == q["choices"][q["label"]] for q, p in zip(questions, pred)])
    return right(ll.argmax(1)), right((ll / chars).argmax(1))


def stock_model(tok, dtype=torch.float32):
    """The stock SmolLM2-135M (`smollm2-135m`, the offline GGUF) as a Quiet-STaR model that has not trained: the
    default ThoughtConfig, markers started as quietstar-train starts them, a zero mixing head (w = 0: its
    predictions with thoughts are the base model's). `tok`: its tokenizer (assets.smollm2_tokenizer())."""
    from .config import ModelConfig, ThoughtConfig
    from .model import QuietStarModel, build_decoder
    from .train import marker_init_id
    return QuietStarModel(build_decoder(ModelConfig(name="smollm2-135m"), dtype=dtype), ThoughtConfig(),
                          marker_init_id=marker_init_id(tok, ThoughtConfig().marker_init_text))


def build_eval_parser():
    import argparse
    from .train import CliParser
    p = CliParser(prog="quietstar-eval", description="The paper's measurements, with and without "
                  "thoughts: held-out text NLL (and hard tokens), GSM8K, CommonsenseQA.",
                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="an export folder (QuietStarModel.save_pretrained / quietstar-train's "
                                 "OUT_DIR/export), or smollm2-135m (the stock model: zero mixing head)")
    p.add_argument("--tasks", default="heldout", help="comma-separated: heldout, gsm8k, csqa")
    p.add_argument("--data", default="default", help="heldout: default|math (the MATH held-out split) or a file")
    p.add_argument("--limit", type=int, default=None, help="the first N documents / problems / questions per task")
    p.add_argument("--seq-len", type=int, default=256, help="heldout: the separator + the first T-1 tokens")
    p.add_argument("--batch-size", type=int, default=4, help="rows scored at once")
    p.add_argument("--no-thoughts", action="store_true", help="the base prediction only (no thought sampled)")
    p.add_argument("--save-hard-mask", default=None, help="heldout: store the hardest 10%% of targets by base NLL")
    p.add_argument("--hard-mask", default=None,
                   help="heldout: score exactly the targets stored by --save-hard-mask (for the same --data, --limit "
                        "and --seq-len: checked)")
    p.add_argument("--gsm8k-em", type=int, default=0,
                   help="gsm8k: also greedy-generate solutions (with thoughts) for this many problems and report "
                        "exact match (slow: M + 3 decode steps per token)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="gsm8k generation length")
    p.add_argument("--out", default="eval_out", help="folder for eval.json and eval.md")
    p.add_argument("--seed", type=int, default=0, help="of the sampled thoughts")
    p.add_argument("--device", default="auto", help="auto (CUDA where there is a GPU), cuda or cpu")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    return p


def load_hard_mask(path) -> dict:
    """What --save-hard-mask stored ({"mask": (rows, T) bool, "seq_len": T, "data", "limit", "tokens_sha256",
    ...}), or a ValueError naming --hard-mask."""
    from pathlib import Path
    if not Path(path).is_file():
        raise ValueError(f"--hard-mask {path}: no such file (write one with --save-hard-mask)")
    try:
        saved = torch.load(path, map_location="cpu")
    except Exception as e:     # not a torch file, or one with other objects than tensors
        raise ValueError(f"--hard-mask {path}: not a mask saved by --save-hard-mask ({type(e).__name__})") from e
    if not (isinstance(saved, dict) and isinstance(saved.get("mask"), torch.Tensor) and "seq_len" in saved
            and saved["mask"].dtype == torch.bool and saved["mask"].dim() == 2):
        raise ValueError(f"--hard-mask {path}: not a mask saved by --save-hard-mask (a dict with a 2-D bool "
                         "'mask' and 'seq_len')")
    return saved


def _data_key(data: str) -> str:
    """--data as a mask file records it: default / math, or the file's absolute path."""
    from pathlib import Path
    return data if data in ("default", "math") else str(Path(data).resolve())


def check_hard_mask(saved: dict, args, n_docs: int) -> None:
    """Refuse (a ValueError naming --hard-mask) a saved mask whose rows are not this run's: another --data,
    --seq-len or number of documents (--limit). A file without some of these records is checked on the rest;
    the scored tokens themselves are compared later (`check_mask_tokens`), once they are tokenized."""
    here = {"--data": _data_key(args.data), "--seq-len": args.seq_len, "documents": n_docs}
    there = {"--data": _data_key(saved["data"]) if isinstance(saved.get("data"), str) else None,
             "--seq-len": saved["seq_len"], "documents": saved["mask"].shape[0]}
    diff = [f"{k} {there[k]} (this run: {here[k]})" for k in here if there[k] is not None and there[k] != here[k]]
    if saved["mask"].shape[1] != args.seq_len == saved["seq_len"]:
        diff.append(f"its mask has {saved['mask'].shape[1]} positions")
    if diff:
        raise ValueError(f"--hard-mask {args.hard_mask}: saved for {tuple(saved['mask'].shape)} rows x positions "
                         f"(T={saved['seq_len']}), this run has {(n_docs, args.seq_len)}: {'; '.join(diff)}; use the "
                         "same --data, --limit and --seq-len")


def check_mask_tokens(saved: dict, rows: torch.Tensor, valid: torch.Tensor, path) -> None:
    """Refuse a saved mask whose rows held other tokens (the file behind --data changed, or another tokenizer),
    where the file records them (`tokens_sha256`)."""
    if saved.get("tokens_sha256") not in (None, tokens_fingerprint(rows, valid)):
        raise ValueError(f"--hard-mask {path}: saved for other tokens than this run's rows (the --data file "
                         "changed since, or the model's tokenizer differs): save a new mask with --save-hard-mask")


def tokens_fingerprint(rows: torch.Tensor, valid: torch.Tensor) -> str:
    """A SHA-256 of the held-out rows' token ids and scored targets: what a saved mask's positions refer to."""
    import hashlib
    return hashlib.sha256(rows.to(torch.int64).numpy().tobytes() + valid.numpy().tobytes()).hexdigest()


def _heldout_documents(args) -> list[str]:
    """The held-out documents of --data (the first --limit); a bad file fails here, before the model loads."""
    from . import data as qdata
    spec = args.data if args.data in ("default", "math") else [args.data]
    try:
        return qdata.load_documents(spec, split="heldout", max_documents=args.limit or 0)   # None: all
    except (OSError, ValueError) as e:       # a missing or binary file, a bad JSON line
        raise ValueError(f"--data {args.data}: {e}") from e


def _heldout_rows(args, docs, saved, tok, sep_id):
    """The held-out rows (input_ids, valid_next) and their bytes; a ValueError for --data with no target, or a
    --hard-mask saved for other tokens."""
    from . import data as qdata
    toks = qdata.tokenize_documents(docs, tok)
    rows, valid = document_rows(toks, args.seq_len, sep_id)
    if not bool(valid.any()):
        raise ValueError(f"--data {args.data}: its documents have no tokens to score")
    if saved is not None:
        check_mask_tokens(saved, rows, valid, args.hard_mask)
    n_bytes = sum(len(tok.decode(t[: args.seq_len - 1]).encode("utf-8")) for t in toks)
    return rows, valid, n_bytes


def _heldout(args, docs, prepared, saved, model, backends, gen, device, autocast) -> dict:
    rows, valid, n_bytes = prepared
    base, mixed = token_nll(model, rows, valid, backends, args.batch_size, not args.no_thoughts, gen, device,
                            autocast, progress=True, desc="held-out rows")
    hard = None
    if saved is not None:                  # --hard-mask, checked before the rows were scored
        hard = saved["mask"] & valid
    elif args.save_hard_mask:
        hard = hard_mask(base, valid)
        torch.save({"mask": hard, "seq_len": args.seq_len, "data": _data_key(args.data), "limit": args.limit,
                    "tokens_sha256": tokens_fingerprint(rows, valid), "chosen_by": args.model}, args.save_hard_mask)
    res = {"documents": len(docs), "bytes": n_bytes, "without_thoughts": summarize(base, valid, n_bytes)}
    if mixed is not None:
        res["with_thoughts"] = summarize(mixed, valid, n_bytes)
    if hard is not None:
        res["hard_tokens"] = {"without_thoughts": summarize(base, hard, None), "mask": args.hard_mask or
                              args.save_hard_mask}
        if mixed is not None:
            res["hard_tokens"]["with_thoughts"] = summarize(mixed, hard, None)
    return res


def _check_output_paths(args) -> None:
    """--out must be (or become) a folder, --save-hard-mask a file in an existing folder: refused now rather
    than after the scoring."""
    import os
    from pathlib import Path

    from .train import folder_obstacle
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file, not a folder (eval.json and eval.md go into the folder)")
    blocked = folder_obstacle(out)
    if blocked is not None:
        raise ValueError(f"--out {out}: cannot create the folder, {blocked} is "
                         f"{'a file' if blocked.is_file() else 'not writable'}")
    if args.save_hard_mask:
        mask = Path(args.save_hard_mask)
        if mask.is_dir():
            raise ValueError(f"--save-hard-mask {mask}: a folder (give a file name, e.g. {mask / 'hard.pt'})")
        if not mask.absolute().parent.is_dir():
            raise ValueError(f"--save-hard-mask {mask}: no such folder {mask.absolute().parent}")
        if not os.access(mask.absolute().parent, os.W_OK):
            raise ValueError(f"--save-hard-mask {mask}: the folder {mask.absolute().parent} is not writable")


def _nll_table(r: dict) -> list[str]:
    lines = ["| | targets | NLL (nats/token) | bits per byte |", "|---|---|---|---|"]
    for key in ("without_thoughts", "with_thoughts"):
        if key in r:
            lines.append(f"| {key.replace('_', ' ')} | {r[key]['targets']} | {r[key]['nll']:.4f} | "
                         f"{r[key]['bits_per_byte']:.4f} |")
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _markdown(res: dict, args) -> list[str]:
    m = res["meta"]
    lines = [f"# quietstar-eval: {args.model}", "", f"{m['date']}, {m['device']}; thoughts: "
             f"{'M=%d, P=%d' % (m['M'], m['P']) if m['thoughts'] else 'off'}, seed {args.seed}; scoring took "
             f"{m['scoring_s']:.0f} s", ""]
    if "heldout" in res:
        h = res["heldout"]
        lines += [f"## Held-out text ({args.data}: {_count(h['documents'], 'document')}, one row each: separator + first "
                  f"{args.seq_len - 1} tokens; {h['bytes']} bytes)", ""] + _nll_table(h)
        for key in ("without_thoughts", "with_thoughts"):
            if key in h.get("hard_tokens", {}):
                r = h["hard_tokens"][key]
                lines.append(f"| hard tokens, {key.replace('_', ' ')} | {r['targets']} | {r['nll']:.4f} | - |")
        lines.append("")
    if "gsm8k" in res:
        g = res["gsm8k"]
        lines += [f"## GSM8K test ({_count(g['problems'], 'problem')}): gold-solution likelihood given the question",
                  ""] + _nll_table(g)
        if "exact_match" in g:
            e = g["exact_match"]
            lines += ["", f"Greedy generation {'with' if e['thoughts'] else 'without'} thoughts, "
                      f"{_count(e['problems'], 'problem')}: exact match {e['exact_match']:.1%} ({e['correct']} correct)"]
        lines.append("")
    if "csqa" in res:
        c = res["csqa"]
        lines += [f"## CommonsenseQA validation ({_count(c['questions'], 'question')}), zero-shot by answer likelihood", "",
                  "| | accuracy (sum) | accuracy (per character) |", "|---|---|---|"]
        for key in ("without_thoughts", "with_thoughts"):
            if key in c:
                lines.append(f"| {key.replace('_', ' ')} | {c[key]['accuracy']:.1%} | {c[key]['accuracy_per_char']:.1%} |")
        lines.append("")
    return lines


def eval_main(argv=None) -> int:
    """The CLI; bad input (a missing or mismatched export, a --hard-mask of other rows, ...) ends in one
    line, exit status 2 (`--debug`: the traceback)."""
    from .train import run_cli
    return run_cli("quietstar-eval", _eval_main, argv)


def _eval_main(argv) -> int:
    import datetime
    import json
    from pathlib import Path

    from . import assets
    from .model import QuietStarModel, load_export_tokenizer
    from .train import document_separator, resolve_device
    args = build_eval_parser().parse_args(argv)
    device = resolve_device(args.device)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1 (or left out: everything), got {args.limit}")
    for flag, v, least in (("--batch-size", args.batch_size, 1), ("--seq-len", args.seq_len, 2),
                           ("--max-new-tokens", args.max_new_tokens, 1), ("--gsm8k-em", args.gsm8k_em, 0)):
        if v < least:
            raise ValueError(f"{flag} must be >= {least}, got {v}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"--tasks: {'unknown %s' % bad if bad else 'none given'}; choose from {', '.join(TASKS)}")
    if args.gsm8k_em and "gsm8k" not in tasks:
        raise ValueError(f"--gsm8k-em generates GSM8K solutions: add gsm8k to --tasks (got {args.tasks})")
    if (args.hard_mask or args.save_hard_mask) and "heldout" not in tasks:
        raise ValueError(f"--hard-mask / --save-hard-mask are for the heldout task: add it to --tasks "
                         f"(got {args.tasks})")
    if args.hard_mask and args.save_hard_mask:
        raise ValueError("--hard-mask scores a saved mask, --save-hard-mask saves a new one: give one of them")
    _check_output_paths(args)
    # read before the model loads: a bad --hard-mask or --data fails now, not after minutes of loading and scoring
    saved_mask = load_hard_mask(args.hard_mask) if args.hard_mask else None
    docs = _heldout_documents(args) if "heldout" in tasks else None
    if docs is not None and not docs:
        raise ValueError(f"--data {args.data}: no documents (the file is empty, or every document is blank)")
    if saved_mask is not None:
        check_hard_mask(saved_mask, args, len(docs))
    # the tokenizer before the model where the export has one (where not, the model's loading or the tokenizer's
    # after it says what is wrong): the held-out rows are tokenized and checked (no target, a --hard-mask of other
    # tokens) before the model loads
    if args.model == "smollm2-135m":
        tok = assets.smollm2_tokenizer()
    else:
        tok = load_export_tokenizer(args.model) if (Path(args.model) / "tokenizer.json").is_file() else None
    heldout_rows = None
    if tok is not None and docs is not None:
        heldout_rows = _heldout_rows(args, docs, saved_mask, tok, document_separator(tok))
    if args.model == "smollm2-135m":
        model = stock_model(tok)
    else:
        model = QuietStarModel.from_pretrained(args.model)
        tok = tok or load_export_tokenizer(args.model)
    model = model.to(device).eval()
    sep_id = document_separator(tok)
    cuda = device.type == "cuda"
    backends = Backends("triton", "triton") if cuda else Backends("split", "chunked")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else None
    gen = torch.Generator(device=device).manual_seed(args.seed)
    thoughts = not args.no_thoughts
    res = {"meta": {"model": args.model, "tasks": tasks, "limit": args.limit, "thoughts": thoughts,
                    "M": model.thought.M, "P": model.thought.P, "seed": args.seed, "device": str(device),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}}
    t_scoring = time.perf_counter()
    if "heldout" in tasks:
        res["heldout"] = _heldout(args, docs, heldout_rows, saved_mask, model, backends, gen, device, autocast)
    if "gsm8k" in tasks:
        probs = assets.gsm8k_test()[: args.limit]
        res["gsm8k"] = gsm8k_nll(model, tok, sep_id, probs, backends, args.batch_size, thoughts, gen, device,
                                 autocast)
        if args.gsm8k_em:
            res["gsm8k"]["exact_match"] = gsm8k_exact_match(model, tok, probs[: args.gsm8k_em], args.max_new_tokens,
                                                            gen, device, thoughts, autocast)
    if "csqa" in tasks:
        qs = assets.commonsense_qa_validation()[: args.limit]
        res["csqa"] = commonsense_qa(model, tok, sep_id, qs, backends, args.batch_size, thoughts, gen, device,
                                     autocast)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res["meta"]["scoring_s"] = round(time.perf_counter() - t_scoring, 1)      # the tasks, after the model loaded
    (out / "eval.json").write_text(json.dumps(res, indent=1))
    lines = _markdown(res, args)
    (out / "eval.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    wrote = [out / "eval.json", out / "eval.md"] + ([Path(args.save_hard_mask)] if args.save_hard_mask else [])
    print("wrote " + ", ".join(str(p) for p in wrote))
    return 0


if __name__ == "__main__":
    raise SystemExit(eval_main())
