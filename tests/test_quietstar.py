"""The Quiet-STaR step on a tiny random Mistral: schedules agree, chains are isolated, the zero
mixing head is the base model, banned ids are never sampled, bad input is named."""
import dataclasses
import json
import re

import pytest
import torch

from quietstar import Backends, LossConfig, ModelConfig, QuietStarModel, ThoughtConfig, build_decoder
from quietstar.thoughts import (plain_lm_forward, quietstar_forward, run_sample_then_train, sample_thoughts,
                                thought_predictions)

V = 97


def tiny_model(seed=0, M=3, K=2, P=2, mixing_scale=0.3, **tkw):
    torch.manual_seed(seed)
    mc = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=64,
                     vocab_size=V, max_position_embeddings=64)
    model = QuietStarModel(build_decoder(mc), ThoughtConfig(M=M, K=K, P=P, **tkw), marker_init_id=5)
    if mixing_scale:
        with torch.no_grad():   # a non-zero last layer, so w (and the talk path) carry gradient signal
            model.mixing_head.net[-1].weight.normal_(0, mixing_scale)
            model.mixing_head.net[-1].bias.fill_(0.2)
    return model


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_and_grads(model, ids, valid, thoughts, schedule, backends, doc_start=None):
    model.zero_grad(set_to_none=True)
    loss, metrics, ex = quietstar_forward(model, ids, valid, LossConfig(beta_policy=3.0), schedule, backends,
                                          thoughts=thoughts, doc_start=doc_start)
    loss.backward()
    return loss.detach(), grads(model), metrics


def assert_schedules_match(model, ids, valid, thoughts, attention, ref_loss, ref_g, doc_start=None):
    """Both schedules on `attention` (triton: sample-then-train only) give the reference's loss and grads."""
    schedules = ["sample-then-train"] if attention == "triton" else ["sample-then-train", "sequential"]
    for sched in schedules:
        loss, g, _ = loss_and_grads(model, ids, valid, thoughts, sched, Backends(attention), doc_start)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert g.keys() == ref_g.keys()
        for n in ref_g:
            torch.testing.assert_close(g[n], ref_g[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{sched} {n}: {m}")


TRAIN_BACKENDS = ["reference", "split", "triton"]


@pytest.mark.parametrize("attention", TRAIN_BACKENDS)
def test_schedules_give_same_loss_and_grads(attention):
    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (2, 9), generator=gen)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 4] = False                                      # a padded / separator target
    thoughts = sample_thoughts(model, ids, Backends("reference"), torch.Generator().manual_seed(1))
    ref_loss, ref_g, ref_m = loss_and_grads(model, ids, valid, thoughts, "sequential", Backends("reference"))
    assert ref_m["policy"].abs() > 0 and ref_m["nll_talk"] > 0
    assert all(g.abs().sum() > 0 for n, g in ref_g.items() if "markers" in n or "mixing" in n)
    assert_schedules_match(model, ids, valid, thoughts, attention, ref_loss, ref_g)


@pytest.mark.parametrize("attention", ["split", "flex", "triton"])
def test_sampling_backends_sample_the_same_thoughts(attention):
    model = tiny_model()
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(4))
    want = sample_thoughts(model, ids, Backends("reference"), torch.Generator().manual_seed(7))
    got = sample_thoughts(model, ids, Backends(attention), torch.Generator().manual_seed(7))
    assert torch.equal(got, want)


def test_flex_cannot_train_on_cpu():
    model = tiny_model()
    ids = torch.randint(0, V, (1, 6))
    with pytest.raises(RuntimeError, match="flex attention backend cannot train on CPU"):
        quietstar_forward(model, ids, None, LossConfig(), "sample-then-train", Backends("flex"),
                          generator=torch.Generator().manual_seed(0))


def test_sequential_refuses_triton():
    model = tiny_model()
    with pytest.raises(ValueError, match="sequential"):
        quietstar_forward(model, torch.randint(0, V, (1, 6)), None, LossConfig(), "sequential", Backends("triton"),
                          generator=torch.Generator().manual_seed(0))


def test_perturbing_one_chain_leaves_others_unchanged():
    model = tiny_model()
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(2))
    thoughts = sample_thoughts(model, ids, Backends("reference"), torch.Generator().manual_seed(3))
    with torch.no_grad():
        hb, hc = run_sample_then_train(model, ids, thoughts, Backends("reference"))
        th2 = thoughts.clone()
        th2[1, 0, 5] = (th2[1, 0, 5] + 11) % V                 # every thought token of chain (b=1, p=0, t=5)
        hb2, hc2 = run_sample_then_train(model, ids, th2, Backends("reference"))
    assert torch.equal(hb, hb2)
    changed = (hc - hc2).abs().amax(dim=(-1, -2)) > 0      # (B, P, T)
    expect = torch.zeros_like(changed)
    expect[1, 0, 5] = True
    assert torch.equal(changed, expect)


def test_zero_mixing_head_reproduces_base_logprobs():
    model = tiny_model(mixing_scale=0)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, m, ex = quietstar_forward(model, ids, None, LossConfig(), "sample-then-train", Backends("reference"),
                                     generator=torch.Generator().manual_seed(0))
        logits = model.lm(input_ids=ids).logits.float()          # the stock model, its own causal attention
    base = torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]     # (B, T-1)
    assert torch.equal(ex.w, torch.zeros_like(ex.w))
    torch.testing.assert_close(ex.lp_base[:, :-1], base, rtol=0, atol=2e-6)
    K, T = model.thought.K, ids.shape[1]
    for k in range(1, K + 1):
        # talk prediction k at position t is the base prediction at t + k - 1, exactly
        n = T - k
        assert torch.equal(ex.lp_mix[:, :, :n, k - 1], ex.lp_base[:, None, k - 1:k - 1 + n].expand(-1, 2, -1))
    assert float(m["policy"]) == 0.0   # equal rewards across passes: zero advantage


def test_banned_ids_never_sampled():
    model = tiny_model(banned_ids=(7, 11))
    with torch.no_grad():
        model.lm.lm_head.weight[7] *= 50      # make the banned ids the likeliest by far
        model.lm.lm_head.weight[11] *= 50
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(6))
    th = sample_thoughts(model, ids, Backends("reference"), torch.Generator().manual_seed(0))
    assert not torch.isin(th, torch.tensor([7, 11])).any()
    model.banned_ids = ()
    th = sample_thoughts(model, ids, Backends("reference"), torch.Generator().manual_seed(0))
    assert torch.isin(th, torch.tensor([7, 11])).any()   # the test can fail


def test_pad_id_is_banned():
    torch.manual_seed(0)
    mc = ModelConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                     vocab_size=V)
    lm = build_decoder(mc)
    lm.config.pad_token_id = 3
    model = QuietStarModel(lm, ThoughtConfig(M=2, K=1, P=1, banned_ids=(9,)))
    assert model.banned_ids == (3, 9)


def test_bad_inputs_name_the_argument():
    model = tiny_model()
    with pytest.raises(TypeError, match="input_ids"):
        quietstar_forward(model, torch.randn(2, 8), None, LossConfig())
    with pytest.raises(ValueError, match="input_ids must be"):
        quietstar_forward(model, torch.randint(0, V, (8,)), None, LossConfig())
    with pytest.raises(ValueError, match="valid_next"):
        quietstar_forward(model, torch.randint(0, V, (2, 8)), torch.ones(2, 7, dtype=torch.bool), LossConfig())
    with pytest.raises(ValueError, match="thoughts must be"):
        quietstar_forward(model, torch.randint(0, V, (2, 8)), None, LossConfig(),
                          thoughts=torch.zeros(2, 2, 8, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="chain length L = M \\+ K \\+ 1 = 6 does not fit"):
        quietstar_forward(model, torch.randint(0, V, (1, 60)), None, LossConfig())
    with pytest.raises(ValueError, match="schedule"):
        quietstar_forward(model, torch.randint(0, V, (1, 8)), None, LossConfig(), schedule="parallel")
    with pytest.raises(ValueError, match="ThoughtConfig.M"):
        ThoughtConfig(M=0)
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig(num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="banned_ids"):
        tiny_model(banned_ids=(V,))


def test_sample_thoughts_and_forward_name_bad_arguments():
    """sample_thoughts checks input_ids (and docs) as quietstar_forward does (a 1-D batch was "not enough values to
    unpack") and that backends is a Backends (a string was an AttributeError); quietstar_forward names a missing
    loss_cfg, a string backends and float or out-of-vocabulary thoughts (the embedding's own errors before)."""
    model = tiny_model(M=2, K=2, P=2)
    ids = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(8))
    with pytest.raises(ValueError, match=r"input_ids must be \(B, T\)"):
        sample_thoughts(model, ids[0], Backends())
    with pytest.raises(TypeError, match="input_ids must be an int64 tensor"):
        sample_thoughts(model, ids.float(), Backends())
    with pytest.raises(TypeError, match="backends must be a Backends"):
        sample_thoughts(model, ids, "triton")
    with pytest.raises(ValueError, match=r"doc_start must be \(B=1, T=6\)"):
        sample_thoughts(model, ids, Backends(), docs=torch.zeros(1, 5, dtype=torch.long))
    th = sample_thoughts(model, ids, Backends(), torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="loss_cfg must be a LossConfig, got NoneType"):
        quietstar_forward(model, ids, None, None, thoughts=th)
    with pytest.raises(TypeError, match="backends must be a Backends"):
        quietstar_forward(model, ids, None, LossConfig(), backends="triton", thoughts=th)
    with pytest.raises(TypeError, match="thoughts must be an int64 tensor"):
        quietstar_forward(model, ids, None, LossConfig(), thoughts=th.float())
    for bad in (th + V, th - V):
        with pytest.raises(ValueError, match=r"thoughts must hold token ids in \[0, V=97\)"):
            quietstar_forward(model, ids, None, LossConfig(), thoughts=bad)
    # out-of-vocabulary input_ids are named (they were the embedding's IndexError, "index out of range in self")
    oov = ids.clone()
    oov[0, 3] = V
    msg = r"input_ids must hold token ids in \[0, V=97\) \(the model's embedding rows\), got "
    for call, got in ((lambda: sample_thoughts(model, oov, Backends()), "[97]"),
                      (lambda: quietstar_forward(model, oov, None, LossConfig()), "[97]"),
                      (lambda: quietstar_forward(model, oov, None, LossConfig(), thoughts=th), "[97]"),
                      (lambda: thought_predictions(model, oov, None), "[97]"),
                      (lambda: plain_lm_forward(model, oov - V, None), str([i for i in (oov - V)[0].tolist() if i < 0][:4]))):
        with pytest.raises(ValueError, match=msg + re.escape(got)):
            call()


def test_thought_config_refuses_non_int_counts_and_bad_banned_ids():
    """M, K, P are ints (M=2.5 made L = 7.5; a bool is no count); banned_ids is a sequence of int ids (a str
    was read character by character: "12" banned 1 and 2), or a 1-D integer tensor, duplicates dropped in order;
    --banned-ids parses ints (its strings made a resumed run's unchanged flag a conflict)."""
    for f in ("M", "K", "P"):
        for bad in (2.5, True, "3"):
            with pytest.raises(TypeError, match=f"ThoughtConfig.{f} must be an int"):
                ThoughtConfig(**{f: bad})
    with pytest.raises(TypeError, match="ThoughtConfig.tau_sample must be a number"):
        ThoughtConfig(tau_sample="1")
    for bad in ("12", 12, b"12"):
        with pytest.raises(TypeError, match="ThoughtConfig.banned_ids must be a sequence"):
            ThoughtConfig(banned_ids=bad)
    for bad in ((3.0,), (True,), (None,)):
        with pytest.raises(TypeError, match="ThoughtConfig.banned_ids must hold int"):
            ThoughtConfig(banned_ids=bad)
    for bad in (("x",), ("3",), torch.tensor([1.0]), torch.tensor([True])):
        with pytest.raises(TypeError, match="ThoughtConfig.banned_ids must hold int"):
            ThoughtConfig(banned_ids=bad)
    th = ThoughtConfig(M=2, banned_ids=[9, 3, 9, 3, 5])
    assert th.banned_ids == (9, 3, 5) and th.L == 2 + 4 + 1 and type(th.L) is int
    assert ThoughtConfig(banned_ids=torch.tensor([4, 2, 4])).banned_ids == (4, 2)
    import numpy as np
    th = ThoughtConfig(tau_sample=np.float32(0.5), banned_ids=np.array([7]))
    assert type(th.tau_sample) is float and th.banned_ids == (7,)
    json.dumps(dataclasses.asdict(th))             # what checkpoints and exports store
    from quietstar.train import config_from_args
    assert config_from_args(["--banned-ids", "5", "7", "5"]).thought.banned_ids == (5, 7)


def test_non_mistral_decoder_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel
    lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="model_type"):
        QuietStarModel(lm, ThoughtConfig())


def test_split_attention_gradcheck():
    """The memory-lean split backend's hand-written backward (float64 gradcheck, GQA, odd sizes)."""
    from quietstar.attention import _split_parallel
    gen = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_()
    B, H, H_KV, T, L, D = 1, 4, 2, 3, 3, 4
    x = (mk(B, H, T, L, D), mk(B, H_KV, T, D), mk(B, H_KV, T, D), mk(B, H_KV, T, L, D), mk(B, H_KV, T, L, D))
    assert torch.autograd.gradcheck(lambda *a: _split_parallel(*a, 0.3), x)


def test_model_calls_build_no_mask_and_never_read_positions_back(monkeypatch):
    """transformers' mask preparation would inspect the (non-consecutive) chain positions of every
    call for packed sequences and read the answer back to the host (a device sync per call on a GPU).
    Layout calls pass an empty 4D mask, which transformers returns as it is: it must not run at all."""
    import transformers.masking_utils as mu

    def boom(*args, **kwargs):
        raise AssertionError("find_packed_sequence_indices was called: a host sync per model call")

    monkeypatch.setattr(mu, "find_packed_sequence_indices", boom)
    model = tiny_model()
    ids = torch.randint(0, V, (2, 9))
    thoughts = sample_thoughts(model, ids, Backends("reference", "reference"), torch.Generator().manual_seed(0))
    loss, _, _ = quietstar_forward(model, ids, None, LossConfig(), "sample-then-train", Backends("split", "chunked"),
                                   thoughts=thoughts)
    loss.backward()
    with torch.no_grad():     # the sequential schedule's base and step calls too
        quietstar_forward(model, ids, None, LossConfig(), "sequential", Backends("reference", "reference"),
                          thoughts=thoughts)


def test_w_metrics_are_over_scored_targets():
    """w_mean / w_std (masked sums, no host sync) equal the statistics of w at the scored talk targets."""
    from quietstar.thoughts import check_batch, talk_validity
    model = tiny_model(K=3)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(2))
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 4:] = False
    _, metrics, ex = quietstar_forward(model, ids, valid, LossConfig(), "sample-then-train", Backends("split", "chunked"),
                                       torch.Generator().manual_seed(0))
    _, valid_tk = talk_validity(check_batch(ids, valid), 3)
    wv = ex.w.detach()[valid_tk[:, None].expand_as(ex.w)]
    assert wv.numel() < ex.w.numel() and wv.std() > 0
    torch.testing.assert_close(metrics["w_mean"], wv.mean())
    torch.testing.assert_close(metrics["w_std"], wv.std(unbiased=False))


def test_autocast_hands_one_dtype_to_the_attention_backends(monkeypatch):
    """Under autocast, RoPE returns fp32 q/k next to a bf16 v; the Triton kernels (which refuse mixed
    dtypes) must get all three in the autocast dtype, for sampling and for training."""
    import kernels
    from kernels import reference as ref
    seen = []

    def parallel(q, kb, vb, kc, vc, scale=None, doc_start=None):
        seen.append({x.dtype for x in (q, kb, vb, kc, vc)})
        return ref.thought_attention_ref(q, kb, vb, kc, vc, scale=scale, doc_start=doc_start)

    def step(q, kb, vb, kc, vc, st, scale=None, doc_start=None):
        seen.append({x.dtype for x in (q, kb, vb, kc, vc)})
        return ref.thought_attention_step_ref(q, kb, vb, kc, vc, st, scale=scale, doc_start=doc_start)

    monkeypatch.setattr(kernels, "thought_attention", parallel)
    monkeypatch.setattr(kernels, "thought_attention_step", step)
    model = tiny_model()
    ids = torch.randint(0, V, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = quietstar_forward(model, ids, None, LossConfig(), "sample-then-train",
                                       Backends("triton", "chunked"), torch.Generator().manual_seed(0))
    loss.backward()
    # 2 layers x P=2 passes: M=3 sampling steps, then one parallel training pass
    assert len(seen) == 2 * 2 * 3 + 2 * 2
    assert all(s == {torch.bfloat16} for s in seen), seen
    assert torch.isfinite(loss) and model.lm.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_gpu_fused_path_matches_reference(autocast):
    """The default GPU path (sample-then-train, Triton attention, Triton LM head) against the reference
    (sequential, dense masks, full logits) on the same thoughts, as `quietstar-train` runs them."""
    model = tiny_model(P=2).cuda()
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(3)).cuda()
    valid = torch.ones(2, 40, dtype=torch.bool, device="cuda")
    valid[0, 7] = False
    ctx = (lambda: torch.autocast("cuda", dtype=autocast)) if autocast else torch.enable_grad
    with ctx():
        thoughts = sample_thoughts(model, ids, Backends("triton", "triton"), torch.Generator("cuda").manual_seed(1))
    results = {}
    for name, sched, be in (("ref", "sequential", Backends("reference", "reference")),
                            ("fused", "sample-then-train", Backends("triton", "triton"))):
        model.zero_grad(set_to_none=True)
        with ctx():
            loss, _, _ = quietstar_forward(model, ids, valid, LossConfig(beta_policy=3.0), sched, be, thoughts=thoughts)
        loss.backward()
        results[name] = (loss.detach().double(), torch.cat([p.grad.double().flatten() for p in model.parameters()]))
    (lr, gr), (lf, gf) = results["ref"], results["fused"]
    rel = ((lf - lr).abs() / lr.abs()).item()
    cos = torch.nn.functional.cosine_similarity(gf, gr, dim=0).item()
    tol_loss, tol_cos = (1e-5, 0.99999) if autocast is None else (1e-2, 0.99)
    assert rel < tol_loss and cos > tol_cos, (rel, cos)


@pytest.mark.gpu
def test_gpu_fused_path_matches_reference_smollm2_shape_bf16():
    """At SmolLM2-135M's exact shape (30 layers, d=576, H=9/3, D=64, V=49152; random weights, a non-zero
    mixing head), bf16 autocast: the default fused path against the reference on the same thoughts."""
    torch.manual_seed(0)
    model = QuietStarModel(build_decoder(ModelConfig(name="smollm2-135m-random")), ThoughtConfig(M=9, K=4, P=2),
                           marker_init_id=5).cuda()
    with torch.no_grad():
        model.mixing_head.net[-1].weight.normal_(0, 0.02)
        model.mixing_head.net[-1].bias.fill_(0.2)
    V_ = model.lm_head_weight.shape[0]
    ids = torch.randint(0, V_, (2, 64), generator=torch.Generator().manual_seed(1)).cuda()
    valid = torch.ones(2, 64, dtype=torch.bool, device="cuda")
    valid[1, 50:] = False
    with torch.autocast("cuda", dtype=torch.bfloat16):
        thoughts = sample_thoughts(model, ids, Backends("triton", "triton"), torch.Generator("cuda").manual_seed(2))
    results = {}
    for name, sched, be in (("ref", "sequential", Backends("reference", "reference")),
                            ("fused", "sample-then-train", Backends("triton", "triton"))):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _, _ = quietstar_forward(model, ids, valid, LossConfig(beta_policy=3.0), sched, be, thoughts=thoughts)
        loss.backward()
        results[name] = (loss.detach().double(), torch.cat([p.grad.double().flatten() for p in model.parameters()
                                                            if p.grad is not None]))
    (lr, gr), (lf, gf) = results["ref"], results["fused"]
    rel = ((lf - lr).abs() / lr.abs()).item()
    cos = torch.nn.functional.cosine_similarity(gf, gr, dim=0).item()
    assert gf.shape == gr.shape
    assert rel < 1e-2 and cos >= 0.99, (rel, cos)


def test_smollm2_random_init_has_finite_gradients_at_a_leading_separator():
    """The random-init SmolLM2-shape model (speed runs) has a non-zero padding/separator embedding: with HF's
    zeroed row, a row starting with the separator gets NaN gradients (overflow through 30 RMSNorm backwards)."""
    torch.manual_seed(0)
    lm = build_decoder(ModelConfig(name="smollm2-135m-random"))
    pad = lm.config.pad_token_id
    assert lm.model.embed_tokens.weight[pad].abs().sum() > 0
    ids = torch.tensor([[pad, 6, 7, 8, 9, 10]])

    def finite_grads():
        lm.zero_grad(set_to_none=True)
        lm(input_ids=ids, labels=ids).loss.backward()
        return all(torch.isfinite(p.grad).all() for p in lm.parameters() if p.grad is not None)
    assert finite_grads()
    with torch.no_grad():       # the test can fail: HF's zeroed row gives non-finite gradients
        lm.model.embed_tokens.weight[pad].zero_()
    assert not finite_grads()


@pytest.mark.parametrize("backends", [("reference", "reference"), ("split", "chunked"), ("triton", "triton")])
@pytest.mark.parametrize("documents", [False, True])
def test_thought_predictions_equal_the_training_forward(backends, documents):
    """The evaluation's own path (thought_predictions: two more cached steps after sampling, the k = 1 prediction
    only) gives the training forward's lp_base and lp_mix[..., 0] for the same generator: the same thoughts, the
    same numbers up to fp32 rounding, with a mixing head that mixes (w != 0) and with packed documents; the
    Triton backends run in the CPU interpreter here (so this test lives here, not in test_eval.py, which
    scripts/gpu_versions_check.sh also runs under the GPU machine's numpy, where the interpreter cannot)."""
    from test_eval import _model

    from quietstar.thoughts import thought_predictions
    model = _model(mixing=True)
    with torch.no_grad():
        for prm in model.mixing_head.parameters():
            prm.add_(0.3 * torch.randn(prm.shape, generator=torch.Generator().manual_seed(3)))
    ids = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(5))
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[0, 2] = False
    ds = torch.tensor([0] * 4 + [4] * 6, dtype=torch.int32).expand(2, 10).contiguous() if documents else None
    be = Backends(*backends)
    _, _, full = quietstar_forward(model, ids, valid, LossConfig(), "sample-then-train", be,
                                   torch.Generator().manual_seed(1), doc_start=ds)
    ev = thought_predictions(model, ids, valid, be, torch.Generator().manual_seed(1), doc_start=ds)
    assert torch.equal(ev.thoughts, full.thoughts)
    assert ev.lp_mix.shape == (2, 2, 10) and ev.w.shape == (2, 2, 10)
    torch.testing.assert_close(ev.lp_base, full.lp_base, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ev.lp_mix, full.lp_mix[..., 0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ev.w, full.w[..., 0], atol=2e-5, rtol=1e-5)
    assert ev.w.abs().min() > 1e-3 and (ev.lp_mix != 0).sum() > 10     # it mixes, and most targets are scored
    assert (ev.lp_mix[:, :, -1] == 0).all() and (ev.lp_mix[0, :, 2] == 0).all()   # unscored targets: 0
