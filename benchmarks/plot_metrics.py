"""Plot a training run's metrics file (JSON lines from quietstar-train) as a PNG, and print its
decoded thoughts.

    python benchmarks/plot_metrics.py runs/x/metrics.jsonl benchmarks/results/x.png [--title T]

Panels: the NLL terms (and held-out NLL), the REINFORCE term, the mixing weight, and the thought gain
(log p_mix - log p_base of the true future tokens, per scored talk target: > 0 where thoughts help)
with the mean reward. The decoded thoughts the run logged (`--thoughts-every N`) are printed, the last
record's also under the plot.

Bad input (a missing or unreadable metrics file, a folder that is not a run's, an output folder that does
not exist) ends in one line, `plot_metrics.py: error: ...`, exit status 2, nothing written. The last line of
a run killed while writing it is skipped, with a note on stderr, as `quietstar-train --resume` does.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import matplotlib
except ModuleNotFoundError:       # a runtime install (scripts/setup.sh without --dev) has no plotting
    raise SystemExit("plot_metrics.py needs matplotlib: pip install matplotlib (or bash scripts/setup.sh --dev)") \
        from None

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402

PROG = "plot_metrics.py"
METRICS = "metrics.jsonl"        # the file quietstar-train writes into its --out-dir


def read(path):
    """(step records, eval records, thought records) of a metrics.jsonl, or of a run folder's. A ValueError naming
    the file (and line) for anything that is not one; a last line cut off by a killed run is skipped (a note on
    stderr)."""
    path = Path(path)
    if path.is_dir():
        if not (path / METRICS).is_file():
            raise ValueError(f"metrics {path}: a folder without {METRICS} (give a quietstar-train run folder or its "
                             f"{METRICS})")
        path = path / METRICS
    if not path.exists():
        raise ValueError(f"metrics {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"metrics {path}: not UTF-8 text (byte {e.start}); expected quietstar-train's {METRICS}") \
            from None
    except OSError as e:
        raise ValueError(f"metrics {path}: cannot be read ({e.strerror})") from None
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    rows = []
    for i, line in numbered:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict):
            if i == numbered[-1][0] and rec is None:   # what a run killed mid-write leaves; --resume drops it too
                print(f"{PROG}: note: {path} line {i}, the last, is not JSON (cut off by a killed run?): skipped",
                      file=sys.stderr)
                continue
            if i == numbered[0][0] and _one_document("\n".join(lines)):
                raise ValueError(f"metrics {path}: one JSON document, not quietstar-train's {METRICS} (one record "
                                 "per line; quietstar-eval writes eval.json)")
            raise ValueError(f"metrics {path} line {i}: not a JSON object (expected quietstar-train's {METRICS}, "
                             "one record per line)")
        rows.append(rec)
    steps = [r for r in rows if "step" in r and "loss" in r]
    if not steps:
        raise ValueError(f"metrics {path}: holds no step records (expected quietstar-train's {METRICS})")
    return (steps, [r["eval"] for r in rows if "eval" in r], [r["thoughts"] for r in rows if "thoughts" in r])


def _one_document(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def check_png(png: str) -> None:
    """A ValueError naming `png` unless an image can be written there (its folder exists, a format matplotlib
    knows), before anything is read or drawn."""
    out = Path(png)
    if out.is_dir():
        raise ValueError(f"png {png}: a folder; give the image file to write (e.g. {out / 'metrics.png'})")
    if not out.parent.is_dir():
        raise ValueError(f"png {png}: folder {out.parent} does not exist")
    kinds = FigureCanvasBase.get_supported_filetypes()
    if out.suffix and out.suffix[1:].lower() not in kinds:
        raise ValueError(f"png {png}: unknown image format {out.suffix} (give .png, or one of "
                         f"{', '.join(sorted(kinds))})")


def format_thoughts(rec: dict, width: int = 60) -> list[str]:
    """One line per decoded thought: position, gain, context -> <thought> -> next tokens."""
    def clip(s, n):
        s = " ".join(s.split())
        return s if len(s) <= n else "..." + s[-(n - 3):]
    return [f"step {rec['step']} t={s['position']} gain {s['gain']:+.3f}: {clip(s['context'], width)!r} "
            f"<{clip(s['thought'], width)!r}> {clip(s['next'], 30)!r}" for s in rec["samples"]]


def main(argv=None) -> int:
    """The command line; bad input ends in one line on stderr, `plot_metrics.py: error: ...`, exit status 2."""
    p = argparse.ArgumentParser(prog=PROG, description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("metrics", help=f"a run's {METRICS} (quietstar-train writes OUT_DIR/{METRICS}), or the run "
                                   f"folder OUT_DIR itself (its {METRICS} is read)")
    p.add_argument("png", help="the image to write (its folder must exist; the format follows the suffix: .png)")
    p.add_argument("--title", default="", help="a title above the panels (default: none)")
    a = p.parse_args(argv)
    try:
        check_png(a.png)
        steps, evals, thoughts = read(a.metrics)
    except ValueError as e:
        return _error(e)
    fig = figure(steps, evals, thoughts, a.title)
    try:
        fig.savefig(a.png, dpi=90)
    except OSError as e:                      # e.g. a folder the user may not write into
        return _error(f"png {a.png}: cannot be written ({e.strerror or e})")
    for rec in thoughts:
        print("\n".join(format_thoughts(rec)))
    return 0


def _error(e) -> int:
    print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2


def figure(steps, evals, thoughts, title: str):
    """The panels of `read`'s records, the last decoded thoughts under them."""

    def series(key):
        """(steps, values) of the records that have `key` (a --no-thoughts run logs no thought terms)."""
        rs = [r for r in steps if key in r]
        return [r["step"] for r in rs], [r[key] for r in rs]
    thinking = any("nll_talk" in r for r in steps)          # False: a --no-thoughts run
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5 if thoughts else 7))
    ax[0, 0].plot(*series("nll_base"), label="NLL base (no thought)")
    if thinking:
        ax[0, 0].plot(*series("nll_talk"), label="NLL talk (mixed, K tokens)")
    if evals:
        ax[0, 0].plot([e["step"] for e in evals], [e["heldout_nll_base"] for e in evals], "o--",
                      label="held-out NLL, no thought")
        with_thought = [e for e in evals if "heldout_nll_thought" in e]
        if with_thought and thinking:
            ax[0, 0].plot([e["step"] for e in with_thought], [e["heldout_nll_thought"] for e in with_thought], "s--",
                          label="held-out NLL, with thought")
    ax[0, 0].set_title("losses (nats/token)")
    ax[0, 0].legend(fontsize=7, framealpha=0.5)
    for panel, name in ((ax[0, 1], "REINFORCE term L_policy"), (ax[1, 0], "mixing weight w"),
                        (ax[1, 1], "thought gain and reward (per position)")):
        panel.set_title(name)
        if not thinking:
            panel.text(0.5, 0.5, "no thoughts in this run", ha="center", va="center", transform=panel.transAxes)
    ax[0, 1].plot(*series("policy"))
    if thinking:
        xw, wm = series("w_mean")
        ws = series("w_std")[1]
        ax[1, 0].plot(xw, wm, label="mean w")
        ax[1, 0].fill_between(xw, [m - sd for m, sd in zip(wm, ws)], [m + sd for m, sd in zip(wm, ws)], alpha=0.3,
                              label="± std")
        ax[1, 0].legend(fontsize=8)
    gained = series("thought_gain")          # runs before the gain was logged have none
    handles = []                             # the last panel's, on both y axes: one legend
    if gained[0]:
        handles += ax[1, 1].plot(*gained, label="thought gain")
        ax[1, 1].axhline(0.0, color="grey", lw=0.5)
        ax[1, 1].set_ylabel("log p_mix - log p_base (nats/token)")
    if thinking:
        r2 = ax[1, 1].twinx() if gained[0] else ax[1, 1]
        handles += r2.plot(*series("reward"), color="C1", alpha=0.6, label="mean reward")
        r2.set_ylabel("reward: sum_k log p_mix")
    if handles:
        ax[1, 1].legend(handles=handles, fontsize=8, loc="upper left")
    for a_ in ax.flat:
        a_.set_xlabel("step")
    if title:
        fig.suptitle(title)
    if thoughts:
        lines = format_thoughts(thoughts[-1], width=45)
        # parse_math off: decoded text (MATH's "$x$") is not mathtext
        fig.text(0.01, 0.005, "\n".join(lines), fontsize=6, family="monospace", va="bottom", parse_math=False)
        fig.tight_layout(rect=(0, 0.02 + 0.018 * len(lines), 1, 1))
    else:
        fig.tight_layout()
    return fig


if __name__ == "__main__":
    raise SystemExit(main())
