"""Plot a training run's metrics file (JSON lines from quietstar-train) as a PNG.

    python benchmarks/plot_metrics.py runs/x/metrics.jsonl benchmarks/results/x.png [--title T]
"""
from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("metrics")
    p.add_argument("png")
    p.add_argument("--title", default="")
    a = p.parse_args()
    rows = [json.loads(line) for line in open(a.metrics)]
    steps = [r for r in rows if "step" in r and "loss" in r]
    evals = [r["eval"] for r in rows if "eval" in r]
    x = [r["step"] for r in steps]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
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
    ax[1, 1].plot(x, [r["reward"] for r in steps])
    ax[1, 1].set_title("mean reward: sum_k log p_mix (per position)")
    for a_ in ax.flat:
        a_.set_xlabel("step")
    fig.suptitle(a.title)
    fig.tight_layout()
    fig.savefig(a.png, dpi=90)


if __name__ == "__main__":
    main()
