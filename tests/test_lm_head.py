"""Tests of the fused LM-head kernels (kernels/lm_head.py) and the chunked path (kernels/lm_head_chunked.py).

Ground truth: the float64 references of kernels/reference.py on the test-dtype inputs upcast. The
kernel's error is bounded by ERR_MULT x PyTorch's own error in the test dtype plus ATOL[dtype] x
max(1, |truth|). On CPU the kernels run in the Triton interpreter in fp32/fp16 (tl.dot on bf16 is
wrong there); bf16 runs on the GPU (@pytest.mark.gpu).
"""
import math

import pytest
import torch

import kernels.lm_head as K
from kernels import (
    mixed_logprob,
    mixed_logprob_chunked,
    sample_thought_tokens,
    sample_thought_tokens_chunked,
    token_logprob,
    token_logprob_chunked,
)
from kernels.reference import mixed_logprob_ref, sample_thought_tokens_ref, token_logprob_ref

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
ERR_MULT = 4
IGNORE = -100


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _assert_close(name, got, truth, torch_out, dtype):
    got, truth, torch_out = got.double(), truth.double(), torch_out.double()
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - truth).abs().max().item()
    torch_err = (torch_out - truth).abs().max().item()
    bound = ERR_MULT * torch_err + ATOL[dtype] * max(1.0, truth.abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (PyTorch's own error {torch_err:.3g})"


@pytest.fixture
def poison(monkeypatch):
    """Every torch.empty/empty_like in the test returns NaN (floats) or a huge int: unwritten outputs show."""
    real_empty, real_like = torch.empty, torch.empty_like

    def fill(x):
        if x.is_floating_point():
            x.fill_(float("nan"))
        elif x.dtype != torch.bool:
            x.fill_(torch.iinfo(x.dtype).max // 3)
        return x

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_like(*a, **k)))


def _mixed_inputs(N, d, V, dtype, device, gen, n_ignored=3):
    ht = torch.randn(N, d, generator=gen).to(device, dtype)
    hb = torch.randn(N, d, generator=gen).to(device, dtype)
    w = (torch.randn(N, generator=gen) * 1.5).to(device, dtype)        # many w outside [0, 1]
    W = (torch.randn(V, d, generator=gen) / math.sqrt(d) * 3).to(device, dtype)
    t = torch.randint(0, V, (N,), generator=gen)
    if N > 1:
        t[torch.randperm(N, generator=gen)[:n_ignored]] = IGNORE
    g = torch.randn(N, generator=gen).to(device)                        # per-row upstream gradients
    return ht, hb, w, W, t.to(device), g


def _value_and_grads(fn, inputs, g):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*xs)
    out.backward(g.to(out.dtype))
    return out.detach(), [x.grad for x in xs]


def _torch_mixed(ht, hb, w, W, t):
    """What plain PyTorch computes in the inputs' dtype: mix, matmul, then fp32 log_softmax."""
    hm = (1 - w)[:, None] * hb + w[:, None] * ht
    lp = torch.log_softmax((hm @ W.T).float(), dim=-1)
    valid = t != IGNORE
    out = lp.gather(1, torch.where(valid, t, 0)[:, None])[:, 0]
    return torch.where(valid, out, torch.zeros_like(out))


def _torch_token(h, W, t, temperature, banned):
    z = (h @ W.T).float() / temperature
    if len(banned):
        z = z.index_fill(1, torch.as_tensor(banned, device=h.device), float("-inf"))
    return torch.log_softmax(z, dim=-1).gather(1, t[:, None])[:, 0]


def _check_mixed(fn, N, d, V, dtype, device, seed, torch_fn=_torch_mixed):
    gen = torch.Generator().manual_seed(seed)
    ht, hb, w, W, t, g = _mixed_inputs(N, d, V, dtype, device, gen)
    inputs = [ht, hb, w, W]
    truth, truth_g = _value_and_grads(lambda *x: mixed_logprob_ref(*x, t), [x.double() for x in inputs], g.double())
    low, low_g = _value_and_grads(lambda *x: torch_fn(*x, t), inputs, g)
    got, got_g = _value_and_grads(lambda *x: fn(*x, t), inputs, g)
    assert got.dtype == torch.float32
    ignored = t == IGNORE
    assert (got[ignored] == 0).all(), "ignored rows must give exactly 0"
    _assert_close("logp", got, truth, low, dtype)
    for name, a, b, c in zip(("h_talk", "h_base", "w", "weight"), got_g, truth_g, low_g):
        assert a.dtype == dtype, f"grad of {name} has dtype {a.dtype}, want {dtype}"
        _assert_close(f"grad {name}", a, b, c, dtype)
    for name, a in zip(("h_talk", "h_base", "w"), got_g[:3]):
        assert (a[ignored] == 0).all(), f"ignored rows must get zero grad in {name}"


def _check_token(fn, N, d, V, dtype, device, seed, temperature, banned):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=gen).to(device, dtype)
    W = (torch.randn(V, d, generator=gen) / math.sqrt(d) * 3).to(device, dtype)
    allowed = torch.tensor([v for v in range(V) if v not in banned])
    t = allowed[torch.randint(0, len(allowed), (N,), generator=gen)].to(device)
    g = torch.randn(N, generator=gen).to(device)
    truth, truth_g = _value_and_grads(lambda *x: token_logprob_ref(*x, t, temperature, banned),
                                      [h.double(), W.double()], g.double())
    low, low_g = _value_and_grads(lambda *x: _torch_token(*x, t, temperature, banned), [h, W], g)
    got, got_g = _value_and_grads(lambda *x: fn(*x, t, temperature, banned), [h, W], g)
    _assert_close("logp", got, truth, low, dtype)
    for name, a, b, c in zip(("h", "weight"), got_g, truth_g, low_g):
        _assert_close(f"grad {name}", a, b, c, dtype)


def _tv(counts, p):
    return 0.5 * (counts / counts.sum() - p).abs().sum().item()


def _tv_bound(p, n):
    """E[TV] <= 0.5 sum sqrt(p(1-p)/n); TV - E[TV] > sqrt(ln(1e6)/(2n)) has probability < 1e-6 (McDiarmid)."""
    return 0.5 * torch.sqrt(p * (1 - p) / n).sum().item() + math.sqrt(math.log(1e6) / (2 * n))


def _softmax_excluding(h0, W, temperature, banned):
    z = (W.double() @ h0.double()) / temperature
    if len(banned):
        z[list(banned)] = float("-inf")
    return torch.softmax(z, 0)


# ----------------------------------------------------------------------------------------------
# mixed_logprob
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N,d,V", [(37, 48, 1003), (1, 48, 1003), (37, 48, 20)])
def test_mixed_logprob_matches_reference(poison, N, d, V):
    _check_mixed(mixed_logprob, N, d, V, torch.float32, "cpu", seed=N * 1000 + V)


@pytest.mark.parametrize("chunk_bytes,min_vc,plan", [(37 * 256 * 4, 64, (37, 256)), (16 * 64 * 4, 64, (16, 64)),
                                                     (37 * 150 * 4, 48, (37, 144))],
                         ids=["vocab-chunks", "row-and-vocab-chunks", "partial-column-tiles"])
def test_mixed_logprob_multi_chunk(poison, monkeypatch, chunk_bytes, min_vc, plan):
    # 4 vocabulary chunks of all 37 rows (dW written once per chunk, dh_mix summed over chunks); 3 row
    # chunks x 16 vocabulary chunks (dW summed over the row chunks in fp32 too); chunks of 144 columns, which
    # the interpreter's 64-column tiles do not divide: a tile's masked tail holds the next chunk's ids, which
    # must not match a target (seen on the GPU, where 512-column tiles met 7936-column chunks)
    monkeypatch.setattr(K, "_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(K, "_MIN_VC", min_vc)
    assert K._chunk_plan(37, 1003, 4) == plan
    _check_mixed(mixed_logprob, 37, 48, 1003, torch.float32, "cpu", seed=7)
    _check_token(token_logprob, 37, 48, 1003, torch.float32, "cpu", 8, 0.7, (0, 5, 300, 1002))


def test_mixed_logprob_fp16(poison, monkeypatch):
    # fp16 weight with 3 row chunks: the fp32 dW and dh_mix sums and the final casts
    monkeypatch.setattr(K, "_CHUNK_BYTES", 16 * 64 * 2)
    monkeypatch.setattr(K, "_MIN_VC", 64)
    assert K._chunk_plan(37, 203, 2) == (16, 64)
    _check_mixed(mixed_logprob, 37, 32, 203, torch.float16, "cpu", seed=11)


def test_sampler_chunks_do_not_change_the_draw(monkeypatch):
    """The noise is keyed by (row, column) of the whole call: chunking rows and columns gives the same tokens."""
    gen = torch.Generator().manual_seed(12)
    h, W = torch.randn(37, 24, generator=gen), torch.randn(1003, 24, generator=gen) * 0.1
    seed = torch.tensor([123456789], dtype=torch.int64)
    whole = sample_thought_tokens(h, W, 0.9, (4, 700), seed=seed)
    monkeypatch.setattr(K, "_CHUNK_BYTES", 16 * 64 * 4)
    monkeypatch.setattr(K, "_MIN_VC", 64)
    assert K._chunk_plan(37, 1003, 4) == (16, 64)
    assert torch.equal(sample_thought_tokens(h, W, 0.9, (4, 700), seed=seed), whole)


def test_mixed_logprob_strided_inputs():
    gen = torch.Generator().manual_seed(3)
    ht, hb, w, W, t, g = _mixed_inputs(21, 40, 300, torch.float32, "cpu", gen)
    both = torch.stack([ht, hb], dim=2)                       # (N, d, 2): stride (2d, 2)
    Wt = W.T.contiguous().T                                   # (V, d) column-major
    got = mixed_logprob(both[..., 0], both[..., 1], w, Wt, t)
    _assert_close("logp", got, mixed_logprob_ref(ht.double(), hb.double(), w.double(), W.double(), t),
                  mixed_logprob_ref(ht, hb, w, W, t), torch.float32)


@pytest.mark.parametrize("chunk_cols", [None, 576], ids=["one-chunk", "chunks-of-576"])
def test_gpu_tiles_under_the_interpreter(poison, monkeypatch, chunk_cols):
    """The tiles the GPU launches (_configs(False): 512- and 256-column tiles, 8- and 16-row blocks), run on
    the CPU. The other CPU tests use the interpreter's small tiles; a bug that only a large tile's masked
    tail shows (GPU run 2's -inf rows: a 512-column tile against 7936-column chunks) is caught here first.
    37 rows leave a partial row block; V = 1403 leaves a partial column tile in every chunk (one chunk of
    1403, or 576 + 576 + 251 columns: neither 512 nor 256 divides 576)."""
    configs = K._configs
    gpu = configs(False)
    assert gpu != configs(True)
    monkeypatch.setattr(K, "_configs", lambda interpret: gpu)
    if chunk_cols is not None:
        monkeypatch.setattr(K, "_MIN_VC", 48)
        monkeypatch.setattr(K, "_CHUNK_BYTES", 37 * 600 * 4)
    assert K._chunk_plan(37, 1403, 4) == (37, chunk_cols or 1403)
    _check_mixed(mixed_logprob, 37, 40, 1403, torch.float32, "cpu", seed=21)
    _check_token(token_logprob, 37, 40, 1403, torch.float32, "cpu", 22, 0.7, (0, 5, 511, 512, 1402))
    # the noise is keyed by (row, column), not by tile: the GPU's tiles draw the interpreter tiles' tokens
    gen = torch.Generator().manual_seed(23)
    h, W = torch.randn(37, 40, generator=gen), torch.randn(1403, 40, generator=gen) * 0.1
    seed = torch.tensor([987654321], dtype=torch.int64)
    big = sample_thought_tokens(h, W, 0.9, (4, 700), seed=seed)
    monkeypatch.setattr(K, "_configs", configs)
    small = sample_thought_tokens(h, W, 0.9, (4, 700), seed=seed)
    assert torch.equal(big, small)


# ----------------------------------------------------------------------------------------------
# token_logprob
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N,d,V,temperature,banned", [
    (37, 48, 1003, 0.7, (0, 5, 1002)),
    (1, 48, 1003, 3.0, ()),
    (37, 48, 20, 2.0, (19, 3)),
])
def test_token_logprob_matches_reference(poison, N, d, V, temperature, banned):
    _check_token(token_logprob, N, d, V, torch.float32, "cpu", N + V, temperature, banned)


def test_token_logprob_banned_target_is_minus_inf():
    gen = torch.Generator().manual_seed(5)
    h, W = torch.randn(4, 32, generator=gen), torch.randn(50, 32, generator=gen)
    t = torch.tensor([7, 1, 7, 2])
    out = token_logprob(h, W, t, 1.0, (7,))
    assert torch.isneginf(out[[0, 2]]).all() and torch.isfinite(out[[1, 3]]).all()


# ----------------------------------------------------------------------------------------------
# sampler
# ----------------------------------------------------------------------------------------------
def test_sampler_reproducible_seeded_and_never_banned():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(40, 24, generator=gen)
    W = torch.randn(300, 24, generator=gen) * 0.1        # near-uniform: banned ids would be hit often
    banned = (0, 1, 64, 65, 299)
    a = sample_thought_tokens(h, W, 1.0, banned, torch.Generator().manual_seed(1))
    b = sample_thought_tokens(h, W, 1.0, banned, torch.Generator().manual_seed(1))
    c = sample_thought_tokens(h, W, 1.0, banned, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(1)
    d1, d2 = sample_thought_tokens(h, W, 1.0, banned, g), sample_thought_tokens(h, W, 1.0, banned, g)
    assert a.dtype == torch.int64 and a.shape == (40,)
    assert torch.equal(a, b), "same generator seed must give the same tokens"
    assert (a != c).float().mean() > 0.5, "different seeds must give different tokens"
    assert torch.equal(d1, a) and (d1 != d2).float().mean() > 0.5, "the generator must advance"
    for toks in (a, c, d2):
        assert ((toks >= 0) & (toks < 300)).all()
        assert not torch.isin(toks, torch.tensor(banned)).any(), "a banned id was sampled"


def test_sampler_explicit_seed_equals_generator_draw():
    """seed= (the CUDA-graph path) is the key the generator path would draw: same tokens."""
    gen = torch.Generator().manual_seed(0)
    h, W = torch.randn(40, 24, generator=gen), torch.randn(300, 24, generator=gen) * 0.1
    banned = (3, 64)
    a = sample_thought_tokens(h, W, 0.7, banned, torch.Generator().manual_seed(5))
    seed = torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(5), dtype=torch.int64)
    assert torch.equal(sample_thought_tokens(h, W, 0.7, banned, seed=seed), a)
    other = sample_thought_tokens(h, W, 0.7, banned, seed=seed + 1)
    assert (other != a).float().mean() > 0.5, "the seed must key the noise"
    with pytest.raises(ValueError, match="seed or generator"):
        sample_thought_tokens(h, W, 0.7, banned, torch.Generator(), seed=seed)
    for bad in (seed.int(), seed.repeat(2), 5):
        with pytest.raises(ValueError, match="seed must be a \\(1,\\) int64"):
            sample_thought_tokens(h, W, seed=bad)


@pytest.mark.parametrize("sampler", [sample_thought_tokens, sample_thought_tokens_chunked],
                         ids=["triton", "chunked"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampler_distribution(sampler, temperature):
    n, V, d = 4096, 40, 16
    gen = torch.Generator().manual_seed(int(temperature * 10))
    h0 = torch.randn(d, generator=gen)
    W = torch.randn(V, d, generator=gen) * 0.6
    p = _softmax_excluding(h0, W, temperature, ())
    toks = sampler(h0.expand(n, d), W, temperature, (), torch.Generator().manual_seed(42))
    counts = torch.bincount(toks, minlength=V).double()
    bound = _tv_bound(p, n)
    wrong_temp = _softmax_excluding(h0, W, temperature * 1.5, ())
    off_by_one = torch.roll(p, 1)
    # the test can tell: both wrong laws are far beyond the bound from the true one
    assert 0.5 * (wrong_temp - p).abs().sum() > 2 * bound
    assert 0.5 * (off_by_one - p).abs().sum() > 2 * bound
    assert _tv(counts, p) < bound, f"TV to softmax {_tv(counts, p):.3f} >= {bound:.3f}"
    assert _tv(counts, wrong_temp) > bound and _tv(counts, off_by_one) > bound


@pytest.mark.parametrize("sampler", [sample_thought_tokens, sample_thought_tokens_chunked],
                         ids=["triton", "chunked"])
def test_sampler_law_equals_token_logprob_with_banned(sampler):
    # V = 300 spans several V blocks and program groups; banned ids include the most likely one
    n, V, d, temperature = 3000, 300, 16, 0.8
    gen = torch.Generator().manual_seed(9)
    h0 = torch.randn(d, generator=gen)
    W = torch.randn(V, d, generator=gen) * 0.8
    top = int(torch.argmax(W @ h0))
    banned = tuple(sorted({top, 0, 63, 64, 299}))
    targets = torch.arange(V)
    fn = token_logprob if sampler is sample_thought_tokens else token_logprob_chunked
    p = fn(h0.expand(V, d), W, targets, temperature, banned).double().exp()
    assert p[list(banned)].eq(0).all()
    assert abs(p.sum().item() - 1) < 1e-5
    toks = sampler(h0.expand(n, d), W, temperature, banned, torch.Generator().manual_seed(123))
    assert not torch.isin(toks, torch.tensor(banned)).any()
    counts = torch.bincount(toks, minlength=V).double()
    bound = _tv_bound(p, n)
    p_unbanned = _softmax_excluding(h0, W, temperature, ())
    assert 0.5 * (p_unbanned - p).abs().sum() > 2 * bound
    assert _tv(counts, p) < bound, f"TV {_tv(counts, p):.3f} >= {bound:.3f}"


# ----------------------------------------------------------------------------------------------
# chunked path
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_chunked_mixed_matches_reference(chunk_size):
    fn = lambda *a: mixed_logprob_chunked(*a, chunk_size=chunk_size)  # noqa: E731
    _check_mixed(fn, 37, 48, 1003, torch.float32, "cpu", seed=21)
    _check_mixed(fn, 1, 48, 20, torch.float32, "cpu", seed=22)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_chunked_token_matches_reference(chunk_size):
    fn = lambda *a: token_logprob_chunked(*a, chunk_size=chunk_size)  # noqa: E731
    _check_token(fn, 37, 48, 1003, torch.float32, "cpu", 31, 0.7, (0, 5, 1002))


def test_chunked_sampler_equals_reference_draws():
    # one chunk consumes the generator exactly as the reference does: identical tokens
    gen = torch.Generator().manual_seed(4)
    h, W = torch.randn(33, 24, generator=gen), torch.randn(500, 24, generator=gen)
    ref = sample_thought_tokens_ref(h, W, 1.0, (3, 4), torch.Generator().manual_seed(8))
    got = sample_thought_tokens_chunked(h, W, 1.0, (3, 4), torch.Generator().manual_seed(8), chunk_size=33)
    assert torch.equal(ref, got)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def _bad_cases():
    h, W = torch.randn(5, 8), torch.randn(11, 8)
    t, w = torch.randint(0, 11, (5,)), torch.rand(5)
    return [
        ("h_talk", lambda f: f["mixed"](torch.randn(5), h, w, W, t)),
        ("h_base", lambda f: f["mixed"](h, torch.randn(4, 8), w, W, t)),
        ("w", lambda f: f["mixed"](h, h, torch.rand(4), W, t)),
        ("w", lambda f: f["mixed"](h, h, torch.ones(5, dtype=torch.int64), W, t)),
        ("weight", lambda f: f["mixed"](h, h, w, torch.randn(11, 9), t)),
        ("target", lambda f: f["mixed"](h, h, w, W, t.float())),
        ("target", lambda f: f["token"](h, W, t[:4])),
        ("weight", lambda f: f["token"](h, W.to("meta"), t)),
        ("temperature", lambda f: f["token"](h, W, t, 0.0)),
        ("temperature", lambda f: f["sample"](h, W, -1.0)),
        ("banned_ids", lambda f: f["sample"](h, W, 1.0, (3, 11))),
        ("banned_ids", lambda f: f["token"](h, W, t, 1.0, (-1,))),
        ("banned_ids", lambda f: f["sample"](h, W, 1.0, tuple(range(11)))),
        ("h", lambda f: f["sample"](h.long(), W)),
        # read as something else before: "12" as ids 1 and 2, [1.7] as 1, a bool mask as ids 0 and 1
        ("banned_ids", lambda f: f["token"](h, W, t, 1.0, "12")),
        ("banned_ids", lambda f: f["sample"](h, W, 1.0, [1.7])),
        ("banned_ids", lambda f: f["sample"](h, W, 1.0, torch.tensor([False, True]))),
        ("banned_ids", lambda f: f["sample"](h, W, 1.0, 5)),
        ("temperature", lambda f: f["sample"](h, W, torch.tensor(0.5))),
        ("weight", lambda f: f["token"](h, torch.randn(0, 8), t[:0] * 0)),
        ("weight", lambda f: f["mixed"](h, h, w, torch.randn(0, 8), t)),
    ]


@pytest.mark.parametrize("impl", ["triton", "chunked"])
@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_names_the_argument(impl, case):
    fns = {"triton": dict(mixed=mixed_logprob, token=token_logprob, sample=sample_thought_tokens),
           "chunked": dict(mixed=mixed_logprob_chunked, token=token_logprob_chunked,
                           sample=sample_thought_tokens_chunked)}[impl]
    name, call = _bad_cases()[case]
    with pytest.raises((ValueError, TypeError), match=name):
        call(fns)


_IMPLS = {"triton": (token_logprob, sample_thought_tokens, mixed_logprob),
          "chunked": (token_logprob_chunked, sample_thought_tokens_chunked, mixed_logprob_chunked),
          "reference": (token_logprob_ref, sample_thought_tokens_ref, mixed_logprob_ref)}


@pytest.mark.parametrize("impl", ["triton", "chunked", "reference"])
def test_banned_ids_numpy_scalars_and_duplicates(impl):
    """Banned ids may repeat (one ban each) and be NumPy ints; NumPy temperatures and ignore indices are numbers."""
    import numpy as np
    token, sample, mixed = _IMPLS[impl]
    gen = torch.Generator().manual_seed(9)
    h, W = torch.randn(6, 8, generator=gen), torch.randn(4, 8, generator=gen)
    t = torch.tensor([0, 0, 0, 0, 0, 0])
    want = token_logprob_ref(h, W, t, 0.5, (1, 2, 3))          # id 0 is the only one left: log p = 0
    got = token(h, W, t, np.float32(0.5), (3, np.int64(1), 1, 2, 2, 3))
    torch.testing.assert_close(got, want)
    assert (got.abs() < 1e-6).all()
    assert (sample(h, W, np.float64(2.0), [1, 1, 2, 3, 3, 3], torch.Generator().manual_seed(0)) == 0).all()
    w = torch.rand(6, generator=gen)
    t2 = torch.tensor([1, -7, 2, 3, -7, 0])
    torch.testing.assert_close(mixed(h, h, w, W, t2, np.int64(-7)), mixed_logprob_ref(h, h, w, W, t2, -7))


@pytest.mark.parametrize("impl", ["triton", "chunked", "reference"])
def test_empty_batch(impl):
    """N = 0 rows: empty results, zero gradients for the weight, no kernel launch (it used to divide by zero)."""
    token, sample, mixed = _IMPLS[impl]
    h, W = torch.randn(0, 8), torch.randn(11, 8, requires_grad=True)
    t = torch.zeros(0, dtype=torch.int64)
    lp = token(h, W, t, 1.0, (3,))
    assert lp.shape == (0,) and lp.dtype == torch.float32
    lp.sum().backward()
    assert W.grad is not None and torch.equal(W.grad, torch.zeros_like(W))
    assert sample(h, W.detach(), 1.0, (3,)).shape == (0,)
    assert mixed(h, h, torch.zeros(0), W, t).shape == (0,)


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_double_backward_is_refused_not_silently_zero(impl):
    """The backward is not differentiable: create_graph=True must say so, not return gradients cut off from
    the graph (a gradient penalty would silently add nothing)."""
    token, mixed = {"triton": (token_logprob, mixed_logprob), "chunked": (token_logprob_chunked,
                                                                          mixed_logprob_chunked)}[impl]
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(5, 8, generator=gen, requires_grad=True)
    W = torch.randn(11, 8, generator=gen, requires_grad=True)
    t = torch.randint(0, 11, (5,), generator=gen)
    for out in (token(h, W, t), mixed(h, h, torch.rand(5, generator=gen), W, t)):
        with pytest.raises(RuntimeError, match="double backward \\(create_graph=True\\) is not supported"):
            torch.autograd.grad(out.sum(), h, create_graph=True)


def test_triton_rejects_float64_and_too_many_banned():
    h, W, t = torch.randn(3, 8, dtype=torch.float64), torch.randn(300, 8), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(TypeError, match="h"):
        token_logprob(h, W.double(), t)
    with pytest.raises(ValueError, match="banned_ids"):
        sample_thought_tokens(h.float(), W, 1.0, tuple(range(K._MAX_BANNED + 1)))
    # duplicates are one ban each: 2 x _MAX_BANNED entries naming _MAX_BANNED ids are taken
    assert sample_thought_tokens(h.float(), W, 1.0, 2 * tuple(range(K._MAX_BANNED))).min() >= K._MAX_BANNED
    # meta tensors have no data: refused by name (it was a copy error inside Triton's interpreter)
    with pytest.raises(ValueError, match="^h is on meta"):
        token_logprob(h.float().to("meta"), W.to("meta"), t.to("meta"))


# ----------------------------------------------------------------------------------------------
# GPU (bf16, bigger shapes)
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("N,d,V", [(517, 256, 5003), (64, 576, 49152), (200, 4096, 32000)])
def test_gpu_bf16_mixed_logprob(N, d, V):
    _check_mixed(mixed_logprob, N, d, V, torch.bfloat16, "cuda", seed=N + d)


@pytest.mark.gpu
@pytest.mark.parametrize("N,d,V", [(300, 512, 32001), (100, 4096, 32000)])
def test_gpu_bf16_token_logprob(N, d, V):
    _check_token(token_logprob, N, d, V, torch.bfloat16, "cuda", 1, 3.0, (0, 1, V - 1))


@pytest.mark.gpu
def test_gpu_bf16_multi_chunk_and_memory(monkeypatch):
    # vocabulary chunks of 2048 x 7936; peak extra memory far below the N x V fp32 logits
    N, d, V = 2048, 256, 32000
    monkeypatch.setattr(K, "_CHUNK_BYTES", 512 * V * 2)
    _check_mixed(mixed_logprob, N, d, V, torch.bfloat16, "cuda", seed=5)
    gen = torch.Generator().manual_seed(6)
    ins = [x.requires_grad_() if x.is_floating_point() and i < 4 else x
           for i, x in enumerate(_mixed_inputs(N, d, V, torch.bfloat16, "cuda", gen))]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    mixed_logprob(*ins[:5]).backward(ins[5])
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 512 * V * 2 + V * d * 4 * 2 + N * d * 2 * 4 + 2**22, f"peak extra {extra / 2**20:.1f} MiB"
    assert extra < N * V * 4 / 2


@pytest.mark.gpu
def test_gpu_sampler_law_and_big_vocab():
    n, V, d = 20000, 262144, 64
    gen = torch.Generator().manual_seed(0)
    h0 = torch.randn(d, generator=gen).cuda().bfloat16()
    W = (torch.randn(V, d, generator=gen) * 0.05).cuda().bfloat16()
    W[:50] += h0 * 0.6                                      # 50 likely ids among 262144
    banned = (0, 1, V - 1)
    toks = sample_thought_tokens(h0.expand(n, d), W, 1.0, banned, torch.Generator("cuda").manual_seed(3))
    assert not torch.isin(toks, torch.tensor(banned, device="cuda")).any()
    p = _softmax_excluding(h0.float(), W.float(), 1.0, banned)
    counts = torch.bincount(toks, minlength=V).double()
    assert _tv(counts, p) < _tv_bound(p, n)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [576, 4096])
def test_gpu_sampler_law_wide_hidden(d):
    """The sampler at d > 64 (several d blocks per logit tile): its law is softmax(W h / tau) without banned ids."""
    n, V, temperature = 20000, 3001, 0.8
    gen = torch.Generator().manual_seed(d)
    h0 = torch.randn(d, generator=gen).cuda().bfloat16()
    W = (torch.randn(V, d, generator=gen) / math.sqrt(d) * 2).cuda().bfloat16()
    banned = (0, int(torch.argmax(W.float() @ h0.float())), V - 1)
    toks = sample_thought_tokens(h0.expand(n, d), W, temperature, banned, torch.Generator("cuda").manual_seed(1))
    assert not torch.isin(toks, torch.tensor(banned, device="cuda")).any()
    p = _softmax_excluding(h0.float().cpu(), W.float().cpu(), temperature, banned)
    counts = torch.bincount(toks.cpu(), minlength=V).double()
    bound = _tv_bound(p, n)
    assert 0.5 * (_softmax_excluding(h0.float().cpu(), W.float().cpu(), temperature * 1.5, banned) - p).abs().sum() \
        > 2 * bound, "the test must be able to tell a wrong temperature"
    assert _tv(counts, p) < bound, f"TV {_tv(counts, p):.3f} >= {bound:.3f}"


def test_cpu_tensors_outside_the_interpreter_are_refused(monkeypatch):
    """The LM-head kernels share the thought-attention kernels' device check (kernels.reference.check_triton_device)."""
    import sys
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delitem(sys.modules, "triton_viz", raising=False)
    h, w, weight, target = torch.randn(3, 16), torch.zeros(3), torch.randn(40, 16), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="h_talk is on cpu; the Triton LM-head kernels need CUDA.*lm_head_chunked"):
        mixed_logprob(h, h, w, weight, target)
