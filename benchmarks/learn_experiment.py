"""Does it learn? Quiet-STaR against a no-thought control on the same tokens, before and after.

Arms from the same starting model, the same seed, the same rows in the same order, the same number of
optimizer steps and learning-rate schedule:
  quietstar_b<beta>  the Quiet-STaR step (M, K, P as given; betas base/talk 0.5/0.5 as the reference)
                     with policy weight beta, one arm per value of --policy-weights (default 1e6 and 1;
                     why: the comment at DEFAULTS)
  control            the same model trained as a plain language model on the same rows
                     (`quietstar-train --no-thoughts`: loss = NLL of x_{t+1}; no thought, no mixing head)

Measured before and after, on the built-in MATH text's held-out part (one row per document: the
separator and the document's first T - 1 tokens): NLL per token over all targets and over the
hardest 10% of targets by the STARTING model's NLL (one token set, saved, used for every arm and
state); the Quiet-STaR arms with and without thoughts; GSM8K gold-solution NLL and CommonsenseQA
zero-shot accuracy by answer likelihood. At step 0 the mixing head's last layer is zero, so w = 0
and "with thoughts" equals "without" exactly: the before column serves both. Differences come with
a 95% bootstrap interval over documents / problems / questions (paired: the same units resampled
for both states).

Phases, in this order, each saving results.json (atomically) and re-rendering table.md and
curves.png, so a run that is cut short leaves everything it finished:
  before -> (train, evaluate) the control -> (train, evaluate) each Quiet-STaR arm

Sizing (--budget-s, the GPU run): the number of steps (the same for every arm) is chosen after the
"before" phase, from what is left of the budget, the step times and per-arm overheads that --measure
timed on a random-init model of the same shape, --measure's estimate of each evaluation's time, and
this run's own load of the real model (the "before" phase's), which every arm repeats.
The training metrics stream into train_<arm>/metrics.jsonl step by step (with a few decoded thoughts
every --thoughts-every steps).

    python benchmarks/learn_experiment.py --smoke --out runs/learn_smoke          # CPU rehearsal, ~1 min
    python benchmarks/learn_experiment.py --measure --out runs/learn              # step times (random init)
    python benchmarks/learn_experiment.py --out runs/learn --step-times runs/learn/step_times.json

On a lent GPU: benchmarks/learn_experiment.sh (two back-to-back calls; see benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from quietstar import data as qdata  # noqa: E402
from quietstar import evaluate as qeval  # noqa: E402
from quietstar.config import (ATTENTION_BACKENDS, LM_HEAD_BACKENDS, Config, LossConfig, ModelConfig,  # noqa: E402
                              ThoughtConfig, TrainConfig)
from quietstar.thoughts import Backends  # noqa: E402

# The recipe, scaled to a 135M model and a lease of minutes (every arm gets the same lr and steps):
# - lr 1e-5, 10x the reference's 1e-6. The reference ran Mistral-7B in pure bf16, where lr-1e-6 updates
#   of the decoder's weights mostly round to zero while the zero-initialised last layer of the mixing
#   head (tiny weights, tiny ulp) does move; with fp32 master weights an Adam step moves every weight by
#   about lr, so at 1e-6 w could hardly leave 0 within a few hundred steps (a CPU run: w = 7e-4 after 80
#   steps), and small models are conventionally fine-tuned at higher rates than 7B ones.
# - two policy weights, as two Quiet-STaR arms: the reference's 1e6 (with Adam only the ratio of the
#   terms matters; at w ~ 0 the advantage is proportional to w, and 1e6 makes the policy term count
#   early), and 1, where the LM terms still steer the decoder: a CPU run at lr 1e-5 with 1e6 (B=1, T=64)
#   lost 0.22 nats of held-out NLL in 30 steps, the policy gradient filling the clipped update. The
#   control separates the effect of training on the MATH text itself from the thoughts'.
DEFAULTS = {"lr": 1e-5, "warmup_steps": 20, "M": 9, "K": 4, "P": 2, "batch_size": 8, "seq_len": 256}
SMOKE = {"model": "tiny", "steps": 3, "batch_size": 2, "seq_len": 32, "M": 2, "K": 2, "P": 2, "eval_docs": 6,
         "bench_items": 4, "eval_batch": 4, "warmup_steps": 1, "lr": 1e-3, "policy_weights": "1"}


# A kernel family that failed its GPU tests on the machine of the run is not trusted with the experiment:
# (a failed test's "file::name" prefix, the setting that replaces it by the plain-PyTorch path or turns it off)
FALLBACKS = (("test_document_mask::test_gpu_graph", "cuda_graphs", False), ("test_graphs::", "cuda_graphs", False),
             ("test_train::test_cuda_graphs", "cuda_graphs", False),
             ("test_document_mask::test_gpu_bf16_kernels", "document_mask", False),
             ("test_thought_attention::", "attention", "split"), ("test_lm_head::", "lm_head", "chunked"),
             # the evaluation's thought_predictions: the Triton step kernel at chain steps M and M + 1
             ("test_eval::test_gpu_", "attention", "split"),
             # the whole Quiet-STaR loss on both Triton families against the reference: which one is wrong is not
             # known, so neither is trusted
             ("test_quietstar::test_gpu_fused_path", "attention", "split"),
             ("test_quietstar::test_gpu_fused_path", "lm_head", "chunked"))


def apply_fallbacks(args, gpu_tests: str) -> list[str]:
    """Set args per FALLBACKS from the GPU tests' one-line result ("GPU tests: ...;- FAILED file::name: msg;...");
    returns what changed, as "setting=value" strings. A test listed as "- PASSED ON RERUN" (it failed under
    xdist and passed alone in a fresh process, gpu_suite.py's rerun) does not count as failed."""
    failed = [part.strip()[len("- FAILED "):] for part in gpu_tests.split(";") if part.strip().startswith("- FAILED ")]
    changed = []
    for prefix, attr, value in FALLBACKS:
        if any(f.startswith(prefix) for f in failed) and getattr(args, attr) != value:
            setattr(args, attr, value)
            changed.append(f"{attr}={value}")
    return changed


def arms(args) -> list[tuple[str, float | None]]:
    """(name, beta_policy) of every arm, the control first (its beta is None), then the Quiet-STaR ones in the
    order of --policy-weights: the order they train in, so that a run cut short has the control for what it has."""
    betas = [float(b) for b in str(args.policy_weights).split(",") if b.strip()]
    if not betas:
        raise SystemExit("learn_experiment: --policy-weights needs at least one value")
    name = lambda b: f"{b:g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")  # noqa: E731  1e6
    return [("control", None)] + [(f"quietstar_b{name(b)}", b) for b in betas]


# ----------------------------------------------------------------------------------------------
# results file: written after every phase, atomically
# ----------------------------------------------------------------------------------------------
def save_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def bootstrap_diff(num_a, den_a, num_b, den_b, reps: int = 2000, seed: int = 0) -> dict:
    """b - a of the ratio estimates sum(num) / sum(den) over units resampled jointly (paired), with the
    95% percentile interval. num/den: one value per unit (document, problem, question)."""
    import numpy as np
    a_n, a_d, b_n, b_d = (np.asarray(x, dtype=np.float64) for x in (num_a, den_a, num_b, den_b))
    point = b_n.sum() / max(b_d.sum(), 1e-12) - a_n.sum() / max(a_d.sum(), 1e-12)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a_n), size=(reps, len(a_n)))
    diffs = b_n[idx].sum(1) / np.maximum(b_d[idx].sum(1), 1e-12) - a_n[idx].sum(1) / np.maximum(a_d[idx].sum(1), 1e-12)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"diff": float(point), "lo": float(lo), "hi": float(hi), "units": int(len(a_n))}


# ----------------------------------------------------------------------------------------------
# evaluation of one model state: per-unit sums, so that differences get paired intervals
# ----------------------------------------------------------------------------------------------
class EvalSets:
    """The held-out rows, the benchmark rows and the hard-token mask, built once."""

    def __init__(self, tok, sep_id: int, T: int, docs: int, bench_items: int):
        heldout = qdata.load_documents("default", split="heldout")[:docs]
        self.rows, self.valid = qeval.document_rows(qdata.tokenize_documents(heldout, tok), T, sep_id)
        from quietstar import assets
        self.gsm = qeval.gsm8k_rows(assets.gsm8k_test()[:bench_items], tok, sep_id)[:2]
        self.questions = assets.commonsense_qa_validation()[:bench_items]
        self.csqa = qeval.commonsense_qa_rows(self.questions, tok, sep_id)[:2]
        self.hard = None                     # chosen by the starting model's NLL in phase "before"

    def sizes(self) -> dict:
        return {"heldout_documents": self.rows.shape[0], "heldout_targets": int(self.valid.sum()),
                "gsm8k_problems": self.gsm[0].shape[0], "csqa_questions": len(self.questions)}


def _rows(nll: torch.Tensor, mask: torch.Tensor) -> dict:
    """Per-row sums and counts of `nll` over `mask` (lists, for results.json)."""
    return {"sum": (nll.double() * mask).sum(1).tolist(), "n": mask.sum(1).tolist()}


def evaluate_state(model, sets: EvalSets, thoughts: bool, backends, batch: int, seed: int, device, autocast) -> dict:
    """Per-unit sums of one model state: held-out (all / hard targets), GSM8K NLL, CommonsenseQA correct;
    for each of "base" (no thought) and, with `thoughts`, "thought" (the k = 1 mixed prediction)."""
    out = {}
    parts = {"heldout": (sets.rows, sets.valid), "gsm8k": sets.gsm, "csqa": sets.csqa}
    for name, (ids, valid) in parts.items():
        gen = torch.Generator(device=device).manual_seed(seed)         # the same thoughts' randomness each state
        base, mixed = qeval.token_nll(model, ids, valid, backends, batch, thoughts, gen, device, autocast,
                                      progress=True, desc=name)
        for kind, nll in (("base", base), ("thought", mixed)):
            if nll is None:
                continue
            if name == "heldout":
                if sets.hard is None:
                    sets.hard = qeval.hard_mask(base, valid)
                out[f"heldout_all_{kind}"] = _rows(nll, valid)
                out[f"heldout_hard_{kind}"] = _rows(nll, sets.hard)
            elif name == "gsm8k":
                out[f"gsm8k_{kind}"] = _rows(nll, valid)
            else:
                ok, ok_char = qeval.choice_correct(nll, sets.questions)
                out[f"csqa_{kind}"] = {"sum": ok.double().tolist(), "n": [1.0] * len(ok)}
                out[f"csqa_char_{kind}"] = {"sum": ok_char.double().tolist(), "n": [1.0] * len(ok)}
    return out


def mean_of(rec: dict) -> float:
    return sum(rec["sum"]) / max(sum(rec["n"]), 1e-12)


# ----------------------------------------------------------------------------------------------
# the table and the curves
# ----------------------------------------------------------------------------------------------
METRICS = [("heldout_all", "held-out NLL, all targets (nats/token)", 4),
           ("heldout_hard", "held-out NLL, hardest 10% (nats/token)", 4),
           ("gsm8k", "GSM8K gold-solution NLL (nats/token)", 4),
           ("csqa", "CommonsenseQA accuracy (sum log-lik)", 3),
           ("csqa_char", "CommonsenseQA accuracy (per char)", 3)]
# (row label, arm, kind of prediction after training)
def table_rows(res: dict) -> list[tuple[str, str, str]]:
    """(row label, arm, kind of prediction after training) for every arm of the run."""
    rows = [("control", "control", "base")]
    for arm in res["meta"]["arms"]:
        if arm != "control":
            b = res["meta"]["arms"][arm]
            rows += [(f"Quiet-STaR (beta_policy {b:g}), without thoughts", arm, "base"),
                     (f"Quiet-STaR (beta_policy {b:g}), with thoughts", arm, "thought")]
    return rows


def _fmt_ci(d: dict, nd: int) -> str:
    return f"{d['diff']:+.{nd}f} [{d['lo']:+.{nd}f}, {d['hi']:+.{nd}f}]"


def weights_description(model: str) -> str:
    """What `--model` loads, exactly (the table's heading and results.json's meta)."""
    if model == "smollm2-135m":
        from quietstar import assets
        return (f"smollm2-135m = {assets.SMOLLM2_GGUF_NAME} (the instruct model, 4-bit GGUF dequantised to fp32; "
                f"sha256 {assets.SMOLLM2_GGUF_SHA256[:12]}...)")
    return model


def render_table(res: dict) -> str:
    m = res["meta"]
    lines = [f"# Does it learn? Quiet-STaR vs a no-thought control ({m.get('weights', m['model'])})", "",
             f"{m['date']}; {m['device']}; torch {m['torch']}, triton {m['triton']}; seed {m['seed']}", "",
             f"Training: {m.get('steps') or '?'} steps of B={m['batch_size']} rows x T={m['seq_len']} tokens per arm "
             f"(the same rows in the same order), lr {m['lr']:g} (warm-up {m['warmup_steps']}), AdamW; Quiet-STaR "
             f"M={m['M']} K={m['K']} P={m['P']}, betas base/talk {m['beta_base']:g}/{m['beta_talk']:g}, policy weight "
             f"per arm below. Backends: attention {m.get('attention', '?')}, LM head {m.get('lm_head', '?')}, "
             f"document masking {'on' if m.get('document_mask', True) else 'off'}, CUDA-graph sampler "
             f"{'on' if m.get('cuda_graphs') else 'off'}.", "",
             f"Evaluation: {m['sizes']['heldout_documents']} held-out MATH documents ({m['sizes']['heldout_targets']} "
             f"targets; hard = the 10% with the highest NLL under the starting model), "
             f"{m['sizes']['gsm8k_problems']} GSM8K problems, {m['sizes']['csqa_questions']} CommonsenseQA questions. "
             "Before = the starting model (w = 0, so with thoughts = without). With thoughts = the mean over the "
             f"P={m['P']} sampled thoughts of -log p_mix (the NLL of one sampled thought, not -log of their mean "
             "probability). Differences: after - before, 95% bootstrap interval over documents / problems / questions "
             "(2000 paired resamples): it covers which units were evaluated, not training noise (one training run per "
             "arm, one seed), so an interval that excludes 0 is not by itself a replicable effect. GSM8K's gold "
             "solutions are scored as the data set has them, calculator annotations (<<48/2=24>>) and the final "
             "'#### N' line included. A few held-out MATH documents are near-copies of training ones (the MATH test "
             "set repeats templated problems; the held-out part is every 10th document of each subject), which "
             "lowers every arm's after alike (all arms train on the same rows).", ""]
    before = res.get("before", {}).get("eval")
    if before is None:
        return "\n".join(lines + ["(no phase finished yet)", ""])
    lines += ["| metric | arm | before | after | after - before [95% CI] |", "|---|---|---|---|---|"]
    for key, label, nd in METRICS:
        b = before[f"{key}_base"]
        for row, arm, kind in table_rows(res):
            after = res.get(arm, {}).get("eval", {}).get(f"{key}_{kind}")
            cells = [label, row, f"{mean_of(b):.{nd}f}"]
            if after is None:
                cells += ["not run", "-"]
            else:
                d = bootstrap_diff(b["sum"], b["n"], after["sum"], after["n"])
                cells += [f"{mean_of(after):.{nd}f}", _fmt_ci(d, nd)]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "The hard tokens were chosen for their high NLL under the starting model, so their NLL tends to fall "
              "under any further training (regression to the mean): compare the arms' after columns (below), not one "
              "arm's after - before."]
    ctl = res.get("control", {}).get("eval")
    done = [(row, arm, kind) for row, arm, kind in table_rows(res) if arm != "control" and res.get(arm, {}).get("eval")]
    if ctl and done:
        lines += ["", "Quiet-STaR after minus control after (paired over the same units; negative NLL / positive "
                  "accuracy = Quiet-STaR better):", "", "| metric | Quiet-STaR arm and prediction | difference [95% CI] |",
                  "|---|---|---|"]
        for key, label, nd in METRICS:
            for row, arm, kind in done:
                c, q = ctl[f"{key}_base"], res[arm]["eval"][f"{key}_{kind}"]
                d = bootstrap_diff(c["sum"], c["n"], q["sum"], q["n"])
                lines.append(f"| {label} | {row[len('Quiet-STaR '):]} | {_fmt_ci(d, nd)} |")
    own = [arm for arm in m["arms"] if arm != "control" and res.get(arm, {}).get("eval")]
    if own:
        lines += ["", "The thoughts' own effect: with thoughts minus without, the same Quiet-STaR model after training "
                  "(paired over the same units; negative NLL / positive accuracy = the thoughts help):", "",
                  "| metric | Quiet-STaR arm | with - without [95% CI] |", "|---|---|---|"]
        for key, label, nd in METRICS:
            for arm in own:
                e = res[arm]["eval"]
                d = bootstrap_diff(e[f"{key}_base"]["sum"], e[f"{key}_base"]["n"],
                                   e[f"{key}_thought"]["sum"], e[f"{key}_thought"]["n"])
                lines.append(f"| {label} | beta_policy {m['arms'][arm]:g} | {_fmt_ci(d, nd)} |")
    if m.get("gpu_tests"):
        lines += ["", f"Before the run, on the same machine: {m['gpu_tests']}"]
        if m.get("fallbacks"):
            lines += ["", f"**Fallback** (a kernel family failed its GPU tests): {', '.join(m['fallbacks'])}"]
    lines += ["", "| phase | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in res.get("seconds", {}).items()]
    return "\n".join(lines) + "\n"


def read_metrics(path: Path) -> list[dict]:
    """The step records of a metrics.jsonl (a line cut by a kill is skipped)."""
    recs = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "step" in r and "loss" in r:
                recs.append(r)
    return recs


def render_curves(out: Path, title: str, arm_names) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    x = lambda rs: [r["step"] for r in rs]  # noqa: E731
    for arm in arm_names:
        rs = read_metrics(metrics_path(out, arm))
        ax[0, 0].plot(x(rs), [r["nll_base"] for r in rs], label=f"{arm}: NLL base")
        if arm == "control" or not rs:
            continue
        ax[0, 0].plot(x(rs), [r["nll_talk"] for r in rs], "--", label=f"{arm}: NLL talk (mixed, K tokens)")
        gain = [r for r in rs if "thought_gain" in r]
        if gain:
            ax[0, 1].plot(x(gain), [r["thought_gain"] for r in gain], label=arm)
            ax[0, 1].set_title("thought gain: log p_mix - log p_base, true next tokens")
        else:
            ax[0, 1].plot(x(rs), [r["reward"] for r in rs], label=arm)
            ax[0, 1].set_title("mean reward: sum_k log p_mix")
        ax[1, 0].plot(x(rs), [r["w_mean"] for r in rs], label=f"{arm}: mean w")
        ax[1, 0].fill_between(x(rs), [r["w_mean"] - r["w_std"] for r in rs],
                              [r["w_mean"] + r["w_std"] for r in rs], alpha=0.3)
        ax[1, 1].plot(x(rs), [r["policy"] for r in rs], label=arm)
    ax[0, 0].set_title("training losses (nats/token)")
    ax[1, 0].set_title("mixing weight w (mean ± std)")
    ax[1, 1].set_title("REINFORCE term L_policy (unweighted)")
    for a in ax.flat:
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    for a in ax.flat:
        a.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=80)
    plt.close(fig)


def render(out: Path, res: dict, mirror: Path | None = None) -> None:
    with _MIRROR_LOCK:
        save_json(out / "results.json", res)
        (out / "table.md").write_text(render_table(res))
        render_curves(out, f"Quiet-STaR vs control, {res['meta']['model']}, {res['meta']['device']}",
                      res["meta"]["arms"])
        if mirror is not None:
            _mirror_files(out, mirror)


_MIRROR_LOCK = threading.Lock()     # render() and the MirrorEvery thread: one copy at a time


def mirror_files(out: Path, mirror: Path) -> list[str]:
    """Copy what a run has written so far into `mirror`, flat, each file replaced atomically: results.json,
    table.md, curves.png, hard_mask.pt and every arm's training log as metrics_<arm>.jsonl. On a lent GPU
    `mirror` is the device call's $OUT, so a call killed at its time limit still returns the last copies.
    render() writes its files and mirrors them under the same lock, so no half-written file is copied."""
    with _MIRROR_LOCK:
        return _mirror_files(out, mirror)


def _mirror_tmp(mirror: Path) -> Path:
    """A folder for the copies in progress, on mirror's file system (so that the rename is atomic): beside
    mirror where that is possible, so that a kill in mid-copy leaves no extra file in mirror (the device tool
    brings back 8 files of $OUT), else inside it."""
    mirror.mkdir(parents=True, exist_ok=True)
    mirror = mirror.resolve()                  # "." has no name, and its parent is not "..": the real folder's
    beside = mirror.parent / f".{mirror.name}_mirror_tmp"
    try:
        beside.mkdir(exist_ok=True)
        if beside.stat().st_dev == mirror.stat().st_dev:
            return beside
        beside.rmdir()
    except OSError:
        pass
    inside = mirror / "_mirror_tmp"
    inside.mkdir(exist_ok=True)
    return inside


def _mirror_files(out: Path, mirror: Path) -> list[str]:
    tmp_dir = _mirror_tmp(mirror)
    files = {n: out / n for n in ("results.json", "table.md", "curves.png", "hard_mask.pt")}
    files.update({f"metrics_{d.name[len('train_'):]}.jsonl": d / "metrics.jsonl" for d in out.glob("train_*")})
    done = []
    for name, src in sorted(files.items()):
        if src.exists():
            shutil.copyfile(src, tmp_dir / name)
            os.replace(tmp_dir / name, mirror / name)
            done.append(name)
    tmp_dir.rmdir()                            # empty again
    return done


class MirrorEvery:
    """A daemon thread that mirrors every `seconds` (the training logs grow step by step between phases)."""

    def __init__(self, out: Path, mirror: Path | None, seconds: float = 20.0):
        self.out, self.mirror, self.seconds = out, mirror, seconds
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True) if mirror is not None else None

    def _loop(self):
        while not self.stop.wait(self.seconds):
            try:
                mirror_files(self.out, self.mirror)
            except OSError:           # a file replaced while being copied: the next round copies it
                pass

    def __enter__(self):
        if self.thread is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
            mirror_files(self.out, self.mirror)


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def arm_config(args, beta: float | None, steps: int, out_dir: Path, model: str) -> Config:
    thoughts = beta is not None
    return Config(
        model=ModelConfig(name=model),
        thought=ThoughtConfig(M=args.M, K=args.K, P=args.P),
        loss=LossConfig(beta_policy=beta if thoughts else 0.0),
        train=TrainConfig(steps=steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                          warmup_steps=args.warmup_steps, seed=args.seed, device=args.device,
                          attention=args.attention, lm_head=args.lm_head, document_mask=args.document_mask,
                          out_dir=str(out_dir), thoughts=thoughts, cuda_graphs=thoughts and graphs_on(args),
                          thoughts_every=args.thoughts_every if thoughts else 0))


def graphs_on(args) -> bool:
    """Whether the Quiet-STaR arms replay the thought sampler from a CUDA graph (CUDA, the backends it captures)."""
    from quietstar.graphs import GRAPH_ATTENTION
    return args.device == "cuda" and args.cuda_graphs and args.lm_head == "triton" and args.attention in GRAPH_ATTENTION


def metrics_path(out: Path, arm: str) -> Path:
    """The arm's training log (quietstar-train's metrics.jsonl, written step by step)."""
    return out / f"train_{arm}" / "metrics.jsonl"


def train_arm(args, arm: str, beta, steps: int, out: Path, model: str):
    """Train one arm in out/train_<arm>/ (replacing an earlier attempt). Returns the trained model."""
    from quietstar.train import train
    shutil.rmtree(out / f"train_{arm}", ignore_errors=True)
    r = train(arm_config(args, beta, steps, out / f"train_{arm}", model), progress=True)
    return r["model"]


def release_memory(device) -> None:
    """After an arm's model is dropped: free what a reference cycle (the graphed sampler's) still holds, and
    give the CUDA cache back, so that the next arm has the memory."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def eval_setup(args):
    """(device, backends, autocast or None, tokenizer, EvalSets) of an evaluation, as both --measure and the run
    evaluate."""
    from quietstar.train import document_separator, load_tokenizer
    device = torch.device(args.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    tok = load_tokenizer(ModelConfig(name=args.model))
    sets = EvalSets(tok, document_separator(tok), args.seq_len, args.eval_docs, args.bench_items)
    return device, Backends(args.attention, args.lm_head), autocast, tok, sets


def eval_seconds(model, sets: EvalSets, thoughts: bool, backends, batch: int, device, autocast, rows: int) -> float:
    """Estimated seconds of evaluate_state on the whole sets: token_nll timed on the first `rows` rows of each
    part (after one untimed batch of that part: compiles, allocator) and scaled to the part's size."""
    from quietstar.evaluate import token_nll
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    parts = [(sets.rows, sets.valid), sets.gsm, sets.csqa]
    gen = torch.Generator(device=device).manual_seed(0)              # as evaluate_state samples
    total = 0.0
    for ids, valid in parts:
        # untimed first: each set's row length is new to the kernels (compiles, autotuning, allocator), and a
        # cost paid once would otherwise be scaled by the set's size (the H200 run's estimate was 1.5x high)
        token_nll(model, ids[:batch], valid[:batch], backends, batch, thoughts, gen, device, autocast)
        k = min(rows, ids.shape[0])
        sync()
        t0 = time.perf_counter()
        token_nll(model, ids[:k], valid[:k], backends, batch, thoughts, gen, device, autocast)
        sync()
        total += (time.perf_counter() - t0) * ids.shape[0] / k
    return total


def measure(args, out: Path) -> dict:
    """On a random-init model of the same shape (the same work): each arm's median step time and its fixed
    cost (set-up, the first step's compiles and graph capture: the wall time less the other steps), and
    the time of one evaluation with and without thoughts (timed on a part of the sets, scaled)."""
    model_name = {"smollm2-135m": "smollm2-135m-random"}.get(args.model, args.model)
    device, backends, autocast, _, sets = eval_setup(args)
    res = {"model": model_name, "device": args.device, "measure_steps": args.measure_steps}
    if args.gpu_tests_line:            # travels with the step times (a run on a fresh machine reads it there)
        res["gpu_tests"] = args.gpu_tests_line
    for arm, beta in (("quietstar", 1.0), ("control", None)):        # beta_policy does not change the work
        t0 = time.time()
        model = train_arm(args, arm, beta, args.measure_steps, out / "measure", model_name)
        wall = time.time() - t0
        all_ms = [r["ms"] for r in read_metrics(metrics_path(out / "measure", arm))]
        ms = all_ms[1:]                                                                  # the first compiles
        res[f"{arm}_ms"] = sorted(ms)[len(ms) // 2]
        res[f"{arm}_overhead_s"] = max(0.0, wall - len(ms) * res[f"{arm}_ms"] / 1000)
        # the first step's excess, mostly cold compiles: a run pays them once at most, not per arm (its arms share
        # the process's compiled kernels, and on the same machine Triton's disk cache from this --measure: the
        # H200 run's first Quiet-STaR step took 13.3 s here, 2.6 s in each arm of call 2, graph capture and the
        # like, which the margin covers)
        res[f"{arm}_compile_s"] = max(0.0, (all_ms[0] - res[f"{arm}_ms"]) / 1000)
        kind = "thought" if beta is not None else "base"
        res[f"eval_{kind}_s"] = eval_seconds(model, sets, beta is not None, backends, args.eval_batch, device,
                                             autocast, args.measure_eval_rows)
        del model
        release_memory(device)
        save_json(out / "step_times.json", res)         # after each arm: a cut --measure keeps what it timed
    shutil.rmtree(out / "measure", ignore_errors=True)
    print(json.dumps(res))
    return res


SIZING_MARGIN = 1.2      # on --measure's overheads and evaluation times (the step times are taken as they are)
SIZING_SLACK_S = 15.0    # left unplanned at the end of --budget-s (the last table, the files)


def step_times(args, budget: bool) -> dict:
    """--step-times' numbers, every one that the sizing needs checked (a --measure cut short saves what it
    timed so far): a run refuses at its start, not after its "before" evaluation."""
    if not args.step_times:
        raise SystemExit("learn_experiment: give --steps N, or --step-times FILE (from --measure) and "
                         "--train-budget-s or --budget-s")
    st = json.loads(Path(args.step_times).read_text())
    need = ("quietstar_ms", "control_ms") + (("quietstar_overhead_s", "control_overhead_s", "eval_thought_s",
                                              "eval_base_s") if budget else ())
    missing = [k for k in need if k not in st]
    if missing:
        raise SystemExit(f"learn_experiment: {'--budget-s' if budget else 'sizing'} needs {', '.join(missing)} in "
                         f"--step-times {args.step_times} (rerun --measure, or give --steps N)")
    return st


def plan_steps(args, left_s: float | None = None, load_s: float = 0.0) -> int:
    """Optimizer steps per arm: --steps; or the training time (--train-budget-s, or with --budget-s what is left
    of it, `left_s`, less every arm's fixed cost and evaluation) over one step of every arm. `load_s`: this
    run's load of the real model, which every arm repeats (--measure's overheads timed a random-init build)."""
    if args.steps:
        return args.steps
    st = step_times(args, budget=left_s is not None)
    n_qs = len(arms(args)) - 1
    per_step_s = (n_qs * st["quietstar_ms"] + st["control_ms"]) / 1000
    if left_s is None:
        train_s, how = args.train_budget_s, f"--train-budget-s {args.train_budget_s:.0f}"
    else:
        qc, cc = st.get("quietstar_compile_s", 0.0), st.get("control_compile_s", 0.0)    # older files: per arm
        fixed = SIZING_MARGIN * (n_qs * (max(0.0, st["quietstar_overhead_s"] - qc) + st["eval_thought_s"])
                                 + max(0.0, st["control_overhead_s"] - cc) + st["eval_base_s"] + (n_qs + 1) * load_s
                                 + max(qc, cc))
        train_s = left_s - fixed - SIZING_SLACK_S
        how = (f"--budget-s: {left_s:.0f} s left - {fixed:.0f} s of set-up, model loads and evaluation "
               f"(x{SIZING_MARGIN}) - {SIZING_SLACK_S:.0f} s slack = {train_s:.0f} s of training")
    steps = int(train_s / per_step_s)
    print(f"sizing: {how}; {n_qs} x {st['quietstar_ms']:.0f} + {st['control_ms']:.0f} ms per step of all arms "
          f"-> {steps} steps (cap {args.max_steps})", flush=True)
    if steps < 1:
        raise SystemExit(f"learn_experiment: no time to train ({how})")
    return min(steps, args.max_steps)


def run(args, out: Path) -> dict:
    if args.mirror and len(arms(args)) + 5 > 8:
        print(f"WARNING: --mirror: {len(arms(args)) + 5} files (run.log, 4 results, a log per arm) in {args.mirror}; "
              "the device tool brings back 8", flush=True)
    mirror = Path(args.mirror) if args.mirror else None
    with MirrorEvery(out, mirror, args.mirror_every):
        return _run(args, out, mirror)


def _run(args, out: Path, mirror: Path | None) -> dict:
    t_start = time.time()
    if args.budget_s and not args.steps:
        step_times(args, budget=True)                             # refused now, not after the "before" phase
    steps = None if args.budget_s else plan_steps(args)          # with --budget-s: after the "before" phase
    device, backends, autocast, tok, sets = eval_setup(args)
    import triton
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    res = {"meta": {"model": args.model, "weights": weights_description(args.model), "device": where,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "torch": torch.__version__, "triton": triton.__version__, "seed": args.seed, "steps": steps,
                    "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
                    "warmup_steps": args.warmup_steps, "M": args.M, "K": args.K, "P": args.P,
                    "beta_base": LossConfig().beta_base, "beta_talk": LossConfig().beta_talk,
                    "arms": dict(arms(args)), "sizes": sets.sizes(), "argv": sys.argv[1:],
                    "attention": args.attention, "lm_head": args.lm_head, "document_mask": args.document_mask,
                    "cuda_graphs": graphs_on(args)},
           "seconds": {}}
    if args.gpu_tests_line:             # what the GPU tests of the same machine said (learn_experiment.sh)
        res["meta"]["gpu_tests"], res["meta"]["fallbacks"] = args.gpu_tests_line, args.fallbacks
    for stale in out.glob("train_*"):        # an earlier run's arms: their logs would be mirrored beside this run's
        shutil.rmtree(stale, ignore_errors=True)       # results (until the arm trains again, or for good)
    render(out, res, mirror)

    def phase(name, fn):
        t0 = time.time()
        r = fn()
        res["seconds"][name] = time.time() - t0
        return r

    def ev(model, thoughts):
        return evaluate_state(model, sets, thoughts, backends, args.eval_batch, args.seed + 7, device, autocast)

    from quietstar.model import QuietStarModel, build_decoder
    from quietstar.train import marker_init_id
    torch.manual_seed(args.seed)          # as train() does: a random-init model starts where both arms start
    start = phase("load", lambda: QuietStarModel(build_decoder(ModelConfig(name=args.model)), ThoughtConfig(),
                                                 marker_init_id(tok, ThoughtConfig().marker_init_text)).to(device))
    res["before"] = {"eval": phase("eval_before", lambda: ev(start, False))}
    res["hard_targets"] = int(sets.hard.sum())
    torch.save({"mask": sets.hard, "seq_len": args.seq_len}, out / "hard_mask.pt")
    del start
    if steps is None:
        steps = res["meta"]["steps"] = plan_steps(args, left_s=args.budget_s - (time.time() - t_start),
                                                  load_s=res["seconds"]["load"])
    render(out, res, mirror)
    for arm, beta in arms(args):
        model = phase(f"train_{arm}", lambda: train_arm(args, arm, beta, steps, out, args.model))
        res[arm] = {"eval": phase(f"eval_{arm}", lambda: ev(model, beta is not None))}
        last = read_metrics(metrics_path(out, arm))
        res[arm]["last_step"] = last[-1] if last else None
        del model
        release_memory(device)
        render(out, res, mirror)
    print((out / "table.md").read_text())
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/learn", help="folder for results.json, table.md, curves.png, metrics")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (the real one), tiny, or a folder")
    p.add_argument("--smoke", action="store_true", help="CPU rehearsal: tiny model, a few steps, a few documents")
    p.add_argument("--measure", action="store_true", help="only measure both arms' step times (random init of the "
                   "same shape) into OUT/step_times.json")
    p.add_argument("--retable", default="", metavar="DIR",
                   help="only rewrite DIR/table.md from DIR/results.json (a finished run's, e.g. one fetched from a GPU)")
    p.add_argument("--measure-steps", type=int, default=4, help="--measure: steps per arm (the first is dropped)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per arm (0: sized from --step-times)")
    p.add_argument("--step-times", default="", help="step_times.json from --measure")
    p.add_argument("--train-budget-s", type=float, default=300.0, help="training time of all arms together")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="the whole run's time (0: off): the steps are sized after the 'before' phase from what is "
                        "left, less --step-times' measured set-up and evaluation times (overrides --train-budget-s)")
    p.add_argument("--measure-eval-rows", type=int, default=48,
                   help="--measure: rows of each evaluation set timed (scaled to the whole set)")
    p.add_argument("--gpu-tests", default="", help="a file with the GPU tests' one-line result (learn_experiment.sh): "
                   "it goes into results.json (and, with --measure, into step_times.json, where a run without "
                   "--gpu-tests finds it), and a kernel family with a failed test is replaced (FALLBACKS)")
    p.add_argument("--mirror", default="", help="also keep copies of the results and training logs in this "
                   "folder, flat, refreshed every --mirror-every s and after each phase (a lent GPU's $OUT)")
    p.add_argument("--mirror-every", type=float, default=20.0, help=argparse.SUPPRESS)
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--eval-docs", type=int, default=1000, help="held-out documents (the built-in split has 503)")
    p.add_argument("--bench-items", type=int, default=300, help="GSM8K problems and CommonsenseQA questions")
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--policy-weights", default="1e6,1", help="beta_policy of each Quiet-STaR arm (comma-separated)")
    p.add_argument("--thoughts-every", type=int, default=50, help="log a few decoded thoughts every N steps")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="CUDA: do not replay the thought sampler from a CUDA graph")
    p.add_argument("--attention", choices=ATTENTION_BACKENDS, default=None,
                   help="thought-attention backend (default: triton on CUDA, split on CPU)")
    p.add_argument("--lm-head", choices=LM_HEAD_BACKENDS, default=None,
                   help="LM-head backend (default: triton on CUDA, chunked on CPU)")
    p.add_argument("--no-document-mask", dest="document_mask", action="store_false",
                   help="attend across the documents packed into a row (as the reference does)")
    for k, v in DEFAULTS.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.retable:
        res_path = Path(args.retable) / "results.json"
        if not res_path.exists():
            p.error(f"--retable: no file {res_path}")
        (Path(args.retable) / "table.md").write_text(render_table(json.loads(res_path.read_text())))
        print(f"rewrote {Path(args.retable) / 'table.md'}")
        return 0
    if args.smoke:
        given = {a.lstrip("-").split("=")[0].replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])}
        for k, v in SMOKE.items():
            if k not in given and not (k == "steps" and args.step_times):
                setattr(args, k, v)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here")
    args.attention = args.attention or ("triton" if args.device == "cuda" else "split")
    args.lm_head = args.lm_head or ("triton" if args.device == "cuda" else "chunked")
    args.gpu_tests_line, args.fallbacks = "", []
    if args.gpu_tests:
        if not Path(args.gpu_tests).exists():
            p.error(f"--gpu-tests: no file {args.gpu_tests}")
        args.gpu_tests_line = Path(args.gpu_tests).read_text().strip()
    elif args.step_times and not args.measure and Path(args.step_times).exists():
        args.gpu_tests_line = json.loads(Path(args.step_times).read_text()).get("gpu_tests", "")
    if args.gpu_tests_line:
        args.fallbacks = apply_fallbacks(args, args.gpu_tests_line)
        if args.fallbacks:
            print(f"FALLBACK after failed GPU tests: {', '.join(args.fallbacks)}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    if args.measure:
        measure(args, out)
    else:
        run(args, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
