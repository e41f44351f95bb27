"""Document masking for packed rows (issue 16): every query of position t sees only base keys of t's
own document, doc_start[t] <= s <= t.

- the dense reference against an independent construction (each document attended on its own);
- the Triton forward / backward / step kernels against the float64 reference (fp32, fp16, odd
  shapes, GQA, several documents per row, a length-1 document, one ending at the last position),
  key tiles before a tile's earliest document start never read, and a one-document row equal
  to the unmasked result exactly;
- the split and flex backends against the reference; the model: both schedules agree with
  documents, a one-document row is today's result exactly, a packed document computes what it
  computes alone in a row (row-relative RoPE), talk targets in a later document are not scored;
- the data side: pack_rows' doc_start follows the layout (the separator opens its document).
"""
from __future__ import annotations

import importlib

import pytest
import torch

from kernels.reference import check_doc_start, thought_attention_ref, thought_attention_step_ref
from quietstar import Backends, LossConfig
from quietstar.attention import Documents, parallel_fn, step_fn
from quietstar.data import pack_rows
from quietstar.thoughts import quietstar_forward, sample_thoughts, talk_validity
from test_quietstar import V, assert_schedules_match, loss_and_grads, tiny_model
from test_thought_attention import ATOL, ERR_FACTOR, nan_empty, ref_and_grads  # noqa: F401  (nan_empty: autouse)

ta = importlib.import_module("kernels.thought_attention")


def doc_start_of(lengths_per_row) -> torch.Tensor:
    """(B, T) int32 doc_start of rows made of documents of the given lengths."""
    rows = []
    for lengths in lengths_per_row:
        row, s = [], 0
        for n in lengths:
            row += [s] * n
            s += n
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int32)


def _inputs(B, H, H_KV, T, L, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, T, L, D), (B, H_KV, T, D), (B, H_KV, T, D), (B, H_KV, T, L, D), (B, H_KV, T, L, D)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def _err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


# ----------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------
def test_reference_equals_each_document_alone():
    """Output rows of a document [a, b) = the unmasked reference on the slice [a, b) (float64)."""
    lengths = [[4, 1, 6, 2], [13]]
    ds = doc_start_of(lengths)
    q, kb, vb, kc, vc = _inputs(2, 4, 2, 13, 3, 16, seed=0)
    o = thought_attention_ref(q, kb, vb, kc, vc, doc_start=ds)
    for b, row in enumerate(lengths):
        a = 0
        for n in row:
            sl = slice(a, a + n)
            want = thought_attention_ref(*(x[b:b + 1, :, sl] for x in (q, kb, vb, kc, vc)))
            torch.testing.assert_close(o[b:b + 1, :, sl], want, rtol=0, atol=1e-12)
            a += n
    assert _err(o[0], thought_attention_ref(q, kb, vb, kc, vc)[0]) > 1e-3, "the mask must change a packed row"
    for step in (0, 2):
        st = thought_attention_step_ref(q[:, :, :, step], kb, vb, kc, vc, step, doc_start=ds)
        full = thought_attention_ref(q, kb, vb, kc, vc, doc_start=ds)   # q's step column over chain 0..step
        want = thought_attention_ref(q[:, :, :, :step + 1].contiguous(), kb, vb, kc[:, :, :, :step + 1],
                                     vc[:, :, :, :step + 1], doc_start=ds)[:, :, :, step]
        torch.testing.assert_close(st, want, rtol=0, atol=1e-12)
        if step == 2:
            torch.testing.assert_close(st, full[:, :, :, 2], rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad, exc, match", [
    (lambda ds: ds.float(), TypeError, "doc_start must be an int32 or int64"),
    (lambda ds: ds[:, :-1], ValueError, r"doc_start must be \(B=2, T=9\)"),
    (lambda ds: ds + 1, ValueError, "doc_start must give each position's document start"),
    (lambda ds: torch.tensor([[0, 0, 2, 1, 4, 4, 4, 4, 4]] * 2, dtype=torch.int32), ValueError, "document start"),
])
def test_bad_doc_start_is_named(bad, exc, match):
    ds = doc_start_of([[3, 6], [9]])
    check_doc_start(ds, 2, 9, "cpu")
    with pytest.raises(exc, match=match):
        check_doc_start(bad(ds), 2, 9, "cpu")
    q, kb, vb, kc, vc = _inputs(2, 2, 1, 9, 2, 16, seed=1, dtype=torch.float32)
    with pytest.raises(exc, match=match):
        ta.thought_attention(q, kb, vb, kc, vc, doc_start=bad(ds))
    with pytest.raises(exc, match=match):
        thought_attention_ref(q, kb, vb, kc, vc, doc_start=bad(ds))


# ----------------------------------------------------------------------------------------------
# Triton kernels (CPU: interpreter)
# ----------------------------------------------------------------------------------------------
# (B, H, H_KV, T, L, D, documents per row): several documents, a length-1 document, one ending at
# the last position, a row that is one document, GQA, odd T / L / D; T = 70 makes tiles skip blocks
KERNEL_CASES = [
    (2, 4, 2, 37, 5, 48, [[10, 1, 20, 6], [37]]),
    (1, 6, 2, 70, 3, 32, [[33, 1, 35, 1]]),
    (2, 2, 2, 19, 4, 16, [[1, 18], [5, 5, 9]]),
]


def _check_parallel(B, H, H_KV, T, L, D, lengths, dtype, seed):
    ds = doc_start_of(lengths)
    xs = _inputs(B, H, H_KV, T, L, D, seed)
    xs64 = [x.clone().requires_grad_() for x in xs]
    ref = thought_attention_ref(*xs64, doc_start=ds)
    do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    g_ref = torch.autograd.grad(ref, xs64, do)
    # PyTorch's own error in the test dtype
    xs_lo = [x.to(dtype).requires_grad_() for x in xs]
    if dtype == torch.float16:   # CPU SDPA in fp16 is emulated; the fp32 pass bounds what the dtype allows
        pt = thought_attention_ref(*[x.float() for x in xs_lo], doc_start=ds)
        g_pt = torch.autograd.grad(pt, xs_lo, do.float())
    else:
        pt = thought_attention_ref(*xs_lo, doc_start=ds)
        g_pt = torch.autograd.grad(pt, xs_lo, do.to(dtype))
    xs_k = [x.to(dtype).requires_grad_() for x in xs]
    o = ta.thought_attention(*xs_k, doc_start=ds)
    g_k = torch.autograd.grad(o, xs_k, do.to(dtype))
    for name, got, pyt, want in [("o", o, pt, ref)] + list(zip(("dq", "dkb", "dvb", "dkc", "dvc"), g_k, g_pt, g_ref)):
        bound = ERR_FACTOR * _err(pyt, want) + ATOL[dtype] * want.abs().max().item()
        assert torch.isfinite(got).all(), name
        assert _err(got, want) <= bound, f"{name}: {_err(got, want):.3e} > {bound:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"T{c[3]}L{c[4]}D{c[5]}")
def test_kernel_parallel_with_documents(case, dtype):
    _check_parallel(*case, dtype=dtype, seed=hash(case[3]) % 1000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"T{c[3]}L{c[4]}D{c[5]}")
def test_kernel_step_with_documents(case, dtype):
    B, H, H_KV, T, L, D, lengths = case
    ds = doc_start_of(lengths)
    q, kb, vb, kc, vc = _inputs(B, H, H_KV, T, L, D, seed=5)
    for step in sorted({0, L - 1}):
        want = thought_attention_step_ref(q[:, :, :, step], kb, vb, kc, vc, step, doc_start=ds)
        pt = thought_attention_step_ref(*(x.to(dtype).float() for x in (q[:, :, :, step], kb, vb, kc, vc)), step,
                                        doc_start=ds)
        got = ta.thought_attention_step(q[:, :, :, step].to(dtype), *(x.to(dtype) for x in (kb, vb, kc, vc)), step,
                                        doc_start=ds)
        bound = ERR_FACTOR * _err(pt, want) + ATOL[dtype] * want.abs().max().item()
        assert _err(got, want) <= bound, f"step {step}: {_err(got, want):.3e} > {bound:.3e}"


@pytest.mark.parametrize("int64", [False, True])
def test_kernel_one_document_row_is_the_unmasked_result_exactly(int64):
    """doc_start all zeros takes the masked code path; it must give today's result bit for bit."""
    B, H, H_KV, T, L, D = 2, 4, 2, 41, 3, 32
    ds = torch.zeros(B, T, dtype=torch.int64 if int64 else torch.int32)
    xs = [x.float().requires_grad_() for x in _inputs(B, H, H_KV, T, L, D, seed=3)]
    do = torch.randn(B, H, T, L, D, generator=torch.Generator().manual_seed(4))
    o0 = ta.thought_attention(*xs)
    g0 = torch.autograd.grad(o0, xs, do)
    o1 = ta.thought_attention(*xs, doc_start=ds)
    g1 = torch.autograd.grad(o1, xs, do)
    assert torch.equal(o0, o1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)
    q = xs[0].detach()[:, :, :, 1].contiguous()
    kv = [x.detach() for x in xs[1:]]
    assert torch.equal(ta.thought_attention_step(q, *kv, 1), ta.thought_attention_step(q, *kv, 1, doc_start=ds))


def test_kernel_skips_key_tiles_before_the_documents():
    """Keys of a first document spanning whole key blocks are NaN: a masked load would still turn
    0 * NaN into NaN, so finite outputs for the tiles after it prove their blocks were never read.
    Likewise the base dK/dV of those keys never reads the rows of later documents (NaN dO)."""
    B, H, H_KV, T, L, D = 1, 2, 1, 100, 3, 16
    first = 64                                         # two fp32 base key blocks (BLOCK_N = 32)
    ds = doc_start_of([[first, T - first]])
    q, kb, vb, kc, vc = _inputs(B, H, H_KV, T, L, D, seed=6, dtype=torch.float32)
    want = thought_attention_ref(q.double(), kb.double(), vb.double(), kc.double(), vc.double(), doc_start=ds)
    kb_nan, vb_nan = kb.clone(), vb.clone()
    kb_nan[:, :, :first], vb_nan[:, :, :first] = float("nan"), float("nan")
    o = ta.thought_attention(q, kb_nan, vb_nan, kc, vc, doc_start=ds)
    pos = ta._fwd_config(D, torch.float32, T)["BLOCK_M"] // L
    t0 = -(-first // pos) * pos                        # first tile that starts inside the second document
    assert t0 < T
    assert _err(o[:, :, t0:], want[:, :, t0:]) < 1e-5
    # the step kernel: rows are (position, head) pairs of POS positions
    pos_s = ta._step_config(D, torch.float32, H // H_KV)["BLOCK_M"] // (H // H_KV)
    t0s = -(-first // pos_s) * pos_s
    st = ta.thought_attention_step(q[:, :, :, 0].contiguous(), kb_nan, vb_nan, kc, vc, 0, doc_start=ds)
    st_ref = thought_attention_step_ref(q[:, :, :, 0].double(), kb.double(), vb.double(), kc.double(), vc.double(), 0,
                                        doc_start=ds)
    assert t0s < T and _err(st[:, :, t0s:], st_ref[:, :, t0s:]) < 1e-5
    # backward: NaN upstream gradient on the second document; keys of the first stay finite and right
    xs = [x.clone().requires_grad_() for x in (q, kb, vb, kc, vc)]
    o = ta.thought_attention(*xs, doc_start=ds)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(7))
    do[:, :, first:] = float("nan")
    dq, dkb, dvb, _, _ = torch.autograd.grad(o, xs, do)
    xr = [x.double().requires_grad_() for x in (q, kb, vb, kc, vc)]
    do_ref = do.double().nan_to_num(0.0)
    g_ref = torch.autograd.grad(thought_attention_ref(*xr, doc_start=ds), xr, do_ref)
    n_full = first - first % ta._bwd_base_config(D, torch.float32, T)["BLOCK_N"]
    assert _err(dkb[:, :, :n_full], g_ref[1][:, :, :n_full]) < 1e-5
    assert _err(dvb[:, :, :n_full], g_ref[2][:, :, :n_full]) < 1e-5
    assert _err(dq[:, :, :first], g_ref[0][:, :, :first]) < 1e-5


# ----------------------------------------------------------------------------------------------
# the other backends
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["split", "flex", "triton"])
def test_backends_match_reference_with_documents(backend):
    B, H, H_KV, T, L, D = 2, 4, 2, 21, 3, 16
    docs = Documents(doc_start_of([[1, 7, 13], [20, 1]]))
    xs = _inputs(B, H, H_KV, T, L, D, seed=8, dtype=torch.float32)
    want = thought_attention_ref(*(x.double() for x in xs), doc_start=docs.doc_start)
    got = parallel_fn(backend)(*xs, D ** -0.5, docs)
    assert _err(got, want) < 1e-5
    q, kb, vb, kc, vc = xs
    for step in (0, L - 1):
        with torch.no_grad():
            got = step_fn(backend)(q[:, :, :, step].contiguous(), kb, vb, kc, vc, step, D ** -0.5, docs)
        want = thought_attention_step_ref(*(x.double() for x in (q[:, :, :, step], kb, vb, kc, vc)), step,
                                          doc_start=docs.doc_start)
        assert _err(got, want) < 1e-5
    if backend == "split":   # gradients too, against the reference's autograd (flex cannot train on CPU; triton:
        # the kernel tests above)
        xr = [x.double().requires_grad_() for x in xs]
        xsp = [x.double().requires_grad_() for x in xs]
        do = torch.randn(want.shape[:3] + (L, D), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        g_ref = torch.autograd.grad(thought_attention_ref(*xr, scale=0.3, doc_start=docs.doc_start), xr, do)
        g_sp = torch.autograd.grad(parallel_fn("split")(*xsp, 0.3, docs), xsp, do)
        for a, b in zip(g_sp, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)   # the float64 references differ by ~2e-7 without documents too


def test_flex_masks_of_two_batches_interleaved():
    """Flex keeps one mask_mod per shape over a doc_start buffer: every call must still read its own batch's
    documents, whichever batch built its block mask last."""
    B, H, H_KV, T, L, D = 2, 2, 1, 15, 2, 16
    xs = _inputs(B, H, H_KV, T, L, D, seed=10, dtype=torch.float32)
    a, b = Documents(doc_start_of([[4, 11], [15]])), Documents(doc_start_of([[1, 1, 13], [7, 8]]))
    fn = parallel_fn("flex")
    for docs in (a, b, a, b):
        want = thought_attention_ref(*(x.double() for x in xs), doc_start=docs.doc_start)
        assert _err(fn(*xs, D ** -0.5, docs), want) < 1e-5


@pytest.mark.parametrize("attention", ["split", "flex", "triton"])
def test_sampling_backends_sample_the_same_thoughts_with_documents(attention):
    model = tiny_model()
    ids = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(5))
    ds = doc_start_of([[2, 9], [1, 4, 6]])
    want = sample_thoughts(model, ids, Backends("reference"), torch.Generator().manual_seed(6), docs=ds)
    got = sample_thoughts(model, ids, Backends(attention), torch.Generator().manual_seed(6), docs=ds)
    assert torch.equal(got, want)
    plain = sample_thoughts(model, ids, Backends("reference"), torch.Generator().manual_seed(6))
    assert not torch.equal(plain, want), "documents must change the sampled thoughts of packed rows"


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["reference", "split", "triton"])
def test_schedules_agree_with_documents(attention):
    model = tiny_model()
    ids = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(0))
    valid = torch.ones(2, 11, dtype=torch.bool)
    ds = doc_start_of([[4, 1, 6], [10, 1]])
    thoughts = sample_thoughts(model, ids, Backends("reference"), torch.Generator().manual_seed(1), docs=ds)
    ref_loss, ref_g, _ = loss_and_grads(model, ids, valid, thoughts, "sequential", Backends("reference"), ds)
    plain_loss, _, _ = loss_and_grads(model, ids, valid, thoughts, "sequential", Backends("reference"))
    assert (ref_loss - plain_loss).abs() > 1e-4, "documents must change the loss of packed rows"
    assert_schedules_match(model, ids, valid, thoughts, attention, ref_loss, ref_g, ds)


@pytest.mark.parametrize("attention", ["reference", "split", "triton"])
def test_one_document_rows_equal_the_unmasked_step_exactly(attention):
    model = tiny_model()
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(2))
    be = Backends(attention, "chunked")
    zeros = torch.zeros(2, 9, dtype=torch.int32)
    t0 = sample_thoughts(model, ids, be, torch.Generator().manual_seed(3))
    t1 = sample_thoughts(model, ids, be, torch.Generator().manual_seed(3), docs=zeros)
    assert torch.equal(t0, t1)
    l0, g0, _ = loss_and_grads(model, ids, None, t0, "sample-then-train", be)
    l1, g1, _ = loss_and_grads(model, ids, None, t0, "sample-then-train", be, zeros)
    assert torch.equal(l0, l1)
    for n in g0:
        assert torch.equal(g0[n], g1[n]), n


def test_packed_document_computes_what_it_computes_alone():
    """Row-relative RoPE: a document packed after another gives (float64) what it gives at the start of
    its own row; RoPE depends on s - t only, and the mask keeps both in one document."""
    model = tiny_model().double()
    g = torch.Generator().manual_seed(4)
    a, n = 5, 8                                          # document 1: positions 0..4, document 2: 5..12
    ids = torch.randint(0, V, (1, a + n), generator=g)
    ds = doc_start_of([[a, n]])
    th = torch.randint(1, V, (1, model.thought.P, a + n, model.thought.M), generator=g)
    be = Backends("split", "reference")
    _, _, packed = quietstar_forward(model, ids, None, LossConfig(), "sample-then-train", be, thoughts=th,
                                     doc_start=ds)
    _, _, alone = quietstar_forward(model, ids[:, a:], None, LossConfig(), "sample-then-train", be,
                                    thoughts=th[:, :, a:].contiguous())
    torch.testing.assert_close(packed.lp_base[:, a:-1], alone.lp_base[:, :-1], rtol=0, atol=1e-10)
    torch.testing.assert_close(packed.lp_mix[:, :, a:], alone.lp_mix, rtol=0, atol=1e-10)


def test_talk_targets_in_a_later_document_are_not_scored():
    valid = torch.ones(1, 8, dtype=torch.bool)
    valid[0, -1] = False
    ds = doc_start_of([[3, 5]])                          # document 2 opens at position 3 (its separator)
    valid[0, 2] = False                                  # position 2 predicts the separator: not scored
    _, plain = talk_validity(valid, 3)
    _, masked = talk_validity(valid, 3, ds)
    # position 1 (document 1): k=1 -> x2 (doc 1) scored; k=2 -> x3 separator, not scored either way;
    # k=3 -> x4 (doc 2) scored without documents only
    assert plain[0, 1].tolist() == [True, False, True]
    assert masked[0, 1].tolist() == [True, False, False]
    # inside document 2 nothing changes
    assert torch.equal(plain[0, 3:], masked[0, 3:])


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def test_pack_rows_doc_start_follows_the_layout():
    # stream: [0] 5 6 7 [0] 8 [0] 0 9 4 4 (a document may contain the separator id itself); 2 rows of 4
    ids, mask, ds = pack_rows([[5, 6, 7], [8], [0, 9, 4, 4]], T=4, sep_id=0, with_doc_start=True)
    assert ids.tolist() == [[0, 5, 6, 7], [0, 8, 0, 0]]
    assert ds.dtype == torch.int32
    assert ds.tolist() == [[0, 0, 0, 0], [0, 0, 2, 2]]
    ids2, mask2 = pack_rows([[5, 6, 7], [8], [0, 9, 4, 4]], T=4, sep_id=0)
    assert torch.equal(ids, ids2) and torch.equal(mask, mask2)
    # with a BOS the document still opens at its separator; targets never cross into a new document
    ids, mask, ds = pack_rows([[5, 6], [7, 8, 9]], T=9, sep_id=2, bos_id=1, with_doc_start=True)
    assert ids.tolist() == [[2, 1, 5, 6, 2, 1, 7, 8, 9]]
    assert ds.tolist() == [[0, 0, 0, 0, 4, 4, 4, 4, 4]]
    t = torch.arange(8)
    assert not (mask[0, :-1] & (ds[0, t + 1] != ds[0, t])).any()
    check_doc_start(ds, *ds.shape, "cpu")


# ----------------------------------------------------------------------------------------------
# end to end: quietstar-train
# ----------------------------------------------------------------------------------------------
def test_train_masks_documents_on_every_backend(tmp_path):
    """One step of quietstar-train on short packed documents: the backends agree with masking on (the same
    thoughts, the same loss), --no-document-mask changes the loss, and the held-out evaluation runs too."""
    import json

    from quietstar.train import config_from_args, train
    texts = ["Let x = 2.", "Then 2x = 4, so the answer is 4.", "A cat sat.", "Solve y + 1 = 3: y = 2.",
             "Primes: 2, 3, 5, 7.", "The sum of 1 and 1 is 2."] * 4
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    tiny = ["--model-hidden-size", "32", "--model-num-layers", "2", "--model-num-heads", "4", "--model-num-kv-heads",
            "2", "--model-head-dim", "16", "--model-intermediate-size", "64", "--M", "2", "--K", "2", "--P", "2",
            "--seq-len", "24", "--batch-size", "2", "--lm-head", "chunked", "--steps", "1", "--data", str(data)]
    assert config_from_args(tiny).train.document_mask
    first = {}
    for attention in ("reference", "split", "triton"):
        out = train(config_from_args(tiny + ["--attention", attention, "--out-dir", str(tmp_path / attention)]
                                     + (["--eval-rows", "2", "--eval-data", str(data)] if attention == "split" else [])),
                    progress=False)
        recs = [json.loads(line) for line in open(out["metrics"])]
        first[attention] = next(r for r in recs if "loss" in r)["loss"]
        if attention == "split":
            assert sum("eval" in r for r in recs) == 2
    assert first["split"] == pytest.approx(first["reference"], rel=1e-5)
    assert first["triton"] == pytest.approx(first["reference"], rel=1e-5)
    cfg = config_from_args(tiny + ["--attention", "reference", "--no-document-mask", "--out-dir", str(tmp_path / "off")])
    assert not cfg.train.document_mask
    out = train(cfg, progress=False)
    off = json.loads(open(out["metrics"]).readline())["loss"]
    # a random-init model predicts nearly uniformly, so the masks move the loss little; but well beyond the
    # backends' agreement above
    spread = max(abs(first[a] - first["reference"]) for a in first)
    assert abs(off - first["reference"]) > max(10 * spread, 2e-5 * abs(off))


# ----------------------------------------------------------------------------------------------
# GPU: bf16 kernels, CUDA-graph sampling with documents
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("B,H,H_KV,T,L,D", [(2, 32, 8, 256, 14, 128), (2, 9, 3, 200, 5, 64)])
def test_gpu_bf16_kernels_with_documents(B, H, H_KV, T, L, D):
    dev, dt = "cuda", torch.bfloat16
    lengths = [[100, 1, T - 101], [T - 1, 1]]
    ds = doc_start_of(lengths).to(dev)
    xs = [x.to(dev) for x in _inputs(B, H, H_KV, T, L, D, seed=11)]
    do = torch.randn_like(xs[0])
    ref, g_ref = ref_and_grads(xs, do, doc_start=ds)          # slice by slice: the whole batch at once is ~27 GB
    pt, g_pt = ref_and_grads([x.to(dt) for x in xs], do.to(dt), doc_start=ds)
    xk = [x.to(dt).requires_grad_() for x in xs]
    o = ta.thought_attention(*xk, doc_start=ds)
    g_k = torch.autograd.grad(o, xk, do.to(dt))
    for got, pyt, want in [(o, pt, ref)] + list(zip(g_k, g_pt, g_ref)):
        assert _err(got, want) <= ERR_FACTOR * _err(pyt, want) + ATOL[dt] * want.abs().max().item()
    step = L - 1
    st = ta.thought_attention_step(xs[0][:, :, :, step].to(dt).contiguous(), *(x.to(dt) for x in xs[1:]), step,
                                   doc_start=ds)
    want = thought_attention_step_ref(xs[0][:, :, :, step], *xs[1:], step, doc_start=ds)
    assert _err(st, want) <= 2 * _err(pt[:, :, :, step], ref[:, :, :, step]) + ATOL[dt] * want.abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["triton", "split"])
def test_gpu_graph_replay_with_documents(attention):
    """The graph's static doc_start buffer is refilled each call, and the masks built from it inside the
    graph: every replay equals the eager loop on its own batch's documents."""
    from quietstar.graphs import GraphedSampler
    dev = "cuda"
    model = tiny_model(M=3).to(dev)
    be = Backends(attention, "triton")
    sampler = GraphedSampler(model, be, torch.Generator(device=dev).manual_seed(3))
    for step, lengths in enumerate([[[4, 5], [9]], [[1, 1, 7], [3, 6]], [[9], [2, 7]]]):
        ids = torch.randint(0, V, (2, 9), device=dev, generator=torch.Generator(device=dev).manual_seed(step))
        ds = doc_start_of(lengths).to(dev)
        with torch.no_grad():
            got = sampler(ids, ds)
            want = sample_thoughts(model, ids, be, seeds=sampler.last_seeds(), docs=ds)
        assert torch.equal(got, want), f"step {step}: graph replay differs from the eager loop"
    assert len(sampler.graphs) == 1
    with torch.no_grad():
        sampler(ids)                            # without documents: a capture of its own
    assert len(sampler.graphs) == 2
