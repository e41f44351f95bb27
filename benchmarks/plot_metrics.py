"""Plot a training run's metrics file (JSON lines from quietstar-train) as a PNG, and print its
decoded thoughts.

    python benchmarks/plot_metrics.py runs/x/metrics.jsonl benchmarks/results/x.png [--title T]

Panels: the NLL terms (and held-out NLL), the REINFORCE term, the mixing weight, and the thought gain
(log p_mix - log p_base of the true future tokens, per scored talk target: > 0 where thoughts help)
with the mean reward. The decoded thoughts the run logged (`--thoughts-every N`) are printed, the last
record's also under the plot.
"""
from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path: str):
    """(step records, eval records, thought records) of a metrics.jsonl."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return ([r for r in rows if "step" in r and "loss" in r], [r["eval"] for r in rows if "eval" in r],
            [r["thoughts"] for r in rows if "thoughts" in r])


def format_thoughts(rec: dict, width: int = 60) -> list[str]:
    """One line per decoded thought: position, gain, context -> <thought> -> next tokens."""
    def clip(s, n):
        s = " ".join(s.split())
        return s if len(s) <= n else "..." + s[-(n - 3):]
    return [f"step {rec['step']} t={s['position']} gain {s['gain']:+.3f}: {clip(s['context'], width)!r} "
            f"<{clip(s['thought'], width)!r}> {clip(s['next'], 30)!r}" for s in rec["samples"]]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("metrics")
    p.add_argument("png")
    p.add_argument("--title", default="")
    a = p.parse_args(argv)
    steps, evals, thoughts = read(a.metrics)
    x = [r["step"] for r in steps]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5 if thoughts else 7))
    ax[0, 0].plot(x, [r["nll_base"] for r in steps], label="NLL base (no thought)")
    ax[0, 0].plot(x, [r["nll_talk"] for r in steps], label="NLL talk (mixed, K tokens)")
    if evals:
        ax[0, 0].plot([e["step"] for e in evals], [e["heldout_nll_base"] for e in evals], "o--",
                      label="held-out NLL, no thought")
        ax[0, 0].plot([e["step"] for e in evals], [e["heldout_nll_thought"] for e in evals], "s--",
                      label="held-out NLL, with thought")
    ax[0, 0].set_title("losses (nats/token)")
    ax[0, 0].legend(fontsize=7, framealpha=0.5)
    ax[0, 1].plot(x, [r["policy"] for r in steps])
    ax[0, 1].set_title("REINFORCE term L_policy")
    ax[1, 0].plot(x, [r["w_mean"] for r in steps], label="mean w")
    ax[1, 0].fill_between(x, [r["w_mean"] - r["w_std"] for r in steps], [r["w_mean"] + r["w_std"] for r in steps],
                          alpha=0.3, label="± std")
    ax[1, 0].set_title("mixing weight w")
    ax[1, 0].legend(fontsize=8)
    gained = [r for r in steps if "thought_gain" in r]          # runs before the gain was logged have none
    if gained:
        ax[1, 1].plot([r["step"] for r in gained], [r["thought_gain"] for r in gained], label="thought gain")
        ax[1, 1].axhline(0.0, color="grey", lw=0.5)
        ax[1, 1].set_ylabel("log p_mix - log p_base (nats/token)")
        ax[1, 1].legend(fontsize=8, loc="upper left")
    r2 = ax[1, 1].twinx() if gained else ax[1, 1]
    r2.plot(x, [r["reward"] for r in steps], color="C1", alpha=0.6, label="mean reward")
    r2.set_ylabel("reward: sum_k log p_mix")
    ax[1, 1].set_title("thought gain and reward (per position)")
    for a_ in ax.flat:
        a_.set_xlabel("step")
    fig.suptitle(a.title)
    if thoughts:
        lines = format_thoughts(thoughts[-1], width=45)
        fig.text(0.01, 0.005, "\n".join(lines), fontsize=6, family="monospace", va="bottom")
        fig.tight_layout(rect=(0, 0.02 + 0.018 * len(lines), 1, 1))
        for rec in thoughts:
            print("\n".join(format_thoughts(rec)))
    else:
        fig.tight_layout()
    fig.savefig(a.png, dpi=90)


if __name__ == "__main__":
    main()
