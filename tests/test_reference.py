"""The references of kernels/reference.py against a one-query-at-a-time float64 loop."""
import math

import pytest
import torch

from kernels.reference import (mixed_logprob_ref, sample_thought_tokens_ref, thought_attention_ref,
                               thought_attention_step_ref, token_logprob_ref)


def loop_attention(q, k_base, v_base, k_chain, v_chain, t, l, scale):
    """o for query (t, l) of one (b, h): softmax over base keys 0..t and chain keys (t, 0..l), float64."""
    keys = torch.cat([k_base[: t + 1], k_chain[t, : l + 1]]).double()
    vals = torch.cat([v_base[: t + 1], v_chain[t, : l + 1]]).double()
    s = keys @ q.double() * scale
    p = torch.softmax(s, dim=0)
    return p @ vals


def rand_inputs(B, H, H_KV, T, L, D, gen):
    f = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float32)
    return f(B, H, T, L, D), f(B, H_KV, T, D), f(B, H_KV, T, D), f(B, H_KV, T, L, D), f(B, H_KV, T, L, D)


@pytest.mark.parametrize("B,H,H_KV,T,L,D", [(2, 6, 2, 7, 5, 12), (1, 3, 3, 5, 1, 8), (1, 4, 1, 1, 3, 16)])
def test_thought_attention_ref_equals_loop(B, H, H_KV, T, L, D):
    gen = torch.Generator().manual_seed(B * 100 + T)
    q, kb, vb, kc, vc = rand_inputs(B, H, H_KV, T, L, D, gen)
    scale = 1 / math.sqrt(D)
    o = thought_attention_ref(q, kb, vb, kc, vc)
    g = H // H_KV
    for b in range(B):
        for h in range(H):
            for t in range(T):
                for l in range(L):
                    want = loop_attention(q[b, h, t, l], kb[b, h // g], vb[b, h // g], kc[b, h // g],
                                          vc[b, h // g], t, l, scale)
                    torch.testing.assert_close(o[b, h, t, l].double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("step", [0, 2, 4])
def test_thought_attention_step_ref_equals_loop(step):
    B, H, H_KV, T, L, D = 2, 4, 2, 6, 5, 8
    gen = torch.Generator().manual_seed(step)
    q5, kb, vb, kc, vc = rand_inputs(B, H, H_KV, T, L, D, gen)
    q = q5[:, :, :, 0]
    # garbage in the cache beyond `step` must not matter
    kc[:, :, :, step + 1:] = 1e4
    o = thought_attention_step_ref(q, kb, vb, kc, vc, step, scale=0.3)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                want = loop_attention(q[b, h, t], kb[b, h // 2], vb[b, h // 2], kc[b, h // 2], vc[b, h // 2], t,
                                      step, 0.3)
                torch.testing.assert_close(o[b, h, t].double(), want, rtol=1e-5, atol=1e-5)


def test_chain_isolation_in_attention():
    """Changing position t' chain K/V changes only the outputs of position t'."""
    B, H, H_KV, T, L, D = 1, 2, 1, 6, 4, 8
    gen = torch.Generator().manual_seed(3)
    q, kb, vb, kc, vc = rand_inputs(B, H, H_KV, T, L, D, gen)
    o = thought_attention_ref(q, kb, vb, kc, vc)
    kc2, vc2 = kc.clone(), vc.clone()
    kc2[:, :, 3] += torch.randn(kc2[:, :, 3].shape, generator=gen)
    vc2[:, :, 3] += 1.0
    o2 = thought_attention_ref(q, kb, vb, kc2, vc2)
    others = [t for t in range(T) if t != 3]
    assert torch.equal(o[:, :, others], o2[:, :, others])
    assert not torch.allclose(o[:, :, 3], o2[:, :, 3])


def test_lm_head_refs_against_float64():
    gen = torch.Generator().manual_seed(0)
    N, d, V = 9, 6, 23
    ht, hb, W = torch.randn(N, d, generator=gen), torch.randn(N, d, generator=gen), torch.randn(V, d, generator=gen)
    w = torch.randn(N, generator=gen) * 2
    tgt = torch.randint(0, V, (N,), generator=gen)
    tgt[2] = -100
    lp = mixed_logprob_ref(ht, hb, w, W, tgt)
    for i in range(N):
        if i == 2:
            assert lp[i] == 0
            continue
        z = (1 - w[i].double()) * (W.double() @ hb[i].double()) + w[i].double() * (W.double() @ ht[i].double())
        want = z[tgt[i]] - torch.logsumexp(z, 0)
        assert abs(lp[i].item() - want.item()) < 1e-4
    tgt2 = torch.randint(0, V, (N,), generator=gen)
    tgt2[tgt2 == 5] = 4
    lp2 = token_logprob_ref(ht, W, tgt2, temperature=3.0, banned_ids=(5,))
    z = (ht.double() @ W.double().T) / 3.0
    z[:, 5] = -math.inf
    want = torch.log_softmax(z, -1).gather(1, tgt2[:, None])[:, 0]
    torch.testing.assert_close(lp2.double(), want, rtol=1e-5, atol=1e-5)


def test_reference_sampler_bans_and_temperature():
    gen = torch.Generator().manual_seed(0)
    N, d, V = 4000, 4, 6
    h = torch.randn(1, d, generator=gen).expand(N, d).contiguous()
    W = torch.randn(V, d, generator=gen)
    banned = (0, 3)
    s1 = sample_thought_tokens_ref(h, W, temperature=1.0, banned_ids=banned, generator=torch.Generator().manual_seed(1))
    assert not any(int(x) in banned for x in s1.unique())
    emp1 = torch.bincount(s1, minlength=V).double() / N
    z = (W.double() @ h[0].double())
    z[list(banned)] = -math.inf
    p1 = torch.softmax(z, 0)
    p3 = torch.softmax(z / 3.0, 0)
    assert 0.5 * (emp1 - p1).abs().sum() < 0.04
    s3 = sample_thought_tokens_ref(h, W, temperature=3.0, banned_ids=banned, generator=torch.Generator().manual_seed(2))
    emp3 = torch.bincount(s3, minlength=V).double() / N
    assert 0.5 * (emp3 - p3).abs().sum() < 0.04
    # the two temperatures give distinguishable distributions
    assert 0.5 * (p1 - p3).abs().sum() > 0.1
    assert 0.5 * (emp3 - p1).abs().sum() > 0.06


def test_reference_input_errors():
    q = torch.randn(1, 4, 5, 3, 8)
    kb = torch.randn(1, 2, 5, 8)
    kc = torch.randn(1, 2, 5, 3, 8)
    with pytest.raises(ValueError, match="q must be"):
        thought_attention_ref(q[0], kb, kb, kc, kc)
    with pytest.raises(ValueError, match="multiple of H_KV"):
        thought_attention_ref(torch.randn(1, 3, 5, 3, 8), kb, kb, kc, kc)
    with pytest.raises(TypeError, match="k_base has dtype"):
        thought_attention_ref(q, kb.half(), kb, kc, kc)
    with pytest.raises(ValueError, match="k_chain must be"):
        thought_attention_ref(q, kb, kb, torch.randn(1, 2, 4, 3, 8), torch.randn(1, 2, 4, 3, 8))
    with pytest.raises(ValueError, match="step=3"):
        thought_attention_step_ref(q[:, :, :, 0], kb, kb, kc, kc, 3)
    h, W = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="weight must be"):
        token_logprob_ref(h, torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="banned_ids"):
        sample_thought_tokens_ref(h, W, banned_ids=(10,))
    with pytest.raises(ValueError, match="temperature"):
        sample_thought_tokens_ref(h, W, temperature=0.0)
    with pytest.raises(ValueError, match="w must be"):
        mixed_logprob_ref(h, h, torch.zeros(3), W, torch.zeros(4, dtype=torch.long))
