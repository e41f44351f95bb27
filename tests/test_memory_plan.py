"""benchmarks/memory_plan.py's live-bytes measurement (the profiler's allocation and free events).

- on a toy decoder whose saved tensors are counted by hand, `live_bytes` finds exactly what the forward
  keeps for the backward, with and without `apply_activation_checkpointing`, and a checkpointed stack's
  peak holds one layer's recompute once (it equals the plain one-layer peak plus the other layers' inputs);
- on the Quiet-STaR model (smoke shape, bf16 autocast), a checkpointed decoder layer keeps exactly its
  bf16 input, tokens x d x 2 bytes per row.
"""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from quietstar import parallel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import memory_plan as mp  # noqa: E402

N, d, f = 37, 24, 56          # rows x tokens, model width, MLP width: fp32, 4 bytes each


class _Layer(nn.Module):
    """x + W2 relu(W1 x): keeps relu's output (N x f, relu's and W2's saved tensor) and hands its output
    (N x d) to the next layer, which saves it as W1's input; W1 x and W2 h are freed in the forward."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False)

    def forward(self, x):
        return x + self.w2(torch.relu(self.w1(x)))


def _toy(n: int, ac: bool) -> nn.Module:
    """A model with its layers at .lm.model.layers, where apply_activation_checkpointing finds them."""
    model = nn.Module()
    model.lm = nn.Module()
    model.lm.model = nn.Module()
    model.lm.model.layers = nn.ModuleList(_Layer() for _ in range(n))
    if ac:
        parallel.apply_activation_checkpointing(model)
    for p in model.parameters():            # the gradient buffers of the step before: accumulated in place
        p.grad = torch.zeros_like(p)
    return model


def _measure(n: int, ac: bool) -> dict:
    torch.manual_seed(n)
    model, x = _toy(n, ac), torch.randn(N, d, requires_grad=True)     # every layer computes its input's gradient
    x.grad = torch.zeros_like(x)

    def forward():
        h = x
        for layer in model.lm.model.layers:
            h = layer(h)
        return h.pow(2).sum()               # pow keeps the last output (counted above), sum is a 4-byte scalar

    return mp.live_bytes(forward)


@pytest.mark.parametrize("n", [1, 3])
def test_live_bytes_equal_the_hand_count(n):
    plain, ckpt = _measure(n, False), _measure(n, True)
    assert plain["saved"] == n * N * (d + f) * 4 + 4          # every layer's output and relu output
    assert ckpt["saved"] == n * N * d * 4 + 4                 # a checkpointed layer: only its output, the next input
    assert plain["end"] == ckpt["end"] == 0                   # gradients went into the existing buffers
    # the recompute runs one layer at a time: the checkpointed peak is one plain layer's peak plus the
    # inputs the other n - 1 layers keep
    assert ckpt["peak"] == _measure(1, False)["peak"] + (n - 1) * N * d * 4
    assert plain["peak"] > ckpt["peak"] or n == 1


def test_checkpointed_quietstar_layer_keeps_its_bf16_input():
    """measure_point (the benchmark's child) on the smoke shape: live bytes saved and peak grow by exactly
    one bf16 hidden state per trained token with each checkpointed layer; without checkpointing by more."""
    T, L = 8, mp.THOUGHT["M"] + mp.THOUGHT["K"] + 1
    tokens = T * (1 + mp.THOUGHT["P"] * L)
    pts = {(n, ac): mp.measure_point(mp.SMOKE, n, T, 1, ac, "live") for n in (1, 2) for ac in (False, True)}
    per_layer = {ac: {k: pts[(2, ac)][k] - pts[(1, ac)][k] for k in ("live_saved", "live_peak")}
                 for ac in (False, True)}
    assert per_layer[True] == {"live_saved": tokens * mp.SMOKE["hidden_size"] * 2,
                               "live_peak": tokens * mp.SMOKE["hidden_size"] * 2}
    assert per_layer[False]["live_saved"] > 5 * per_layer[True]["live_saved"]
    rows = mp.saved_per_layer(list(pts.values()), mp.SMOKE)
    assert [(r["ac"], r["saved"] == r["input_bf16"]) for r in rows] == [(False, False), (True, True)]
