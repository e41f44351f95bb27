"""The Quiet-STaR model: a stock Hugging Face decoder plus <sot>/<eot> and the mixing head.

Nothing of the decoder is forked. Its attention is the "quietstar" function registered through
`AttentionInterface` (quietstar/attention.py); every call passes a `Layout` saying which tokens are
base text and which are chain tokens. The two marker embeddings are extra parameters fed as input
embeddings: they are not rows of the vocabulary, so they are never predicted nor sampled (DESIGN.md section 3).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn

from . import attention
from .config import ModelConfig, ThoughtConfig

SUPPORTED_MODEL_TYPES = ("mistral", "llama")
EXTRAS_WEIGHTS = "quietstar.safetensors"     # markers + mixing head, beside the decoder's own files
EXTRAS_CONFIG = "quietstar.json"
EXPORT_FORMAT = "quietstar-export-1"
DECODER_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")   # what transformers' save_pretrained writes
LOAD_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}


def tiny_mistral_config(cfg: ModelConfig):
    from transformers import MistralConfig
    return MistralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
        sliding_window=None, tie_word_embeddings=cfg.tie_word_embeddings, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=None)


def check_decoder(lm) -> None:
    """Raise a clear error unless `lm` is a Mistral-like decoder the attention plug-in can drive."""
    cfg = getattr(lm, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model: expected a Mistral- or Llama-architecture decoder (model_type in "
                         f"{SUPPORTED_MODEL_TYPES}), got model_type={mt!r}")
    inner = getattr(lm, "model", None)
    if inner is None or not hasattr(inner, "embed_tokens") or not hasattr(lm, "lm_head"):
        raise ValueError("model: expected a *ForCausalLM with .model.embed_tokens and .lm_head")
    if getattr(lm.lm_head, "bias", None) is not None:
        raise ValueError("model: an LM head with a bias is not supported (the fused LM head is W h)")


def _folder_config(name, who: str | None = None):
    """The config.json of a local model folder (never a Hub id), refused unless Mistral or Llama; errors begin with
    `who` (default: "--model NAME")."""
    from transformers import AutoConfig
    who = who or f"--model {name}"
    try:
        hf_cfg = AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as e:      # e.g. a config.json that is not JSON, or without model_type
        raise ValueError(f"{who}: its config.json cannot be read ({' '.join(str(e).split())[:300]})") from e
    if hf_cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{who}: expected a Mistral- or Llama-architecture folder, got model_type="
                         f"{hf_cfg.model_type!r} in its config.json")
    return hf_cfg


def build_decoder(cfg: ModelConfig, dtype=torch.float32, weights: bool = True):
    """The stock decoder: a random-init tiny Mistral, SmolLM2-135M (real, or random-init at its exact
    shape: the same work for speed measurements, no weights needed), or a local HF folder.
    `weights=False`: the architecture only, for weights loaded next (build it under torch.device("meta"):
    `empty_decoder_model`); a folder's weight files are not read."""
    from transformers import AutoModelForCausalLM, MistralForCausalLM
    if not weights:
        from .assets import smollm2_mistral_config
        hf_cfg = (tiny_mistral_config(cfg) if cfg.name == "tiny" else
                  smollm2_mistral_config() if cfg.name in ("smollm2-135m", "smollm2-135m-random") else
                  _folder_config(cfg.name))
        lm = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
        if (Path(cfg.name) / "generation_config.json").exists():   # from_config makes a default one
            from transformers import GenerationConfig
            lm.generation_config = GenerationConfig.from_pretrained(cfg.name, local_files_only=True)
    elif cfg.name == "tiny":
        lm = MistralForCausalLM(tiny_mistral_config(cfg)).to(dtype)
    elif cfg.name == "smollm2-135m-random":
        from .assets import smollm2_mistral_config
        lm = MistralForCausalLM(smollm2_mistral_config()).to(dtype)
        # HF's init zeroes the padding row (id 0, also the document separator). A token with a zero
        # embedding keeps an exactly-zero residual stream through every layer (its attention sees only
        # zero values before it at t = 0, MLP(0) = 0); each RMSNorm's backward then multiplies its
        # gradient by 1/sqrt(eps) ~ 316, which overflows within a few of the 30 layers (NaN gradients,
        # seen on CPU and GPU). The real model's row 0 is a trained, non-zero embedding: so is this one.
        with torch.no_grad():
            pad = lm.config.pad_token_id
            lm.model.embed_tokens.weight[pad].normal_(0.0, lm.config.initializer_range)
    elif cfg.name == "smollm2-135m":
        from .assets import load_smollm2
        lm = load_smollm2(dtype=dtype)
    else:
        _folder_config(cfg.name)
        try:
            lm = AutoModelForCausalLM.from_pretrained(cfg.name, dtype=dtype, local_files_only=True)
        except OSError as e:                # no weight files, or unreadable ones
            raise ValueError(f"--model {cfg.name}: its weights cannot be read "
                             f"({' '.join(str(e).split())[:300]})") from e
    check_decoder(lm)
    lm.config._attn_implementation = attention.register()
    return lm


def empty_decoder_model(cfg: ModelConfig, thought: ThoughtConfig) -> "QuietStarModel":
    """A QuietStarModel with `cfg`'s architecture in fp32 on the CPU, its memory allocated but not initialised,
    for a state dict loaded next (a checkpoint, a gathered FSDP model): nothing is read from the model's
    weight files (7B: ~14 GB) and nothing is drawn at random. Built on the meta device, then allocated;
    RoPE's buffers (computed, in no state dict) are made again. The embeddings come untied: load both, then
    `retie_embeddings` (the trained model may have had them tied or not)."""
    with torch.device("meta"):
        lm = build_decoder(cfg, dtype=torch.float32, weights=False)
        model = QuietStarModel(lm, thought)
    model.to_empty(device="cpu")
    remake_rope(lm)
    return model


def remake_rope(lm, device=None) -> None:
    """Compute RoPE's buffers (inverse frequencies, in no state dict) from the config again and put them on
    `device`: after a build on the meta device and `to_empty`, which leaves them uninitialised. Computed on
    the CPU, as every model built from its weights has them (a GPU's pow may round otherwise)."""
    with torch.device("cpu"):
        lm.model.rotary_emb = type(lm.model.rotary_emb)(config=lm.config).to(device)


def retie_embeddings(lm) -> None:
    """Tie the output head to the input embedding again where the config ties them and the loaded weights
    agree (a model trained tied: both state-dict entries hold one tensor); a config that says tied over two
    different trained tensors (transformers then loads them untied and warns) stays untied."""
    if getattr(lm.config, "tie_word_embeddings", False) and torch.equal(lm.lm_head.weight,
                                                                         lm.model.embed_tokens.weight):
        lm.tie_weights()


def _extras_meta(d: Path) -> dict:
    """An export's quietstar.json, checked: a JSON object in this format with the keys `save_pretrained` writes, of
    their types, a valid thought config and no option that has been removed since. Else one ValueError naming it."""
    path = d / EXTRAS_CONFIG
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:                 # JSONDecodeError (an empty file too), UnicodeDecodeError
        raise ValueError(f"{path}: not JSON ({e}); QuietStarModel.save_pretrained writes it") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(meta).__name__}")
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {EXPORT_FORMAT!r}")
    missing = [k for k in ("thought", "vocab_size", "hidden_size", "banned_ids") if k not in meta]
    if missing:
        raise ValueError(f"{path}: {', '.join(missing)} missing")
    for k in ("vocab_size", "hidden_size"):
        if not isinstance(meta[k], int) or isinstance(meta[k], bool) or meta[k] < 1:
            raise ValueError(f"{path}: {k} must be a positive int, got {meta[k]!r}")
    if not isinstance(meta["banned_ids"], list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                           for i in meta["banned_ids"]):
        raise ValueError(f"{path}: banned_ids must be a list of ints, got {meta['banned_ids']!r}")
    saved = meta["thought"]
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: thought must be a JSON object (the ThoughtConfig), got {saved!r}")
    if saved.get("mixing", "unbounded") != "unbounded":   # exports written before the option was removed
        raise ValueError(f"{path}: mixing={saved['mixing']!r} is no longer supported "
                         "(only the unbounded mixing weight is; see MixingHead)")
    _export_thought(path, saved)
    return meta


def _export_thought(path: Path, saved: dict) -> ThoughtConfig:
    """The ThoughtConfig of quietstar.json's "thought" (at `path`); unknown or missing M/K/P keys and invalid values
    are one ValueError naming the file."""
    fields = {f.name for f in dataclasses.fields(ThoughtConfig)}
    unknown = sorted(set(saved) - fields - {"mixing"})
    missing = [k for k in ("M", "K", "P") if k not in saved]
    if unknown or missing:
        raise ValueError(f"{path}: thought has " + "; ".join(
            ([f"unknown keys {unknown} (ThoughtConfig's fields: {sorted(fields)})"] if unknown else []) +
            ([f"no {', '.join(missing)}"] if missing else [])))
    try:
        return ThoughtConfig(**{k: v for k, v in saved.items() if k != "mixing"})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: thought is not a valid ThoughtConfig: {e}") from e


def load_dtype(dtype):
    """`from_pretrained`'s dtype as transformers takes it: a floating torch dtype, or a name in LOAD_DTYPES; None
    leaves it to transformers."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in LOAD_DTYPES:
            raise ValueError(f"dtype must be a floating torch dtype or one of {tuple(LOAD_DTYPES)}, got {dtype!r}")
        return LOAD_DTYPES[dtype]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a floating torch dtype or one of {tuple(LOAD_DTYPES)}, got "
                        f"{type(dtype).__name__} {dtype!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype (the weights are), got {dtype}")
    return dtype


def load_export_tokenizer(directory):
    """The tokenizer saved in an export (tokenizer.json), as a fast tokenizer. Not AutoTokenizer: for a
    Mistral config it would route to mistral-common's own tokenizer class (and need tiktoken)."""
    from transformers import PreTrainedTokenizerFast
    if not (Path(directory) / "tokenizer.json").exists():
        raise FileNotFoundError(f"{directory} holds no tokenizer.json: save the export with "
                                "save_pretrained(dir, tokenizer=tok)")
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(directory))
    except Exception as e:      # the tokenizers library raises a bare Exception for a file it cannot parse
        raise ValueError(f"{Path(directory) / 'tokenizer.json'}: cannot be read as a tokenizer "
                         f"({' '.join(str(e).split())[:300]})") from e


def _tokenizer_vocab_size(path: Path) -> int | None:
    """1 + the largest id of a tokenizers `tokenizer.json` (its vocabulary and added tokens); None if absent."""
    if not path.exists():
        return None
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
        vocab = (tj.get("model") or {}).get("vocab") or {}
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))  # BPE: dict; Unigram: list
        ids += [t["id"] for t in tj.get("added_tokens") or []]
        if not all(isinstance(i, int) for i in ids):
            raise TypeError("token ids that are not ints")
        return max(ids) + 1 if ids else None
    except (ValueError, TypeError, KeyError, AttributeError) as e:    # not JSON, or not a tokenizers file's layout
        raise ValueError(f"{path}: not a tokenizers tokenizer.json ({type(e).__name__}: {e})") from e


class MixingHead(nn.Module):
    """w = MLP([h_base ; h_talk]): Linear(2d, d) -> ReLU -> Linear(d, d) -> ReLU -> Linear(d, 1).

    w is unbounded (the reference code's raw MLP output). The last layer starts at zero, so w = 0 and
    training starts exactly at the base model (DESIGN.md section 4); the hidden layers start as the
    decoder's own linear layers do, N(0, init_std) with zero biases (the reference: init_std =
    initializer_range = 0.02), not PyTorch's default uniform init. A squashed w (sigmoid) was an option
    once and was removed: a zero last layer gives sigmoid(0) = 0.5, half-way to the thought, not the
    base model.
    """

    def __init__(self, d: int, init_std: float = 0.02):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 1))
        for layer in (self.net[0], self.net[2]):
            nn.init.normal_(layer.weight, mean=0.0, std=init_std)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, h_base: torch.Tensor, h_talk: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([h_base, h_talk], dim=-1)).squeeze(-1)


class QuietStarModel(nn.Module):
    """A decoder `lm` (unmodified HF *ForCausalLM), the learned markers and the mixing head."""

    def __init__(self, lm, thought: ThoughtConfig, marker_init_id: int | None = None):
        super().__init__()
        check_decoder(lm)
        self.lm = lm
        self.thought = thought
        d = lm.config.hidden_size
        emb = lm.model.embed_tokens.weight
        init = emb[marker_init_id].detach().float() if marker_init_id is not None else torch.zeros(d)
        # markers[0] = <sot>, markers[1] = <eot>; stored / scale, used * scale (100x effective lr)
        self.markers = nn.Parameter((init / thought.marker_scale).repeat(2, 1).to(emb.dtype))
        init_std = float(getattr(lm.config, "initializer_range", 0.02) or 0.02)
        self.mixing_head = MixingHead(d, init_std).to(emb.dtype)
        pad = getattr(lm.config, "pad_token_id", None)
        banned = set(thought.banned_ids) | ({int(pad)} if pad is not None else set())
        V = self.lm_head_weight.shape[0]
        bad = [i for i in banned if not 0 <= i < V]
        if bad:
            raise ValueError(f"ThoughtConfig.banned_ids {bad} are outside the vocabulary [0, {V})")
        self.banned_ids = tuple(sorted(banned))

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.lm.lm_head.weight

    @property
    def max_positions(self) -> int:
        return int(getattr(self.lm.config, "max_position_embeddings", 1 << 30))

    @property
    def sliding_window(self) -> int | None:
        """The decoder's attention window (Mistral-7B-v0.1: 4096), None for full causal attention."""
        w = getattr(self.lm.config, "sliding_window", None)
        return None if w is None else int(w)

    def check_window(self, span: int, what: str) -> None:
        """Refuse `what` on a windowed decoder unless its window is at least `span` tokens.

        The thought-attention patterns have no window. transformers keeps a key when 0 <= query - key < W,
        so a call whose queries reach at most span - 1 tokens back (span <= W) computes exactly what the
        windowed model computes; beyond, the window would drop keys that thought attention keeps."""
        w = self.sliding_window
        if w is not None and span > w:
            raise ValueError(f"{what} needs a window of at least {span} tokens, but the model attends within "
                             f"sliding_window={w} (its config.json), which thought attention does not implement")

    def check_lengths(self, T: int) -> None:
        """The last chain token sits at RoPE position (T - 1) + 1 + (L - 1) = T + L - 1, so it is T + L - 1
        positions after the row's first token: it must fit the positions, and a sliding window must hold it."""
        L = self.thought.L
        if T + L > self.max_positions:
            raise ValueError(f"ThoughtConfig: chain length L = M + K + 1 = {L} does not fit: base length T={T} "
                             f"plus L needs {T + L} positions but the model has max_position_embeddings="
                             f"{self.max_positions}")
        self.check_window(T + L, f"base length T={T} plus chain length L = M + K + 1 = {L}")

    def marker_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.markers * self.thought.marker_scale
        return m[0], m[1]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.model.embed_tokens(ids)

    def forward(self, input_ids, valid_next, loss_cfg, schedule="sample-then-train", backends=None, generator=None,
                thoughts=None, denominators=None, doc_start=None, plain=False):
        """One Quiet-STaR step's (loss, metrics, extras): `quietstar.thoughts.quietstar_forward` on this
        model (a module forward, so DistributedDataParallel can wrap it); with `plain`, the no-thought
        control's plain language-model loss (`quietstar.thoughts.plain_lm_forward`)."""
        from .thoughts import Backends, plain_lm_forward, quietstar_forward
        if plain:
            return plain_lm_forward(self, input_ids, valid_next, backends or Backends(), denominators, doc_start)
        return quietstar_forward(self, input_ids, valid_next, loss_cfg, schedule, backends or Backends(), generator,
                                 thoughts, denominators, doc_start)

    # ------------------------------------------------------------------------------------------
    # export: a standard Hugging Face folder for the decoder + the Quiet-STaR extras beside it
    # ------------------------------------------------------------------------------------------
    def save_pretrained(self, directory, tokenizer=None) -> Path:
        """Write `directory`: the decoder as a standard Hugging Face folder (config.json,
        model.safetensors: loadable by stock transformers on its own, which then uses its default
        attention), the tokenizer when given, and the Quiet-STaR extras: `quietstar.safetensors`
        (markers, mixing head) and `quietstar.json` (the thought config, the vocabulary size)."""
        from safetensors.torch import save_file
        if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):   # before any file
            raise TypeError(f"tokenizer must be a Hugging Face tokenizer (with save_pretrained) or None, got "
                            f"{type(tokenizer).__name__} {tokenizer!r:.80}")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        extras = {"markers": self.markers.detach()}
        extras.update({f"mixing_head.{k}": v.detach() for k, v in self.mixing_head.state_dict().items()})
        save_file({k: v.contiguous().cpu() for k, v in extras.items()}, str(out / EXTRAS_WEIGHTS))
        meta = {"format": EXPORT_FORMAT, "thought": dataclasses.asdict(self.thought),
                "vocab_size": int(self.lm_head_weight.shape[0]), "hidden_size": int(self.lm.config.hidden_size),
                "banned_ids": list(self.banned_ids)}
        (out / EXTRAS_CONFIG).write_text(json.dumps(meta, indent=1) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, directory, dtype=torch.float32, device=None) -> "QuietStarModel":
        """Load what `save_pretrained` wrote (the decoder with the "quietstar" attention registered). `dtype`: a
        floating torch dtype, "float32", "float16", "bfloat16", or "auto" (the dtype the weights were saved in).
        A missing file is a FileNotFoundError; a damaged one a ValueError naming the folder and the file."""
        from safetensors import SafetensorError
        from transformers import AutoModelForCausalLM
        dtype = load_dtype(dtype)
        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: no such folder (an export is the folder quietstar-train writes as "
                                    "OUT_DIR/export)" if not d.exists() else
                                    f"{d} is a file; an export is a folder (quietstar-train's OUT_DIR/export)")
        missing = [n for n in ("config.json", EXTRAS_WEIGHTS, EXTRAS_CONFIG) if not (d / n).exists()]
        if not any((d / n).exists() for n in DECODER_WEIGHTS):
            missing.insert(1, DECODER_WEIGHTS[0])
        if missing:
            hint = (f"; {d} looks like a quietstar-train run folder: its export is {d / 'export'}"
                    if cls.is_export(d / "export") else "")
            raise FileNotFoundError(
                f"{d} is not a Quiet-STaR export: {', '.join(missing)} missing (QuietStarModel.save_pretrained "
                f"writes them; a plain Hugging Face decoder folder is a --model for quietstar-train instead){hint}")
        meta = _extras_meta(d)
        hf_cfg = _folder_config(d, str(d))       # a decoder of another architecture is refused before it is built
        try:
            lm = AutoModelForCausalLM.from_pretrained(d, config=hf_cfg, dtype=dtype, local_files_only=True)
        except (OSError, ValueError, SafetensorError) as e:     # e.g. a truncated or garbled model.safetensors
            raise ValueError(f"{d}: its decoder weights ({DECODER_WEIGHTS[0]}) cannot be loaded "
                             f"({' '.join(str(e).split())[:300]})") from e
        check_decoder(lm)
        lm.config._attn_implementation = attention.register()
        V, hidden = int(lm.lm_head.weight.shape[0]), int(lm.config.hidden_size)
        if (V, hidden) != (meta["vocab_size"], meta["hidden_size"]):
            raise ValueError(f"{d}: the decoder has vocabulary {V} and hidden size {hidden}, but the Quiet-STaR "
                             f"extras were saved for vocabulary {meta['vocab_size']} and hidden size "
                             f"{meta['hidden_size']}")
        n_tok = _tokenizer_vocab_size(d / "tokenizer.json")
        if n_tok is not None and n_tok > V:
            raise ValueError(f"{d}: the tokenizer (tokenizer.json) has ids up to {n_tok - 1} but the decoder's "
                             f"vocabulary is {V}: a mismatched vocabulary")
        thought = _export_thought(d / EXTRAS_CONFIG, meta["thought"])
        try:
            model = cls(lm, thought)
        except ValueError as e:             # banned ids outside this decoder's vocabulary
            raise ValueError(f"{d / EXTRAS_CONFIG}: {e}") from e
        model.load_extras(d)
        if tuple(model.banned_ids) != tuple(meta["banned_ids"]):
            raise ValueError(f"{d}: banned ids {model.banned_ids} of the loaded model differ from the saved "
                             f"{tuple(meta['banned_ids'])} (a different padding id in config.json?)")
        return model.to(device) if device is not None else model

    @staticmethod
    def is_export(directory) -> bool:
        """Whether `directory` holds a Quiet-STaR export's extras (what `save_pretrained` writes beside the decoder)."""
        return all((Path(directory) / n).exists() for n in (EXTRAS_WEIGHTS, EXTRAS_CONFIG))

    def load_extras(self, directory) -> None:
        """Load an export's markers and mixing head into this model (whose decoder may come from the same export:
        `quietstar-train --model EXPORT` continues a trained model). The markers are stored divided by
        marker_scale: a model with another scale gets the same effective markers, stored / its own scale."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        d = Path(directory)
        meta = _extras_meta(d)
        hidden = int(self.lm.config.hidden_size)
        if (int(self.lm_head_weight.shape[0]), hidden) != (meta["vocab_size"], meta["hidden_size"]):
            raise ValueError(f"{d}: Quiet-STaR extras saved for vocabulary {meta['vocab_size']} and hidden size "
                             f"{meta['hidden_size']}, but the decoder has {int(self.lm_head_weight.shape[0])} and "
                             f"{hidden}")
        try:
            extras = load_file(str(d / EXTRAS_WEIGHTS))
        except (OSError, SafetensorError) as e:
            raise ValueError(f"{d / EXTRAS_WEIGHTS}: not a safetensors file ({' '.join(str(e).split())[:300]})") from e
        if "markers" not in extras:
            raise ValueError(f"{d / EXTRAS_WEIGHTS}: no markers (not written by QuietStarModel.save_pretrained)")
        if tuple(extras["markers"].shape) != (2, hidden):
            raise ValueError(f"{d / EXTRAS_WEIGHTS}: markers of shape {tuple(extras['markers'].shape)}, "
                             f"expected (2, {hidden})")
        head = {k.removeprefix("mixing_head."): v for k, v in extras.items() if k != "markers"}
        want = self.mixing_head.state_dict()
        bad = ([f"{k} missing" for k in want if k not in head] + [f"unexpected {k}" for k in head if k not in want] +
               [f"{k} {tuple(head[k].shape)}, expected {tuple(v.shape)}" for k, v in want.items()
                if k in head and head[k].shape != v.shape])
        if bad:     # checked before anything is copied: a refused file leaves this model as it was
            raise ValueError(f"{d / EXTRAS_WEIGHTS}: its mixing head does not fit this model: {'; '.join(bad)}")
        nonfinite = [k for k, v in extras.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if nonfinite:       # a diverged run's export: every thought would mix in NaN
            raise ValueError(f"{d / EXTRAS_WEIGHTS}: non-finite values (NaN or inf) in {', '.join(sorted(nonfinite))}")
        saved_scale = float(meta["thought"].get("marker_scale", self.thought.marker_scale))
        m = extras.pop("markers")
        if saved_scale != self.thought.marker_scale:
            m = m.double() * saved_scale / self.thought.marker_scale
        with torch.no_grad():
            self.markers.copy_(m)
        self.mixing_head.load_state_dict(head)

    def hidden(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, layout) -> torch.Tensor:
        """Final-norm hidden states (B, S, d) of the decoder for the given embeddings and positions."""
        out = self.lm.model(inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=False,
                            attention_mask=attention.layout_mask(inputs_embeds.device), qs_layout=layout)
        return out.last_hidden_state
