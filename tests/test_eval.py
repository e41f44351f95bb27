"""quietstar-eval (held-out part): the one-row-per-document layout, the hard-token mask, the with/without-
thought NLLs (equal when w = 0; the base NLL the same whether or not thoughts are sampled), bits per byte,
and the CLI round trip --save-hard-mask / --hard-mask on an export."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quietstar import Backends, ModelConfig, QuietStarModel, ThoughtConfig, build_decoder
from quietstar.evaluate import (commonsense_qa, document_rows, final_number, hard_mask, heldout_losses, scored_rows,
                                token_nll)

REPO = Path(__file__).resolve().parents[1]


def test_document_rows_layout():
    ids, valid = document_rows([[5, 6, 7], list(range(10, 30))], T=6, sep_id=0)
    assert ids.tolist() == [[0, 5, 6, 7, 0, 0], [0, 10, 11, 12, 13, 14]]
    assert valid.tolist() == [[True, True, True, False, False, False], [True] * 5 + [False]]


def test_hard_mask_is_the_top_fraction_of_scored_targets():
    nll = torch.tensor([[9.0, 1.0, 5.0, 100.0], [2.0, 8.0, 7.0, 3.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    m = hard_mask(nll, valid, fraction=2 / 7)        # 7 scored targets: the 2 hardest, never the unscored 100
    assert m.tolist() == [[True, False, False, False], [False, True, False, False]]


def _model(mixing):
    torch.manual_seed(0)
    mc = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=64,
                     vocab_size=97, max_position_embeddings=64)
    model = QuietStarModel(build_decoder(mc), ThoughtConfig(M=2, K=2, P=2), marker_init_id=5)
    if mixing:
        with torch.no_grad():
            model.mixing_head.net[-1].bias.fill_(0.5)
    return model


def test_with_and_without_thoughts():
    ids, valid = document_rows([list(range(3, 15)), [40, 41, 42, 43]], T=10, sep_id=0)
    be = Backends("split", "chunked")
    zero = _model(mixing=False)
    b0, m0 = token_nll(zero, ids, valid, be, 2, True, torch.Generator().manual_seed(1))
    plain, none = token_nll(zero, ids, valid, be, 2, False)
    # the base NLL, with or without thoughts: computed the same way (the base pass, the LM-head op), to the bit, so
    # that a control arm and a Quiet-STaR arm (quietstar-eval, the learning experiment) share their numerics
    assert none is None and torch.equal(plain, b0)
    assert torch.allclose(m0, b0, atol=1e-6)                          # w = 0: the thought changes nothing
    assert (b0[~valid] == 0).all() and (b0[valid] > 0).all()
    _, m1 = token_nll(_model(mixing=True), ids, valid, be, 2, True, torch.Generator().manual_seed(1))
    assert (m1 - b0)[valid].abs().max() > 1e-3


def test_without_thoughts_with_documents():
    """The control's held-out NLL with packed documents: one document is the plain causal NLL; two documents
    give the thought path's base NLL under the same masking (each position sees only its own document)."""
    ids = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(5))
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[:, -1] = False
    be = Backends("split", "chunked")
    model = _model(mixing=False)
    one_doc = torch.zeros(2, 10, dtype=torch.int32)
    plain, _ = token_nll(model, ids, valid, be, 2, False)
    docs, none = token_nll(model, ids, valid, be, 2, False, doc_start=one_doc)
    assert none is None and torch.allclose(docs, plain, atol=1e-5)
    two = torch.tensor([0] * 4 + [4] * 6, dtype=torch.int32).expand(2, 10).contiguous()
    split, _ = token_nll(model, ids, valid, be, 2, False, doc_start=two)
    base, _ = token_nll(model, ids, valid, be, 2, True, torch.Generator().manual_seed(1), doc_start=two)
    assert torch.equal(split, base)
    assert (split[:, 4:] - plain[:, 4:]).abs().max() > 1e-3            # the second document no longer sees the first


def test_training_eval_bar_is_erased(capsys):
    """Training's periodic held-out eval erases its progress bar (the log line says the result); the
    stand-alone evaluation keeps its bar."""
    ids, valid = document_rows([list(range(3, 15))], T=10, sep_id=0)
    model, be = _model(mixing=False), Backends("split", "chunked")
    token_nll(model, ids, valid, be, 1, False, progress=True, desc="kept")
    kept = capsys.readouterr().err
    assert "kept" in kept and kept.endswith("\n")
    res = heldout_losses(model, ids, valid, be, 1, thoughts=False, progress=True)
    erased = capsys.readouterr().err
    assert "held-out eval" in erased and not erased.endswith("\n")      # the bar's line is blanked, not ended
    assert res["heldout_targets"] == int(valid[:, :-1].sum())


@pytest.mark.gpu
def test_gpu_token_nll_triton_backends():
    """The evaluation on the fast path (what learn_experiment.py times and runs on the GPU): the base NLL equals
    the plain-PyTorch path's, the mixed one equals it at w = 0 and is finite under bf16 autocast."""
    ids, valid = document_rows([list(range(3, 40)), [40, 41, 42, 43], list(range(50, 90))], T=33, sep_id=0)
    fast, plain = Backends("triton", "triton"), Backends("split", "chunked")
    dev = torch.device("cuda")
    zero, mixing = _model(mixing=False).to(dev), _model(mixing=True).to(dev)
    gen = lambda: torch.Generator(device=dev).manual_seed(1)  # noqa: E731
    b_fast, m_fast = token_nll(zero, ids, valid, fast, 2, True, gen(), dev)
    b_plain, _ = token_nll(zero, ids, valid, plain, 2, True, gen(), dev)
    assert torch.allclose(b_fast, b_plain, atol=1e-4) and torch.allclose(m_fast, b_fast, atol=1e-5)
    bf16 = torch.autocast("cuda", dtype=torch.bfloat16)
    b16, m16 = token_nll(mixing, ids, valid, fast, 2, True, gen(), dev, bf16)
    assert torch.isfinite(m16).all() and (b16 - b_plain)[valid].abs().max() < 0.1
    assert (m16 - b16)[valid].abs().max() > 1e-3                         # w != 0: the thoughts count


@pytest.mark.gpu
def test_gpu_thought_predictions_equal_the_training_forward():
    """On the GPU's fast path (Triton attention and LM head): the evaluation's path equals the training forward's
    k = 1 prediction in fp32 (the same thoughts), and under bf16 autocast differs from it by rounding only (a wrong
    chain step or position would be off by nats)."""
    from quietstar import LossConfig, quietstar_forward
    from quietstar.thoughts import thought_predictions
    dev = torch.device("cuda")
    model = _model(mixing=True).to(dev)
    ids = torch.randint(3, 97, (3, 40), generator=torch.Generator().manual_seed(5)).to(dev)
    ds = torch.tensor([0] * 15 + [15] * 25, dtype=torch.int32, device=dev).expand(3, 40).contiguous()
    be = Backends("triton", "triton")
    gen = lambda: torch.Generator(device=dev).manual_seed(1)  # noqa: E731
    for name, ctx in (("fp32", torch.autocast("cuda", enabled=False)),
                      ("bf16", torch.autocast("cuda", dtype=torch.bfloat16))):
        with ctx, torch.no_grad():
            _, _, full = quietstar_forward(model, ids, None, LossConfig(), "sample-then-train", be, gen(), doc_start=ds)
            ev = thought_predictions(model, ids, None, be, gen(), doc_start=ds)
        assert torch.equal(ev.thoughts, full.thoughts), name
        diff = (ev.lp_mix.float() - full.lp_mix[..., 0].float()).abs()
        assert torch.isfinite(ev.lp_mix).all() and (ev.lp_mix != 0).sum() > 100, name
        if name == "fp32":
            assert diff.max() < 1e-4, diff.max()
        else:
            assert diff.max() < 0.1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_cli_hard_mask_round_trip(tmp_path):
    from quietstar.assets import mistral_tokenizer
    torch.manual_seed(0)
    mc = ModelConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64)
    model = QuietStarModel(build_decoder(mc), ThoughtConfig(M=2, K=2, P=2), marker_init_id=5)
    with torch.no_grad():
        model.mixing_head.net[-1].bias.fill_(0.5)
    exp = model.save_pretrained(tmp_path / "exp", tokenizer=mistral_tokenizer())
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"Problem {i}: compute {i} + {i * 3} = {i * 4}."}) for i in range(5)))
    common = [sys.executable, "-m", "quietstar.evaluate", str(exp), "--data", str(docs), "--limit", "4",
              "--seq-len", "16", "--batch-size", "2", "--device", "cpu"]
    r1 = subprocess.run(common + ["--save-hard-mask", str(tmp_path / "hard.pt"), "--out", str(tmp_path / "a")],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run(common + ["--hard-mask", str(tmp_path / "hard.pt"), "--out", str(tmp_path / "b")],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = (json.loads((tmp_path / x / "eval.json").read_text())["heldout"] for x in ("a", "b"))
    assert a["documents"] == 4 and a["without_thoughts"]["targets"] > 0
    assert a["without_thoughts"]["bits_per_byte"] > 0 and "with_thoughts" in a
    n = a["without_thoughts"]["targets"]
    assert a["hard_tokens"]["without_thoughts"]["targets"] == round(0.1 * n) == b["hard_tokens"]["without_thoughts"]["targets"]
    assert abs(a["hard_tokens"]["without_thoughts"]["nll"] - b["hard_tokens"]["without_thoughts"]["nll"]) < 1e-5
    assert a["hard_tokens"]["without_thoughts"]["nll"] > a["without_thoughts"]["nll"]
    assert (tmp_path / "b" / "eval.md").read_text().count("hard tokens") == 2
    meta = json.loads((tmp_path / "a" / "eval.json").read_text())["meta"]
    assert meta["scoring_s"] > 0 and f"scoring took {meta['scoring_s']:.0f} s" in (tmp_path / "a" / "eval.md").read_text()
    bad = subprocess.run(common[:4] + ["--data", str(docs), "--limit", "3", "--seq-len", "16", "--device", "cpu",
                                        "--hard-mask", str(tmp_path / "hard.pt"), "--out", str(tmp_path / "c")],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "use the same --data, --limit and --seq-len" in bad.stderr
    assert "held-out rows" not in bad.stderr         # refused before any row is scored (its progress bar)
    bad = subprocess.run(common[:4] + ["--data", str(docs), "--limit", "4", "--seq-len", "12", "--device", "cpu",
                                        "--hard-mask", str(tmp_path / "hard.pt"), "--out", str(tmp_path / "c")],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "(T=16), this run has (4, 12)" in bad.stderr and "held-out rows" not in bad.stderr


def test_hard_mask_of_other_text_is_refused(tmp_path, capsys, tiny_export):
    """A --hard-mask is refused before any row is scored when this run's rows are not the ones it was saved for:
    another --data file with as many documents, or the same --data path whose text changed since (the mask
    file's fingerprint of the scored token ids). A mask file without these records is checked on the rest."""
    from quietstar.evaluate import eval_main
    exp = tiny_export(P=1)
    docs, other = tmp_path / "docs.jsonl", tmp_path / "other.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"Problem {i}: compute {i} + {i * 3} = {i * 4}."}) for i in range(3)))
    other.write_text("\n".join(json.dumps({"text": f"Other text {i}, not the same at all."}) for i in range(3)))
    common = [str(exp), "--limit", "3", "--seq-len", "16", "--no-thoughts", "--device", "cpu"]
    assert eval_main(common + ["--data", str(docs), "--save-hard-mask", str(tmp_path / "hard.pt"),
                               "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()

    def refused(data, needle):
        rc = eval_main(common + ["--data", str(data), "--hard-mask", str(tmp_path / "hard.pt"), "--out",
                                 str(tmp_path / "b")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("quietstar-eval: error: --hard-mask "), err
        assert needle in err[0], err            # one line: refused before the rows' progress bar
        assert not (tmp_path / "b").exists()
    refused(other, f"--data {docs} (this run: {other})")
    docs.write_text(docs.read_text().replace("compute", "add"))       # the same path, other text
    refused(docs, "saved for other tokens than this run's rows")
    old = torch.load(tmp_path / "hard.pt")
    assert set(old) >= {"data", "limit", "seq_len", "tokens_sha256"} and old["data"] == str(docs)
    torch.save({"mask": old["mask"], "seq_len": 16}, tmp_path / "old.pt")      # as older versions saved it
    assert eval_main(common + ["--data", str(docs), "--hard-mask", str(tmp_path / "old.pt"), "--out",
                               str(tmp_path / "c")]) == 0


class _Tok:
    """Characters as token ids (ord % 97), enough for the row layouts."""
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(ch) % 97 for ch in text]}

    @property
    def backend_tokenizer(self):
        outer = self

        class B:
            def encode_batch(self, texts, add_special_tokens=False):
                return [type("E", (), {"ids": outer(t)["input_ids"]})() for t in texts]
        return B()

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def test_scored_rows_marks_the_continuation():
    ids, valid, n_bytes = scored_rows([("ab", "cde"), ("x", "yz")], _Tok(), sep_id=0)
    assert ids.tolist() == [[0, 0, 1, 2, 3, 4], [0, 23, 24, 25, 0, 0]]      # "a" = 97 -> 0
    assert valid.tolist() == [[False, False, True, True, True, False], [False, True, True, False, False, False]]
    assert n_bytes == [3, 2]


def test_final_number():
    assert final_number("so 3 + 4 = 7\n#### 1,234.") == "1234"
    assert final_number("she has 5 then 12 apples") == "12"
    assert final_number("no digits") is None


def test_commonsense_qa_scores_by_answer_likelihood():
    model = _model(mixing=False)
    qs = [{"question": "q one?", "choices": ["a", "bb", "ccc", "d", "ee"], "label": 2},
          {"question": "two?", "choices": ["x", "y", "zz", "w", "vvv"], "label": 0}]
    be = Backends("split", "chunked")
    res = commonsense_qa(model, _Tok(), 0, qs, be, 4, True, torch.Generator().manual_seed(0), torch.device("cpu"), None)
    assert res["questions"] == 2 and res["with_thoughts"] == res["without_thoughts"]      # w = 0
    # the chosen answer is the argmax of the summed log-likelihood of its tokens, computed here directly
    items = [("Question: " + q["question"] + "\nAnswer:", " " + c) for q in qs for c in q["choices"]]
    ids, valid, _ = scored_rows(items, _Tok(), 0)
    with torch.no_grad():
        lp = torch.log_softmax(model.lm(input_ids=ids).logits.float(), -1)
    tgt = torch.cat([ids[:, 1:], ids[:, -1:]], 1)
    ll = (lp.gather(-1, tgt[..., None])[..., 0] * valid).sum(1).view(2, 5)
    acc = float((ll.argmax(1) == torch.tensor([2, 0])).double().mean())
    assert res["without_thoughts"]["accuracy"] == acc


def test_a_repeated_answer_counts_whichever_copy_wins():
    """CommonsenseQA lists some answers twice; the copies score the same without thoughts and argmax takes the
    first: the labelled text is right whichever copy is picked (the later copy's label was counted wrong)."""
    from quietstar.evaluate import choice_correct
    qs = [{"choices": ["a", "dup", "b", "dup", "c"], "label": 3}, {"choices": ["a", "dup", "b", "dup", "c"], "label": 0},
          {"choices": ["p", "q", "r", "s", "t"], "label": 4}]
    nll = torch.tensor([[5.0, 1.0, 6.0, 1.0, 7.0], [5.0, 1.0, 6.0, 1.0, 7.0], [9.0, 9.0, 9.0, 9.0, 1.0]]).view(15, 1)
    by_sum, by_char = choice_correct(nll, qs)
    assert by_sum.tolist() == by_char.tolist() == [True, False, True]


def test_cli_gsm8k_and_csqa(tmp_path, tiny_export):
    exp = tiny_export(P=2)
    r = subprocess.run([sys.executable, "-m", "quietstar.evaluate", str(exp), "--tasks", "gsm8k,csqa", "--limit", "2",
                        "--gsm8k-em", "1", "--max-new-tokens", "3", "--device", "cpu", "--out", str(tmp_path / "o")],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "o" / "eval.json").read_text())
    g, c = res["gsm8k"], res["csqa"]
    assert g["problems"] == 2 and g["with_thoughts"]["targets"] == g["without_thoughts"]["targets"] > 100
    assert g["exact_match"]["problems"] == 1 and len(g["exact_match"]["outputs"]) == 1
    assert c["questions"] == 2 and 0 <= c["with_thoughts"]["accuracy"] <= 1
    md = (tmp_path / "o" / "eval.md").read_text()
    assert "## GSM8K" in md and "## CommonsenseQA" in md


def test_cli_bad_input_is_one_line(tmp_path, capsys, tiny_export):
    from quietstar.evaluate import eval_main
    exp = tiny_export(P=2)
    capsys.readouterr()                                # the export's own progress output
    import shutil
    shutil.copytree(exp, tmp_path / "run" / "export")              # a quietstar-train run folder's layout
    (tmp_path / "text.pt").write_text("not a mask")
    torch.save({"mask": torch.zeros(3)}, tmp_path / "other.pt")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
    cases = [([str(tmp_path / "missing")], f"{tmp_path / 'missing'}: no such folder"),
             ([str(tmp_path / "run")], f"its export is {tmp_path / 'run' / 'export'}"),   # the run folder given
             ([str(exp), "--tasks", "heldout,mmlu"], "--tasks: unknown ['mmlu']"),
             ([str(exp), "--limit", "0"], "--limit must be >= 1"),
             ([str(exp), "--batch-size", "0"], "--batch-size must be >= 1"),
             ([str(exp), "--data", "/bin/ls"], "--data /bin/ls: document file /bin/ls is not UTF-8"),
             ([str(exp), "--tasks", "csqa", "--gsm8k-em", "2"], "add gsm8k to --tasks"),
             ([str(exp), "--hard-mask", str(tmp_path / "none.pt")], "no such file"),
             ([str(exp), "--hard-mask", str(tmp_path / "text.pt")], "not a mask saved by --save-hard-mask"),
             ([str(exp), "--hard-mask", str(tmp_path / "other.pt")], "not a mask saved by --save-hard-mask"),
             ([str(exp), "--hard-mask", str(tmp_path / "other.pt"), "--save-hard-mask", str(tmp_path / "h.pt")],
              "give one of them"),
             ([str(exp), "--data", str(tmp_path / "empty.txt")], f"--data {tmp_path / 'empty.txt'}: no documents"),
             ([str(exp), "--data", str(tmp_path / "blank.jsonl")], "no documents"),
             ([str(exp), "--tasks", ""], "--tasks: none given; choose from heldout, gsm8k, csqa"),
             ([str(exp), "--device", "gpu"], "--device must be auto, cpu or cuda, got 'gpu'"),
             ([str(exp), "--limit", "1", "--seq-len", "8", "--save-hard-mask", str(tmp_path / "nodir" / "h.pt")],
              f"--save-hard-mask {tmp_path / 'nodir' / 'h.pt'}: no such folder"),
             ([str(exp), "--limit", "1", "--seq-len", "8", "--save-hard-mask", str(tmp_path)],
              f"--save-hard-mask {tmp_path}: a folder"),
             ([str(exp), "--limit", "1", "--seq-len", "8", "--out", str(tmp_path / "text.pt")],
              f"--out {tmp_path / 'text.pt'}: a file, not a folder"),
             ([str(exp), "--limit", "1", "--seq-len", "8", "--out", str(tmp_path / "text.pt" / "o")],
              f"--out {tmp_path / 'text.pt' / 'o'}: cannot create the folder")]
    if not torch.cuda.is_available():
        cases.append(([str(exp), "--device", "cuda"], "--device cuda was asked for but no CUDA GPU"))
    for argv, needle in cases:
        rc = eval_main(argv + (["--device", "cpu"] if "--device" not in argv else [])
                       + (["--out", str(tmp_path / "o")] if "--out" not in argv else []))
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("quietstar-eval: error: ") and needle in err[0], err
    assert not (tmp_path / "o").exists() and not (tmp_path / "nodir").exists()
    assert (tmp_path / "text.pt").read_text() == "not a mask"


def test_gsm8k_exact_match_decodes_under_the_autocast(tiny_export):
    """quietstar-eval's generated GSM8K answers run under its autocast (bf16 on CUDA), like its likelihoods:
    here CPU bf16 autocast, seen in the dtype of a decoder layer's MLP outputs."""
    from quietstar import QuietStarModel
    from quietstar.assets import mistral_tokenizer
    from quietstar.evaluate import gsm8k_exact_match
    model = QuietStarModel.from_pretrained(tiny_export(P=1)).eval()
    seen = []
    model.lm.model.layers[0].mlp.down_proj.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    probs = [{"question": "What is 1 + 1?", "short_answer": "2"}]
    res = gsm8k_exact_match(model, mistral_tokenizer(), probs, 2, torch.Generator().manual_seed(0),
                            torch.device("cpu"), thoughts=False, autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    assert res["problems"] == 1 and seen and set(seen) == {torch.bfloat16}, seen
    seen.clear()
    gsm8k_exact_match(model, mistral_tokenizer(), probs, 2, torch.Generator().manual_seed(0), torch.device("cpu"),
                      thoughts=True)
    assert seen and set(seen) == {torch.float32}, seen
