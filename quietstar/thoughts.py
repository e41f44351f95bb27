"""One Quiet-STaR training step: sample thoughts, run the chains, score the talk, REINFORCE.

DESIGN.md sections 3-6 in code. For every base position t and pass p the chain is
    l:      0      1..M        M+1     M+2 .. M+K      (L = M + K + 1 tokens)
    token:  <sot>  s_1..s_M    <eot>   x_{t+1}..x_{t+K-1}
    RoPE:   t + 1 + l
The hidden state at chain index l < M samples s_{l+1}; the one at index M + k predicts x_{t+k}
(talk prediction k = 1..K), mixed with the base pass's prediction at t + k - 1 by the mixing head.

Two schedules give the same loss and gradients for the same sampled thoughts (a test):
- `sequential`: the base pass, then L steps of P*T new tokens against a growing K/V cache, with
  gradients through all of them (the reference algorithm);
- `sample-then-train`: M no-grad steps to sample, then ONE forward+backward over the base tokens and
  all P*T*L chain tokens with the parallel thought-attention pattern.

Packed documents (``doc_start`` (B, T), quietstar/data.py; None = one document per row): the base
pass and every chain of position t see only t's own document, and a talk target x_{t+k} that lies
in a later document than t is not scored (a thought is not rewarded for predicting the next,
unrelated document). RoPE positions stay row-relative (see README: with RoPE and the mask, a
restart per document would change nothing but rounding).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from kernels.reference import check_doc_start

from .attention import Documents, Layout, ThoughtCache
from .config import LossConfig
from .model import QuietStarModel


# ----------------------------------------------------------------------------------------------
# LM-head backends
# ----------------------------------------------------------------------------------------------
def lm_head_ops(name: str) -> SimpleNamespace:
    """mixed_logprob / token_logprob / sample_thought_tokens of one backend (DESIGN.md section 7 signatures)."""
    if name == "reference":
        from kernels import reference as r
        return SimpleNamespace(mixed_logprob=r.mixed_logprob_ref, token_logprob=r.token_logprob_ref,
                               sample=r.sample_thought_tokens_ref)
    if name == "chunked":
        from kernels import lm_head_chunked as c
        return SimpleNamespace(mixed_logprob=c.mixed_logprob_chunked, token_logprob=c.token_logprob_chunked,
                               sample=c.sample_thought_tokens_chunked)
    if name == "triton":
        import kernels
        return SimpleNamespace(mixed_logprob=_autocast(kernels.mixed_logprob), token_logprob=_autocast(
            kernels.token_logprob), sample=_autocast(kernels.sample_thought_tokens))
    raise ValueError(f"lm_head must be reference, chunked or triton, got {name!r}")


def _autocast(fn):
    """Under CUDA autocast, feed a Triton LM-head op the autocast dtype, as an nn.Linear LM head would
    get (the final-norm hidden states and the fp32 master weight are float32 otherwise); gradients flow
    back through the casts to the fp32 tensors."""
    def wrapped(*args, **kwargs):
        if torch.is_autocast_enabled("cuda"):
            dt = torch.get_autocast_dtype("cuda")
            args = tuple(a.to(dt) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        return fn(*args, **kwargs)
    wrapped.__name__ = getattr(fn, "__name__", "op")
    return wrapped


@dataclass
class Backends:
    attention: str = "reference"
    lm_head: str = "reference"


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def check_backends(backends) -> None:
    """Refuse anything but a `Backends` (a backend name alone says neither which op nor which the other is)."""
    if not isinstance(backends, Backends):
        raise TypeError(f"backends must be a Backends(attention=..., lm_head=...), got {type(backends).__name__} "
                        f"{backends!r}")


def check_id_range(name: str, ids: torch.Tensor, V: int, what: str = "") -> None:
    """Refuse ids outside [0, V), naming `name` (`what`: more about V). Reads them: on a GPU, a host sync."""
    if ids.numel() and not bool(((ids >= 0) & (ids < V)).all()):
        bad = ids[(ids < 0) | (ids >= V)]
        raise ValueError(f"{name} must hold token ids in [0, V={V}){what}, got {bad[:4].tolist()}")


def check_input_ids(input_ids: torch.Tensor, min_T: int, V: int | None = None) -> None:
    """Refuse anything but a (B, T) int64 (or int32) tensor with T >= min_T; with `V`, ids outside [0, V) too,
    read on the CPU only (on a GPU that would sync every step; there the embedding's own check fires)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be an int64 tensor, got {getattr(input_ids, 'dtype', type(input_ids))}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] < min_T:
        raise ValueError(f"input_ids must have T >= {min_T} tokens per row, got T={input_ids.shape[1]}")
    if V is not None and input_ids.device.type == "cpu":
        check_id_range("input_ids", input_ids, V, " (the model's embedding rows)")


def vocab_rows(model: QuietStarModel) -> int:
    """The ids an input may hold: the rows of the model's input embedding."""
    return model.lm.model.embed_tokens.num_embeddings


def check_batch(input_ids: torch.Tensor, valid_next: torch.Tensor | None,
                doc_start: torch.Tensor | None = None, V: int | None = None) -> torch.Tensor:
    """Validate a batch (and its (B, T) ``doc_start``, if any: values checked on the CPU only; with `V`, the ids
    too, as check_input_ids); return valid_next (B, T) bool: True where target x_{t+1} is scored."""
    check_input_ids(input_ids, 2, V)
    B, T = input_ids.shape
    if valid_next is None:
        valid_next = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
    elif valid_next.shape != (B, T) or valid_next.dtype != torch.bool:
        raise ValueError(f"valid_next must be a (B={B}, T={T}) bool tensor, got {tuple(valid_next.shape)} "
                         f"{valid_next.dtype}")
    check_doc_start(doc_start, B, T, input_ids.device)
    valid_next = valid_next.clone()
    valid_next[:, -1] = False                      # x_T does not exist
    return valid_next


def chain_positions(T: int, L: int, device) -> torch.Tensor:
    """RoPE positions of chain token (t, l): t + 1 + l, as (T, L)."""
    return torch.arange(T, device=device)[:, None] + 1 + torch.arange(L, device=device)[None, :]


def future_tokens(input_ids: torch.Tensor, K: int) -> torch.Tensor:
    """x_{t+k} for k = 1..K as (B, T, K); past the row's end, token 0 (its targets are never scored)."""
    B, T = input_ids.shape
    idx = torch.arange(T, device=input_ids.device)[:, None] + torch.arange(1, K + 1, device=input_ids.device)
    padded = torch.cat([input_ids, input_ids.new_zeros(B, K)], dim=1)
    return padded[:, idx]                                                   # (B, T, K)


def chain_embeddings(model: QuietStarModel, input_ids: torch.Tensor, thoughts: torch.Tensor) -> torch.Tensor:
    """Embeddings of all chains, (B, P, T, L, d): <sot>, s_1..s_M, <eot>, x_{t+1}..x_{t+K-1}."""
    B, P, T, M = thoughts.shape
    K = model.thought.K
    sot, eot = model.marker_embeddings()
    d = sot.shape[-1]
    fut = future_tokens(input_ids, K)[:, :, :K - 1]                          # (B, T, K-1)
    parts = [sot.expand(B, P, T, 1, d), model.embed(thoughts), eot.expand(B, P, T, 1, d),
             model.embed(fut)[:, None].expand(B, P, T, K - 1, d)]
    return torch.cat(parts, dim=3)


# ----------------------------------------------------------------------------------------------
# sampling (no grad)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_thoughts(model: QuietStarModel, input_ids: torch.Tensor, backends: Backends,
                    generator: torch.Generator | None = None, seeds: torch.Tensor | None = None,
                    docs: Documents | torch.Tensor | None = None) -> torch.Tensor:
    """Sample M thought tokens for every (pass, position): (B, P, T, M) int64, tokenwise in parallel.

    `docs`: the batch's packed documents (a `Documents` or its (B, T) doc_start), None for one per row.

    The noise comes from `generator`, or with the Triton LM head from `seeds`: an (M,) int64 tensor
    on the device whose entry l keys step l's Philox noise (a CUDA graph reads them from a static
    buffer; quietstar/graphs.py). Drawing them as M one-element randints from a generator gives
    exactly the tokens of the generator path."""
    check_input_ids(input_ids, 1, vocab_rows(model))
    check_backends(backends)
    docs = _documents(docs)
    if docs is not None:
        check_doc_start(docs.doc_start, *input_ids.shape, input_ids.device, values=False)   # its values: Documents
    return _sample(model, input_ids, backends, generator, seeds, docs).thoughts


def _sample(model: QuietStarModel, input_ids: torch.Tensor, backends: Backends, generator, seeds, docs,
            extra_steps: int = 0) -> SimpleNamespace:
    """sample_thoughts' work: the base pass, then M cached chain steps that sample. Returns the thoughts, the base
    pass's hidden states h_base (B, T, d), the cache (with room for `extra_steps` more chain steps) and the
    embeddings of the last sampled tokens s_M (B, P*T, d), the input of chain step M."""
    th = model.thought
    B, T = input_ids.shape
    P, M = th.P, th.M
    if seeds is not None:
        if backends.lm_head != "triton":
            raise ValueError(f"seeds need the triton LM head (its sampler is keyed by a device seed); "
                             f"lm_head={backends.lm_head!r} takes a generator")
        if generator is not None:
            raise ValueError("pass either seeds or generator to sample_thoughts, not both")
        if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or tuple(seeds.shape) != (M,):
            raise ValueError(f"seeds must be an (M={M},) int64 tensor, got "
                             f"{tuple(getattr(seeds, 'shape', ()))} {getattr(seeds, 'dtype', type(seeds).__name__)}")
    docs = _documents(docs)
    ops = lm_head_ops(backends.lm_head)
    W = model.lm_head_weight
    if backends.lm_head == "triton" and W.is_cuda and torch.is_autocast_enabled("cuda"):
        W = W.to(torch.get_autocast_dtype("cuda"))     # once, not in each of the M sampler calls
    cache = ThoughtCache(P=P, T=T, L=M + extra_steps)   # indices 0..M-1 are the ones that sample
    pos_base = torch.arange(T, device=input_ids.device)[None].expand(B, T)
    h_base = model.hidden(model.embed(input_ids), pos_base, Layout("base", backends.attention, cache=cache, docs=docs))
    pos = chain_positions(T, M, input_ids.device)                          # (T, M)
    sot, _ = model.marker_embeddings()
    thoughts = input_ids.new_empty(B, P, T, M)
    emb = sot.expand(B, P * T, sot.shape[-1])
    for l in range(M):
        p_l = pos[:, l].repeat(P)[None].expand(B, P * T)
        h = model.hidden(emb, p_l, Layout("step", backends.attention, step=l, cache=cache, docs=docs))  # (B, P*T, d)
        noise = {"generator": generator} if seeds is None else {"seed": seeds[l:l + 1]}
        s = ops.sample(h.reshape(B * P * T, -1), W, temperature=th.tau_sample, banned_ids=model.banned_ids, **noise)
        thoughts[..., l] = s.view(B, P, T)
        emb = model.embed(s.view(B, P * T))
    return SimpleNamespace(thoughts=thoughts, h_base=h_base, cache=cache, next_embeddings=emb)


# ----------------------------------------------------------------------------------------------
# the chains with gradients: two schedules
# ----------------------------------------------------------------------------------------------
def _documents(docs) -> Documents | None:
    return docs if docs is None or isinstance(docs, Documents) else Documents(docs)


def run_sample_then_train(model: QuietStarModel, input_ids, thoughts, backends: Backends, docs=None):
    """One forward over [T base | P*T*L chain] tokens; returns h_base (B, T, d), h_chain (B, P, T, L, d)."""
    B, T = input_ids.shape
    P, L = model.thought.P, model.thought.L
    chain = chain_embeddings(model, input_ids, thoughts)                    # (B, P, T, L, d)
    d = chain.shape[-1]
    emb = torch.cat([model.embed(input_ids), chain.reshape(B, P * T * L, d)], dim=1)
    pos_c = chain_positions(T, L, input_ids.device).reshape(-1).repeat(P)  # (P*T*L,)
    pos = torch.cat([torch.arange(T, device=input_ids.device), pos_c])[None].expand(B, -1)
    h = model.hidden(emb, pos, Layout("parallel", backends.attention, T=T, L=L, P=P, docs=_documents(docs)))
    return h[:, :T], h[:, T:].reshape(B, P, T, L, d)


def run_sequential(model: QuietStarModel, input_ids, thoughts, backends: Backends, docs=None):
    """The base pass, then L steps of P*T tokens on a growing cache, gradients through all steps."""
    docs = _documents(docs)
    B, T = input_ids.shape
    P, L = model.thought.P, model.thought.L
    cache = ThoughtCache(P=P, T=T, L=L)
    pos_base = torch.arange(T, device=input_ids.device)[None].expand(B, T)
    h_base = model.hidden(model.embed(input_ids), pos_base, Layout("base", backends.attention, cache=cache, docs=docs))
    chain = chain_embeddings(model, input_ids, thoughts)                    # (B, P, T, L, d)
    d = chain.shape[-1]
    pos = chain_positions(T, L, input_ids.device)
    hs = []
    for l in range(L):
        p_l = pos[:, l].repeat(P)[None].expand(B, P * T)
        h = model.hidden(chain[:, :, :, l].reshape(B, P * T, d), p_l,
                         Layout("step", backends.attention, step=l, cache=cache, docs=docs))
        hs.append(h.view(B, P, T, d))
    return h_base, torch.stack(hs, dim=3)


# ----------------------------------------------------------------------------------------------
# loss (DESIGN.md section 5)
# ----------------------------------------------------------------------------------------------
def talk_validity(valid_next: torch.Tensor, K: int, doc_start: torch.Tensor | None = None):
    """For talk prediction k of position t (target x_{t+k}): the base position t + k - 1 that predicts
    the same token, clamped (T, K), and whether the target is scored (B, T, K). With `doc_start`, only
    targets in t's own document are scored."""
    T = valid_next.shape[1]
    dev = valid_next.device
    src = torch.arange(T, device=dev)[:, None] + torch.arange(1, K + 1, device=dev)[None, :] - 1   # (T, K)
    src_c = src.clamp(max=T - 1)
    valid = (src <= T - 1)[None] & valid_next[:, src_c]
    if doc_start is not None:
        valid = valid & (doc_start[:, (src + 1).clamp(max=T - 1)] == doc_start[:, :, None])
    return src_c, valid


def target_counts(valid_next: torch.Tensor, K: int, P: int, doc_start: torch.Tensor | None = None) -> dict:
    """The denominators of the three means: scored base targets, talk targets (x P passes), and
    policy positions (x P). Data-parallel training sums them over ranks so that every rank divides
    by the global count (then the averaged gradients equal one big batch's)."""
    _, valid_tk = talk_validity(valid_next, K, doc_start)
    n = valid_next.sum()
    return {"n_base": n.float(), "n_talk": valid_tk.sum().float() * P, "n_pol": n.float() * P}


def base_logprobs(model: QuietStarModel, input_ids, valid_next, h_base, ops) -> torch.Tensor:
    """log p(x_{t+1}) of the base pass at every scored position, 0 elsewhere, flat (B * T,): the
    LM head's mixed_logprob with w = 0, which is plain log_softmax."""
    B, T, d = h_base.shape
    tgt_next = torch.where(valid_next, future_tokens(input_ids, 1)[..., 0], -100)           # (B, T)
    hb = h_base.reshape(B * T, d)
    return ops.mixed_logprob(hb, hb, hb.new_zeros(B * T), model.lm_head_weight, tgt_next.reshape(-1),
                             ignore_index=-100)


# Metrics that are sums divided by the step's counts (`denominators`): they add up over micro-batches.
# The others (the spread of w) are averaged over micro-batches.
ADDITIVE_METRICS = ("loss", "nll_base", "nll_talk", "policy", "w_mean", "reward", "thought_gain")


def quietstar_loss(model: QuietStarModel, input_ids, valid_next, thoughts, h_base, h_chain,
                   loss_cfg: LossConfig, backends: Backends, denominators: dict | None = None,
                   doc_start: torch.Tensor | None = None):
    """L = beta_base NLL_base + beta_talk NLL_talk + beta_policy L_policy, and the metrics.

    Each mean divides by the count of scored items in this batch, or by `denominators` when given
    (data-parallel training: global counts / world size)."""
    th = model.thought
    B, P, T, L, d = h_chain.shape
    M, K = th.M, th.K
    ops = lm_head_ops(backends.lm_head)
    W = model.lm_head_weight
    ignore = -100

    lp_base = base_logprobs(model, input_ids, valid_next, h_base, ops)                        # (B * T,)
    den = denominators if denominators is not None else target_counts(valid_next, K, P, doc_start)
    n_base, n_talk, n_pol = (den[k].clamp_min(1) for k in ("n_base", "n_talk", "n_pol"))
    nll_base = -lp_base.sum() / n_base

    # talk: prediction k = 1..K of x_{t+k} from chain index M + k, mixed with base at t + k - 1
    src_c, valid_tk = talk_validity(valid_next, K, doc_start)                                # (T, K), (B, T, K)
    tgt = torch.where(valid_tk, future_tokens(input_ids, K), ignore)                         # (B, T, K)
    h_talk = h_chain[:, :, :, M + 1:M + 1 + K]                                               # (B, P, T, K, d)
    h_b = h_base[:, src_c][:, None].expand(B, P, T, K, d)                                    # (B, P, T, K, d)
    w = model.mixing_head(h_b, h_talk)                                                       # (B, P, T, K)
    tgt_p = tgt[:, None].expand(B, P, T, K)
    lp_mix = ops.mixed_logprob(h_talk.reshape(-1, d), h_b.reshape(-1, d), w.reshape(-1), W, tgt_p.reshape(-1),
                               ignore_index=ignore).view(B, P, T, K)
    valid_p = valid_tk[:, None].expand(B, P, T, K)
    nll_talk = -lp_mix.sum() / n_talk

    # REINFORCE: reward = sum_k log p_mix (detached), baseline = mean over passes
    reward = lp_mix.detach().sum(-1)                                                         # (B, P, T)
    adv = reward - reward.mean(dim=1, keepdim=True)
    if loss_cfg.clamp_advantage:
        adv = adv.clamp_min(0)
    h_pol = h_chain[:, :, :, :M].reshape(-1, d)                                              # index m-1 samples s_m
    lp_s = ops.token_logprob(h_pol, W, thoughts.reshape(-1), temperature=th.tau_reinforce,
                             banned_ids=model.banned_ids).view(B, P, T, M)
    pos_valid = valid_next[:, None].expand(B, P, T)
    policy = -(adv * lp_s.mean(-1) * pos_valid).sum() / n_pol

    loss = loss_cfg.beta_base * nll_base + loss_cfg.beta_talk * nll_talk + loss_cfg.beta_policy * policy
    # w statistics over the scored talk targets by masked sums (boolean indexing would sync with the host);
    # the mean divides by n_talk (this batch's count, or the step's) so that it adds up over micro-batches
    vf = valid_p.float()
    wd = w.detach().float()
    w_mean = (wd * vf).sum() / n_talk
    w_here = (wd * vf).sum() / vf.sum().clamp_min(1)
    # thought gain: log p_mix - log p_base of the true future token x_{t+k} (the base prediction of the same
    # token is the one at t + k - 1), per scored talk target: > 0 where the thoughts help
    lp_base_tk = lp_base.detach().view(B, T)[:, src_c][:, None]                              # (B, 1, T, K)
    gain = (lp_mix.detach() - lp_base_tk) * vf                                               # (B, P, T, K)
    metrics = {
        "loss": loss.detach(), "nll_base": nll_base.detach(), "nll_talk": nll_talk.detach(),
        "policy": policy.detach(), "w_mean": w_mean,
        "w_std": (((wd - w_here) ** 2 * vf).sum() / vf.sum().clamp_min(1)).sqrt(),
        "reward": (reward * pos_valid).sum() / n_pol,
        "thought_gain": gain.sum() / n_talk,
    }
    return loss, metrics, SimpleNamespace(lp_base=lp_base.view(B, T), lp_mix=lp_mix, w=w, gain=gain, advantage=adv,
                                          logp_thought=lp_s)


def check_token_ids(name: str, ids, shape: tuple, shape_text: str, device, V: int, sync: bool = True,
                    where: str = "the decoder") -> None:
    """Refuse anything but an int64/int32 tensor `name` of `shape` on `device` (that of `where`) holding ids in
    [0, V). The ids are read on the CPU; on a GPU only with `sync` (a host sync: not once per generated token or
    training step)."""
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 tensor of token ids, got "
                        f"{getattr(ids, 'dtype', type(ids).__name__)}")
    if tuple(ids.shape) != tuple(shape):
        raise ValueError(f"{name} must be {shape_text}, got shape {tuple(ids.shape)}")
    if ids.device != torch.device(device):
        raise ValueError(f"{name} is on {ids.device} but {where} is on {device}")
    if sync or ids.device.type == "cpu":
        check_id_range(name, ids, V)


def check_thoughts(model: QuietStarModel, thoughts, B: int, T: int, device) -> None:
    """Refuse given thoughts unless a (B, P, T, M) int64 (or int32) tensor on `device` whose ids are in [0, V) (read
    on the CPU only: on a GPU that would sync every step)."""
    P, M = model.thought.P, model.thought.M
    check_token_ids("thoughts", thoughts, (B, P, T, M), f"(B={B}, P={P}, T={T}, M={M})", device,
                    model.lm_head_weight.shape[0], sync=False, where="input_ids")


def quietstar_forward(model: QuietStarModel, input_ids: torch.Tensor, valid_next: torch.Tensor | None,
                      loss_cfg: LossConfig, schedule: str = "sample-then-train",
                      backends: Backends = Backends(), generator: torch.Generator | None = None,
                      thoughts: torch.Tensor | None = None, denominators: dict | None = None,
                      doc_start: torch.Tensor | None = None):
    """Sample thoughts (unless given), run the chains by `schedule`, return (loss, metrics, extras).

    doc_start (B, T): the rows' packed documents (quietstar/data.py), each position attending within
    its own document; None: one document per row. Given `thoughts` must be (B, P, T, M) integer token ids
    on input_ids' device; their values are checked (in [0, V)) on the CPU only, as doc_start's are."""
    valid_next = check_batch(input_ids, valid_next, doc_start, vocab_rows(model))
    check_backends(backends)
    if not isinstance(loss_cfg, LossConfig):
        raise TypeError(f"loss_cfg must be a LossConfig, got {type(loss_cfg).__name__} {loss_cfg!r}")
    docs = None if doc_start is None else Documents(doc_start)
    model.check_lengths(input_ids.shape[1])
    B, T = input_ids.shape
    if thoughts is None:
        thoughts = sample_thoughts(model, input_ids, backends, generator, docs=docs)
    else:
        check_thoughts(model, thoughts, B, T, input_ids.device)
    if schedule == "sample-then-train":
        h_base, h_chain = run_sample_then_train(model, input_ids, thoughts, backends, docs)
    elif schedule == "sequential":
        if backends.attention == "triton":
            raise ValueError("schedule='sequential' needs gradients through every step, which the triton step "
                             "kernel does not have: use attention='reference' or 'flex', or "
                             "schedule='sample-then-train'")
        h_base, h_chain = run_sequential(model, input_ids, thoughts, backends, docs)
    else:
        raise ValueError(f"schedule must be 'sequential' or 'sample-then-train', got {schedule!r}")
    loss, metrics, extras = quietstar_loss(model, input_ids, valid_next, thoughts, h_base, h_chain, loss_cfg,
                                           backends, denominators, docs.doc_start if docs is not None else None)
    extras.thoughts = thoughts
    return loss, metrics, extras


@torch.no_grad()
def thought_predictions(model: QuietStarModel, input_ids: torch.Tensor, valid_next: torch.Tensor | None,
                        backends: Backends = Backends(), generator: torch.Generator | None = None,
                        doc_start: torch.Tensor | None = None) -> SimpleNamespace:
    """Evaluation's predictions of x_{t+1}, without and with a thought, and nothing of the training loss' other
    work. Equals quietstar_forward's `extras.lp_base` and `extras.lp_mix[..., 0]` (talk prediction k = 1)
    for the same generator state (a test; up to rounding):

    - the thoughts are sampled by the same code and the same draws, so they are the same tokens;
    - two more cached chain steps feed s_M and <eot>; the hidden state at <eot> is the parallel chain's at
      index M + 1: the same attention (the causal prefix and the chain's own earlier tokens), the same
      positions; it is mixed with the base pass's state at t, as the loss mixes it.

    Skipped: the second forward over all P*T*L chain tokens (the incremental steps already hold the cache),
    the K - 1 later talk predictions and the P*T*M REINFORCE log-probs. At the paper shape (T=256, M=9, K=4,
    P=2) that is 5,888 decoder tokens per row instead of 12,288 and 5,376 LM-head rows instead of 11,520.

    Returns lp_base (B, T) and lp_mix (B, P, T): log p(x_{t+1}), 0 where not scored; w (B, P, T): the
    mixing weight; thoughts (B, P, T, M)."""
    valid_next = check_batch(input_ids, valid_next, doc_start, vocab_rows(model))
    check_backends(backends)
    docs = None if doc_start is None else Documents(doc_start)
    model.check_lengths(input_ids.shape[1])
    B, T = input_ids.shape
    P, M = model.thought.P, model.thought.M
    run = _sample(model, input_ids, backends, generator, None, docs, extra_steps=2)
    pos = chain_positions(T, M + 2, input_ids.device)
    _, eot = model.marker_embeddings()
    for l, emb in ((M, run.next_embeddings), (M + 1, eot.expand(B, P * T, eot.shape[-1]))):
        p_l = pos[:, l].repeat(P)[None].expand(B, P * T)
        h = model.hidden(emb, p_l, Layout("step", backends.attention, step=l, cache=run.cache, docs=docs))
    d = h.shape[-1]
    h_talk = h.view(B, P, T, d)
    h_b = run.h_base[:, None].expand(B, P, T, d)
    ops = lm_head_ops(backends.lm_head)
    lp_base = base_logprobs(model, input_ids, valid_next, run.h_base, ops).view(B, T)
    _, valid_1 = talk_validity(valid_next, 1, doc_start)                                     # (B, T, 1)
    tgt = torch.where(valid_1[..., 0], future_tokens(input_ids, 1)[..., 0], -100)            # (B, T)
    w = model.mixing_head(h_b, h_talk)                                                       # (B, P, T)
    lp_mix = ops.mixed_logprob(h_talk.reshape(-1, d), h_b.reshape(-1, d), w.reshape(-1), model.lm_head_weight,
                               tgt[:, None].expand(B, P, T).reshape(-1), ignore_index=-100).view(B, P, T)
    return SimpleNamespace(lp_base=lp_base, lp_mix=lp_mix, w=w, thoughts=run.thoughts)


def plain_lm_forward(model: QuietStarModel, input_ids: torch.Tensor, valid_next: torch.Tensor | None,
                     backends: Backends = Backends(), denominators: dict | None = None, doc_start=None):
    """The no-thought control (`quietstar-train --no-thoughts`): the decoder trained as an ordinary
    language model on the same rows. Loss = the mean NLL of x_{t+1} over the scored targets: the same
    targets, LM-head op, denominator (n_base) and document masking (`doc_start`) as NLL_base, at weight
    1; no thought is sampled and the markers and mixing head get no gradient. Returns (loss, metrics,
    extras) like quietstar_forward."""
    valid_next = check_batch(input_ids, valid_next, doc_start, vocab_rows(model))
    check_backends(backends)
    B, T = input_ids.shape
    # the Quiet-STaR base pass's computation (its attention, causal within documents with doc_start, and LM-head
    # op), so that a control and a Quiet-STaR model are scored with the same numerics (quietstar/evaluate.py);
    # a sliding window that binds (T above it; no Quiet-STaR model runs there) is left to the decoder's own forward
    window = model.sliding_window
    if doc_start is None and window is not None and window < T:
        h = model.lm.model(input_ids=input_ids).last_hidden_state
    else:
        pos = torch.arange(T, device=input_ids.device)[None].expand(B, T)
        docs = None if doc_start is None else _documents(doc_start)
        h = model.hidden(model.embed(input_ids), pos, Layout("causal", backends.attention, docs=docs))
    lp_base = base_logprobs(model, input_ids, valid_next, h, lm_head_ops(backends.lm_head))
    den = denominators if denominators is not None else {"n_base": valid_next.sum().float()}
    nll = -lp_base.sum() / den["n_base"].clamp_min(1)
    return nll, {"loss": nll.detach(), "nll_base": nll.detach()}, SimpleNamespace(lp_base=lp_base.view(B, T))
