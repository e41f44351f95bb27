"""Convergence (Liger-style): a tiny Mistral trained a few AdamW steps through the kernels (Triton, in
the interpreter on CPU, fp32, sample-then-train) and through the reference path (dense masks, full
logits, sequential schedule) from one seed gives the same losses. Both paths train on thoughts drawn
by the reference sampler from the same generator (the two samplers use different random streams,
and the Triton sampler's distribution is tested on its own in test_lm_head.py); the thoughts are
sampled from each path's own current model, through its own attention backend."""
import pytest
import torch

from quietstar import Backends, LossConfig, ModelConfig, QuietStarModel, ThoughtConfig, build_decoder
from quietstar.thoughts import quietstar_forward, sample_thoughts

V = 97


def run(schedule, backends, steps=5):
    torch.manual_seed(0)
    mc = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=64,
                     vocab_size=V, max_position_embeddings=64)
    model = QuietStarModel(build_decoder(mc), ThoughtConfig(M=2, K=2, P=2), marker_init_id=5)
    # Start with w != 0. At the default w = 0 the P passes' rewards are equal in exact arithmetic, so the
    # advantages (and the gradients of the markers and of every chain-only path) are exactly zero; the
    # interpreter's tl.dot (numpy BLAS) rounds rows by their position in a tile, so the Triton head gives
    # advantages of +-1 ulp there, and AdamW, which normalises the step, turns that noise into a full
    # lr-sized update: the runs then part for a reason that is not a difference in the computation.
    # The hidden layers get PyTorch's wider default init rather than the decoder's N(0, 0.02), so that w
    # depends on the thought enough for the passes' rewards to differ by more than rounding (the same reason).
    with torch.no_grad():
        model.mixing_head.net[0].reset_parameters()
        model.mixing_head.net[2].reset_parameters()
        model.mixing_head.net[-1].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
        model.mixing_head.net[-1].bias.fill_(0.2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.randint(0, V, (steps, 2, 12), generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    history = []
    for ids in data:
        thoughts = sample_thoughts(model, ids, Backends(backends.attention, "reference"), gen)
        loss, m, _ = quietstar_forward(model, ids, None, LossConfig(beta_policy=10.0), schedule, backends,
                                       thoughts=thoughts)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append({k: float(v) for k, v in m.items()})
    return history


@pytest.mark.slow
def test_kernels_and_reference_train_alike():
    ref = run("sequential", Backends("reference", "reference"))
    ker = run("sample-then-train", Backends("triton", "triton"))
    # the run moved: w changed and the policy term is active
    assert abs(ref[-1]["w_mean"] - ref[0]["w_mean"]) > 1e-3 and ref[-1]["policy"] != 0
    assert ref[-1]["loss"] != ref[0]["loss"]
    for step, (r, k) in enumerate(zip(ref, ker)):
        for key in ("loss", "nll_base", "nll_talk", "w_mean", "reward"):
            assert k[key] == pytest.approx(r[key], rel=1e-4, abs=1e-6), (step, key, r[key], k[key])
        # the policy term is A * logp with A = R - mean_p R, a difference of nearly equal rewards: its error
        # is that of R (~1e-6 relative: 1e-5 |R| allows the tau=3 log-prob factor of ~log V), not of A
        assert k["policy"] == pytest.approx(r["policy"], rel=1e-4, abs=1e-5 * abs(r["reward"])), (step, r, k)
