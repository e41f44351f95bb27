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

try:
    import matplotlib
except ModuleNotFoundError:       # a runtime install (scripts/setup.sh without --dev) has no plotting
    raise SystemExit("plot_metrics.py needs matplotlib: pip install matplotlib (or bash scripts/setup.sh --dev)") \
        from None

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
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("metrics")
    p.add_argument("png")
    p.add_argument("--title", default="")
    a = p.parse_args(argv)
    steps, evals, thoughts = read(a.metrics)
    if not steps:
        raise SystemExit(f"plot_metrics.py: {a.metrics} holds no step records")

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
    for panel, title in ((ax[0, 1], "REINFORCE term L_policy"), (ax[1, 0], "mixing weight w"),
                         (ax[1, 1], "thought gain and reward (per position)")):
        panel.set_title(title)
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
    if gained[0]:
        ax[1, 1].plot(*gained, label="thought gain")
        ax[1, 1].axhline(0.0, color="grey", lw=0.5)
        ax[1, 1].set_ylabel("log p_mix - log p_base (nats/token)")
        ax[1, 1].legend(fontsize=8, loc="upper left")
    if thinking:
        r2 = ax[1, 1].twinx() if gained[0] else ax[1, 1]
        r2.plot(*series("reward"), color="C1", alpha=0.6, label="mean reward")
        r2.set_ylabel("reward: sum_k log p_mix")
    for a_ in ax.flat:
        a_.set_xlabel("step")
    fig.suptitle(a.title)
    if thoughts:
        lines = format_thoughts(thoughts[-1], width=45)
        # parse_math off: decoded text (MATH's "$x$") is not mathtext
        fig.text(0.01, 0.005, "\n".join(lines), fontsize=6, family="monospace", va="bottom", parse_math=False)
        fig.tight_layout(rect=(0, 0.02 + 0.018 * len(lines), 1, 1))
        for rec in thoughts:
            print("\n".join(format_thoughts(rec)))
    else:
        fig.tight_layout()
    fig.savefig(a.png, dpi=90)


if __name__ == "__main__":
    main()
