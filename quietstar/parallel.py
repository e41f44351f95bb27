"""Sharded training for models that do not fit one GPU: FSDP2, activation checkpointing, sharded checkpoints.

All of it is PyTorch's own machinery, as torchtitan uses it:

- `apply_fsdp`: `torch.distributed.fsdp.fully_shard` on every decoder layer, then on the root
  `QuietStarModel`. The root group holds the embedding, the final norm, the LM head (tied or not) and
  the Quiet-STaR extras (the <sot>/<eot> markers and the mixing head): they are sharded like any
  parameter and their gradients reduce-scattered with the rest. On CUDA the policy is bf16 compute
  (parameters all-gathered in bf16), fp32 master weights, optimizer state and gradient reduction.
  Reduce-scatter averages over ranks, as DDP does, so the loss is divided by the global counts / world
  (`denominators` in quietstar/train.py): the update is the one of the whole global batch.
- `shard_from_rank0`: how a fresh `quietstar-train --parallel fsdp` run builds its model. Only rank 0
  reads the weights (the full fp32 model in its host memory); the other ranks build the architecture on
  the meta device. `fully_shard` moves one module at a time to rank 0's GPU and keeps its shard; the
  other ranks allocate theirs, and rank 0 broadcasts its state dict and buffers, each rank keeping its
  shard. One host copy of the model per job instead of one per rank (benchmarks/bench_fsdp_load.py).
- `shard_empty` / `empty_model`: how a resumed run builds its model (sharded or not). Nobody reads the
  weights: every rank builds the architecture on the meta device, shares its parameters as the
  checkpoint records (`shared_params`: tied embeddings or not), allocates them (its shards) and computes
  RoPE's buffers again; the checkpoint fills the rest.
- `apply_activation_checkpointing`: each decoder layer recomputes its forward in the backward
  (`torch.utils.checkpoint`, non-reentrant, through `checkpoint_wrapper`). Calls without gradients
  (the M thought-sampling steps) run the layer directly. The recomputation is exact: every attention
  backend's forward is deterministic (no atomics, fixed reduction order: the Triton kernels and
  PyTorch's CPU/CUDA SDPA and matmuls), and no decoder layer draws random numbers, so the recomputed
  activations equal the stored ones bit for bit and so does the backward (tests/test_parallel.py).
  The sequential schedule's K/V cache sees a layer's forward twice; `ThoughtCache.put_chain` returns
  the same cache on the second call without growing it.
- `save_checkpoint` / `load_checkpoint`: `torch.distributed.checkpoint` (DCP) folders holding the model
  (extras included), the optimizer, the scheduler, the step, the config and every rank's RNG state.
  Model and optimizer go through `get_state_dict` / `set_state_dict`, so a checkpoint loads on any world
  size (N ranks -> 1 and 1 -> N) and into an unsharded model. Every rank writes into `<name>.tmp`; only
  when all have finished does rank 0 rename it to `<name>`: a kill at any moment leaves every earlier
  checkpoint whole, and a half-written one is never under a checkpoint's name. On another world size,
  the ranks the saving run had get their thought-sampling RNG back, new ranks start from their own seed.
- `export_checkpoint` / `load_plain`: a checkpoint (DCP folder or .pt file) -> the `QuietStarModel.save_pretrained` folder
  (`python -m quietstar.parallel CKPT EXPORT_DIR`; `--model PATH` where the run's base-model folder has moved,
  `--overwrite` to replace an earlier export).

Limits: one data-parallel mesh dimension (no tensor/pipeline parallelism, no HSDP); FSDP with CUDA graphs
is refused (the graphed sampler would capture buffers FSDP frees between calls).
"""
from __future__ import annotations

import builtins
import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

PARALLEL_MODES = ("ddp", "fsdp")
META_FILE = "quietstar_checkpoint.json"      # beside DCP's files: the config, the step, the world size
_CKPT_WRAPPED = "_checkpoint_wrapped_module."  # the name checkpoint_wrapper gives the layer it wraps


# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------
def check_options(parallel: str, activation_checkpointing: bool, cuda_graphs: bool) -> None:
    """Refuse the combinations that cannot work, with a one-line message naming the flags."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"--parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    if parallel == "fsdp" and cuda_graphs:
        raise ValueError("--parallel fsdp does not work with --cuda-graphs: the graphed sampler captures the decoder "
                         "weights once, FSDP frees and re-gathers them on every call (use --parallel ddp or "
                         "--no-cuda-graphs)")
    if activation_checkpointing and cuda_graphs:
        raise ValueError("--activation-checkpointing does not work with --cuda-graphs: the graph replays the "
                         "sampler's layer calls, a checkpointed layer must run eagerly to be recomputed (drop "
                         "one of the two flags)")


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of a QuietStarModel (`model.lm.model.layers`), or a clear error."""
    layers = getattr(getattr(getattr(model, "lm", None), "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError("--parallel fsdp / --activation-checkpointing: unsupported model, expected the decoder "
                         "layers as a non-empty nn.ModuleList at model.lm.model.layers (a Mistral/Llama "
                         f"*ForCausalLM), got {type(layers).__name__}")
    inside = {id(p) for layer in layers for p in layer.parameters()}
    outside = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in inside and ".layers." not in n]
    if outside:
        raise ValueError(f"--parallel fsdp: unsupported model, parameters {outside[:3]} are shared between a "
                         "decoder layer and the rest of the model (each layer is sharded on its own)")
    return layers


# ----------------------------------------------------------------------------------------------
# activation checkpointing and FSDP2
# ----------------------------------------------------------------------------------------------
def _checkpoint_if_grad(fn, *args, **kwargs):
    """torch.utils.checkpoint when the call builds a graph; a plain call otherwise (the no-grad sampling
    steps: nothing would be saved, and the checkpoint machinery would only cost time)."""
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    # preserve_rng_state=False: a decoder layer draws no random numbers (no dropout in training)
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


def apply_activation_checkpointing(model) -> None:
    """Wrap every decoder layer of `model` (in place) so that its activations are recomputed in the
    backward instead of stored. State-dict keys are unchanged (the wrapper strips its prefix)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer, checkpoint_fn=_checkpoint_if_grad)


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group even on one rank: outside `torchrun` start a 1-rank group in memory."""
    if dist.is_initialized():
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)


def exit_process(code: int = 0) -> None:
    """End a process that sharded or replicated a model without the interpreter's teardown: collect the modules'
    reference cycles (FSDP's hooks hold the device mesh and with it the process group), destroy the group, flush,
    os._exit. In the teardown an FSDP rank aborted ("terminate called without an active exception", SIGABRT) in
    about 1 run in 60 on 2 busy cores. The caller drops its own references to the model first."""
    import gc
    import sys
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def apply_fsdp(model, device: torch.device, mixed_precision: bool | None = None):
    """Shard `model` (a QuietStarModel, already on `device`) in place with FSDP2: every decoder layer, then
    the root. `mixed_precision` (default: on CUDA) all-gathers parameters in bf16 for compute and keeps
    fp32 master weights and fp32 gradient reduction. Returns the model (now also an FSDPModule)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    layers = decoder_layers(model)
    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    bf16 = device.type == "cuda" if mixed_precision is None else mixed_precision
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    # The root's forward takes the loss denominators (global target counts, up to B*T*P): they must stay
    # fp32 (bf16 would round counts above 256), so the root does not cast its inputs.
    fully_shard(model, mesh=mesh, mp_policy=dataclasses.replace(mp, cast_forward_inputs=False))
    return model


def shard_from_rank0(build, build_empty, device: torch.device, activation_checkpointing: bool = False,
                     mixed_precision: bool | None = None):
    """The FSDP2 model of `build()`, whose weights only rank 0 reads and only rank 0 holds whole.

    Rank 0 calls `build()`: the full model on the CPU. Every other rank calls `build_empty()` under
    `torch.device("meta")`: the architecture without memory. Before any other collective every rank learns
    whether a rank failed to build (each then raises that error: nobody waits in a broadcast for a rank
    that is gone) and how rank 0's parameters are shared: a config that says "tied" over a checkpoint
    with two different embedding tensors loads untied on rank 0, so the meta model is untied to match.
    `fully_shard` moves each decoder layer, then the root's remaining parameters, to `device` and keeps
    this rank's shard: rank 0's GPU holds one module unsharded at a time, never the whole model. The
    other ranks allocate their shards, and rank 0 broadcasts its state dict one tensor at a time (each
    rank keeps its shard: `set_model_state_dict` with `broadcast_from_rank0`) and its buffers (RoPE's,
    which no state dict holds). So a node holds one fp32 copy of the model in host memory, not one per
    rank. On one rank this is `apply_fsdp(build())`. Returns the model on `device`, every rank's
    parameters and buffers equal to rank 0's `build()`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    ensure_process_group(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world == 1:                   # nobody to broadcast to
        model = build()
        if activation_checkpointing:
            apply_activation_checkpointing(model)
        return apply_fsdp(model, device, mixed_precision)

    def build_here():
        if rank == 0:
            model = build()
        else:
            with torch.device("meta"):
                model = build_empty()
        return model, _shared_params(model)
    model, told = _built_on_every_rank(build_here)
    if any(_flat(g) != _flat(told[0]) for g in told[1:]):     # every rank decides alike
        raise ValueError("rank 0's model has other parameters than the architecture the other ranks built "
                         "from its config (names or shapes differ): cannot shard it from rank 0")
    if told[rank] != told[0]:                                 # rank > 0 on meta, shared otherwise
        _share_like(model, told[0])
    full = model.state_dict() if rank == 0 else {}   # rank 0's CPU tensors: fully_shard replaces the parameters' data
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    apply_fsdp(model, device, mixed_precision)
    if rank != 0:
        model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    with torch.no_grad():
        for b in model.buffers():
            dist.broadcast(b, src=0)
    return model


def shard_empty(build_empty, device: torch.device, shared, activation_checkpointing: bool = False,
                mixed_precision: bool | None = None, arg: str = "--resume"):
    """The FSDP2 model of `build_empty()`'s architecture, for a checkpoint loaded next (`load_checkpoint`):
    nobody reads the model's weight files. Every rank builds it on the meta device, shares its parameters
    as `shared` says (`shared_params` of the model that was saved: tied embeddings or not), shards it and
    allocates its shards on `device` (not initialised), then computes RoPE's buffers again (no state dict
    holds them). A checkpoint whose parameters (names or shapes) differ from the architecture is refused
    on every rank, naming `arg` and the first difference."""
    from .model import remake_rope
    ensure_process_group(device)
    shared = _from_json(shared)

    def build_here():
        with torch.device("meta"):
            model = build_empty()
        _check_rebuildable(model, arg)
        _check_fits(model, shared, arg)
        return model, None
    model, _ = _built_on_every_rank(build_here)
    _share_like(model, shared)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    apply_fsdp(model, device, mixed_precision)
    model.to_empty(device=device)
    remake_rope(model.lm, device)
    return model


def empty_model(build_empty, device: torch.device, shared, arg: str = "--resume"):
    """The unsharded model of `build_empty()`'s architecture on `device`, allocated but not initialised, its
    parameters shared as `shared` says and RoPE's buffers computed: for a state dict loaded next (a
    resumed run of one process or DDP). Nobody reads the model's weight files. Names or shapes that
    differ from the checkpoint are left for `load_state_dict` to report."""
    from .model import remake_rope
    shared = _from_json(shared)
    with torch.device("meta"):
        model = build_empty()
    _check_rebuildable(model, arg)
    model.to_empty(device=device)        # unties shared parameters (each gets its own memory): tied again below
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    _share_like(model, [g for g in shared if len(g[0]) > 1 and all(n in names for n in g[0])])
    remake_rope(model.lm, device)
    return model


def shared_params(model) -> list[list[list]]:
    """What a checkpoint stores of how `model`'s parameters are shared (`_shared_params`, JSON-ready), so that
    a resumed run can build the same model empty; activation checkpointing's wrapper is not in the names,
    and under FSDP the shapes are the full ones."""
    return [[list(ns), list(s)] for ns, s in _shared_params(model)]


def _from_json(shared) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    return sorted((tuple(ns), tuple(s)) for ns, s in shared)


def check_fits(model, shared, arg: str = "--resume") -> None:
    """Refuse, naming `arg` and the first difference, a checkpoint whose parameters (`shared`: its stored
    `shared_params`) differ in names or shapes from `model`'s (e.g. its architecture built on meta)."""
    _check_fits(model, _from_json(shared), arg)


def _check_fits(model, shared, arg: str) -> None:
    want, have = dict(_flat(shared)), dict(_flat(_shared_params(model)))
    if want != have:
        diff = sorted(want.keys() ^ have.keys()) or sorted(n for n in want if want[n] != have[n])
        n = diff[0]
        raise ValueError(f"{arg}: the checkpoint's parameters do not fit the model built from its configuration "
                         f"({len(diff)} differ, first: {n}: checkpoint {want.get(n, 'absent')}, model "
                         f"{have.get(n, 'absent')})")


def _check_rebuildable(model, arg: str) -> None:
    """An empty-built model gets its parameters from a checkpoint and RoPE's buffers computed again: any other
    buffer that no state dict holds could not be made again (none in a Mistral-style decoder)."""
    saved = set(model.state_dict())
    lost = [n for n, _ in model.named_buffers() if n not in saved and not n.startswith("lm.model.rotary_emb.")]
    if lost:
        raise ValueError(f"{arg}: the model has buffers that no checkpoint holds ({', '.join(lost[:3])}), which a "
                         "resumed run cannot compute again")


def agreed(fn):
    """`fn()` on every rank (the checks of a run, or the whole model of one process or DDP), then agree
    before any other collective: an error a rank met is raised on every rank (see `_built_on_every_rank`),
    so that a rank that fails alone (a node without the `--model` folder) ends every rank in one line
    instead of leaving the others in a later collective (DDP's constructor) until `torchrun` stops them.
    Returns `fn()`'s result. One process: `fn()`."""

    def run_here():
        return fn(), None
    result, _ = _built_on_every_rank(run_here)
    return result


def _built_on_every_rank(build_here):
    """Collective: `build_here()` -> (model, payload) on every rank, then (this rank's model, every rank's
    payload). Every rank raises the error a rank met: its own (re-raised as it was), else the lowest failed
    rank's (rebuilt from its type name and message), so that no rank waits in a later collective for one
    that is gone. The own error is re-raised from inside its `except` block, which frees it on the way
    out: an error kept in a variable of a frame in its own traceback makes a reference cycle that keeps
    every frame's objects alive until the interpreter's teardown, where collecting them aborted ranks
    ("terminate called without an active exception": 8 of 20 two-rank runs on CPU, 0 of 14 since)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    told = [None] * world
    try:
        model, payload = build_here()
    except Exception as e:
        if world > 1:
            dist.all_gather_object(told, ((type(e).__name__, str(e)), None))
        raise
    if world == 1:
        return model, [payload]
    dist.all_gather_object(told, (None, payload))
    failed = next(((r, f) for r, (f, _) in enumerate(told) if f is not None), None)
    if failed is not None:
        r, (name, msg) = failed
        cls = getattr(builtins, name, None)
        raise (cls(msg) if isinstance(cls, type) and issubclass(cls, Exception) else
               RuntimeError(f"rank {r}: {name}: {msg}"))
    return model, [p for _, p in told]


def _shared_params(model) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """Every parameter once: the names it has (more than one when tied; without activation checkpointing's
    wrapper) and its shape."""
    names = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), ([], tuple(p.shape)))[0].append(n.replace(_CKPT_WRAPPED, ""))
    return sorted((tuple(ns), shape) for ns, shape in names.values())


def _flat(groups) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter name, tied or not."""
    return sorted((n, s) for ns, s in groups for n in ns)


def _share_like(model, groups) -> None:
    """Make `model`'s parameters (unwrapped, the same names and shapes) shared as `groups` says (`_shared_params`
    of another model, or `shared_params` from a checkpoint); their values are not kept."""
    for names, _ in groups:          # one fresh parameter (on the model's device, not initialised) per group
        first = model.get_parameter(names[0])
        p = nn.Parameter(torch.empty_like(first), requires_grad=first.requires_grad)
        for n in names:
            owner, _, attr = n.rpartition(".")
            setattr(model.get_submodule(owner), attr, p)


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model):
    """Make the root's parameters whole for calls that bypass `model.forward` (evaluation calls
    `model.hidden` / `model.lm_head_weight` directly); a no-op without FSDP."""
    if not is_fsdp(model):
        yield
        return
    # Before the first training step nothing has run the root's forward, which is where FSDP decides who
    # is the root; a layer called first would make itself one. Decide it now (a no-op once decided).
    model._get_fsdp_state()._lazy_init()
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def grad_sync(fwd, sync: bool):
    """Context for one micro-batch's backward: reduce gradients across ranks only when `sync` (the last
    micro-batch of an optimizer step), for DDP (`no_sync`) and FSDP2 (`set_requires_gradient_sync`)."""
    if is_fsdp(fwd):
        fwd.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if sync or not hasattr(fwd, "no_sync"):
        return contextlib.nullcontext()
    return fwd.no_sync()


def full_grad_norm(gnorm) -> float:
    """The total norm clip_grad_norm_ returned, as a float (a DTensor under FSDP)."""
    return float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)


# ----------------------------------------------------------------------------------------------
# sharded checkpoints (torch.distributed.checkpoint)
# ----------------------------------------------------------------------------------------------
def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


@contextlib.contextmanager
def _dcp_quiet():
    """DCP without a process group (one process, on purpose) warns on every call that it assumes one
    process: that is the intent here, so the warning is dropped."""
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rng_key(rank: int) -> str:
    return f"rng_rank{rank}"


def save_checkpoint(path, model, opt, sched, step: int, rng: dict, config: dict, base: dict | None = None) -> Path:
    """Collective: write a DCP checkpoint folder `path` from every rank (see the module docstring); `base`: the
    base model's fingerprint (train.base_fingerprint), kept in the metadata file."""
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    path = Path(path)
    rank, world = _rank_world()
    tmp = path.with_name(path.name + ".tmp")
    if rank == 0 and tmp.exists():          # left by a run killed while writing
        shutil.rmtree(tmp)
    if world > 1:
        dist.barrier()
    shared = shared_params(model)            # the same on every rank: rank 0 writes it
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optimizer": osd, "scheduler": sched.state_dict(), "step": step, _rng_key(rank): rng}
    # returns on rank 0 after every rank's files are written; without a process group: one process
    with _dcp_quiet():
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    if rank == 0:
        (tmp / META_FILE).write_text(json.dumps({"step": step, "world_size": world, "config": config,
                                                 "shared_params": shared, "base": base}, indent=1))
        if path.exists():                    # re-running into the same folder: replace the old one
            old = path.with_name(path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)            # the one atomic step: before it no checkpoint of this name exists
    if world > 1:
        dist.barrier()
    return path


def read_meta(path, arg: str = "--resume") -> dict:
    """The config, step and world size stored with a DCP checkpoint; a clear error, naming `arg`, for anything
    else."""
    path = Path(path)
    if not (path / META_FILE).exists() or not (path / ".metadata").exists():
        raise FileNotFoundError(f"{arg} {path}: not a complete sharded checkpoint (no {META_FILE} / .metadata; "
                                "a folder ending in .tmp is one a killed run did not finish)")
    return json.loads((path / META_FILE).read_text())


def load_checkpoint(path, model, opt, sched, rng: dict) -> tuple[int, dict | None]:
    """Collective: load a DCP checkpoint into `model` (FSDP-sharded or not, any world size), `opt` and
    `sched`. `rng` is this rank's current RNG state (the template DCP loads into). Returns (step, this
    rank's saved RNG state, or None when the saving run had no such rank)."""
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    path = Path(path)
    meta = read_meta(path)
    rank, _ = _rank_world()
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optimizer": osd, "scheduler": sched.state_dict(), "step": 0}
    key = _rng_key(rank)
    has_rng = rank < meta["world_size"]
    if has_rng:
        state[key] = rng
    with _dcp_quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return int(state["step"]), state[key] if has_rng else None


# ----------------------------------------------------------------------------------------------
# export: the full model on one rank, as QuietStarModel.save_pretrained writes it
# ----------------------------------------------------------------------------------------------
def plain_model(config: dict, state_dict: dict | None = None):
    """An unsharded fp32 QuietStarModel on the CPU with the architecture of a run's `config` (a
    `dataclasses.asdict(Config)`), built empty (`empty_decoder_model`), with `state_dict` loaded into it when
    given (else its weights are to be loaded, then `fill`)."""
    from .config import ModelConfig, ThoughtConfig
    from .model import empty_decoder_model
    th = dict(config["thought"])
    th["banned_ids"] = tuple(th.get("banned_ids", ()))
    model = empty_decoder_model(ModelConfig(**config["model"]), ThoughtConfig(**th))
    return model if state_dict is None else fill(model, state_dict)


def fill(model, state_dict: dict):
    """Load a full state dict into an empty-built model and tie its embeddings again where they agree."""
    from .model import retie_embeddings
    model.load_state_dict(state_dict)
    retie_embeddings(model.lm)
    return model


def export_full(model, export_dir, config: dict, tokenizer=None) -> Path | None:
    """Collective: gather the full state dict of a sharded `model` on rank 0 and write `export_dir` in the
    `save_pretrained` layout there (other ranks return None)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank_world()[0] != 0:
        return None
    return plain_model(config, sd).save_pretrained(export_dir, tokenizer=tokenizer)


def load_plain(ckpt, base_model: str | None = None) -> tuple:
    """(an unsharded fp32 QuietStarModel on the CPU with a checkpoint's weights, the run's configuration), in one
    process without a process group: from a DCP folder of any world size (--parallel fsdp), or a .pt file
    (single process or DDP). The architecture comes from the base model's config.json (its weights are not read):
    the folder the run recorded, or `base_model` (the converter's --model: where that folder is now), which the
    returned configuration then names. A model whose parameters' names or shapes differ from the checkpoint's is
    refused."""
    if Path(ckpt).is_file():
        from .train import load_checkpoint
        ck = load_checkpoint(ckpt, mmap=True, arg="checkpoint")
        saved, state = ck, ck["model"]
    else:
        saved, state = read_meta(ckpt, arg="checkpoint"), None
    shared = saved.get("shared_params")
    config = _with_base_model(saved["config"], ckpt, base_model)
    arg = f"--model {base_model}" if base_model is not None else f"checkpoint {ckpt}"
    model = plain_model(config)
    if shared is not None:                   # checkpoints written before it was stored: load_state_dict checks
        _check_fits(model, _from_json(shared), arg)
    if base_model is not None:               # the same tokenizer and config.json, where the checkpoint records them
        from .config import ModelConfig
        from .train import base_fingerprint, check_moved_base, load_tokenizer
        mc = ModelConfig(**config["model"])
        check_moved_base(saved, mc, base_fingerprint(mc, load_tokenizer(mc)), f"checkpoint {ckpt}", legacy_ok=True)
    if state is None:
        from torch.distributed import checkpoint as dcp
        state = {"model": model.state_dict()}
        with _dcp_quiet():
            dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
        state = state["model"]
    try:
        return fill(model, state), config
    except RuntimeError as e:                # size mismatch / missing / unexpected keys
        raise ValueError(f"{arg}: the checkpoint's weights do not fit the model built from its configuration "
                         f"({str(e).strip().splitlines()[-1].strip()})") from e


def _with_base_model(config: dict, ckpt, base_model: str | None) -> dict:
    """The run's `config` with `base_model` (checked) as its base model when given; without it, the folder the run
    recorded must still be there, else the error says to give the converter's --model."""
    from .config import MODEL_PRESETS
    if base_model is not None:                # ModelConfig checks it is a model folder, naming --model
        return {**config, "model": {**config["model"], "name": base_model}}
    name = config["model"]["name"]
    if name not in MODEL_PRESETS and not (Path(name) / "config.json").is_file():
        raise ValueError(f"checkpoint {ckpt}: the run's base model folder {name} "
                         f"{'has no config.json' if Path(name).is_dir() else 'is not there (moved?)'}: give the "
                         "folder where it is now with --model PATH (its config.json and tokenizer are read, not its "
                         "weights)")
    return config


def export_checkpoint(ckpt, export_dir, tokenizer=None, base_model: str | None = None) -> Path:
    """A checkpoint (a DCP folder or a .pt file, see `load_plain`; `base_model` replaces the base-model folder the
    run recorded) -> the `QuietStarModel.save_pretrained` folder."""
    return load_plain(ckpt, base_model)[0].save_pretrained(export_dir, tokenizer=tokenizer)


def _check_export_dir(out: Path, overwrite: bool) -> None:
    """The converter's destination: a new or empty folder, or (with --overwrite) one holding an earlier export,
    which is replaced; anything else is refused before any loading."""
    from .model import QuietStarModel
    if out.exists() and not out.is_dir():
        raise ValueError(f"export {out}: a file is there; the export is a folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not held:
        return
    shown = f"{', '.join(held[:4])}{', ...' if len(held) > 4 else ''}"
    if not QuietStarModel.is_export(out):
        raise ValueError(f"export {out} is not empty ({shown}) and holds no Quiet-STaR export: give a new or empty "
                         "folder (--overwrite replaces only an earlier export)")
    if not overwrite:
        raise ValueError(f"export {out} already holds an export ({shown}): give a new folder, or --overwrite to "
                         "replace it")


def _write_replacing(model, out: Path, tokenizer) -> Path:
    """`model.save_pretrained(out)`; an earlier export in `out` is replaced whole (no file of it is left), and only
    once the new one is written."""
    if not out.is_dir() or not any(out.iterdir()):
        return model.save_pretrained(out, tokenizer=tokenizer)
    import tempfile
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, tokenizer=tokenizer)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, out.stat().st_mode & 0o7777)     # mkdtemp's folder is private: keep the folder's permissions
    shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _main(argv) -> int:
    from .train import CliParser
    ap = CliParser(prog="python -m quietstar.parallel",
                   description="Convert a Quiet-STaR checkpoint (a sharded DCP folder or a .pt file) "
                               "to the save_pretrained export folder (decoder + "
                               "quietstar.safetensors + quietstar.json)")
    ap.add_argument("checkpoint", help="a checkpoint folder written with --parallel fsdp (e.g. runs/x/step000100), "
                                       "or a .pt checkpoint of a single-process or DDP run (e.g. runs/x/step000100.pt)")
    ap.add_argument("export", help="the folder to write: a new or empty one (an earlier export only with --overwrite)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the earlier export in EXPORT (default: refuse a folder that is not empty)")
    ap.add_argument("--model", metavar="PATH", default=None,
                    help="the run's base model folder, where it is now if it has moved since training: its "
                         "config.json and tokenizer are read (not its weights); a model whose parameters do not fit "
                         "the checkpoint is refused (default: the folder the checkpoint records)")
    ap.add_argument("--no-tokenizer", action="store_true", help="do not save the run's tokenizer beside the model")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error (default: one line)")
    args = ap.parse_args(argv)
    ck, out = Path(args.checkpoint), Path(args.export)
    if not ck.exists():
        raise FileNotFoundError(f"checkpoint {ck}: no such file or folder")
    if ck.is_dir() and not (ck / META_FILE).exists():
        steps = sorted(p.name for p in ck.glob("step*") if p.suffix == ".pt" or p.is_dir())
        pts = (["final.pt"] if (ck / "final.pt").exists() else []) + steps[-2:]
        if pts:                             # a quietstar-train run folder: name what it holds, the last first
            raise ValueError(f"checkpoint {ck} is a run folder, not a checkpoint: give one of its checkpoints "
                             f"({', '.join(str(ck / n) for n in pts)})")
    _check_export_dir(out, args.overwrite)
    model, config = load_plain(args.checkpoint, args.model)
    tok = None
    if not args.no_tokenizer:                # the tokenizer the run trained with, as the run's own export has it
        from .config import ModelConfig
        from .train import load_tokenizer
        tok = load_tokenizer(ModelConfig(**config["model"]))
    print(f"export: {_write_replacing(model, out, tok)}")
    return 0


def main(argv=None) -> int:
    from .train import run_cli
    return run_cli("python -m quietstar.parallel", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
