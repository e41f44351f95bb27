"""Model FLOPs of one Quiet-STaR step and the GPU's peak, for MFU (the training log, bench_train_step).

With N the decoder's non-embedding parameters plus the LM head's d*V (matmul FLOPs only; attention
scores are left out), a trained token costs 6N (forward + backward) and a sampled token 2N:

    FLOPs/step = 6 N (B*T + B*P*T*L) + 2 N (M * B*P*T)

B*T base tokens and B*P*T*L chain tokens are trained; M no-grad steps of B*P*T tokens sample.
MFU = FLOPs/step / step time / peak, with the peak dense bf16 rate of known GPUs (None otherwise).
"""
from __future__ import annotations

import torch

# dense bf16 tensor-core peaks (FLOP/s), matched against torch.cuda.get_device_name()
PEAK_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12))


def matmul_params(lm) -> int:
    """Non-embedding parameters plus the LM head (parameters() counts a tied weight once)."""
    n = sum(p.numel() for p in lm.parameters()) - lm.model.embed_tokens.weight.numel()
    return n + (lm.lm_head.weight.numel() if lm.config.tie_word_embeddings else 0)


def step_flops(lm, B: int, T: int, M: int, P: int, L: int) -> float:
    """Model FLOPs of one Quiet-STaR step (one micro-batch), by the formula above."""
    N = matmul_params(lm)
    return 6.0 * N * (B * T + B * P * T * L) + 2.0 * N * M * B * P * T


def peak_bf16_flops(device) -> float | None:
    """The dense bf16 peak of a known CUDA GPU, else None (CPU, or a GPU not in PEAK_BF16)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)
