"""Generation with thoughts: the mixed prediction it uses equals training's k = 1 mixed prediction on the
same (forced) thought; the thought's K/V do not leak into later steps; padded rows equal rows alone;
with w = 0 it is plain greedy decoding; `quietstar-generate` runs on an export."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quietstar import Backends, LossConfig, ModelConfig, QuietStarModel, ThoughtConfig, build_decoder
from quietstar.generate import ThinkingDecoder, generate_with_thoughts
from quietstar.thoughts import quietstar_forward, sample_thoughts

REPO = Path(__file__).resolve().parents[1]
V = 97


def _model(mixing=0.3):
    torch.manual_seed(0)
    mc = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=64,
                     vocab_size=V, max_position_embeddings=64)
    model = QuietStarModel(build_decoder(mc), ThoughtConfig(M=3, K=2, P=2), marker_init_id=5).eval()
    if mixing:
        with torch.no_grad():
            model.mixing_head.net[-1].weight.normal_(0, mixing)
            model.mixing_head.net[-1].bias.fill_(0.2)
    return model


def test_mixed_prediction_equals_training_k1():
    model = _model()
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(1))
    thoughts = sample_thoughts(model, ids, Backends("reference", "reference"), torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, _, ex = quietstar_forward(model, ids, None, LossConfig(), "sequential", Backends("reference", "reference"),
                                     thoughts=thoughts)
    for t in (0, 4, 8):
        dec = ThinkingDecoder(model, ids[:, : t + 1])
        for p in range(2):
            th = dec.think(thought=thoughts[:, p, t])
            got = th.logp_mix.gather(1, ids[:, t + 1:t + 2])[:, 0]
            assert torch.allclose(got, ex.lp_mix[:, p, t, 0], atol=1e-5, rtol=0), (t, p, got, ex.lp_mix[:, p, t, 0])
            assert torch.allclose(th.w, ex.w[:, p, t, 0], atol=1e-6)


def test_thoughts_do_not_leak_into_later_steps():
    model = _model()
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(3))
    forced = torch.randint(3, V, (2, 3), generator=torch.Generator().manual_seed(4))
    dec = ThinkingDecoder(model, ids[:, :5])
    n = dec.cache.get_seq_length()
    dec.think(torch.Generator().manual_seed(5))               # a sampled thought, then dropped
    assert dec.cache.get_seq_length() == n
    dec.advance(ids[:, 5])
    a = dec.think(thought=forced)
    b = ThinkingDecoder(model, ids[:, :6]).think(thought=forced)
    assert torch.allclose(a.logp_mix, b.logp_mix, atol=1e-5, rtol=0)
    assert (a.logp_mix - dec.base_logprobs()).abs().max() > 1e-3, "the thought must change the prediction"


def test_left_padded_rows_equal_rows_alone():
    model = _model()
    g = torch.Generator().manual_seed(6)
    a, b = torch.randint(3, V, (7,), generator=g), torch.randint(3, V, (4,), generator=g)
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 3:], mask[1, 3:] = b, 1
    forced = torch.randint(3, V, (2, 3), generator=g)
    both = ThinkingDecoder(model, ids, mask)
    both.advance(torch.tensor([11, 12]))
    tb = both.think(thought=forced)
    for i, row in enumerate((a, b)):
        alone = ThinkingDecoder(model, row[None])
        alone.advance(torch.tensor([11 + i]))
        ta = alone.think(thought=forced[i:i + 1])
        assert torch.allclose(tb.logp_mix[i], ta.logp_mix[0], atol=1e-5, rtol=0), i


def test_zero_mixing_head_is_plain_greedy_decoding():
    model = _model(mixing=0)
    ids = torch.randint(3, V, (2, 6), generator=torch.Generator().manual_seed(7))
    toks, thoughts, w = generate_with_thoughts(model, ids, max_new_tokens=6, generator=torch.Generator().manual_seed(8))
    plain = model.lm.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[:, 6:]
    assert torch.equal(toks, plain) and bool((w == 0).all())
    assert thoughts.shape == (2, 6, 1, 3) and not torch.isin(thoughts, torch.tensor(model.banned_ids)).any()


def test_stop_ids_end_rows_and_bad_input():
    model = _model()
    ids = torch.randint(3, V, (2, 5), generator=torch.Generator().manual_seed(9))
    toks, _, _ = generate_with_thoughts(model, ids, max_new_tokens=8, generator=torch.Generator().manual_seed(1))
    first = toks[:, 0].tolist()
    stopped, _, _ = generate_with_thoughts(model, ids, max_new_tokens=8, stop_ids=first,
                                           generator=torch.Generator().manual_seed(1))
    assert stopped.shape[1] == 1 and stopped[:, 0].tolist() == first
    with pytest.raises(ValueError, match="left"):
        ThinkingDecoder(model, ids, torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="thought must be"):
        ThinkingDecoder(model, ids).think(thought=torch.zeros(2, 2, dtype=torch.long))


def test_quietstar_generate_cli_on_an_export(tmp_path, tiny_export):
    out = tiny_export(P=1)
    r = subprocess.run([sys.executable, "-m", "quietstar.generate", str(out), "--prompt", "1 + 1 =", "--prompt", "x",
                        "--max-new-tokens", "3", "--show-thoughts", "--device", "cpu"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("=== ") == 2 and r.stdout.count("<|thought|>") >= 2, r.stdout


def test_quietstar_generate_takes_the_stock_model(capsys):
    """`quietstar-generate smollm2-135m` decodes the stock model, as `quietstar-eval smollm2-135m` scores it (it
    was "no such folder"); its mixing head is zero, so greedy decoding with thoughts gives the plain tokens."""
    from quietstar.generate import main
    texts = []
    for extra in ([], ["--no-thoughts"]):
        assert main(["smollm2-135m", "--prompt", "The capital of France is", "--max-new-tokens", "3",
                     "--device", "cpu", *extra]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0].startswith("=== 'The capital of France is'\nThe capital of France is") and texts[0] == texts[1]
    assert len(texts[0].splitlines()[1]) > len("The capital of France is")


def test_bench_generate_runs_and_the_naive_decoder_agrees(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/bench_generate.py", "--model", "tiny", "--B", "2", "--prompt", "6",
                        "--new", "3", "--M", "2", "--repeats", "1", "--device", "cpu", "--out", str(tmp_path),
                        "--tag", "g"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    meta = json.loads((tmp_path / "g.json").read_text())["meta"]
    assert meta["naive_and_cached_tokens_equal"] is True and meta["thinking_vs_M_plus_3_plain_steps"] > 0
    assert meta["dtype"] == "float32" and "one_after_another_vs_together" not in meta
    r = subprocess.run([sys.executable, "benchmarks/bench_generate.py", "--model", "tiny", "--B", "2", "--prompt", "5",
                        "--new", "2", "--M", "2", "--repeats", "1", "--device", "cpu", "--out", str(tmp_path),
                        "--thoughts", "3"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((tmp_path / "generate_cpu_tiny_B2_P3.json").read_text())["meta"]
    assert meta["thoughts"] == 3 and meta["together_and_one_after_another_tokens_equal"] is True
    assert meta["one_after_another_vs_together"] > 0
    assert "3 thoughts per token together (think_many)" in (tmp_path / "generate_cpu_tiny_B2_P3.md").read_text()
    r = subprocess.run([sys.executable, "benchmarks/bench_generate.py", "--model", "tiny", "--B", "1", "--prompt", "4",
                        "--new", "2", "--M", "2", "--repeats", "1", "--device", "cpu", "--out", str(tmp_path),
                        "--dtype", "bfloat16"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "generate_cpu_tiny_B1_bfloat16.json").read_text())["meta"]["dtype"] == "bfloat16"


def test_end_token_ids_include_the_chat_end_of_turn():
    from quietstar.assets import mistral_tokenizer, smollm2_tokenizer
    from quietstar.generate import end_token_ids
    assert end_token_ids(smollm2_tokenizer()) == [0, 2]      # <|endoftext|> (its eos) and <|im_end|>
    assert end_token_ids(mistral_tokenizer()) == [2]         # </s>


def test_cli_bad_export_is_one_line(tmp_path, capsys):
    from quietstar.generate import main
    rc = main([str(tmp_path / "missing"), "--prompt", "x", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("quietstar-generate: error: "), err
    assert f"{tmp_path / 'missing'}: no such folder" in err[0]
    with pytest.raises(FileNotFoundError):           # --debug: the traceback instead
        main([str(tmp_path / "missing"), "--prompt", "x", "--device", "cpu", "--debug"])


def test_cli_bad_options_are_one_line(tmp_path, capsys, tiny_export):
    """Bad options end in one line naming the option, before the model is loaded where they can."""
    from quietstar.generate import main
    exp = tiny_export(P=1)
    capsys.readouterr()
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\t\n")
    cases = [(["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
             (["--prompt", "x", "--thoughts", "0"], "--thoughts must be >= 1"),
             (["--prompt", "x", "--temperature", "-1"], "--temperature must be >= 0"),
             (["--prompt", "x", "--no-thoughts", "--show-thoughts"], "--no-thoughts decodes without thoughts"),
             (["--prompts-file", str(tmp_path / "none.txt")], "--prompts-file"),
             (["--prompts-file", str(tmp_path / "empty.txt")], f"--prompts-file {tmp_path / 'empty.txt'}: no prompts"),
             (["--prompt", "x", "--prompts-file", str(tmp_path / "blank.txt")],
              f"--prompts-file {tmp_path / 'blank.txt'}: no prompts"),
             (["--prompt", "x", "--stop", "ok", "--stop", ""], "--stop: an empty stop string"),
             (["--prompt", "x", "--device", "gpu"], "--device must be auto, cpu or cuda, got 'gpu'"),
             ([], "give --prompt TEXT or --prompts-file FILE"),
             (["--prompt", "x", "--dtype", "int8"], None)]             # argparse's own message, exit 2
    if not torch.cuda.is_available():
        cases.append((["--prompt", "x", "--device", "cuda"], "--device cuda was asked for but no CUDA GPU"))
    for argv, needle in cases:
        if needle is None:
            with pytest.raises(SystemExit) as e:
                main([str(exp)] + argv)
            assert e.value.code == 2 and "--dtype" in capsys.readouterr().err
            continue
        rc = main([str(exp)] + argv + (["--device", "cpu"] if "--device" not in argv else []))
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("quietstar-generate: error: "), (argv, err)
        assert needle in err[0], (argv, err)
    assert main([str(exp), "--prompts-file", str(tmp_path / "f.txt"), "--max-new-tokens", "1", "--device", "cpu"]) == 0
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        from quietstar import QuietStarModel
        from quietstar.generate import generate_with_thoughts
        generate_with_thoughts(QuietStarModel.from_pretrained(exp), torch.ones(1, 2, dtype=torch.long),
                               max_new_tokens=0)


def test_no_thoughts_sampling_follows_the_seed(tiny_export, capsys):
    """quietstar-generate --no-thoughts --temperature T (transformers' sampler, which draws from torch's global
    RNG): the same --seed gives the same text, another seed other text (random weights: nearly uniform over
    32,000 tokens); the caller's global RNG is not reseeded by --seed (its state after does not depend on it)."""
    from quietstar.generate import main
    exp = tiny_export(P=1)
    capsys.readouterr()

    def text(seed):
        assert main([str(exp), "--prompt", "1 + 1 =", "--no-thoughts", "--temperature", "1", "--seed", str(seed),
                     "--max-new-tokens", "6", "--device", "cpu"]) == 0
        return capsys.readouterr().out
    after = []
    for seed in (5, 5, 6):
        torch.manual_seed(123)
        after.append((text(seed), torch.rand(3)))
    assert after[0][0] == after[1][0] and after[2][0] != after[0][0]
    assert torch.equal(after[0][1], after[2][1])     # fork_rng: the caller's RNG state, whatever --seed was


def test_bf16_weights_decode_like_fp32(tiny_export):
    """quietstar-generate's --dtype: "auto" is bf16 on CUDA; an export loaded in bf16 (markers and mixing head
    included) decodes to fp32 log-probabilities close to the fp32 model's, and the CLI runs with it."""
    from quietstar.generate import weights_dtype
    assert weights_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert weights_dtype("auto", torch.device("cpu")) == torch.float32
    assert weights_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="--dtype"):
        weights_dtype("int8", torch.device("cpu"))
    out = tiny_export(P=1)
    m32 = QuietStarModel.from_pretrained(out).eval()
    m16 = QuietStarModel.from_pretrained(out, dtype=torch.bfloat16).eval()
    with torch.no_grad():     # a mixing head that mixes, so that the bf16 mixing head is used
        for m in (m32, m16):
            m.mixing_head.net[-1].bias.fill_(0.3)
    assert {p.dtype for p in m16.parameters()} == {torch.bfloat16}
    V32 = m32.lm_head_weight.shape[0]
    ids = torch.randint(3, V32, (2, 6), generator=torch.Generator().manual_seed(7))
    forced = torch.randint(3, V32, (2, 2), generator=torch.Generator().manual_seed(4))
    a = ThinkingDecoder(m32, ids).think(thought=forced)
    b = ThinkingDecoder(m16, ids).think(thought=forced)
    assert b.logp_mix.dtype == torch.float32
    err = (a.logp_mix - b.logp_mix).abs().max()
    assert 0 < err < 0.1, err                     # bf16 rounding, not another computation
    assert torch.allclose(a.w, b.w.float(), atol=2e-2)
    r = subprocess.run([sys.executable, "-m", "quietstar.generate", str(out), "--prompt", "1 + 1 =",
                        "--max-new-tokens", "2", "--device", "cpu", "--dtype", "bfloat16"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.count("=== ") == 1, r.stderr[-3000:]


def test_think_many_equals_thoughts_one_at_a_time():
    """n thoughts decoded as one batch (each row's cache copied n times) equal n single thoughts on the same
    forced tokens, padded rows included; the cache and the later steps are as before; bad n and shapes refused."""
    model = _model()
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, V, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    ids[1, :2], mask[1, :2] = 0, 0                           # row 1 left-padded
    forced = torch.randint(3, V, (2, 3, 3), generator=g)     # (B, n, M)
    dec = ThinkingDecoder(model, ids, mask)
    n = dec.cache.get_seq_length()
    many = dec.think_many(3, thoughts=forced)
    assert dec.cache.get_seq_length() == n and dec.mask.shape == (2, 7)
    assert all(layer.keys.shape[0] == 2 for layer in dec.cache.layers)
    assert many.tokens.shape == (2, 3, 3) and many.w.shape == (2, 3) and many.logp_mix.shape == (2, 3, V)
    assert torch.equal(many.tokens, forced)
    for p in range(3):
        one = dec.think(thought=forced[:, p])
        assert torch.allclose(many.logp_mix[:, p], one.logp_mix, atol=1e-5, rtol=0), p
        assert torch.allclose(many.w[:, p], one.w, atol=1e-6), p
    assert (many.logp_mix[:, 0] - many.logp_mix[:, 1]).abs().max() > 1e-3, "different thoughts, different mixes"
    dec.advance(torch.tensor([11, 12]))                      # the base step after it sees the prefix only
    ref = ThinkingDecoder(model, ids, mask)
    ref.advance(torch.tensor([11, 12]))
    assert torch.allclose(dec.h_base, ref.h_base, atol=1e-6)
    sampled = dec.think_many(4, torch.Generator().manual_seed(3))
    assert not torch.isin(sampled.tokens, torch.tensor(model.banned_ids)).any()
    for b in range(2):      # each copy draws its own noise: the 4 thoughts of a row are not one thought 4 times
        assert len({tuple(t) for t in sampled.tokens[b].tolist()}) > 1, sampled.tokens[b]
    with pytest.raises(ValueError, match="n must be"):
        dec.think_many(0)
    with pytest.raises(ValueError, match="thoughts must be"):
        dec.think_many(2, thoughts=forced)


def test_generate_averages_the_n_thoughts_probabilities():
    """generate_with_thoughts(n_thoughts=n): the next token is the argmax of the mean of the n mixed
    probabilities; with w = 0 every thought gives the base prediction, so n = 3 decodes like n = 1."""
    model = _model()
    ids = torch.randint(3, V, (2, 5), generator=torch.Generator().manual_seed(12))
    toks, thoughts, w = generate_with_thoughts(model, ids, max_new_tokens=3, n_thoughts=3,
                                               generator=torch.Generator().manual_seed(13))
    assert thoughts.shape == (2, 3, 3, 3) and w.shape == (2, 3, 3)
    dec = ThinkingDecoder(model, ids)
    for j in range(3):
        th = dec.think_many(3, thoughts=thoughts[:, j])
        assert torch.allclose(th.w, w[:, j], atol=1e-6)
        assert torch.equal(th.logp_mix.exp().mean(1).argmax(-1), toks[:, j]), j
        dec.advance(toks[:, j])
    plain = _model(mixing=0)
    a, _, _ = generate_with_thoughts(plain, ids, max_new_tokens=4, n_thoughts=3, generator=torch.Generator())
    b, _, _ = generate_with_thoughts(plain, ids, max_new_tokens=4, n_thoughts=1, generator=torch.Generator())
    assert torch.equal(a, b)


@pytest.mark.parametrize("fail_at", ["copy", "forward"])
def test_an_error_inside_a_thought_leaves_the_cache_as_before(fail_at, monkeypatch):
    """An error while the thoughts decode (out of memory in the copies, or inside a forward, where the layers
    before it already hold one token more) leaves the cache at the prefix: later steps are as if it never ran."""
    model = _model()
    ids = torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(14))
    dec = ThinkingDecoder(model, ids)
    shapes = [tuple(layer.keys.shape) for layer in dec.cache.layers]
    if fail_at == "copy":     # the second layer's copy fails: the first one holds 2 n rows, the second 2
        layer = dec.cache.layers[1]
        monkeypatch.setattr(layer, "batch_repeat_interleave", lambda n: (_ for _ in ()).throw(MemoryError("copy")))
        err = MemoryError
    else:                     # layer 0's MLP fails on the second step, after its attention cached the step:
        mlp, calls = model.lm.model.layers[0].mlp, []   # layer 0 is one token ahead of layer 1
        real = mlp.forward
        monkeypatch.setattr(mlp, "forward", lambda x: (calls.append(1), real(x))[1] if len(calls) < 1 else
                            (_ for _ in ()).throw(RuntimeError("forward")))
        err = RuntimeError
    with pytest.raises(err):
        dec.think_many(3, torch.Generator().manual_seed(1))
    monkeypatch.undo()
    assert [tuple(layer.keys.shape) for layer in dec.cache.layers] == shapes and dec.mask.shape == (2, 7)
    dec.advance(torch.tensor([11, 12]))
    ref = ThinkingDecoder(model, ids)
    ref.advance(torch.tensor([11, 12]))
    assert torch.allclose(dec.h_base, ref.h_base, atol=1e-6)


def test_a_refused_or_failed_advance_leaves_the_decoder_as_before(monkeypatch):
    """advance checks `tokens` (a (B,) int tensor on the decoder's device, ids in [0, V)) before anything changes,
    and a step that fails inside the forward restores the cache, the mask and the positions: the next results
    equal a fresh decoder's exactly. (The position and the mask used to move on first: later log-probs were off.)
    Forced thoughts are checked likewise."""
    model = _model()
    g = torch.Generator().manual_seed(15)
    ids = torch.randint(3, V, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0                           # row 1 left-padded
    nxt, forced = torch.tensor([11, 12]), torch.randint(3, V, (2, 3), generator=g)
    ref = ThinkingDecoder(model, ids, mask)
    ref.advance(nxt)
    want = ref.think(thought=forced)
    cases = [(torch.tensor([11, 12, 13]), ValueError, r"tokens must be \(B=2,\)"),
             (nxt[:, None], ValueError, r"tokens must be \(B=2,\)"),
             (nxt.float(), TypeError, "tokens must be an int64 tensor"),
             ([11, 12], TypeError, "tokens must be an int64 tensor"),
             (torch.tensor([11, V]), ValueError, r"tokens must hold token ids in \[0, V=97\), got \[97\]"),
             (torch.tensor([-1, 12]), ValueError, r"tokens must hold token ids in \[0, V=97\)"),
             ("a forward that fails", RuntimeError, "forward")]
    for tokens, err, msg in cases:
        dec = ThinkingDecoder(model, ids, mask)
        if isinstance(tokens, str):   # layer 1's MLP fails: layer 0 and layer 1's attention cached the step already
            mlp = model.lm.model.layers[1].mlp
            monkeypatch.setattr(mlp, "forward", lambda x: (_ for _ in ()).throw(RuntimeError("forward")))
            tokens = nxt
        with pytest.raises(err, match=msg):
            dec.advance(tokens)
        monkeypatch.undo()
        assert dec.mask.shape == (2, 6) and dec.cache.get_seq_length() == 6 and dec.length == 6, tokens
        dec.advance(nxt)
        got = dec.think(thought=forced)
        assert torch.equal(dec.pos, ref.pos) and torch.equal(dec.mask, ref.mask), tokens
        assert torch.equal(got.logp_mix, want.logp_mix) and torch.equal(got.w, want.w), tokens
    with pytest.raises(TypeError, match="thought must be an int64 tensor"):
        dec.think(thought=forced.float())
    with pytest.raises(ValueError, match=r"thought must hold token ids in \[0, V=97\)"):
        dec.think(thought=forced + V)
    with pytest.raises(TypeError, match="n must be an int"):
        dec.think_many(2.0)


def test_any_nonzero_attention_mask_value_attends():
    """attention_mask values other than 0 and 1 (mask * 2, a bool or float mask) mean what they mean to Hugging Face
    models, non-zero attends: the same positions, thoughts and tokens as the 0/1 mask. (The RoPE positions were
    the mask's sums: mask * 2 shifted them.)"""
    model = _model()
    g = torch.Generator().manual_seed(16)
    ids = torch.randint(3, V, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    forced = torch.randint(3, V, (2, 3), generator=g)
    want = ThinkingDecoder(model, ids, mask).think(thought=forced)
    toks = generate_with_thoughts(model, ids, mask, max_new_tokens=2, generator=torch.Generator().manual_seed(1))
    for m in (mask * 2, mask.bool(), mask.float() * 0.5):
        dec = ThinkingDecoder(model, ids, m)
        assert torch.equal(dec.pos, torch.tensor([5, 2])) and torch.equal(dec.think(thought=forced).logp_mix,
                                                                         want.logp_mix), m
        got = generate_with_thoughts(model, ids, m, max_new_tokens=2, generator=torch.Generator().manual_seed(1))
        assert all(torch.equal(a, b) for a, b in zip(got, toks)), m


def test_generate_refuses_bad_arguments_before_any_work(monkeypatch):
    """Each bad argument of generate_with_thoughts is one clear error naming it, raised before the decoder runs;
    max_new_tokens must keep the last thought within max_position_embeddings (as quietstar_forward's chains)."""
    model = _model()                                         # max_position_embeddings=64, M=3
    ids = torch.randint(3, V, (2, 5), generator=torch.Generator().manual_seed(17))
    cases = [({"input_ids": ids[0]}, ValueError, r"input_ids must be \(B, S\)"),
             ({"input_ids": ids[:0]}, ValueError, r"input_ids must be \(B, S\) with B >= 1"),
             ({"input_ids": ids.tolist()}, TypeError, "input_ids must be"),
             ({"input_ids": ids.float()}, TypeError, "input_ids must be an int64 tensor"),
             ({"input_ids": ids + V}, ValueError, r"input_ids must hold token ids in \[0, V=97\)"),
             ({"attention_mask": [[1] * 5] * 2}, TypeError, "attention_mask must be a tensor"),
             ({"temperature": float("nan")}, ValueError, "temperature must be a finite number >= 0"),
             ({"temperature": "1"}, TypeError, "temperature must be a number"),
             ({"n_thoughts": 0}, ValueError, "n_thoughts must be >= 1"),
             ({"n_thoughts": 2.5}, TypeError, "n_thoughts must be an int"),
             ({"max_new_tokens": -1}, ValueError, "max_new_tokens must be >= 1"),
             ({"max_new_tokens": 1.5}, TypeError, "max_new_tokens must be an int"),
             ({"stop_ids": 2}, TypeError, "stop_ids must be a sequence of token ids"),
             ({"stop_ids": "</s>"}, TypeError, "stop_ids must be a sequence of token ids"),
             ({"stop_ids": [2.0]}, ValueError, "stop_ids must hold int token ids"),
             ({"generator": 123}, TypeError, "generator must be a torch.Generator"),
             ({"input_ids": torch.full((1, 59), 5), "max_new_tokens": 2}, ValueError,
              r"max_new_tokens=2 does not fit: .* position 64, .*max_position_embeddings=64 \(at most 1 new"),
             ({"max_new_tokens": 200}, ValueError, "max_new_tokens=200 does not fit")]
    monkeypatch.setattr(model.lm.model, "forward", lambda *a, **k: pytest.fail("the decoder ran"))
    for kw, err, msg in cases:
        with pytest.raises(err, match=msg):
            generate_with_thoughts(model, **{"input_ids": ids, "max_new_tokens": 2, **kw})
    monkeypatch.undo()
    toks, _, _ = generate_with_thoughts(model, torch.full((1, 59), 5), max_new_tokens=1)   # the longest that fits
    assert toks.shape == (1, 1)
    a, _, _ = generate_with_thoughts(model, ids, max_new_tokens=2, stop_ids=torch.tensor([2, 3]),
                                     generator=torch.Generator().manual_seed(0))    # a tensor of stop ids works
    b, _, _ = generate_with_thoughts(model, ids, max_new_tokens=2, stop_ids=[2, 3],
                                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)



def test_decoder_used_directly_keeps_within_max_position_embeddings():
    """ThinkingDecoder checks positions as generate_with_thoughts does (it ran past max_position_embeddings
    silently: RoPE has no table to overflow): a thought whose <eot> would reach position 64, an advance to position
    64 and a prompt of 65 tokens are refused, and a refusal changes nothing."""
    model = _model()                                         # max_position_embeddings=64, M=3
    ids = torch.full((1, 59), 5)
    dec = ThinkingDecoder(model, ids)                        # last position 58: a thought reaches 58 + 5 = 63
    forced = torch.full((1, 3), 7)
    before = dec.think(thought=forced).logp_mix
    dec.advance(torch.tensor([6]))                           # position 59: a thought would reach 64
    with pytest.raises(ValueError, match=r"a thought after position 59 would reach position 64 .*"
                                         r"max_position_embeddings=64"):
        dec.think(thought=forced)
    for _ in range(4):                                       # base steps still fit, up to position 63
        dec.advance(torch.tensor([6]))
    with pytest.raises(ValueError, match=r"advance: position 64 is past the model's max_position_embeddings=64"):
        dec.advance(torch.tensor([6]))
    assert dec.last_pos == 63 and dec.length == 64 and dec.cache.get_seq_length() == 64
    with pytest.raises(ValueError, match=r"input_ids: a prompt of 65 tokens does not fit .*=64"):
        ThinkingDecoder(model, torch.full((1, 65), 5))
    full = ThinkingDecoder(model, torch.full((1, 64), 5))    # the longest prompt: its base prediction only
    assert full.last_pos == 63 and full.base_logprobs().shape == (1, V)
    with pytest.raises(ValueError, match=r"a thought after position 63 would reach position 68"):
        full.think_many(2, thoughts=torch.full((1, 2, 3), 7))
    # left padding does not count: positions are per row
    padded = ThinkingDecoder(model, torch.full((1, 61), 5), torch.tensor([[0, 0] + [1] * 59]))
    assert padded.last_pos == 58 and torch.allclose(padded.think(thought=forced).logp_mix, before, atol=1e-5)


def _decode(model, zero, ids, mask, forced, dev):
    """On `dev`: a forced thought, an advance of left-padded rows and another forced thought (`model`), then greedy
    generation with a stop id by `zero`, whose mixing head is zero (w = 0: the sampled thoughts change nothing);
    the results on the CPU."""
    dec = ThinkingDecoder(model, ids.to(dev), mask.to(dev))
    a = dec.think(thought=forced.to(dev))
    dec.advance(ids[:, -1].to(dev))
    b = dec.think(thought=forced.to(dev))
    toks, _, w = generate_with_thoughts(zero, ids.to(dev), mask.to(dev), max_new_tokens=4, temperature=0,
                                        stop_ids=[2], generator=torch.Generator(dev).manual_seed(0))
    return a.logp_mix.cpu(), b.logp_mix.cpu(), b.w.cpu(), toks.cpu(), w.cpu()


@pytest.mark.gpu
def test_gpu_decoding_equals_the_cpu():
    """Generation on CUDA (fp32 here; quietstar-generate's bf16 is test_bf16_weights_decode_like_fp32's rounding):
    the thinking decoder's mixed log-probs after a forced thought, an advance of left-padded rows and another
    thought equal the CPU's, and greedy generation (w = 0) gives the CPU's tokens."""
    import copy
    cpu, zero = _model(), _model(mixing=0)
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    forced = torch.randint(3, V, (2, 3), generator=torch.Generator().manual_seed(12))
    want = _decode(cpu, zero, ids, mask, forced, "cpu")
    got = _decode(copy.deepcopy(cpu).cuda(), copy.deepcopy(zero).cuda(), ids, mask, forced, "cuda")
    for name, x, y in zip(("logp_mix", "logp_mix after advance", "w"), want[:3], got[:3]):
        torch.testing.assert_close(y, x, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert torch.equal(got[3], want[3]), (got[3], want[3])
    assert bool((got[4] == 0).all()) and bool((want[4] == 0).all())
