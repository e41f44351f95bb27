"""The thought-sampling loop captured in a CUDA graph and replayed (opt-in: `--cuda-graphs`).

Sampling is the base pass plus M no-grad steps of P*T tokens; at small models each step is a few
hundred short kernels, so the loop is bound by kernel launches, not by the GPU (SmolLM2-135M at
8 x 256 tokens: ~2.5% MFU per eager forward). `GraphedSampler` records the whole loop once per input
shape and autocast dtype and then replays it: one launch per step of training instead of thousands.

What is static and what is not:
- the input ids (and, for packed documents, the (B, T) int32 doc_start) are copied into static
  buffers before each replay; the masks derived from doc_start are built inside the graph, so every
  replay uses its batch's documents; the thoughts are cloned out of the graph's output buffer after
  it (so a caller may keep them across steps);
- the randomness does not go through a `torch.Generator` inside the graph: the M Philox keys of the
  Triton sampler are drawn eagerly from `generator` into a static (M,) buffer before each replay,
  one one-element draw per step, exactly the draws the eager loop makes; so a generator state gives
  the same thoughts with and without the graph, and checkpoints resume either way;
- the parameters are read where they live: in-place updates (optimizer steps, `load_state_dict`)
  are seen by the next replay. Each call compares (on the host) the parameters' and buffers'
  addresses, dtypes and shapes and the ThoughtConfig with those at capture, and captures again when
  anything differs (`model.to(...)`, `load_state_dict(assign=True)`, a new temperature);
- the K/V caches and activations of the loop live in one private memory pool shared by all captured
  shapes, which stays reserved between replays (the eager loop frees them before training): peak
  memory grows by about the sampling loop's own peak. At most MAX_GRAPHS shapes are kept.

Needs CUDA and the Triton LM head (its sampler takes a device seed); attention triton, split or
reference (FlexAttention is compiled by torch.compile, which this module does not capture); RoPE
whose frequencies do not depend on the positions seen (not "dynamic" / "longrope", which read the
largest position back to the host on every call).
"""
from __future__ import annotations

import contextlib
import dataclasses
from types import SimpleNamespace

import torch

from .thoughts import Backends, sample_thoughts

GRAPH_ATTENTION = ("triton", "split", "reference")
MAX_GRAPHS = 8


class GraphedSampler:
    """`sample_thoughts(model, input_ids, backends, generator)` by CUDA-graph replay.

    Call it like the eager function minus the fixed arguments: ``thoughts = sampler(input_ids)``, or
    ``sampler(input_ids, doc_start)`` for packed documents.
    The first call for a new (B, T) shape, autocast dtype or with/without documents runs the loop `warmup` times eagerly on
    a side stream (Triton compiles, cuBLAS and the banned-id cache initialise) and captures it.
    """

    def __init__(self, model, backends: Backends, generator: torch.Generator | None = None, warmup: int = 2):
        if backends.lm_head != "triton":
            raise ValueError(f"CUDA-graph sampling needs lm_head='triton' (a device-seeded sampler), "
                             f"got {backends.lm_head!r}")
        if backends.attention not in GRAPH_ATTENTION:
            raise ValueError(f"CUDA-graph sampling supports attention in {GRAPH_ATTENTION}, got "
                             f"{backends.attention!r}")
        if not torch.cuda.is_available():
            raise ValueError("CUDA-graph sampling needs a CUDA GPU; none is available")
        if generator is not None and torch.device(generator.device).type != "cuda":
            raise ValueError(f"generator must be a CUDA generator, got one on {generator.device}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (Triton must compile before capture), got {warmup}")
        rope = getattr(getattr(model.lm.model, "rotary_emb", None), "rope_type", "default")
        if "dynamic" in str(rope) or rope == "longrope":
            raise ValueError(f"CUDA-graph sampling cannot capture rope_type={rope!r}: its frequencies are "
                             "updated from the largest position on every call (a host sync)")
        self.model, self.backends, self.generator, self.warmup = model, backends, generator, warmup
        self.graphs: dict = {}
        self.pool = self.stream = None
        self.fingerprint = None
        self.last = None

    def _fingerprint(self):
        """What the captured kernels bake in: every parameter's and buffer's address, dtype and shape,
        and the thought settings (M, temperature, banned ids, ...)."""
        ts = [(t.data_ptr(), t.dtype, tuple(t.shape)) for t in self.model.parameters()]
        ts += [(t.data_ptr(), t.dtype, tuple(t.shape)) for t in self.model.buffers()]
        return tuple(ts), dataclasses.astuple(self.model.thought), self.model.banned_ids

    @staticmethod
    def _autocast_dtype():
        return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None

    def _autocast(self, dtype):
        # the autocast weight cache must be off while capturing: a cast cached during capture holds
        # memory that capture does not fill, and the training forward after it would read it
        return torch.autocast("cuda", dtype=dtype, cache_enabled=False) if dtype is not None else \
            contextlib.nullcontext()

    def _capture(self, input_ids: torch.Tensor, doc_start, key) -> SimpleNamespace:
        from kernels.lm_head import _banned_on_device
        M = self.model.thought.M
        dev = input_ids.device
        ids = input_ids.clone()
        # each sample_thoughts call below wraps it in a fresh Documents: the capture records the masks' construction
        ds = None if doc_start is None else doc_start.to(torch.int32).clone()
        seeds = torch.zeros(M, dtype=torch.int64, device=dev)
        # the graph reads the banned-id tensor by address: hold it here, not only in the kernel's cache
        banned = _banned_on_device(self.model.banned_ids, self.model.lm_head_weight.shape[0], dev)
        if self.pool is None:
            self.pool, self.stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(device=dev)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), self._autocast(key[1]):
            for _ in range(self.warmup):
                sample_thoughts(self.model, ids, self.backends, seeds=seeds, docs=ds)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # one pool for every shape: replays run one at a time and their outputs are cloned at once
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream), self._autocast(key[1]):
            thoughts = sample_thoughts(self.model, ids, self.backends, seeds=seeds, docs=ds)
        return SimpleNamespace(graph=graph, ids=ids, doc_start=ds, seeds=seeds, thoughts=thoughts, banned=banned)

    def __call__(self, input_ids: torch.Tensor, doc_start: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.device.type != "cuda":
            raise ValueError(f"input_ids must be a CUDA tensor for CUDA-graph sampling, got "
                             f"{getattr(input_ids, 'device', type(input_ids).__name__)}")
        if input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            raise ValueError(f"input_ids must be (B, T) int64, got {tuple(input_ids.shape)} {input_ids.dtype}")
        if doc_start is not None:
            from kernels.reference import check_doc_start
            check_doc_start(doc_start, *input_ids.shape, input_ids.device)
        fp = self._fingerprint()
        key = (tuple(input_ids.shape), self._autocast_dtype(), input_ids.device, doc_start is not None)
        if fp != self.fingerprint or len(self.graphs) >= MAX_GRAPHS and key not in self.graphs:
            self.graphs.clear()                   # free the old graphs (and their pool) before capturing anew
            self.pool = self.stream = self.last = None
            self.fingerprint = fp
        with torch.cuda.device(input_ids.device):
            g = self.graphs.get(key)
            if g is None:
                g = self.graphs[key] = self._capture(input_ids, doc_start, key)
            g.ids.copy_(input_ids)
            if doc_start is not None:
                g.doc_start.copy_(doc_start)
            for l in range(g.seeds.numel()):      # the eager loop's draws: one (1,) key per step
                torch.randint(0, 2**62, (1,), generator=self.generator, device=g.seeds.device, dtype=torch.int64,
                              out=g.seeds[l:l + 1])
            g.graph.replay()
            self.last = g
            return g.thoughts.clone()

    def last_seeds(self) -> torch.Tensor:
        """The Philox keys of the last replay (to recompute it eagerly: `sample_thoughts(..., seeds=...)`)."""
        if self.last is None:
            raise RuntimeError("no replay yet")
        return self.last.seeds.clone()
