"""Regression test against numbers produced by the official Quiet-STaR code (ezelikman/quiet-star).

`tests/data/oracle/` (data only; its README.md says how it was produced): a tiny Mistral in a standard
folder plus the official extra parameters, two inputs (one right-padded) with forced thoughts, and
every loss term, per-position value and per-term gradient of the official forward. The tiny model
is loaded into our QuietStarModel, fed the same thoughts, and compared:

- per-position values: hidden states of the base pass and of every chain token, NLL_base and the
  NLL of each talk prediction, the mixing weights, the REINFORCE log-probs (tau = 3, markers banned)
  and the clamped advantages;
- our own (DESIGN.md) scalars: NLL_base, the pooled NLL_talk and the policy mean over the valid
  positions, against the oracle's "spec_variants" files;
- the official scalars and per-term gradients, after recomputing the official normalisations from
  our per-position tensors (talk: the mean of the per-k means; policy: positions t <= T-K-2 of every
  row, DESIGN.md "Deviations").

For the reference path (sequential schedule, dense-mask attention, full-logit LM head) and the CPU
fast path (sample-then-train, split attention, chunked LM head). A second test breaks one thing at a
time (the REINFORCE temperature, a banned id, the marker order) and checks the comparison fails.
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quietstar import QuietStarModel, ThoughtConfig, build_decoder
from quietstar.config import LossConfig, ModelConfig
from quietstar.thoughts import Backends, quietstar_loss, run_sample_then_train, run_sequential

DATA = Path(__file__).resolve().parent / "data" / "oracle"
PATHS = {"reference": ("sequential", Backends("reference", "reference")),
         "cpu-fast": ("sample-then-train", Backends("split", "chunked"))}
LOSS = LossConfig(beta_base=0.5, beta_talk=0.5, beta_policy=1e6)


def load_oracle_model(tau_reinforce=3.0, banned_ids=(512, 513), swap_markers=False):
    """The official tiny model as a QuietStarModel: <sot> = start_embedding[0], <eot> = end_embedding[0]
    (both stored / 100 as ours are), the talk head as our mixing head (the official last layer has no bias:
    ours is 0), the marker ids 512 and 513 banned as the official sampler and REINFORCE log-prob do."""
    torch.manual_seed(0)
    lm = build_decoder(ModelConfig(name=str(DATA / "tiny_model")), dtype=torch.float32)
    model = QuietStarModel(lm, ThoughtConfig(M=2, K=2, P=2, tau_sample=1.0, tau_reinforce=tau_reinforce,
                                             banned_ids=banned_ids))
    extra = load_file(str(DATA / "tiny_model" / "quietstar_extra.safetensors"))
    markers = [extra["start_embedding"][0], extra["end_embedding"][0]]
    with torch.no_grad():
        model.markers.copy_(torch.stack(markers[::-1] if swap_markers else markers))
        for i in (0, 2):
            model.mixing_head.net[i].weight.copy_(extra[f"talk_head.0.{i}.weight"])
            model.mixing_head.net[i].bias.copy_(extra[f"talk_head.0.{i}.bias"])
        model.mixing_head.net[4].weight.copy_(extra["talk_head.0.4.weight"])
        model.mixing_head.net[4].bias.zero_()
    return model.train()


def our_name(official: str) -> str:
    if official.startswith("talk_head.0."):
        return "mixing_head.net." + official.removeprefix("talk_head.0.")
    return "lm." + official


def run_ours(model, case, path):
    """Our forward on the oracle's input and thoughts: per-position tensors (official row order r = b*P + p,
    detached) and the official-normalised and DESIGN-normalised terms (with graphs)."""
    ids, pad = case["input_ids"], case["harness"]["pad_id"]
    B, T = ids.shape
    M, K, P = model.thought.M, model.thought.K, model.thought.P
    # the official rule: a target is ignored iff its id is the pad id
    valid = torch.zeros(B, T, dtype=torch.bool)
    valid[:, :-1] = case["labels"][:, 1:] != pad
    schedule, backends = PATHS[path]
    thoughts = case["thoughts"]                                                        # (B, P, T, M)
    run = run_sequential if schedule == "sequential" else run_sample_then_train
    h_base, h_chain = run(model, ids, thoughts, backends)
    _, metrics, ex = quietstar_loss(model, ids, valid, thoughts, h_base, h_chain, LOSS, backends)
    rows = lambda x: x.reshape(B * P, *x.shape[2:])                                    # noqa: E731
    # official normalisations, from our per-position tensors
    src_valid = torch.stack([torch.cat([valid[:, k - 1:], valid.new_zeros(B, k - 1)], 1) for k in range(1, K + 1)], -1)
    vt = src_valid[:, None].expand(B, P, T, K).float()                                 # target x_{t+k} scored
    talk_per_k = (-ex.lp_mix * vt).sum((0, 1, 2)) / vt.sum((0, 1, 2))                  # (K,)
    n = T - K - 1                                                                      # positions t <= T-K-2
    dqn_per_m = (-ex.advantage[:, :, :n, None] * ex.logp_thought[:, :, :n]).mean((0, 1, 2))   # (M,)
    return {
        "hidden": torch.cat([h_base[:, None].expand(B, P, T, -1)[None],
                             h_chain.permute(3, 0, 1, 2, 4)]).reshape(1 + h_chain.shape[3], B * P, T, -1).detach(),
        "nll_base_per_pos": -rows(ex.lp_base[:, None].expand(B, P, T))[:, :T - 1].detach(),
        "nll_talk_per_pos": [-rows(ex.lp_mix[..., k - 1])[:, :T - k].detach() for k in range(1, K + 1)],
        "w_talk": ex.w.permute(3, 0, 1, 2).reshape(K, B * P, T).detach(),
        "action_loglik": ex.logp_thought.permute(3, 0, 1, 2).reshape(M, B * P, T)[..., :T - 1].detach(),
        "advantage_clamped": rows(ex.advantage)[:, :n].detach(),
        "talk_valid": vt.permute(3, 0, 1, 2).reshape(K, B * P, T),
        "real": case["attention_mask"].bool().repeat_interleave(P, 0),
        "metrics": metrics,
        "terms": {"base": LOSS.beta_base * metrics["nll_base"],     # the same normalisation in both
                  "base_graph": LOSS.beta_base * (-ex.lp_base.sum() / valid.sum()),
                  "talk": LOSS.beta_talk * talk_per_k.mean(), "policy": LOSS.beta_policy * dqn_per_m.mean()},
        "talk_per_k": talk_per_k.detach(), "dqn_per_m": dqn_per_m.detach(),
    }


def close(a, b, what, rel=1e-4, atol=2e-5):
    """max |a - b| <= atol + rel * max |b| (float32 through two different programs)."""
    err = (a.float() - b.float()).abs().max().item()
    assert err <= atol + rel * b.float().abs().max().item(), f"{what}: max |diff| {err:.3g} (max |ref| " \
                                                              f"{b.abs().max().item():.3g})"


def compare(model, case_name, path):
    case = torch.load(DATA / f"{case_name}.pt", weights_only=False)
    sfx = case_name.removeprefix("case")
    ref = torch.load(DATA / f"oracle{sfx}.pt", weights_only=False)
    spec = torch.load(DATA / f"spec_variants{sfx}.pt", weights_only=False)
    ours = run_ours(model, case, path)
    real = ours["real"]                                    # (B*P, T): positions of real tokens
    K = model.thought.K
    # per-position values (chain states at padded positions follow another rule and feed no loss)
    r = real[..., None]
    close(ours["hidden"][0] * r, ref["hidden_states"][0] * r, "base hidden states")
    M, T = model.thought.M, real.shape[1]
    for l in range(model.thought.L):
        # chain token l >= M + 2 is x_{t+j}, j = l - M - 1: past the row's end a filler (the official code
        # feeds the pad id, we feed id 0) whose state feeds no scored target
        j = max(0, l - M - 1)
        ok = (real & (torch.arange(T) <= T - 1 - j))[..., None]
        close(ours["hidden"][1 + l] * ok, ref["hidden_states"][1 + l] * ok, f"chain hidden states, l={l}")
    close(ours["nll_base_per_pos"], ref["nll_base_per_pos"], "NLL_base per position")
    for k in range(K):
        close(ours["nll_talk_per_pos"][k], ref["nll_talk_per_pos"][k], f"NLL_talk per position, k={k + 1}")
        v = ours["talk_valid"][k]
        close(ours["w_talk"][k] * v, ref["mixing_weight_talk"][k] * v, f"mixing weight, k={k + 1}")
    close(ours["action_loglik"] * real[:, :-1], ref["action_loglik"] * real[:, :-1], "REINFORCE log-probs")
    close(ours["advantage_clamped"], ref["advantage_clamped"], "clamped advantages")
    # scalars: ours (DESIGN.md section 5) against the oracle's spec_variants, the official ones recomputed
    m = ours["metrics"]
    close(m["nll_base"], ref["nll_base"], "NLL_base", atol=2e-6)
    close(m["nll_talk"], spec["nll_talk_spec_pooled"], "NLL_talk (pooled)", atol=2e-6)
    close(m["policy"], spec["policy_spec_valid_positions"], "policy (valid positions)", atol=2e-6)
    close(ours["talk_per_k"], ref["nll_talk_per_k"], "official NLL_talk per k", atol=2e-6)
    close(ours["dqn_per_m"], ref["dqn_loss_per_m"], "official policy loss per m", atol=2e-6)
    for t in ("base", "talk"):
        close(ours["terms"][t].detach(), ref[f"loss_{t}_term"], f"official {t} term", atol=2e-6)
    close(ours["terms"]["policy"].detach() / 1e6, ref["loss_policy_term"] / 1e6, "official policy term / 1e6",
          atol=2e-6)
    # per-term gradients of the official terms (each term backpropagated on its own)
    params = dict(model.named_parameters())
    for t, graph in (("base", "base_graph"), ("talk", "talk"), ("policy", "policy")):
        names = list(ref["grads_by_term"][t])
        mine = []
        for n in names:
            mine.append(params["markers"] if n in ("start_embedding", "end_embedding") else params[our_name(n)])
        grads = torch.autograd.grad(ours["terms"][graph], mine, retain_graph=True, allow_unused=True)
        for n, g in zip(names, grads):
            want = ref["grads_by_term"][t][n]
            if n in ("start_embedding", "end_embedding"):        # row 0 is the marker, row 1 is unused
                g = g[0 if n == "start_embedding" else 1] if g is not None else torch.zeros_like(want[0])
                assert torch.count_nonzero(want[1]) == 0
                want = want[0]
            g = torch.zeros_like(want) if g is None else g
            if want.abs().max() == 0:
                assert g.abs().max() == 0, f"{t} gradient of {n} should be exactly zero"
            else:
                close(g, want, f"{t} gradient of {n}", rel=2e-4, atol=0)


@pytest.mark.parametrize("case_name", ["case", "case_pad"])
@pytest.mark.parametrize("path", list(PATHS))
def test_matches_the_official_code(path, case_name):
    compare(load_oracle_model(), case_name, path)


@pytest.mark.parametrize("broken", [{"tau_reinforce": 1.0}, {"banned_ids": (512,)}, {"banned_ids": ()},
                                    {"swap_markers": True}])
def test_the_comparison_catches_a_wrong_detail(broken):
    with pytest.raises(AssertionError):
        compare(load_oracle_model(**broken), "case", "cpu-fast")
