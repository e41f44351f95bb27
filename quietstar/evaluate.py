"""Held-out loss with and without thoughts.

- without: the base pass's NLL of x_{t+1} (the model as an ordinary LM);
- with: the NLL of x_{t+1} under the mixed prediction of talk k = 1 (the thought's own next-token
  prediction mixed with the base by the learned w), averaged over the P sampled thoughts.
Both over the same scored targets of the held-out rows.
"""
from __future__ import annotations

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
