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
import hashlib
import itertools
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data, parallel
from .config import (ATTENTION_BACKENDS, LM_HEAD_BACKENDS, MODEL_PRESETS, SCHEDULES, TINY_PRESET, Config,
                     LossConfig, ModelConfig, ThoughtConfig, TrainConfig)
from .flops import peak_bf16_flops, step_flops
from .model import QuietStarModel, build_decoder
from .thoughts import ADDITIVE_METRICS, Backends, check_batch, target_counts


# ----------------------------------------------------------------------------------------------
# config from the command line (one parse)
# ----------------------------------------------------------------------------------------------
def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of dataclass `cls` (read from its source), as one line each."""
    import ast
    import inspect
    import textwrap
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _default_text(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, tuple) else repr(v) if isinstance(v, str) else str(v)


FIELD_CHOICES = {"parallel": parallel.PARALLEL_MODES}     # fields whose flag takes one of a few values


def _add_fields(parser: argparse.ArgumentParser, cls, prefix: str = "", skip=(), preset=None):
    """One flag per field of `cls`, its help the field's docstring and its default (the flags themselves
    default to None, so that a flag given on the command line can be told from a default)."""
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        name = "--" + prefix + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = _default_text(default) or "none"
        if preset and f.name in preset and preset[f.name] != default:
            shown += f"; with --model tiny: {_default_text(preset[f.name])}"
        kw = {"dest": prefix.replace("-", "_") + f.name, "default": None,
              "help": (docs.get(f.name, "") + f" (default: {shown})").replace("%", "%%")}
        if f.name in FIELD_CHOICES:       # shown, not enforced here: Config's check refuses others in one line
            kw["metavar"] = "{" + ",".join(FIELD_CHOICES[f.name]) + "}"
        if isinstance(default, bool):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, tuple):     # the element type: the default's, else the annotation's (tuple[int, ...])
            elem = type(default[0]) if default else int if str(f.type).startswith("tuple[int") else str
            parser.add_argument(name, nargs="+", type=elem, **kw)
        else:
            parser.add_argument(name, type=type(default), **kw)


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="quietstar-train", description=__doc__.split("\n")[0],
                  epilog="The logged loss is beta_base*NLL_base + beta_talk*NLL_talk + "
                         "beta_policy*policy: with the reference weights (0.5/0.5/1e6) the policy "
                         "term dominates it. Bad input ends in one line naming the argument "
                         "(--debug shows the traceback).")
    tdocs = field_docs(TrainConfig)
    p.add_argument("--model", dest="model_name", default=None,
                   help='"tiny" (random-init Mistral), "smollm2-135m", "smollm2-135m-random" (its shape, random '
                        'weights: for speed runs), or a local Hugging Face Mistral/Llama folder (default: tiny)')
    p.add_argument("--attention", choices=ATTENTION_BACKENDS, default=None,
                   help=tdocs["attention"] + " (default: triton on CUDA, split on CPU)")
    p.add_argument("--lm-head", dest="lm_head", choices=LM_HEAD_BACKENDS, default=None,
                   help=tdocs["lm_head"] + " (default: triton on CUDA, chunked on CPU)")
    p.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help=tdocs["schedule"] + f" (default: {TrainConfig.schedule})")
    p.add_argument("--data", nargs="+", default=None, help=tdocs["data"] + " (default: default)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (default: one line)")
    g = p.add_argument_group("model (random-init tiny model)")
    _add_fields(g, ModelConfig, "model-", skip=("name",))
    g = p.add_argument_group("thoughts")
    _add_fields(g, ThoughtConfig)
    g = p.add_argument_group("loss")
    _add_fields(g, LossConfig, preset=TINY_PRESET["loss"])
    g = p.add_argument_group("training")
    _add_fields(g, TrainConfig, skip=("attention", "lm_head", "schedule", "data"), preset=TINY_PRESET["train"])
    return p


SECTIONS = {"model": ModelConfig, "thought": ThoughtConfig, "loss": LossConfig, "train": TrainConfig}
# What a resumed run may change: how long it runs, where and how it logs, evaluates and checkpoints, and the
# backends (each computes the same step). batch_size may change with the number of ranks (checked in train).
RESUME_MAY_CHANGE = {"steps", "out_dir", "overwrite", "log_every", "ckpt_every", "keep_last", "resume", "eval_rows",
                     "eval_data", "eval_every", "thoughts_every", "device", "attention", "lm_head", "schedule",
                     "cuda_graphs", "batch_size", "activation_checkpointing"}


def _flag(section: str, name: str) -> str:
    if section == "model":
        return "--model" if name == "name" else "--model-" + name.replace("_", "-")
    return "--" + name.replace("_", "-")


def _given(args: dict) -> dict:
    """The flags given on the command line, by config section: {section: {field: value}}."""
    given = {}
    for sec, cls in SECTIONS.items():
        prefix = "model_" if sec == "model" else ""
        kw = {}
        for f in dataclasses.fields(cls):
            v = args.get(prefix + f.name)
            if v is not None:
                kw[f.name] = tuple(v) if isinstance(v, list) else v
        given[sec] = kw
    if args["model_name"]:
        given["model"]["name"] = args["model_name"]
    return given


def _resumed_config(given: dict) -> dict:
    """The configuration stored in the --resume checkpoint, with the flags a resumed run may change applied;
    any other flag that differs from the stored value is refused (the run would silently change)."""
    path = given["train"]["resume"]
    stored = (parallel.read_meta(path) if Path(path).is_dir() else load_checkpoint(path, mmap=True))["config"]
    kws, conflicts = {}, []
    for sec, cls in SECTIONS.items():
        names = {f.name: f for f in dataclasses.fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.get(sec, {}).items() if k in names}
        for k, v in given[sec].items():
            if sec == "train" and k in RESUME_MAY_CHANGE:
                kw[k] = v
                continue
            f = names[k]
            old = kw.get(k, f.default if f.default is not dataclasses.MISSING else f.default_factory())
            if sec == "model" and k == "name" and v not in MODEL_PRESETS and old not in MODEL_PRESETS:
                kw[k] = v       # the base model's folder moved: checked against the checkpoint's fingerprint
                continue
            if v != old:
                conflicts.append(f"{_flag(sec, k)} {_default_text(v)} (the checkpoint's run has {_default_text(old)})")
        kws[sec] = kw
    if conflicts:
        raise ValueError(f"--resume {path}: a resumed run keeps the configuration stored in its checkpoint, but "
                         f"{'; '.join(conflicts)}: drop these flags, or start a new run")
    if "out_dir" not in given["train"]:     # continue in the checkpoint's folder
        kws["train"]["out_dir"] = str(Path(path).parent)
    return kws


def config_from_args(argv=None) -> Config:
    """The run's Config from command-line flags (defaults for the rest; the tiny preset for --model tiny), or
    with --resume from the configuration stored in the checkpoint."""
    args = vars(build_parser().parse_args(argv))
    given = _given(args)
    if given["train"].get("resume"):
        kws = _resumed_config(given)
    else:
        kws = {sec: dict(kw) for sec, kw in given.items()}
        if kws["model"].get("name", "tiny") == "tiny":
            kws["train"] = {**TINY_PRESET["train"], **kws["train"]}
            kws["loss"] = {**TINY_PRESET["loss"], **kws["loss"]}
    try:
        train = TrainConfig(**kws["train"])
    except ValueError as e:
        raise ValueError(cli_names(str(e))) from e
    # Defaults that depend on the machine: the fused path on CUDA, the fastest CPU path on CPU.
    cuda = resolve_device(train.device).type == "cuda"
    if "attention" not in kws["train"]:
        train.attention = "triton" if cuda else "split"
    if "lm_head" not in kws["train"]:
        train.lm_head = "triton" if cuda else "chunked"
    if train.cuda_graphs and not train.thoughts:
        raise ValueError("--cuda-graphs captures the thought sampler; --no-thoughts samples none: drop one")
    if not cuda and train.attention == "flex" and train.thoughts:
        raise ValueError("--attention flex cannot train on CPU (FlexAttention has no CPU backward in this torch): "
                         "use --attention split, the CPU default")
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":    # the interpreter (tests) runs them on CPU
        for flag, v in (("--attention", train.attention), ("--lm-head", train.lm_head)):
            if v == "triton":
                raise ValueError(f"{flag} triton needs a CUDA GPU (none here, or --device cpu): use {flag} "
                                 f"{'split' if flag == '--attention' else 'chunked'}, the CPU default")
    if train.cuda_graphs:
        from .graphs import GRAPH_ATTENTION
        if not cuda:
            raise ValueError("--cuda-graphs needs a CUDA GPU (and --device cuda or auto)")
        if train.lm_head != "triton" or train.attention not in GRAPH_ATTENTION:
            raise ValueError(f"--cuda-graphs needs --lm-head triton and --attention in {GRAPH_ATTENTION}, got "
                             f"--lm-head {train.lm_head} --attention {train.attention}")
    try:
        model = ModelConfig(**kws["model"])
    except ValueError as e:
        moved = train.resume and "name" not in given["model"] and "folder not found" in str(e)
        raise ValueError(f"{e} (the base model of --resume {train.resume}: if it moved, give --model with its "
                         "new folder)" if moved else cli_names(str(e))) from e
    sized = [_flag("model", k) for k in given["model"] if k != "name"]
    if sized and model.name != "tiny" and not train.resume:         # they were ignored without a word
        raise ValueError(f"{', '.join(sized)}: the random-init model's size, for --model tiny only; "
                         f"--model {model.name} has its own")
    try:
        return Config(model=model, thought=ThoughtConfig(**kws["thought"]), loss=LossConfig(**kws["loss"]),
                      train=train)
    except ValueError as e:
        raise ValueError(cli_names(str(e))) from e


_CONFIG_CLASSES = {"ModelConfig": "model", "ThoughtConfig": "thought", "LossConfig": "loss", "TrainConfig": "train"}


def cli_names(message: str) -> str:
    """A config error as the command line sees it: `ThoughtConfig.M` -> `--M`, `ModelConfig.num_heads` ->
    `--model-num-heads` (the flag that sets the field)."""
    return re.sub(r"\b(ModelConfig|ThoughtConfig|LossConfig|TrainConfig)\.(\w+)",
                  lambda m: _flag(_CONFIG_CLASSES[m.group(1)], m.group(2)), message)


def resolve_device(name: str) -> torch.device:
    """`--device` of every CLI: auto (CUDA where there is a GPU), cpu or cuda; a ValueError naming --device
    otherwise, or for cuda without a CUDA GPU."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
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
    if (Path(model_cfg.name) / "tokenizer.json").exists():
        # as for an export: AutoTokenizer would route a Mistral folder to mistral-common's tokenizer class,
        # which needs tiktoken (not installed: mistral-common is installed data-only)
        from .model import load_export_tokenizer
        return load_export_tokenizer(model_cfg.name)
    files = ("tokenizer.model", "tokenizer_config.json", "vocab.json", "tekken.json")
    if not any((Path(model_cfg.name) / f).exists() for f in files):
        raise ValueError(f"--model {model_cfg.name}: the folder has no tokenizer (tokenizer.json, or one of "
                         f"{', '.join(files)})")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model_cfg.name, local_files_only=True)
    except ImportError as e:
        raise ValueError(f"--model {model_cfg.name}: its tokenizer needs a package that is not installed ({e}); "
                         "a tokenizer.json in the folder is read without it") from e
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {model_cfg.name}: its tokenizer cannot be read "
                         f"({' '.join(str(e).split())[:300]})") from e


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def base_fingerprint(model_cfg: ModelConfig, tok) -> dict:
    """What a resumed run given another `--model` folder (the base model moved) must find unchanged: the
    tokenizer's vocabulary and, for a folder, its config.json without bookkeeping keys (16 hex digits of
    sha256 each). Stored in checkpoints."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    out = {"tokenizer": _digest(vocab)}
    cfg = Path(model_cfg.name) / "config.json"
    if model_cfg.name not in MODEL_PRESETS and cfg.is_file():
        keep = {k: v for k, v in json.loads(cfg.read_text()).items()
                if not k.startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype")}
        out["config"] = _digest(keep)
    return out


def check_moved_base(saved: dict, model_cfg: ModelConfig, base: dict, what: str, legacy_ok: bool = False) -> None:
    """A checkpoint (`saved`: its dict or metadata, with "config" and "base") is used only with a base model whose
    tokenizer and config.json are its run's (`base`: `base_fingerprint` of `model_cfg`): in the folder it names,
    whose files may have changed since, or in another `--model` folder (the base model moved). `what` names the
    checkpoint in errors ("--resume PATH"). A checkpoint without a fingerprint is accepted in its own folder; in
    another it is refused, or with `legacy_ok` left to the caller's other checks."""
    old = saved["config"]["model"]["name"]
    fingerprint = saved.get("base")
    if fingerprint is None:
        if legacy_ok or old == model_cfg.name:
            return
        raise ValueError(f"--model {model_cfg.name}: {what} was written before checkpoints recorded their base "
                         f"model's fingerprint, so this folder cannot be checked against its run's ({old}); put the "
                         f"base model back at {old}")
    for key in ("tokenizer", "config"):
        if fingerprint.get(key) != base.get(key):
            name = "config.json" if key == "config" else key
            if old == model_cfg.name:
                raise ValueError(f"--model {old}: its {name} changed since the run in {what} began (the checkpoint "
                                 "records a fingerprint of the base model's tokenizer and config.json); restore it")
            raise ValueError(f"--model {model_cfg.name}: its {name} is not the one of the run in {what} (whose base "
                             f"model was {old})")


def document_separator(tok) -> int:
    """Documents are packed as [sep] + doc + [sep] + doc ... (quietstar/data.py): `<|endoftext|>` where
    the vocabulary has it (SmolLM2's id 0), else BOS (Mistral's <s>), else EOS."""
    eot = tok.convert_tokens_to_ids("<|endoftext|>") if hasattr(tok, "convert_tokens_to_ids") else None
    if isinstance(eot, int) and eot != getattr(tok, "unk_token_id", None):
        return eot
    if getattr(tok, "bos_token_id", None) is not None:
        return int(tok.bos_token_id)
    return int(tok.eos_token_id)


BUILTIN_DATA = ("default", "math")


def load_rows(data_spec, tok, T: int, split: str = "train", with_doc_start: bool = False, max_documents: int = 0,
              max_rows: int = 0):
    """Tokenize the documents and pack them into rows: (input_ids (R, T), valid_next (R, T)[, doc_start (R, T)]).
    `max_documents` > 0: only the first so many documents; `max_rows` > 0: only the first so many rows, reading
    no more documents than they need (the rows are those of packing everything)."""
    from . import data
    spec = data_spec[0] if len(data_spec) == 1 and data_spec[0] in BUILTIN_DATA else list(data_spec)
    flag = "--data" if split == "train" or spec in BUILTIN_DATA else "--eval-data"
    try:
        docs = data.iter_documents(spec, split=split)
        if max_documents:
            docs = itertools.islice(docs, max_documents)
        toks, n = [], 0
        while not max_rows or n < max_rows * T:            # stream tokens: each document plus its separator
            chunk = data.tokenize_documents(list(itertools.islice(docs, 512)), tok)
            if not chunk:
                break
            toks += chunk
            n += sum(len(t) + 1 for t in chunk)
        rows = data.pack_rows(toks, T, sep_id=document_separator(tok), with_doc_start=with_doc_start)
        return tuple(x[:max_rows] for x in rows) if max_rows else rows
    except (OSError, ValueError) as e:       # a missing or binary file, a bad JSON line, too little text
        raise ValueError(f"{flag} {' '.join(map(str, data_spec))}: {e}") from e


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
    """Restore `rng_state`'s states; they may come back from torch.load on the run's device (a CUDA --resume
    loads there), but torch takes RNG states as CPU byte tensors only."""
    torch.set_rng_state(s["torch"].cpu())
    generator.set_state(s["sampler"].cpu())
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in s["cuda"]])


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "step", "rng", "config")


def rank_rng_states(generator: torch.Generator, world: int) -> list[dict]:
    """Collective under DDP: every rank's `rng_state`, in rank order (for rank 0's checkpoint)."""
    s = rng_state(generator)
    if world == 1:
        return [s]
    import torch.distributed as dist
    states = [None] * world
    dist.all_gather_object(states, s)
    return states


def save_checkpoint(path: Path, model, opt, sched, step: int, rngs: list[dict], cfg: Config,
                    base: dict | None = None) -> None:
    """Atomic: written to PATH.tmp, then renamed (a kill mid-write leaves the previous file; the stale .tmp
    is removed by the next run in this folder). `rngs`: every rank's RNG state (`rank_rng_states`); `base`:
    the base model's fingerprint (`base_fingerprint`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "step": step, "rng": rngs[0], "rng_ranks": rngs, "config": dataclasses.asdict(cfg),
                "world": len(rngs), "shared_params": parallel.shared_params(model), "base": base}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu", mmap: bool = False, arg: str = "--resume") -> dict:
    """A checkpoint written by save_checkpoint, or a one-line ValueError naming `arg`."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{arg} {path}: no such checkpoint (neither a .pt file nor a --parallel fsdp checkpoint "
                         "folder is there)")
    try:
        ck = torch.load(p, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as e:      # torch raises RuntimeError, EOFError, UnpicklingError, ... for a bad file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{arg} {path}: not a readable checkpoint (truncated, or not written by "
                         f"quietstar-train): {msg}") from e
    missing = [k for k in CHECKPOINT_KEYS if k not in ck] if isinstance(ck, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise ValueError(f"{arg} {path}: not a quietstar-train checkpoint (it has no {', '.join(missing)})")
    return ck


def restore_checkpoint(ck: dict, path: str, model, opt, sched, generator, rank: int = 0) -> int:
    """Load `ck` into the run's objects; returns its step. Rank r gets back rank r's RNG state; a rank the
    saving run did not have keeps its fresh seed (checkpoints written before every rank's state was stored
    give every rank rank 0's). A checkpoint of another model size or layout is refused in one line (the
    first mismatching tensor named)."""
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip().startswith(("size mismatch", "Missing",
                                                                                      "Unexpected"))]
        raise ValueError(f"--resume {path}: the checkpoint's weights do not fit the model built from its "
                         f"configuration ({len(lines)} problem(s), first: {lines[0] if lines else e})") from e
    try:
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        rngs = ck.get("rng_ranks")
        if rngs is None or rank < len(rngs):
            set_rng_state(ck["rng"] if rngs is None else rngs[rank], generator)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise ValueError(f"--resume {path}: the optimizer / scheduler / RNG state does not fit this run: {e}") from e
    return int(ck["step"])


# ----------------------------------------------------------------------------------------------
# the run folder
# ----------------------------------------------------------------------------------------------
def step_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """The step checkpoints in a run folder, oldest first: stepNNNNNN.pt files (--parallel ddp) and
    stepNNNNNN folders (--parallel fsdp; a .tmp one is a killed write, not a checkpoint)."""
    found = []
    for p in out.glob("step*"):
        digits = p.stem[4:] if p.suffix == ".pt" and p.is_file() else (p.name[4:] if p.is_dir() else "")
        if digits.isdigit():
            found.append((int(digits), p))
    return sorted(found)


def _remove(p: Path) -> None:
    import shutil
    shutil.rmtree(p) if p.is_dir() else p.unlink()


def run_files(out: Path) -> list[Path]:
    """What a run writes into its folder (stale .tmp files aside)."""
    if not out.is_dir():
        return []
    names = [out / n for n in ("metrics.jsonl", "final.pt", "final", "export")]
    return [p for p in names if p.exists()] + [p for _, p in step_checkpoints(out)]


def folder_obstacle(path: Path) -> Path | None:
    """What would stop `path.mkdir(parents=True, exist_ok=True)`: None, or the nearest existing path at or above
    `path` when it is a file or a folder that cannot be written."""
    above = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    return None if above.is_dir() and os.access(above, os.W_OK | os.X_OK) else above


def check_out_dir(out: Path, resume: str, overwrite: bool) -> bool:
    """Refuse a folder that already holds a run, unless --overwrite or --resume continues the run in it.
    Returns whether this run continues the one in `out`."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out-dir {out}: a file is there, not a folder")
    blocked = folder_obstacle(out)
    if blocked is not None:
        raise ValueError(f"--out-dir {out}: cannot be created ({blocked} is not a writable folder)")
    here = bool(resume) and Path(resume).resolve().parent == out.resolve()
    existing = run_files(out)
    if existing and not here and not overwrite:
        raise ValueError(f"--out-dir {out} already holds a run ({', '.join(p.name for p in existing[:4])}"
                         f"{', ...' if len(existing) > 4 else ''}): give a new --out-dir, --resume one of its "
                         "checkpoints to continue it, or --overwrite to replace it")
    return here


def prepare_out_dir(out: Path, continuing: bool, overwrite: bool, start: int) -> None:
    """Rank 0, once everything is loaded: remove stale .tmp files of killed checkpoint writes; with
    --overwrite the old run; when continuing the run in `out` from step `start`, the records and step
    checkpoints after `start` (they are written again)."""
    out.mkdir(parents=True, exist_ok=True)
    for tmp in sorted(out.glob("*.tmp")):
        _remove(tmp)
        print(f"removed {tmp} (a checkpoint write that did not finish)")
    if overwrite and not continuing:
        for p in run_files(out):
            _remove(p)
    if continuing:
        for step, p in step_checkpoints(out):
            if step > start:
                _remove(p)
        trim_metrics(out / "metrics.jsonl", start)


def record_step(rec: dict) -> int | None:
    """The step of a metrics.jsonl record: a step line, or an "eval" / "thoughts" record."""
    for key in ("eval", "thoughts"):
        if isinstance(rec.get(key), dict):
            return rec[key].get("step")
    return rec.get("step")


def trim_metrics(path: Path, step: int) -> None:
    """Keep the records of steps <= `step` (and drop a line cut by a kill), atomically."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        s = record_step(rec)
        if s is None or s <= step:
            keep.append(line)
    tmp = path.with_name(path.name + ".trim")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def prune_checkpoints(out: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step checkpoints (0: keep all)."""
    if keep_last > 0:
        for _, old in step_checkpoints(out)[:-keep_last]:
            _remove(old)


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as the Hugging Face Trainer of the reference run makes them: weight decay on
    matrices and embeddings (markers included), none on biases and norm weights (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


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


def log_line(rec: dict) -> str:
    """The step's log line: the terms the run has (the no-thought control has loss and base NLL only)."""
    parts = [f"step {rec['step']:5d}", f"loss {rec['loss']:.4f}", f"base {rec['nll_base']:.4f}"]
    if "nll_talk" in rec:
        parts += [f"talk {rec['nll_talk']:.4f}", f"policy {rec['policy'] + 0.0:+.3e}",   # + 0.0: no "-0.000e+00"
                  f"w {rec['w_mean']:+.3f}±{rec['w_std']:.3f}", f"reward {rec['reward']:+.3f}",
                  f"gain {rec['thought_gain']:+.4f}"]
    parts += [f"{rec['ms']:.0f} ms", f"{rec['tok_per_s']:.0f} tok/s"] + ([f"MFU {rec['mfu']:.1%}"] if "mfu" in rec else [])
    return " | ".join(parts)


def step_denominators(micros, K: int, P: int, world: int = 1) -> dict:
    """The counts of the whole optimizer step (every micro-batch of every rank) divided by `world`.
    Each micro-batch's loss divides its sums by these, so the micro-batch losses add up (and DDP's mean
    over ranks averages them) to the means over the step's whole batch."""
    total = 0
    for ids, vn, *ds in micros:                      # ds: [doc_start] with --document-mask
        ds = ds[0] if ds else None
        c = target_counts(check_batch(ids, vn, ds), K, P, ds)
        total = total + torch.stack([c["n_base"], c["n_talk"], c["n_pol"]])
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(total)
    return dict(zip(("n_base", "n_talk", "n_pol"), total / world))


def accumulate_gradients(fwd, micros, cfg: Config, backends: Backends, generator, sampler=None, world: int = 1,
                         autocast=None):
    """Forward and backward over the micro-batches `micros` [(input_ids, valid_next[, doc_start]), ...] of one optimizer
    step; returns (metrics of the step, the last micro-batch's extras). Every mean divides by the counts
    of the whole step (`step_denominators`), so A micro-batches of B rows give the loss and gradients of
    one batch of A*B rows however unequal their scored-target counts (tested). `sampler(ids, doc_start)` gives
    the thoughts (a CUDA-graphed sampler); None samples them inside the forward."""
    den = step_denominators(micros, cfg.thought.K, cfg.thought.P, world)
    sums: dict[str, torch.Tensor] = {}
    extras = None
    for i, (ids, vn, *ds) in enumerate(micros):
        ds = ds[0] if ds else None
        sync = world == 1 or i == len(micros) - 1
        with autocast or contextlib.nullcontext(), parallel.grad_sync(fwd, sync):   # DDP no_sync / FSDP2
            thoughts = sampler(ids, ds) if sampler is not None else None
            loss, m, extras = fwd(ids, vn, cfg.loss, cfg.train.schedule, backends, generator, thoughts=thoughts,
                                  denominators=den, doc_start=ds, plain=not cfg.train.thoughts)
            loss.backward()
        for k, v in m.items():     # partial sums over the step's counts add up; the rest are averaged
            v = v.float() if k in ADDITIVE_METRICS else v.float() / len(micros)
            sums[k] = sums[k] + v if k in sums else v
    return sums, extras


def thought_samples(tok, ids: torch.Tensor, valid_next: torch.Tensor, extras, K: int, n: int = 3,
                    context: int = 24, doc_start: torch.Tensor | None = None) -> list[dict]:
    """A few decoded thoughts of the batch's first row and pass, at evenly spaced scored positions t: the
    text up to x_t (its last `context` tokens), the thought, the next K true tokens, and the thought gain
    there (mean over the scored talk targets of log p_mix - log p_base, nats)."""
    from .thoughts import talk_validity
    _, valid_tk = talk_validity(check_batch(ids, valid_next, doc_start), K, doc_start)
    vt = valid_tk[0].cpu()                                                  # (T, K)
    pos = vt.any(-1).nonzero()[:, 0].tolist()
    picks = [pos[round(i * (len(pos) - 1) / max(1, n - 1))] for i in range(min(n, len(pos)))]
    row, thoughts, gain = ids[0].tolist(), extras.thoughts[0, 0].cpu(), extras.gain[0, 0].float().cpu()
    out = []
    for t in dict.fromkeys(picks):
        out.append({"position": t, "context": tok.decode(row[max(0, t + 1 - context):t + 1]),
                    "thought": tok.decode(thoughts[t].tolist()), "next": tok.decode(row[t + 1:t + 1 + K]),
                    "gain": float(gain[t].sum() / vt[t].sum())})
    return out


def read_resume(tc, world: int, device) -> tuple[dict | None, bool]:
    """The checkpoint that `--resume` names, checked against this run: (its metadata or whole .pt dict, whether
    it is a --parallel fsdp folder); (None, False) without --resume. A folder's small metadata file is read
    here, its shards once the model is built; a .pt file (one process or DDP) is read whole."""
    if not tc.resume:
        return None, False
    sharded = Path(tc.resume).is_dir()             # a --parallel fsdp checkpoint folder (any world size)
    if tc.parallel == "fsdp" and not sharded:
        raise ValueError(f"--resume {tc.resume}: --parallel fsdp resumes from a checkpoint folder (written with "
                         "--parallel fsdp), not a single-file checkpoint of --parallel ddp")
    resumed = parallel.read_meta(tc.resume) if sharded else load_checkpoint(tc.resume, map_location=device)
    old_rows = resumed["config"]["train"]["batch_size"] * (resumed["world_size"] if sharded else
                                                           resumed.get("world", 1))
    if tc.batch_size * world != old_rows:
        raise ValueError(f"--batch-size {tc.batch_size} x {world} rank(s) = {tc.batch_size * world} rows per "
                         f"micro-batch, but the run in --resume {tc.resume} used {old_rows}: a resumed run "
                         "keeps its batch (give --batch-size so that batch-size x ranks stays the same)")
    if resumed["step"] >= tc.steps:
        raise ValueError(f"--steps {tc.steps}: --resume {tc.resume} is already at step {resumed['step']}, so "
                         f"there is nothing to train; give --steps larger than {resumed['step']}")
    return resumed, sharded


def train(cfg: Config, rank: int = 0, world: int = 1, progress: bool = True, device=None) -> dict:
    """Run `cfg`; with world > 1 (a started process group) as data-parallel rank `rank` (DDP)."""
    tc = cfg.train
    device = device if device is not None else resolve_device(tc.device)
    torch.manual_seed(tc.seed)
    # nothing is written until everything is loaded and checked: bad input leaves nothing behind
    out = Path(tc.out_dir)
    tok = None

    # model: fp32 master weights. A fresh run reads the base model's weights; a resumed run builds the same
    # architecture empty (its embeddings shared as the saved model's were, so that the optimizer's parameters
    # are the same) and the checkpoint fills it: no weight file is read (Mistral-7B: 14 GB per start).
    def quietstar_model(weights: bool = True):    # weights=False: the architecture (built on meta)
        lm = build_decoder(cfg.model, dtype=torch.float32, weights=weights)
        if lm.config.vocab_size < len(tok):
            raise ValueError(f"the tokenizer has {len(tok)} ids but the model's vocab_size is {lm.config.vocab_size}"
                             + (" (--model-vocab-size)" if cfg.model.name == "tiny" else ""))
        model = QuietStarModel(lm, cfg.thought, marker_init_id=marker_init_id(tok, cfg.thought.marker_init_text)
                               if weights else None)
        model.check_lengths(tc.seq_len)
        if weights and QuietStarModel.is_export(cfg.model.name) and not tc.resume:  # a trained model continues
            model.load_extras(cfg.model.name)                                      # with its extras
            if rank == 0 and progress:
                print(f"--model {cfg.model.name}: a Quiet-STaR export; its markers and mixing head are loaded too")
        return model

    def architecture():
        return quietstar_model(weights=False)

    def checks():
        """What can be refused before the corpus is tokenized: the run folder, the checkpoint to resume, the
        tokenizer, and the model's own checks (vocabulary, banned ids, lengths) on its architecture on meta."""
        nonlocal tok
        continuing = check_out_dir(out, tc.resume, tc.overwrite)
        resumed, sharded = read_resume(tc, world, device)
        if tc.eval_rows > 0 and not tc.eval_data and not (len(tc.data) == 1 and tc.data[0] in BUILTIN_DATA):
            raise ValueError("--eval-rows: file --data has no held-out part (the training rows would be scored); "
                             "name held-out text files with --eval-data FILES")
        tok = load_tokenizer(cfg.model)
        base = base_fingerprint(cfg.model, tok)
        if resumed is not None:
            check_moved_base(resumed, cfg.model, base, f"--resume {tc.resume}")
        with torch.device("meta"):
            arch = architecture()
        if resumed is not None and resumed.get("shared_params") is not None:
            parallel.check_fits(arch, resumed["shared_params"], f"--resume {tc.resume}")
        marker_init_id(tok, cfg.thought.marker_init_text)
        return continuing, resumed, sharded, base

    def load_data():
        packed = load_rows(tc.data, tok, tc.seq_len, with_doc_start=tc.document_mask,   # (rows, valid[, doc_start])
                           max_documents=tc.max_documents)
        if packed[0].shape[0] < tc.batch_size * world:
            raise ValueError(f"--data gives {packed[0].shape[0]} rows of T={tc.seq_len} tokens; need at least "
                             f"batch_size*world_size={tc.batch_size * world}")
        eval_rows = None if tc.eval_rows == 0 else list(
            load_rows(tc.eval_data or tc.data, tok, tc.seq_len, split="heldout", with_doc_start=tc.document_mask,
                      max_rows=tc.eval_rows))
        return packed, eval_rows

    # each on every rank and agreed, so that a rank that fails alone ends every rank in one line; the first is
    # also the barrier after which rank 0 may write into the folder that every rank has looked at
    continuing, resumed, sharded, base = parallel.agreed(checks)
    packed, eval_rows = parallel.agreed(load_data)
    rows, valid = packed[:2]
    if rank == 0 and progress:
        n_eval = 0 if eval_rows is None else eval_rows[0].shape[0]
        print(f"data: {rows.shape[0]} rows of T={tc.seq_len} tokens ({' '.join(tc.data)}"
              + (f", the first {tc.max_documents} documents" if tc.max_documents else "") + ")"
              + (f"; held-out: {n_eval} row{'s' * (n_eval != 1)}"
                 + (f" (all there are; --eval-rows asked for {tc.eval_rows})" if n_eval < tc.eval_rows else "")
                 if eval_rows is not None else ""))
    # how the saved model's parameters were shared (tied embeddings or not); None in checkpoints written before
    # it was stored: those runs build the model from its weights, as a fresh run does
    shared = resumed.get("shared_params") if resumed is not None else None

    backends = Backends(tc.attention, tc.lm_head)
    if tc.parallel == "fsdp" and shared is not None:
        model = parallel.shard_empty(architecture, device, shared, tc.activation_checkpointing,
                                     arg=f"--resume {tc.resume}").train()
    elif tc.parallel == "fsdp":     # only rank 0 reads the weights; the other ranks receive their shards
        model = parallel.shard_from_rank0(quietstar_model, architecture, device, tc.activation_checkpointing).train()
    else:                           # one process, or DDP: every rank builds the whole model

        def build():
            model = (quietstar_model().to(device) if shared is None else
                     parallel.empty_model(architecture, device, shared, arg=f"--resume {tc.resume}")).train()
            if tc.activation_checkpointing:
                parallel.apply_activation_checkpointing(model)
            return model
        model = parallel.agreed(build)
    lm, fwd = model.lm, model
    if world > 1 and tc.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        fwd = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=not tc.thoughts)   # the control: no extras' grads
    opt = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=tc.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, tc.warmup_steps)))
    if rank == 0 and tc.warmup_steps > tc.steps:      # allowed (a short try of a long recipe), but said
        print(f"note: --warmup-steps {tc.warmup_steps} is longer than --steps {tc.steps}: the learning rate "
              f"reaches only {tc.steps}/{tc.warmup_steps} of --lr {tc.lr:g}", flush=True)
    generator = torch.Generator(device=device).manual_seed(tc.seed + 1 + rank)
    sampler = None
    if tc.cuda_graphs:
        from .graphs import GraphedSampler
        sampler = GraphedSampler(model, backends, generator)
    start = 0
    if tc.resume:
        ck, resumed = resumed, None
        if sharded:
            start, rng = parallel.load_checkpoint(tc.resume, model, opt, sched, rng_state(generator))
            if rng is not None:                        # a rank the saving run did not have keeps its fresh seed
                set_rng_state(rng, generator)
        else:
            start = restore_checkpoint(ck, tc.resume, model, opt, sched, generator, rank)
        del ck
        if rank == 0:
            print(f"resumed: {tc.resume} at step {start}, on to step {tc.steps} in {out}", flush=True)
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        prepare_out_dir(out, continuing, tc.overwrite, start)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    th = cfg.thought
    tokens_per_micro = tc.batch_size * tc.seq_len * ((1 + th.P * th.L) if tc.thoughts else 1)
    flops_per_rank_step = (step_flops(lm, tc.batch_size, tc.seq_len, th.M, th.P, th.L) if tc.thoughts
                           else step_flops(lm, tc.batch_size, tc.seq_len, 0, 0, 0)) * tc.grad_accum
    peak = peak_bf16_flops(device)                 # None off CUDA or on an unknown GPU: no MFU
    bar = tqdm(range(start, tc.steps), desc="quietstar", disable=not progress or rank != 0, initial=start,
               total=tc.steps)
    last = {}

    def evaluate(step: int) -> None:
        from .evaluate import heldout_losses
        g = torch.Generator(device=device).manual_seed(tc.seed + 12345)   # same thoughts' randomness each time
        with parallel.gathered(model):
            ev = heldout_losses(model, *eval_rows[:2], backends, tc.batch_size, g, device, autocast,
                                doc_start=eval_rows[2] if len(eval_rows) > 2 else None, thoughts=tc.thoughts,
                                progress=progress and rank == 0)
        ev["step"] = step
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"eval": ev}) + "\n")
            with_thoughts = (f", with thoughts {ev['heldout_nll_thought']:.4f}" if "heldout_nll_thought" in ev
                             else " (a --no-thoughts run: no thoughts to score)")
            tqdm.write(f"eval @ step {step}: held-out NLL without thoughts {ev['heldout_nll_base']:.4f}"
                       f"{with_thoughts} ({ev['heldout_targets']} targets)")

    if eval_rows is not None and start == 0:
        evaluate(0)
    # micro-batch i of the run is a pure function of (seed, i, rank): a resumed run reads the same rows
    stream = data.batches(packed, tc.batch_size, tc.seed, rank, world, start_step=start * tc.grad_accum)
    for step in bar:
        t0 = time.perf_counter()
        micros = [tuple(x.to(device) for x in next(stream)) for _ in range(tc.grad_accum)]   # (ids, valid[, doc_start])
        sums, extras = accumulate_gradients(fwd, micros, cfg, backends, generator, sampler, world, autocast)
        samples = None
        if rank == 0 and tc.thoughts and tc.thoughts_every and (step + 1) % tc.thoughts_every == 0:
            samples = thought_samples(tok, *micros[-1][:2], extras, cfg.thought.K,
                                      doc_start=micros[-1][2] if len(micros[-1]) > 2 else None)
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
        rec.update(step=step + 1, lr=sched.get_last_lr()[0], grad_norm=parallel.full_grad_norm(gnorm), ms=1000 * dt,
                   tok_per_s=tokens_per_micro * tc.grad_accum * world / dt)
        if peak:
            rec["mfu"] = flops_per_rank_step / dt / peak
        last = rec
        checkpoint = tc.ckpt_every and (step + 1) % tc.ckpt_every == 0 and step + 1 < tc.steps
        rngs = rank_rng_states(generator, world) if checkpoint and tc.parallel == "ddp" else None   # collective
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
                if samples is not None:
                    f.write(json.dumps({"thoughts": {"step": step + 1, "samples": samples}}) + "\n")
            if (step + 1) % tc.log_every == 0:
                tqdm.write(log_line(rec))
            if rngs is not None:
                save_checkpoint(out / f"step{step + 1:06d}.pt", model, opt, sched, step + 1, rngs, cfg, base)
                prune_checkpoints(out, tc.keep_last)
        if checkpoint and tc.parallel == "fsdp":
            parallel.save_checkpoint(out / f"step{step + 1:06d}", model, opt, sched, step + 1, rng_state(generator),
                                     dataclasses.asdict(cfg), base)
            if rank == 0:
                prune_checkpoints(out, tc.keep_last)
        if eval_rows is not None and tc.eval_every and (step + 1) % tc.eval_every == 0 and step + 1 < tc.steps:
            evaluate(step + 1)
    if eval_rows is not None:
        evaluate(tc.steps)
    ckpt = out / "final.pt"
    export = out / "export"
    if tc.parallel == "fsdp":   # collective: every rank writes its shards, rank 0 gathers the export
        ckpt = parallel.save_checkpoint(out / "final", model, opt, sched, tc.steps, rng_state(generator),
                                        dataclasses.asdict(cfg), base)
        parallel.export_full(model, export, dataclasses.asdict(cfg), tokenizer=tok)
        if rank == 0:
            print(f"checkpoint: {ckpt}\nexport:     {export}\nmetrics:    {metrics_path}")
    else:
        rngs = rank_rng_states(generator, world)         # collective
        if rank == 0:
            save_checkpoint(ckpt, model, opt, sched, tc.steps, rngs, cfg, base)
            model.save_pretrained(export, tokenizer=tok)    # a Hugging Face folder + the Quiet-STaR extras
            print(f"checkpoint: {ckpt}\nexport:     {export}\nmetrics:    {metrics_path}")
    if world > 1:      # rank 0 writes the export alone: the ranks leave together (no teardown while one works)
        import torch.distributed as dist
        dist.barrier()
    return {"checkpoint": str(ckpt), "export": str(export), "metrics": str(metrics_path), "last": last,
            "model": model}


class CliParser(argparse.ArgumentParser):
    """argparse, with its errors in one line like every other bad input here (argparse prints the whole usage
    first: 40 lines for quietstar-train) and a suggestion for a mistyped option."""

    def error(self, message):
        import difflib
        hint = ""
        if message.startswith("unrecognized arguments: "):
            near = {a: difflib.get_close_matches(a.split("=")[0], list(self._option_string_actions), n=1)
                    for a in message[len("unrecognized arguments: "):].split() if a.startswith("-")}
            hint = "".join(f" ({a}: did you mean {m[0]}?)" for a, m in near.items() if m)
        self.exit(2, f"{self.prog}: error: {message}{hint} (--help lists the options)\n")


def run_cli(prog: str, body, argv=None) -> int:
    """Run a command-line entry point `body(argv) -> int`. Bad input (a ValueError or OSError) ends in one
    line on stderr, `PROG: error: ...`, exit status 2; with `--debug` in argv the traceback shows instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return body(argv)
    except (ValueError, OSError) as e:
        if "--debug" in argv:
            raise
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def _main(argv) -> int:
    cfg = config_from_args(argv)
    rank, world, device = init_distributed(cfg.train.device)
    try:
        train(cfg, rank, world, device=device)
    except ValueError as e:     # e.g. the model's checks of the thought config (ThoughtConfig.banned_ids)
        raise ValueError(cli_names(str(e))) from e
    finally:
        import gc

        import torch.distributed as dist
        if dist.is_initialized():       # torchrun's group, or the 1-rank group of --parallel fsdp
            gc.collect()                # FSDP/DDP objects in reference cycles hold the group: freed while it lives
            dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    """The CLI. Bad input (a ValueError or OSError raised before or while training) ends in one line on
    stderr naming the argument, exit status 2; `--debug` shows the traceback instead."""
    return run_cli("quietstar-train", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
