"""Plain-PyTorch chunked LM-head ops: the CPU training path and a benchmark provider (DESIGN.md section 7).

Same contracts as ``kernels/lm_head.py`` (and ``kernels/reference.py``):

* ``mixed_logprob_chunked(h_talk, h_base, w, weight, target, ignore_index=-100, *, chunk_size=None)``
* ``token_logprob_chunked(h, weight, target, temperature=1.0, banned_ids=(), *, chunk_size=None)``
* ``sample_thought_tokens_chunked(h, weight, temperature=1.0, banned_ids=(), generator=None, *, chunk_size=None)``

Rows are processed ``chunk_size`` at a time (default: as many as keep a float32 (chunk, V) block
under 64 MiB), so the peak extra memory is about chunk x V, never N x V. The autograd.Function
saves only the inputs and the per-row log-sum-exp and recomputes each chunk's logits in backward:
G = g (onehot - softmax) / tau, dh_mix = G W, dW += G^T h_mix (accumulated in float32, or float64
for float64 weights), dh_talk = w dh_mix, dh_base = (1 - w) dh_mix, dw = <dh_mix, h_talk - h_base>.

Logits are float32 (float64 for float64 inputs); with 16-bit weights the matmul runs in the weight's
dtype (fp32 accumulate inside the GEMM) and is then upcast, as an ``F.linear`` LM head would.
The sampler is Gumbel-max per chunk with ``torch.rand(..., generator=generator)``; on one device the
chunks consume the generator's stream in order, so with one chunk it draws exactly the reference's
numbers.
"""
from __future__ import annotations

import torch

from .reference import (banned_ids_tensor, check_ignore_index, check_lm_head_inputs, check_mixed_logprob_inputs,
                        check_temperature, refuse_double_backward)

__all__ = ["mixed_logprob_chunked", "token_logprob_chunked", "sample_thought_tokens_chunked"]

_CHUNK_BYTES = 64 * 2**20


def _chunk_rows(N: int, V: int, chunk_size) -> int:
    if chunk_size is None:
        return max(1, min(N, _CHUNK_BYTES // (4 * V)))
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def _acc_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _hidden(h, h2, w, weight, r0, r1):
    """Rows r0:r1 of h, or of h_mix = h2 + w (h - h2) (computed in fp32), in weight's dtype."""
    if w is None:
        return h[r0:r1].to(weight.dtype)
    acc = _acc_dtype(weight)
    hb = h2[r0:r1].to(acc)
    return (hb + w[r0:r1].to(acc)[:, None] * (h[r0:r1].to(acc) - hb)).to(weight.dtype)


def _logits(hm, weight, inv_temp, banned):
    z = (hm @ weight.T).to(_acc_dtype(weight)) * inv_temp
    if banned.numel():
        z.index_fill_(1, banned, float("-inf"))
    return z


class _ChunkedLogprobFunction(torch.autograd.Function):
    """logp = log_softmax(W h_mix / tau, banned at -inf)[target] chunk by chunk (h2, w None: no mixing)."""

    @staticmethod
    def forward(ctx, h, h2, w, weight, target, banned, inv_temp, ignore_index, chunk):
        N = h.shape[0]
        logp = torch.empty(N, device=h.device, dtype=torch.float32)
        lse = torch.empty(N, device=h.device, dtype=_acc_dtype(weight))
        valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
        safe = torch.where(valid, target, torch.zeros_like(target)).long()
        for r0 in range(0, N, chunk):
            r1 = min(N, r0 + chunk)
            z = _logits(_hidden(h, h2, w, weight, r0, r1), weight, inv_temp, banned)   # (chunk, V)
            lse[r0:r1] = torch.logsumexp(z, dim=1)
            lp = z.gather(1, safe[r0:r1, None])[:, 0] - lse[r0:r1]
            logp[r0:r1] = torch.where(valid[r0:r1], lp, torch.zeros_like(lp))
        ctx.save_for_backward(h, h2, w, weight, safe, valid, banned, lse)
        ctx.inv_temp, ctx.chunk = inv_temp, chunk
        return logp

    @staticmethod
    def backward(ctx, grad):
        refuse_double_backward("the chunked LM head")
        h, h2, w, weight, safe, valid, banned, lse = ctx.saved_tensors
        inv_temp, chunk = ctx.inv_temp, ctx.chunk
        N = h.shape[0]
        acc = _acc_dtype(weight)
        g = torch.where(valid, grad.to(acc), torch.zeros((), device=grad.device, dtype=acc)) * inv_temp
        dh = torch.empty_like(h)
        dh2 = torch.empty_like(h2) if w is not None else None
        dw = torch.empty_like(w) if w is not None else None
        dW = torch.zeros(weight.shape, device=weight.device, dtype=acc)
        for r0 in range(0, N, chunk):
            r1 = min(N, r0 + chunk)
            hm = _hidden(h, h2, w, weight, r0, r1)
            z = _logits(hm, weight, inv_temp, banned)
            G = -torch.exp(z - lse[r0:r1, None])                           # -softmax, (chunk, V)
            G.scatter_add_(1, safe[r0:r1, None], torch.ones_like(G[:, :1]))
            G *= g[r0:r1, None]
            if banned.numel():
                G.index_fill_(1, banned, 0.0)        # banned logits are constants: no gradient
            Gw = G.to(weight.dtype)
            dmix = Gw @ weight                                              # (chunk, d)
            dW += (Gw.T @ hm).to(acc)
            if w is None:
                dh[r0:r1] = dmix
            else:
                wr = w[r0:r1].to(acc)[:, None]
                dmix = dmix.to(acc)
                dh[r0:r1] = wr * dmix
                dh2[r0:r1] = (1 - wr) * dmix
                dw[r0:r1] = (dmix * (h[r0:r1].to(acc) - h2[r0:r1].to(acc))).sum(1)
        return dh, dh2, dw, dW.to(weight.dtype), None, None, None, None, None


def mixed_logprob_chunked(h_talk, h_base, w, weight, target, ignore_index=-100, *, chunk_size=None):
    """mixed_logprob_ref(h_talk, h_base, w, weight, target, ignore_index) computed chunk x V at a time."""
    N, d, V = check_mixed_logprob_inputs(h_talk, h_base, w, weight, target, ignore_index)
    none = torch.empty(0, dtype=torch.int64, device=h_talk.device)
    return _ChunkedLogprobFunction.apply(h_talk, h_base, w, weight, target, none, 1.0, check_ignore_index(ignore_index),
                                         _chunk_rows(N, V, chunk_size))


def token_logprob_chunked(h, weight, target, temperature=1.0, banned_ids=(), *, chunk_size=None):
    """token_logprob_ref(h, weight, target, temperature, banned_ids) computed chunk x V at a time."""
    N, d, V = check_lm_head_inputs(h, weight, target)
    temperature = check_temperature(temperature)
    banned = banned_ids_tensor(banned_ids, V, h.device)
    return _ChunkedLogprobFunction.apply(h, None, None, weight, target, banned, 1.0 / temperature, None,
                                         _chunk_rows(N, V, chunk_size))


@torch.no_grad()
def sample_thought_tokens_chunked(h, weight, temperature=1.0, banned_ids=(), generator=None, *, chunk_size=None):
    """One exact sample per row of softmax(W h / temperature) without banned ids (Gumbel-max per chunk)."""
    N, d, V = check_lm_head_inputs(h, weight)
    temperature = check_temperature(temperature)
    banned = banned_ids_tensor(banned_ids, V, h.device)
    chunk = _chunk_rows(N, V, chunk_size)
    tokens = torch.empty(N, device=h.device, dtype=torch.int64)
    tiny = torch.finfo(torch.float32).tiny
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        z = _logits(h[r0:r1].to(weight.dtype), weight, 1.0 / temperature, banned).float()
        u = torch.rand(z.shape, generator=generator, device=h.device, dtype=torch.float32)
        z -= torch.log(-torch.log(u.clamp_min_(tiny)))
        tokens[r0:r1] = torch.argmax(z, dim=1)
    return tokens
