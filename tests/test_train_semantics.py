"""Training semantics at the edges: gradient accumulation is the big batch, the mixing head starts at
the base model, P = 1 is refused, defaults are the reference run's, the thought gain is logged."""
import pytest
import torch

from quietstar import QuietStarModel, build_decoder
from quietstar.config import Config, LossConfig, ThoughtConfig, TrainConfig
from quietstar.thoughts import Backends, quietstar_forward
from quietstar.train import accumulate_gradients, config_from_args, param_groups

from test_train import TINY


def _tiny(cfg, seed=0):
    torch.manual_seed(seed)
    model = QuietStarModel(build_decoder(cfg.model), cfg.thought, marker_init_id=5)
    with torch.no_grad():   # a non-zero mixing head, so every term carries gradient
        model.mixing_head.net[-1].weight.normal_(0, 0.3)
    return model


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("schedule", ["sample-then-train", "sequential"])
def test_accumulated_micro_batches_equal_one_big_batch(schedule):
    """A = 3 micro-batches of B = 2 rows with very unequal scored-target counts give the loss, every metric
    that is a mean, and every gradient of one batch of 6 rows (the same thoughts)."""
    cfg = config_from_args(TINY + ["--grad-accum", "3", "--beta-policy", "3", "--schedule", schedule])
    model = _tiny(cfg)
    A, B, T, th = 3, 2, cfg.train.seq_len, cfg.thought
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (A * B, T), generator=g)
    valid = torch.ones(A * B, T, dtype=torch.bool)
    valid[:B, 2:] = False                 # micro-batch 0: 2 scored targets per row; the others: all
    valid[B:2 * B, T // 2:] = False
    thoughts = torch.randint(3, 1000, (A * B, th.P, T, th.M), generator=g)
    backends = Backends("reference", "reference")

    model.zero_grad(set_to_none=True)
    big, _ = accumulate_gradients(model, [(ids, valid)], cfg, backends, None, sampler=lambda x, ds: thoughts)
    g_big = _grads(model)
    model.zero_grad(set_to_none=True)
    parts = iter(thoughts.split(B))
    micros = list(zip(ids.split(B), valid.split(B)))
    small, _ = accumulate_gradients(model, micros, cfg, backends, None, sampler=lambda x, ds: next(parts))
    g_small = _grads(model)

    for k in ("loss", "nll_base", "nll_talk", "policy", "reward", "w_mean", "thought_gain"):
        torch.testing.assert_close(small[k], big[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"{k}: {m}")
    assert g_big.keys() == g_small.keys() and len(g_big) == len(list(model.parameters()))
    for n in g_big:
        assert g_big[n].abs().sum() > 0, n
        torch.testing.assert_close(g_small[n], g_big[n], rtol=1e-4, atol=1e-7, msg=lambda m: f"{n}: {m}")
    # the comparison can fail: the mean of the three micro-batch means is another loss
    per_micro = []
    for (i, v), t in zip(micros, thoughts.split(B)):
        _, m, _ = quietstar_forward(model, i, v, cfg.loss, schedule, backends, thoughts=t)
        per_micro.append(m["nll_base"])
    assert abs(float(sum(per_micro) / A) - float(big["nll_base"])) > 1e-3


def test_mixing_head_starts_at_the_base_model_with_decoder_init():
    """w = 0 exactly at init (no sigmoid option, whose zero layer gave w = 0.5); hidden layers N(0, 0.02)
    like the decoder's linear layers, zero biases."""
    cfg = config_from_args(TINY + ["--model-hidden-size", "256", "--model-head-dim", "64"])
    assert not hasattr(cfg.thought, "mixing")
    with pytest.raises(SystemExit):
        config_from_args(["--mixing", "sigmoid"])
    torch.manual_seed(0)
    model = QuietStarModel(build_decoder(cfg.model), cfg.thought, marker_init_id=5)
    net = model.mixing_head.net
    std = model.lm.config.initializer_range
    for layer in (net[0], net[2]):
        assert abs(layer.weight.std().item() - std) < 0.1 * std, layer.weight.std()
        assert abs(layer.weight.mean().item()) < 0.1 * std
        assert torch.count_nonzero(layer.bias) == 0
    h = torch.randn(5, 256)
    assert torch.count_nonzero(model.mixing_head(h, torch.randn(5, 256))) == 0


def test_one_pass_is_refused_unless_the_policy_term_is_off():
    with pytest.raises(ValueError, match="--P 1"):
        config_from_args(TINY[:-8] + ["--P", "1"])
    with pytest.raises(ValueError, match="--P 1"):
        Config(thought=ThoughtConfig(P=1))
    cfg = config_from_args(TINY + ["--P", "1", "--beta-policy", "0"])
    assert cfg.thought.P == 1 and cfg.loss.beta_policy == 0


def test_defaults_are_the_reference_runs():
    """AdamW betas (0.9, 0.999), weight decay 0.001 (not on biases / norms), 20 warm-up steps, lr 1e-6,
    clipping at 1, the 0.5/0.5/1e6 loss weights (the HF Trainer defaults of quiet-star-train.py)."""
    tc, lc = TrainConfig(), LossConfig()
    assert (tc.betas, tc.weight_decay, tc.warmup_steps, tc.lr, tc.grad_clip) == ((0.9, 0.999), 0.001, 20, 1e-6, 1.0)
    assert (lc.beta_base, lc.beta_talk, lc.beta_policy) == (0.5, 0.5, 1e6)
    cfg = config_from_args(["--model", "smollm2-135m-random"])
    assert (cfg.train.betas, cfg.train.weight_decay, cfg.train.warmup_steps) == ((0.9, 0.999), 0.001, 20)
    model = _tiny(config_from_args(TINY))
    decay, no_decay = param_groups(model, 0.001)
    assert decay["weight_decay"] == 0.001 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert "markers" in {names[id(p)] for p in decay["params"]}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert "mixing_head.net.0.bias" in nd and any("norm" in n for n in nd)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_thought_gain_is_log_p_mix_minus_log_p_base_of_the_true_tokens():
    cfg = config_from_args(TINY + ["--beta-policy", "3"])
    model = _tiny(cfg)
    T, K = cfg.train.seq_len, cfg.thought.K
    ids = torch.randint(3, 1000, (2, T))
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[0, 5] = False
    _, m, ex = quietstar_forward(model, ids, valid, cfg.loss, "sample-then-train", Backends("reference", "reference"),
                                 torch.Generator().manual_seed(0))
    # recomputed by loops from the per-position log-probs: target x_{t+k}, base prediction at t + k - 1
    total, n = 0.0, 0
    for b in range(2):
        for p in range(cfg.thought.P):
            for t in range(T):
                for k in range(1, K + 1):
                    s = t + k - 1
                    if s <= T - 2 and valid[b, s]:
                        total += float(ex.lp_mix[b, p, t, k - 1] - ex.lp_base[b, s])
                        n += 1
    assert abs(total / n - float(m["thought_gain"])) < 1e-5
    assert abs(float(m["thought_gain"])) > 1e-4                # a non-zero mixing head changes the prediction
    zero = _tiny(cfg)
    with torch.no_grad():
        zero.mixing_head.net[-1].weight.zero_()
    _, m0, _ = quietstar_forward(zero, ids, valid, cfg.loss, "sample-then-train", Backends("reference", "reference"),
                                 torch.Generator().manual_seed(0))
    assert float(m0["thought_gain"]) == 0.0                    # w = 0: the mixed prediction is the base one


def test_exports_with_the_removed_sigmoid_mixing_are_refused(tmp_path):
    import json
    model = _tiny(config_from_args(TINY))
    model.save_pretrained(tmp_path / "e")
    meta_path = tmp_path / "e" / "quietstar.json"
    meta = json.loads(meta_path.read_text())
    meta["thought"]["mixing"] = "unbounded"              # an export written while the option existed
    meta_path.write_text(json.dumps(meta))
    again = QuietStarModel.from_pretrained(tmp_path / "e")
    assert torch.equal(again.mixing_head.net[0].weight, model.mixing_head.net[0].weight)
    meta["thought"]["mixing"] = "sigmoid"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="mixing='sigmoid' is no longer supported"):
        QuietStarModel.from_pretrained(tmp_path / "e")
