"""Offline assets: tokenizers against their sources, the MATH split, SmolLM2 as MistralForCausalLM.

Needs the three data packages and `python -m quietstar.assets prepare` (scripts/setup.sh --dev).
"""
import functools
import hashlib
import json
import sys
from pathlib import Path

import pytest
import regex
import torch

from quietstar import assets

EDGE_TEXTS = [
    "", " ", "  ", "a  b   c    d", "x  = 3\n\n  y =  4", " leading space", "trailing space ",
    "\n\nnewlines\n", "tab\there", "12345 67890", "3.14159  2.71828", "  12  345",
    "literal <s> and </s> and <unk> in text", "<s>", "<|endoftext|> <|im_end|>",
    "emoji \U0001F600\U0001F9EE and \u65e5\u672c\u8a9e \uff13\uff14",
    "$\\frac{1}{2} + \\sqrt{x^2}$  \\begin{align*} a &= b \\\\ c&=d \\end{align*}",
    "\u2581 already a U+2581 \u2581\u2581",
]


@functools.lru_cache(maxsize=None)
def _sample_texts():
    """~450 real MATH texts (every 10th train problem, every 2nd held-out one) plus edge cases."""
    return assets.math_documents("train")[::10] + assets.math_documents("heldout")[::2] + EDGE_TEXTS


# ----------------------------------------------------------------------------- Mistral

def test_mistral_sentencepiece_sha256():
    path = assets.mistral_sentencepiece_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == assets.MISTRAL_SP_SHA256


def test_verified_rejects_a_wrong_hash(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"not the model")
    with pytest.raises(RuntimeError, match="sha256"):
        assets._verified(str(p), assets.MISTRAL_SP_SHA256)


def test_smollm2_gguf_from_environment(tmp_path, monkeypatch):
    """QUIETSTAR_SMOLLM2_GGUF (a GPU machine without the package) names a copy, checked like the package's."""
    real = assets.smollm2_gguf_path()
    copy = tmp_path / "copy.gguf"
    copy.symlink_to(real)
    monkeypatch.setenv("QUIETSTAR_SMOLLM2_GGUF", str(copy))
    assert assets.smollm2_gguf_path() == copy
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF but not the model")
    monkeypatch.setenv("QUIETSTAR_SMOLLM2_GGUF", str(bad))
    with pytest.raises(RuntimeError, match="sha256"):
        assets.smollm2_gguf_path()
    monkeypatch.setenv("QUIETSTAR_SMOLLM2_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="QUIETSTAR_SMOLLM2_GGUF"):
        assets.smollm2_gguf_path()


def test_mistral_tokenizer_equals_sentencepiece():
    sentencepiece = pytest.importorskip("sentencepiece")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(assets.mistral_sentencepiece_path()))
    tok = assets.mistral_tokenizer()  # from the prepared JSON: no sentencepiece involved
    texts = _sample_texts()
    assert len(texts) > 400
    enc = tok(texts)["input_ids"]
    n_tokens = 0
    for s, ids in zip(texts, enc):
        ref = [assets.MISTRAL_BOS_ID] + sp.encode(s)
        assert ids == ref, repr(s[:80])
        n_tokens += len(ids)
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ref[1:]), repr(s[:80])
    assert n_tokens > 100_000
    # Real MATH texts decode back to themselves.
    for s, ids in zip(texts[:-len(EDGE_TEXTS)], enc):
        assert tok.decode(ids, skip_special_tokens=True) == s


def test_mistral_special_tokens_and_padding():
    tok = assets.mistral_tokenizer()
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert len(tok) == 32000
    # A literal "<s>" is text (as in sentencepiece), not BOS: only the prepended id 1.
    ids = tok("a <s> b")["input_ids"]
    assert ids[0] == 1 and 1 not in ids[1:] and 2 not in ids
    # Padding: with eos id 2 on the right, told apart by the attention mask only.
    out = tok(["a", "a b c d"], padding=True)
    n = len(out["input_ids"][1])
    assert out["input_ids"][0] == tok("a")["input_ids"] + [2] * (n - len(tok("a")["input_ids"]))
    assert out["attention_mask"][0] == [1] * len(tok("a")["input_ids"]) + [0] * (n - 2)
    assert isinstance(tok.backend_tokenizer, __import__("tokenizers").Tokenizer)


# ----------------------------------------------------------------------------- SmolLM2

def _bytes_to_unicode():
    """GPT-2's byte -> printable character table."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
          + list(range(ord("\xae"), ord("\xff") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class _GGUFReferenceBPE:
    """Byte-level BPE straight from the GGUF's token and merge lists, written out by hand:
    each digit alone, GPT-2 regex, then merges by rank. Slow, independent of `tokenizers`."""

    GPT2 = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self):
        tokens, merges, _ = assets._smollm2_gguf_vocab()
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.rank = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
        self.b2u = _bytes_to_unicode()

    @functools.lru_cache(maxsize=None)
    def _word(self, word):
        parts = list(word)
        while len(parts) > 1:
            r, i = min((self.rank.get(p, float("inf")), i) for i, p in enumerate(zip(parts, parts[1:])))
            if r == float("inf"):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return tuple(self.vocab[p] for p in parts)

    def encode(self, s):
        ids = []
        for chunk in regex.findall(r"\p{N}|[^\p{N}]+", s):
            for w in self.GPT2.findall(chunk):
                ids += self._word("".join(self.b2u[b] for b in w.encode("utf-8")))
        return ids


def test_smollm2_tokenizer_equals_gguf_reference():
    tok = assets.smollm2_tokenizer()
    ref = _GGUFReferenceBPE()
    simple = ["Hello world", "x = 10^{23}", "  12  345", "a  1", "don't stop", "tab\tnew\n\nline"]
    texts = simple + list(_sample_texts())
    enc = tok(texts)["input_ids"]
    for s, ids in zip(texts, enc):
        assert ids == ref.encode(s), repr(s[:80])
        assert tok.decode(ids) == s, repr(s[:80])  # byte-level: every text round-trips


def test_smollm2_digits_and_special_ids():
    tok = assets.smollm2_tokenizer()
    ids = tok("x 2024 y")["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces == ["x", "\u0120", "2", "0", "2", "4", "\u0120y"]
    assert tok.bos_token is None and tok("hi")["input_ids"][0] != 0  # no BOS
    assert tok.eos_token_id == tok.pad_token_id == assets.SMOLLM2_SEP_ID == 0
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens, _, types = assets._smollm2_gguf_vocab()
    assert [i for i, t in enumerate(types) if t == 3] == list(range(17))
    assert tuple(tok.convert_ids_to_tokens(list(range(len(tokens))))) == tokens
    # Specials are skipped in decoding; a literal separator in text stays text.
    assert tok.decode([0, 104, 2, 16], skip_special_tokens=True) == "x"
    assert 0 not in tok("a <|endoftext|> b")["input_ids"]


# ----------------------------------------------------------------------------- MATH and prepare

def test_math_split_sizes_and_disjoint():
    train, held = assets.math_documents("train"), assets.math_documents("heldout")
    assert (len(train), len(held)) == (4497, 503)
    assert len(set(train)) == 4497 and len(set(held)) == 503 and not set(train) & set(held)
    records = assets._math_records()
    assert len({(r["subject"], r["index"]) for r in records}) == len(records) == 5000
    assert sum(r["index"] % 10 == 0 for r in records) == 503
    first = records[0]  # algebra, index 0: held out; text = problem + "\n" + solution
    assert first["subject"] == "algebra" and first["index"] == 0
    assert held[0] == first["text"] and first["text"].startswith("How many vertical asymptotes")
    with pytest.raises(ValueError):
        assets.math_documents("test")


def test_prepared_files_match_sources_and_are_up_to_date():
    assert assets.prepare(verbose=False) == {n: "up to date" for n in (
        "mistral_tokenizer.json", "smollm2_tokenizer.json", "default_corpus.jsonl",
        "default_heldout.jsonl", "gsm8k_test.jsonl", "commonsense_qa_validation.jsonl")}
    for path, split in ((assets.DEFAULT_CORPUS, "train"), (assets.DEFAULT_HELDOUT, "heldout")):
        lines = [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines()]
        assert [r["text"] for r in lines] == assets.math_documents(split)
    gsm, csqa = assets._gsm8k_from_package(), assets._csqa_from_package()
    assert (len(gsm), len(csqa)) == (1319, 1221)
    assert assets.gsm8k_test() == gsm and assets.commonsense_qa_validation() == csqa       # the prepared files
    assert gsm[0]["short_answer"] == "18" and gsm[0]["answer"].endswith("#### 18")
    assert len(csqa[0]["choices"]) == 5 and 0 <= csqa[0]["label"] < 5
    size = sum(p.stat().st_size for p in assets.DATA_DIR.iterdir())
    assert size < 16e6


def test_the_gpu_machine_needs_no_data_package(monkeypatch, tmp_path):
    """The GPU machine has none of the three data packages (no registry there): it receives quietstar/data/
    and the SmolLM2 file (QUIETSTAR_SMOLLM2_GGUF). Everything the learning experiment reads must then come
    from those: tokenizers, the MATH text, GSM8K, CommonsenseQA, the model."""
    def not_installed(name):
        raise FileNotFoundError(f"package {name!r} is not installed (simulated GPU machine)")

    gguf = assets.smollm2_gguf_path()
    want = (assets.gsm8k_test(), assets.commonsense_qa_validation(), assets.math_documents("heldout"))
    monkeypatch.setattr(assets, "_package_dir", not_installed)
    monkeypatch.setenv("QUIETSTAR_SMOLLM2_GGUF", str(gguf))
    assert (assets.gsm8k_test(), assets.commonsense_qa_validation()) == want[:2]
    from quietstar import data as qdata
    assert qdata.load_documents("default", split="heldout") == want[2]
    assert assets.smollm2_tokenizer()("1 + 1")["input_ids"] and assets.mistral_tokenizer()("1 + 1")["input_ids"]
    assert assets.smollm2_gguf_path() == gguf
    with pytest.raises(FileNotFoundError, match="simulated"):     # the simulation is real: MATH from the package
        assets._math_records.__wrapped__()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import learn_experiment
        sets = learn_experiment.EvalSets(assets.smollm2_tokenizer(), 0, 64, docs=3, bench_items=2)
    finally:
        sys.path.pop(0)
    assert sets.sizes()["gsm8k_problems"] == 2 and sets.sizes()["csqa_questions"] == 2


# ----------------------------------------------------------------------------- model

def _transformers_gguf_llama():
    """The GGUF as transformers itself reads it (its config and its dequantise + unpermute), as a
    LlamaForCausalLM: the reference ``load_smollm2`` is checked against. from_pretrained needs
    accelerate for GGUF files; without it, the same transformers reader is called directly."""
    import importlib.util

    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    p = assets.smollm2_gguf_path()
    if importlib.util.find_spec("accelerate") is not None:
        return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                    dtype=torch.float32, local_files_only=True)
    cfg = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    llama = LlamaForCausalLM(cfg)
    sd = load_gguf_checkpoint(str(p), return_tensors=True, model_to_load=llama)["tensors"]
    result = llama.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys  # tied
    assert llama.lm_head.weight.data_ptr() == llama.model.embed_tokens.weight.data_ptr()
    return llama


@pytest.mark.slow
def test_load_smollm2_logits_equal_transformers_gguf_llama():
    from transformers import LlamaForCausalLM, MistralForCausalLM

    model = assets.load_smollm2()
    assert type(model) is MistralForCausalLM
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert len(model.state_dict()) == 273
    assert model.config.sliding_window is None
    llama = _transformers_gguf_llama().eval()
    assert isinstance(llama, LlamaForCausalLM)
    tok = assets.smollm2_tokenizer()
    ids = torch.tensor([tok("Problem:\nFind 12+35.\nSolution: $12+35=\\boxed{47}$.")["input_ids"]])
    with torch.no_grad():
        ref, got = llama(ids).logits, model(ids).logits
    assert ids.shape[1] > 20 and torch.isfinite(got).all() and got.abs().max() > 1
    assert (got - ref).abs().max().item() == 0.0
    # A real (if degraded) model, not merely two equally wrong readings: its next-token NLL on
    # this text is far below uniform (log 49152 = 10.8 nats).
    nll = torch.nn.functional.cross_entropy(got[0, :-1], ids[0, 1:])
    assert nll < 4.0, nll
