"""A decoder with a sliding attention window (Mistral-7B-v0.1's config.json has sliding_window=4096).

Thought attention has no window. A window of W tokens keeps every key at distance < W, so while a call
reaches at most W tokens back (training: T + L, L = M + K + 1) the windowed model computes exactly what
the unwindowed one does: the step, its gradients and generation with thoughts must be identical; and
the window is real in these tests (a plain forward longer than W differs). Beyond W the call is
refused with the window named, before any work.
"""
import copy

import pytest
import torch

from quietstar import Backends, LossConfig, ModelConfig, QuietStarModel, ThoughtConfig, build_decoder
from quietstar.attention import Layout
from quietstar.generate import ThinkingDecoder, generate_with_thoughts
from quietstar.thoughts import quietstar_forward, sample_thoughts

V, M, K, P = 97, 3, 2, 2
L = M + K + 1
T = 9
W = T + L                         # the largest window-free length for rows of T tokens


def _models(window: int):
    """(unwindowed, windowed): the same weights, the second with config.sliding_window = window."""
    torch.manual_seed(0)
    mc = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=64,
                     vocab_size=V, max_position_embeddings=64)
    model = QuietStarModel(build_decoder(mc), ThoughtConfig(M=M, K=K, P=P), marker_init_id=5)
    with torch.no_grad():    # a non-zero mixing head, so the talk path and w carry signal
        model.mixing_head.net[-1].weight.normal_(0, 0.3)
        model.mixing_head.net[-1].bias.fill_(0.2)
    windowed = copy.deepcopy(model)
    windowed.lm.config.sliding_window = window
    return model, windowed


def _step(model, ids, thoughts, schedule, attention):
    model.zero_grad(set_to_none=True)
    loss, _, _ = quietstar_forward(model, ids, None, LossConfig(beta_policy=3.0), schedule, Backends(attention),
                                   thoughts=thoughts)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_window_is_real_in_these_tests():
    plain, windowed = _models(W)
    ids = torch.randint(0, V, (1, W + 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = plain.lm(ids).logits, windowed.lm(ids).logits
    torch.testing.assert_close(b[:, :W], a[:, :W], rtol=0, atol=1e-5)     # within the window: the same
    assert (b[:, W:] - a[:, W:]).abs().max() > 1e-3                       # beyond it the window drops keys


@pytest.mark.parametrize("schedule,attention", [("sample-then-train", "reference"), ("sequential", "reference"),
                                                ("sample-then-train", "split"), ("sample-then-train", "triton")])
def test_window_that_cannot_bind_changes_nothing(schedule, attention):
    plain, windowed = _models(W)
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(2))
    th_plain = sample_thoughts(plain, ids, Backends(attention), torch.Generator().manual_seed(3))
    th_win = sample_thoughts(windowed, ids, Backends(attention), torch.Generator().manual_seed(3))
    assert torch.equal(th_plain, th_win)
    loss_p, g_p = _step(plain, ids, th_plain, schedule, attention)
    loss_w, g_w = _step(windowed, ids, th_plain, schedule, attention)
    assert torch.equal(loss_p, loss_w)
    assert g_p.keys() == g_w.keys()
    for n in g_p:
        assert torch.equal(g_p[n], g_w[n]), n


def test_a_chain_equals_the_windowed_model_reading_it_inline():
    """What the window-free thought attention computes for chain token (t, l) is what the stock windowed decoder
    computes for the last token of x_0..x_t followed by that chain's first l + 1 tokens, written inline at
    positions 0..t+1+l: equal while the window holds all T + L positions, and not for the farthest token
    once it is one shorter (the bound is exact, and thought attention keeps what the window would drop)."""
    from quietstar.thoughts import chain_embeddings, run_sample_then_train
    _, windowed = _models(W)
    ids = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(6))
    thoughts = sample_thoughts(windowed, ids, Backends("reference"), torch.Generator().manual_seed(7))
    with torch.no_grad():
        _, h_chain = run_sample_then_train(windowed, ids, thoughts, Backends("reference"))
        chain = chain_embeddings(windowed, ids, thoughts)

        def inline(t, l, window):
            windowed.lm.config.sliding_window = window
            emb = torch.cat([windowed.embed(ids[:, :t + 1]), chain[:, 0, t, :l + 1]], dim=1)
            out = windowed.lm.model(inputs_embeds=emb, position_ids=torch.arange(t + l + 2)[None])
            return out.last_hidden_state[0, -1]

        for t, l in ((0, 0), (4, 3), (T - 1, L - 1)):
            torch.testing.assert_close(inline(t, l, W), h_chain[0, 0, t, l], rtol=1e-5, atol=1e-5)
        assert (inline(T - 1, L - 1, W - 1) - h_chain[0, 0, T - 1, L - 1]).abs().max() > 1e-3
        torch.testing.assert_close(inline(T - 2, L - 1, W - 1), h_chain[0, 0, T - 2, L - 1], rtol=1e-5, atol=1e-5)


def test_generation_within_the_window_is_unchanged():
    S, new = 4, 6
    window = S + new + M + 2                  # the least generate_with_thoughts takes: the cache stays below it
    plain, windowed = _models(window)
    ids = torch.randint(3, V, (2, S), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 0] = 0                            # left padding
    out_p = generate_with_thoughts(plain.eval(), ids, mask, new, generator=torch.Generator().manual_seed(5))
    out_w = generate_with_thoughts(windowed.eval(), ids, mask, new, generator=torch.Generator().manual_seed(5))
    for a, b in zip(out_p, out_w):
        assert torch.equal(a, b)


def test_window_that_would_bind_is_refused():
    _, windowed = _models(W - 1)
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match=f"T={T} plus chain length L = M \\+ K \\+ 1 = {L} needs a window of at "
                                         f"least {W} tokens.*sliding_window={W - 1}"):
        quietstar_forward(windowed, ids, None, LossConfig(), "sample-then-train", Backends("reference"))
    # a layout call made directly, past QuietStarModel.check_lengths
    emb = windowed.embed(torch.randint(0, V, (1, T + P * T * L)))
    positions = torch.cat([torch.arange(T), (torch.arange(T)[:, None] + 1 + torch.arange(L)).reshape(-1).repeat(P)])
    with pytest.raises(ValueError, match="'parallel' layout call needs a window of at least 15 tokens.*sliding_window=14"):
        windowed.hidden(emb, positions[None], Layout("parallel", "reference", T=T, L=L, P=P))
    # generation: refused before the first token, and a decoder stepped up to the window refuses to think
    S = 4
    with pytest.raises(ValueError, match="max_new_tokens=4 after a prompt of 4 tokens.*sliding_window=12"):
        generate_with_thoughts(_models(S + 4 + M + 1)[1].eval(), ids[:, :S], max_new_tokens=4)
    dec = ThinkingDecoder(_models(S + M + 3)[1].eval(), ids[:, :S])
    dec.think()
    dec.advance(ids[:, S])
    with pytest.raises(ValueError, match="a thought after 5 cached tokens.*sliding_window=10"):
        dec.think()


def test_the_no_thought_control_keeps_a_window_that_binds():
    """The control's forward (and any held-out scoring without thoughts) is the Quiet-STaR base pass's, which has
    no window: where a window binds (rows longer than it, one document per row), it is the decoder's own windowed
    forward instead, not a refusal; where it cannot bind, the base pass exactly."""
    from kernels.reference import token_logprob_ref
    from quietstar.thoughts import plain_lm_forward
    plain, windowed = _models(8)
    be = Backends("split", "reference")
    for n, model in ((20, windowed), (8, windowed), (20, plain)):
        ids = torch.randint(0, V, (2, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            _, _, ex = plain_lm_forward(model, ids, None, be)
            h = model.lm.model(input_ids=ids).last_hidden_state           # the decoder's own (windowed) forward
        want = token_logprob_ref(h[:, :-1].reshape(-1, h.shape[-1]), model.lm_head_weight, ids[:, 1:].reshape(-1))
        torch.testing.assert_close(ex.lp_base[:, :-1].reshape(-1), want, rtol=0, atol=1e-5)
    with torch.no_grad():     # the window binds at n = 20: the windowed and unwindowed scores differ there
        ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(20))
        a = plain_lm_forward(plain, ids, None, be)[2].lp_base
        b = plain_lm_forward(windowed, ids, None, be)[2].lp_base
    assert (a - b).abs().max() > 1e-3
