"""CUDA-graph sampling (quietstar/graphs.py): the keyed sampling loop it captures equals the
generator path (CPU, interpreter), bad set-ups are refused, and on a GPU the replayed graph gives
exactly the eager loop's thoughts, across new inputs, parameter updates and autocast."""
import dataclasses

import pytest
import torch

from quietstar import Backends
from quietstar.graphs import GraphedSampler
from quietstar.thoughts import sample_thoughts
from test_quietstar import V, tiny_model


def _keys(gen_seed: int, M: int, device="cpu") -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(gen_seed)
    return torch.cat([torch.randint(0, 2**62, (1,), generator=g, device=device, dtype=torch.int64)
                      for _ in range(M)])


@pytest.mark.parametrize("attention", ["split", "triton"])
def test_keyed_loop_equals_generator_loop(attention):
    model = tiny_model(M=3)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    be = Backends(attention, "triton")
    want = sample_thoughts(model, ids, be, torch.Generator().manual_seed(7))
    got = sample_thoughts(model, ids, be, seeds=_keys(7, 3))
    assert torch.equal(got, want)
    other = sample_thoughts(model, ids, be, seeds=_keys(8, 3))
    assert not torch.equal(other, want), "the keys must drive the noise"


def test_keyed_loop_refuses_bad_seeds():
    model = tiny_model(M=3)
    ids = torch.randint(0, V, (2, 9))
    with pytest.raises(ValueError, match="triton LM head"):
        sample_thoughts(model, ids, Backends("split", "chunked"), seeds=_keys(0, 3))
    with pytest.raises(ValueError, match="not both"):
        sample_thoughts(model, ids, Backends("split", "triton"), torch.Generator(), seeds=_keys(0, 3))
    with pytest.raises(ValueError, match="seeds must be an \\(M=3,\\) int64"):
        sample_thoughts(model, ids, Backends("split", "triton"), seeds=_keys(0, 2))


def test_graphed_sampler_refuses_bad_setup():
    model = tiny_model(M=3)
    with pytest.raises(ValueError, match="lm_head='triton'"):
        GraphedSampler(model, Backends("triton", "chunked"))
    with pytest.raises(ValueError, match="attention in"):
        GraphedSampler(model, Backends("flex", "triton"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            GraphedSampler(model, Backends("triton", "triton"))


def test_recapture_fingerprint(monkeypatch):
    """What a graph bakes in: in-place updates keep the capture, replaced tensors or settings do not."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # the constructor only; nothing runs on CUDA
    model = tiny_model(M=3)
    s = GraphedSampler(model, Backends("triton", "triton"))
    fp = s._fingerprint()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert s._fingerprint() == fp
    model.lm.model.embed_tokens.weight.data = model.lm.model.embed_tokens.weight.data.clone()
    fp2 = s._fingerprint()
    assert fp2 != fp
    model.thought = dataclasses.replace(model.thought, tau_sample=0.5)
    assert s._fingerprint() != fp2
    model.lm.config.rope_parameters = {**model.lm.config.rope_parameters, "rope_type": "dynamic", "factor": 2.0}
    model.lm.model.rotary_emb.rope_type = "dynamic"
    with pytest.raises(ValueError, match="rope_type='dynamic'"):
        GraphedSampler(model, Backends("triton", "triton"))


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("attention", ["triton", "split"])
def test_graph_replay_equals_eager_loop(attention, autocast):
    dev = "cuda"
    model = tiny_model(M=3).to(dev)
    be = Backends(attention, "triton")
    g_graph = torch.Generator(device=dev).manual_seed(3)
    g_eager = torch.Generator(device=dev).manual_seed(3)
    sampler = GraphedSampler(model, be, g_graph)
    ctx = (lambda: torch.autocast("cuda", dtype=autocast)) if autocast else torch.no_grad
    for step in range(3):
        ids = torch.randint(0, V, (2, 9), device=dev, generator=torch.Generator(device=dev).manual_seed(step))
        with ctx():
            got = sampler(ids)
            want = sample_thoughts(model, ids, be, g_eager)
        assert torch.equal(got, want), f"step {step}: graph replay differs from the eager loop"
        assert torch.equal(g_graph.get_state(), g_eager.get_state()), "the generators must advance alike"
        with torch.no_grad():       # an optimizer-like in-place update: the next replay must see it
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    assert len(sampler.graphs) == 1, "one capture per shape"
    ids = torch.randint(0, V, (1, 12), device=dev)
    with ctx():
        got = sampler(ids)
        want = sample_thoughts(model, ids, be, seeds=sampler.last_seeds())
    assert torch.equal(got, want) and len(sampler.graphs) == 2
    # what the graph bakes in changes: a new temperature, a parameter replaced by a new tensor
    model.thought = dataclasses.replace(model.thought, tau_sample=0.5)
    with torch.no_grad():
        model.mixing_head.net[0].weight = torch.nn.Parameter(model.mixing_head.net[0].weight * 1.0)
        model.lm.model.embed_tokens.weight.data = model.lm.model.embed_tokens.weight.data * 2.0
    with ctx():
        got = sampler(ids)
        want = sample_thoughts(model, ids, be, seeds=sampler.last_seeds())
    assert torch.equal(got, want) and len(sampler.graphs) == 1, "a changed model must be captured again"
