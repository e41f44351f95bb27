"""FSDP2, activation checkpointing and sharded checkpoints (quietstar/parallel.py), on CPU with gloo.

- one FSDP2 step on 2 ranks equals the single-process step on the same global batch (loss, gradients),
  both schedules, with and without activation checkpointing (tests/fsdp_step_worker.py under torchrun);
- activation checkpointing recomputes every decoder layer and its backward is bit-identical to the
  plain one (every attention backend's forward is deterministic), for both schedules;
- a sharded checkpoint resumes on another world size (2 -> 1, 1 -> 2) and ends where an uninterrupted
  run ends; the converter writes the same export as the run; a save killed midway leaves the previous
  checkpoint loadable and nothing under the new name;
- combinations that cannot work are refused with a message naming the flags.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from quietstar import parallel
from quietstar.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from fsdp_step_worker import step, tiny_model  # noqa: E402

TINY = ["--model-hidden-size", "32", "--model-num-layers", "2", "--model-num-heads", "4", "--model-num-kv-heads",
        "2", "--model-head-dim", "8", "--model-intermediate-size", "64", "--M", "2", "--K", "2", "--P", "2",
        "--seq-len", "16", "--lm-head", "reference", "--attention", "split", "--steps", "2", "--lr", "3e-3",
        "--tau-sample", "1e-6", "--grad-clip", "1", "--device", "cpu", "--parallel", "fsdp"]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _launch(target, args, nproc, timeout=600):
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + target
    else:
        cmd = [sys.executable] + target
    p = subprocess.Popen(cmd + args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.terminate()                # torchrun stops its workers (each in its own session) on SIGTERM
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        pytest.fail(f"{' '.join(target)}: no end after {timeout} s (a rank waiting in a collective?)\n{err[-3000:]}")
    assert p.returncode == 0, out[-3000:] + err[-3000:]
    return subprocess.CompletedProcess(cmd + args, p.returncode, out, err)


# ----------------------------------------------------------------------------------------------
# one step: FSDP2 on 2 ranks == one process on the whole batch
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fsdp_step_equals_single_process(tmp_path):
    out = tmp_path / "step.json"
    _launch([str(ROOT / "tests" / "fsdp_step_worker.py")], [str(out)], nproc=2)
    res = json.loads(out.read_text())
    assert set(res) == {"sample-then-train/split/ac=False", "sample-then-train/split/ac=True",
                        "sequential/reference/ac=False", "sequential/reference/ac=True"}
    for case, r in res.items():
        assert r["n_params"] == r["n_fsdp_grads"] == 28, case      # the markers and mixing head included
        assert r["loss_rel"] < 1e-6, (case, r)
        assert r["min_cos"] > 0.99999, (case, r)
        # the cosine cannot see a wrongly scaled gradient (e.g. per-rank instead of global counts): the norm can
        assert r["max_grad_rel_err"] < 1e-4, (case, r)


# ----------------------------------------------------------------------------------------------
# activation checkpointing: recomputed, and the same backward bit for bit
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule,attention", [
    ("sample-then-train", "reference"), ("sample-then-train", "split"),
    pytest.param("sample-then-train", "triton", marks=pytest.mark.slow),
    ("sequential", "reference"), ("sequential", "split")])
def test_activation_checkpointing_backward_is_identical(schedule, attention):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (2, 11), generator=g)
    vn = torch.rand(2, 11, generator=g) > 0.2
    thoughts = torch.randint(0, 97, (2, 2, 11, 2), generator=g)
    plain = tiny_model(head_dim=16)                # the Triton kernels take D in multiples of 16
    ckpt = tiny_model(head_dim=16)
    parallel.apply_activation_checkpointing(ckpt)
    runs = {"plain": 0, "ckpt": 0}                 # calls of the decoder layers (pre-hooks: a recomputation stops early)

    def count(name):
        def hook(*args):
            runs[name] += 1
        return hook
    for layer in plain.lm.model.layers:
        layer.register_forward_pre_hook(count("plain"))
    for layer in ckpt.lm.model.layers:
        layer._checkpoint_wrapped_module.register_forward_pre_hook(count("ckpt"))
    l0 = step(plain, ids, vn, thoughts, schedule, attention)
    l1 = step(ckpt, ids, vn, thoughts, schedule, attention)
    assert runs["plain"] > 0 and runs["ckpt"] == 2 * runs["plain"], f"not every layer call was recomputed: {runs}"
    assert torch.equal(l0, l1)
    named = {n.replace("_checkpoint_wrapped_module.", ""): p for n, p in ckpt.named_parameters()}
    assert named.keys() == dict(plain.named_parameters()).keys()
    assert ckpt.state_dict().keys() == plain.state_dict().keys()    # checkpoints and exports unchanged
    for n, p in plain.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, named[n].grad), n


@pytest.mark.gpu
def test_activation_checkpointing_backward_is_identical_on_gpu():
    """The same on CUDA with the Triton attention (fp32 model): the GPU's recomputed forward is bitwise
    the stored one too (no atomics in our kernels; cuBLAS GEMMs repeat exactly on one device)."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (2, 37), generator=g).cuda()
    vn = (torch.rand(2, 37, generator=g) > 0.2).cuda()
    thoughts = torch.randint(0, 97, (2, 2, 37, 2), generator=g).cuda()
    plain, ckpt = tiny_model(head_dim=16).cuda(), tiny_model(head_dim=16).cuda()
    parallel.apply_activation_checkpointing(ckpt)
    assert torch.equal(step(plain, ids, vn, thoughts, "sample-then-train", "triton"),
                       step(ckpt, ids, vn, thoughts, "sample-then-train", "triton"))
    named = {n.replace("_checkpoint_wrapped_module.", ""): p for n, p in ckpt.named_parameters()}
    for n, p in plain.named_parameters():
        assert torch.equal(p.grad, named[n].grad), n


# ----------------------------------------------------------------------------------------------
# building the sharded model: only rank 0 reads the weights
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bench_fsdp_load_gives_every_rank_rank0s_shards(tmp_path):
    """2 ranks: the shards of `shard_from_rank0` (rank 1 builds on meta) equal those of every rank building
    the model (checksums; the script exits 1 otherwise), and the table is written."""
    r = _launch([str(ROOT / "benchmarks" / "bench_fsdp_load.py")], ["--tiny", "--out", str(tmp_path)], nproc=1)
    runs = json.loads((tmp_path / "fsdp_load.json").read_text())["runs"]
    assert {m: [x["rank"] for x in recs] for m, recs in runs.items()} == {"rank0": [0, 1], "every": [0, 1]}
    assert runs["rank0"][1]["checksum"] == runs["every"][1]["checksum"] != runs["every"][0]["checksum"]
    assert "| rank0: rank 0 builds" in (tmp_path / "fsdp_load.md").read_text() and "Sum over the ranks" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("case", ["untied", "fail0", "fail1", "mismatch"])
def test_shard_from_rank0_agrees_or_fails_on_every_rank(case, tmp_path):
    """2 ranks: rank 0's weights untied under a tied config reach every rank untied (and the loss is rank
    0's); a rank that cannot build makes every rank raise its error (none waits in a broadcast); a model
    whose parameters differ from the architecture is refused on every rank."""
    _launch([str(ROOT / "tests" / "fsdp_build_worker.py")], [str(tmp_path), case], nproc=2, timeout=180)  # a hang fails
    recs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    if case == "untied":
        for r in recs:
            assert r["equal"] and not r["tied"], r
            assert abs(r["loss"] - r["ref_loss"]) <= 1e-6 * abs(r["ref_loss"]), r
    else:
        want = {"fail0": "rank 0 cannot read the weights", "fail1": "rank 1 cannot build the architecture",
                "mismatch": "rank 0's model has other parameters"}[case]
        assert all(r.get("error", "").startswith(want) for r in recs), recs


@pytest.mark.gpu
def test_shard_from_rank0_on_gpu():
    """One rank on CUDA (NCCL, in a fresh process), as `quietstar-train --parallel fsdp` on one GPU: the
    model built on the CPU reaches the GPU through fully_shard, module by module, holds the CPU build's
    values, everything on the GPU, and trains a step with the Triton kernels. (The broadcast to other
    ranks needs two GPUs: it is tested on the CPU with gloo.)"""
    code = """
import torch, sys
sys.path.insert(0, "tests")
from fsdp_step_worker import step, tiny_model
from quietstar import parallel
ref = tiny_model(head_dim=16).state_dict()
model = parallel.shard_from_rank0(lambda: tiny_model(head_dim=16), lambda: tiny_model(head_dim=16),
                                  torch.device("cuda"), activation_checkpointing=True)
assert all(t.device.type == "cuda" for t in list(model.parameters()) + list(model.buffers()))
got = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in model.state_dict().items()}
assert got.keys() == ref.keys(), got.keys() ^ ref.keys()
for k, v in ref.items():
    assert torch.equal(getattr(got[k], "full_tensor", lambda: got[k])().cpu(), v), k
g = torch.Generator().manual_seed(2)
ids = torch.randint(0, 97, (2, 37), generator=g).cuda()
thoughts = torch.randint(0, 97, (2, 2, 37, 2), generator=g).cuda()
with torch.autocast("cuda", dtype=torch.bfloat16):      # as quietstar-train runs it (bf16 compute)
    loss = step(model, ids, None, thoughts, "sample-then-train", "triton")
assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
print("OK", flush=True)
del model, loss
parallel.exit_process()
"""
    env = {k: v for k, v in _env().items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-3000:] + r.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# sharded checkpoints: other world sizes, the converter, a killed save
# ----------------------------------------------------------------------------------------------
def _train(out, nproc, batch, extra=()):
    _launch(["-m", "quietstar.train"], TINY + ["--batch-size", str(batch), "--out-dir", str(out)] + list(extra),
            nproc)
    return out


def _export_weights(folder):
    from safetensors.torch import load_file
    return {**load_file(str(folder / "model.safetensors")),
            **{"qs." + k: v for k, v in load_file(str(folder / "quietstar.safetensors")).items()}}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 steps of 2 micro-batches, global batch 2, a checkpoint after step 1: on 2 ranks (B=1 each, with a
    held-out evaluation before and after: the root's parameters gathered outside its forward), and on 1
    rank (B=2, with activation checkpointing)."""
    base = tmp_path_factory.mktemp("fsdp")
    return {"two": _train(base / "two", 2, 1, ["--ckpt-every", "1", "--grad-accum", "2", "--eval-rows", "2"]),
            "one": _train(base / "one", 1, 2, ["--ckpt-every", "1", "--grad-accum", "2", "--activation-checkpointing"])}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")     # DCP read in this process, on purpose
def test_sharded_checkpoint_resumes_on_other_world_sizes(runs, tmp_path):
    two, one = _export_weights(runs["two"] / "export"), _export_weights(runs["one"] / "export")
    _assert_same(two, one)                       # 2 ranks x B=1 == 1 rank x B=2
    meta = json.loads((runs["two"] / "step000001" / parallel.META_FILE).read_text())
    assert (meta["step"], meta["world_size"]) == (1, 2)
    r21 = _train(tmp_path / "r21", 1, 2, ["--grad-accum", "2", "--resume", str(runs["two"] / "step000001")])
    r12 = _train(tmp_path / "r12", 2, 1, ["--grad-accum", "2", "--resume", str(runs["one"] / "step000001")])
    _assert_same(_export_weights(r21 / "export"), two)
    _assert_same(_export_weights(r12 / "export"), one)
    # the step-1 checkpoint is not the end: resuming from it did train a step
    from torch.distributed import checkpoint as dcp
    model = parallel.plain_model(meta["config"])
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(runs["two"] / "step000001"), no_dist=True)
    ck1 = {k: v for k, v in state["model"].items() if k.startswith("lm.model.layers")}
    assert max((ck1[k] - two[k.removeprefix("lm.")]).abs().max().item() for k in ck1) > 1e-4


def test_a_failed_build_leaves_no_reference_cycle():
    """The error a build raises reaches the caller without a reference cycle through its traceback's frames, so
    those frames' objects go when the caller lets the error go, not at the interpreter's teardown (where, kept
    alive by such a cycle, collecting them aborted a rank in about 1 two-rank run in 3, after its error message)."""
    import gc
    import weakref
    alive = []

    def build_here():
        model = torch.nn.Linear(2, 2)
        alive.append(weakref.ref(model))
        raise ValueError("cannot build")
    gc.disable()                     # only reference counting frees: a cycle would keep the model
    try:
        try:
            parallel._built_on_every_rank(build_here)
        except ValueError as e:
            assert str(e) == "cannot build"
        assert alive[0]() is None
    finally:
        gc.enable()


def test_remake_rope_computes_the_buffers_on_the_cpu_and_moves_them():
    """RoPE's buffers (in no state dict) of an empty-built model: the stock values, on the model's device."""
    from quietstar import ModelConfig, build_decoder
    from quietstar.model import remake_rope
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64)
    want = dict(build_decoder(cfg).model.rotary_emb.named_buffers())
    with torch.device("meta"):
        lm = build_decoder(cfg, weights=False)
    remake_rope(lm, torch.device("meta"))
    assert {n: b.device.type for n, b in lm.model.rotary_emb.named_buffers()} == {n: "meta" for n in want}
    remake_rope(lm)
    got = dict(lm.model.rotary_emb.named_buffers())
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, "config-only"], ids=["untied", "config-tied-weights-untied"])
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")     # the converter reads DCP in this process
def test_sharded_resume_reads_no_base_weights(tmp_path, base_folder, tied, capsys):
    """A --parallel fsdp run resumed on 2 ranks from 1 rank's checkpoint, after the base model's weight files are
    deleted: every rank builds the architecture empty (its embeddings untied, as the saved model's were, also
    where the config says tied) and the checkpoint's shards fill it. It ends where the uninterrupted run ends.
    (Tied embeddings: test_sharded_checkpoint_resumes_on_other_world_sizes.) The converter refuses the changed
    folder too, and converts with --model once the folder has moved."""
    folder = base_folder(tied)
    common = ["--model", str(folder)] + TINY[TINY.index("--M"):] + ["--grad-accum", "2"]
    _launch(["-m", "quietstar.train"], common + ["--batch-size", "2", "--ckpt-every", "1", "--out-dir",
                                                 str(tmp_path / "a")], 1)
    meta = json.loads((tmp_path / "a" / "step000001" / parallel.META_FILE).read_text())
    assert all(len(names) == 1 for names, _ in meta["shared_params"])     # untied: one name per parameter
    for f in folder.glob("*.safetensors"):
        f.unlink()                                            # the base weights are gone
    _launch(["-m", "quietstar.train"], ["--resume", str(tmp_path / "a" / "step000001"), "--batch-size", "1",
                                        "--out-dir", str(tmp_path / "b")], 2)
    _assert_same(_export_weights(tmp_path / "b" / "export"), _export_weights(tmp_path / "a" / "export"))
    if tied is False:      # the folder now describes another model: refused on every rank, in one line
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "quietstar.train", "--resume", str(tmp_path / "a" / "step000001"), "--batch-size",
                            "1", "--out-dir", str(tmp_path / "c")], cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=300)
        assert r.returncode != 0 and not (tmp_path / "c").exists(), r.stderr[-3000:]
        # (torchrun stops the other rank once one has exited, so that one may not have printed its line yet; the
        # two ranks' lines may interleave)
        msg = (f"quietstar-train: error: --model {folder}: its config.json changed since the run in --resume "
               f"{tmp_path / 'a' / 'step000001'} began")
        assert 1 <= r.stderr.count(msg) == r.stderr.count("error:") <= 2, r.stderr[-3000:]
        assert "terminate called" not in r.stderr, r.stderr[-3000:]
        final, exp = tmp_path / "a" / "final", tmp_path / "exp"

        def convert_fails(argv, *needles):
            capsys.readouterr()
            assert parallel.main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and all(n in err[0] for n in needles) and not exp.exists(), (needles, err)
        convert_fails([str(final), str(exp), "--model", str(folder)], f"--model {folder}: the checkpoint's parameters "
                      "do not fit", "checkpoint (32, 64), model (32, 96)")
        # a change that keeps every shape is caught by the checkpoint's fingerprint of the base model
        (folder / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-3}))
        convert_fails([str(final), str(exp), "--model", str(folder)], f"--model {folder}: its config.json changed "
                      f"since the run in checkpoint {final} began")
        (folder / "config.json").write_text(json.dumps(cfg))
        moved = folder.rename(folder.with_name("base_moved"))
        convert_fails([str(final), str(exp)], f"checkpoint {final}: the run's base model folder {folder} is not there",
                      "--model PATH")
        assert parallel.main([str(final), str(exp), "--model", str(moved)]) == 0
        _assert_same(_export_weights(exp), _export_weights(tmp_path / "a" / "export"))
        assert (exp / "tokenizer.json").read_text() == (tmp_path / "a" / "export" / "tokenizer.json").read_text()


@pytest.mark.slow
def test_converter_writes_the_runs_export(runs, tmp_path):
    from quietstar.model import QuietStarModel
    _launch(["-m", "quietstar.parallel"], [str(runs["two"] / "final"), str(tmp_path / "exp")], nproc=1)
    _assert_same(_export_weights(tmp_path / "exp"), _export_weights(runs["two"] / "export"))
    model = QuietStarModel.from_pretrained(tmp_path / "exp")
    assert model.thought.M == 2 and model.markers.shape == (2, 32)
    assert (tmp_path / "exp" / "tokenizer.json").read_text() == (runs["two"] / "export" / "tokenizer.json").read_text()


def _objects(seed):
    model = tiny_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    return model, opt, sched


def test_killed_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    """Without a process group (one process): save at step 1, then a save at step 2 that dies while
    writing its shards. The step-2 name never appears, the step-1 checkpoint loads, a later save works."""
    from torch.distributed.checkpoint import filesystem
    from torch.distributed.checkpoint.api import CheckpointException
    model, opt, sched = _objects(0)
    rng = {"torch": torch.get_rng_state()}
    parallel.save_checkpoint(tmp_path / "step1", model, opt, sched, 1, rng, {})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def die(*a, **k):
        raise OSError("killed while writing the shards")
    monkeypatch.setattr(filesystem, "_write_files_from_queue", die)
    with pytest.raises(CheckpointException) as e:          # DCP re-raises what a rank raised
        parallel.save_checkpoint(tmp_path / "step2", model, opt, sched, 2, rng, {})
    assert "killed while writing" in repr(e.value.failures)
    monkeypatch.undo()
    assert not (tmp_path / "step2").exists() and (tmp_path / "step2.tmp").exists()
    with pytest.raises(FileNotFoundError, match="not a complete sharded checkpoint"):
        parallel.read_meta(tmp_path / "step2.tmp")
    fresh, fopt, fsched = _objects(1)
    step_, got = parallel.load_checkpoint(tmp_path / "step1", fresh, fopt, fsched, {"torch": torch.get_rng_state()})
    assert step_ == 1 and torch.equal(got["torch"], rng["torch"])
    ref, _, _ = _objects(0)
    for (n, a), b in zip(fresh.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), n
    parallel.save_checkpoint(tmp_path / "step2", model, opt, sched, 2, rng, {})   # clears the .tmp
    assert (tmp_path / "step2").exists() and not (tmp_path / "step2.tmp").exists()


# ----------------------------------------------------------------------------------------------
# refused combinations
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,flags", [
    ({"parallel": "fsdp", "cuda_graphs": True}, ("--parallel fsdp", "--cuda-graphs")),
    ({"activation_checkpointing": True, "cuda_graphs": True}, ("--activation-checkpointing", "--cuda-graphs")),
    ({"parallel": "zero3"}, ("--parallel",)),
])
def test_bad_combinations_refused(kw, flags):
    with pytest.raises(ValueError) as e:
        TrainConfig(**kw)
    msg = str(e.value)
    assert "\n" not in msg and all(f in msg for f in flags), msg


def test_bad_combination_refused_on_the_command_line():
    from quietstar.train import config_from_args
    with pytest.raises(ValueError, match="--parallel fsdp does not work with --cuda-graphs"):
        config_from_args(["--parallel", "fsdp", "--cuda-graphs", "--device", "cpu"])


def test_unsupported_model_refused():
    model = tiny_model()
    model.lm.model.layers = torch.nn.Sequential(*model.lm.model.layers)      # not where FSDP looks for layers
    for fn in (parallel.apply_activation_checkpointing, lambda m: parallel.apply_fsdp(m, torch.device("cpu"))):
        with pytest.raises(ValueError, match="--parallel fsdp / --activation-checkpointing: unsupported model"):
            fn(model)
    shared = tiny_model()
    shared.lm.model.layers[0].mlp.down_proj.weight = shared.lm.lm_head.weight   # a layer shares a root parameter
    with pytest.raises(ValueError, match="--parallel fsdp: unsupported model, parameters"):
        parallel.decoder_layers(shared)


# ----------------------------------------------------------------------------------------------
# the GPU benchmark: fails fast without CUDA, its CPU rehearsal runs the same code
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_bench_fsdp_needs_cuda(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_fsdp.py"), "--out", str(tmp_path)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr and not any(tmp_path.iterdir())


@pytest.mark.slow
def test_bench_fsdp_dry_run(tmp_path):
    _launch([str(ROOT / "benchmarks" / "bench_fsdp.py")], ["--dry-run", "--out", str(tmp_path), "--steps", "1",
                                                          "--warmup", "1"], nproc=1)
    res = json.loads((tmp_path / "fsdp_ws1.json").read_text())
    assert [(r["ac"], r["status"]) for r in res["runs"]] == [(True, "ok"), (False, "ok")]
    assert res["runs"][0]["loss"] == pytest.approx(res["runs"][1]["loss"], rel=1e-5)   # same model, same step


def test_bench_fsdp_budget_spent_skips_and_still_writes(tmp_path):
    """--budget-s: a configuration with under 20 s of the budget left is not started but reported SKIPPED, the
    tables are written anyway (bench_fsdp closes learn_experiment.sh's first device call), and it exits 1."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_fsdp.py"), "--dry-run", "--budget-s", "5",
                        "--out", str(tmp_path)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    runs = json.loads((tmp_path / "fsdp_ws1.json").read_text())["runs"]
    assert [(x["ac"], x["status"].split(" ")[0]) for x in runs] == [(True, "SKIPPED")]
    assert "| on | 2 | 16 | SKIPPED (" in (tmp_path / "fsdp_ws1.md").read_text()


def test_bench_fsdp_keeps_a_record_printed_before_a_failed_exit(monkeypatch):
    """A configuration whose process printed its measurement and then died in its teardown (the SIGABRT seen in
    1 of 60 FSDP exits) keeps the measurement, with the exit noted; one that printed nothing is FAILED."""
    import types
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_fsdp
    rec = {"ac": True, "B": 8, "T": 256, "status": "ok", "ms": 123.0}
    outs = iter([(json.dumps(rec) + "\n", -6), ("", -6)])

    def fake_run(cmd, **kw):
        out, rc = next(outs)
        return subprocess.CompletedProcess(cmd, rc, stdout="step 1\n" + out, stderr="terminate called ...")
    monkeypatch.setattr(bench_fsdp.subprocess, "run", fake_run)
    args = types.SimpleNamespace(T=256, steps=1, warmup=1, dry_run=True)
    got = bench_fsdp.run(True, 8, args, 60)
    assert got["status"] == "ok" and got["ms"] == 123.0 and got["exit"] == "rc=-6 after printing its record"
    assert bench_fsdp.run(True, 8, args, 60)["status"] == "FAILED rc=-6"


def test_memory_plan_recovers_a_known_model():
    """benchmarks/memory_plan.py's analysis on synthetic points t = F + B (r0(T) + n r1(T)) with quadratic
    r0, r1: it recovers F and the per-row fits, and the plan adds the counted state to them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import memory_plan as mp
    F = {False: 5e8, True: 4e8}
    r0 = {False: (1e8, 2e6, 10.0), True: (1e8, 2e6, 10.0)}
    r1 = {False: (3e6, 8e6, 0.0), True: (1e6, 6e4, 0.0)}        # linear in T: what a layer keeps
    points = [{"layers": n, "T": T, "B": B, "ac": ac,
               "transient": F[ac] + B * (np.polyval(r0[ac][::-1], T) + n * np.polyval(r1[ac][::-1], T))}
              for ac in (False, True) for T in (16, 32, 64, 128) for n in (1, 2) for B in ((1, 2) if T == 32 else (1,))]
    fixed = {ac: mp.fixed_part(points, ac, "transient") for ac in (False, True)}
    assert fixed == pytest.approx(F)
    pl = mp.per_layer(points, fixed, "transient")
    fits = {}
    for ac in (False, True):
        ts = sorted(T for (T, a) in pl if a == ac)
        fits[ac] = (mp.r0_model(ts, [pl[(T, ac)][0] for T in ts]), mp.fit_line(ts, [pl[(T, ac)][1] for T in ts]))
    for T in (96, 128):                         # between measured T (interpolated) and at one
        for ac in (False, True):
            want = np.polyval(r0[ac][::-1], T) + 32 * np.polyval(r1[ac][::-1], T)
            if ac:                              # or one plain layer's peak and 31 checkpointed inputs
                want = max(want, np.polyval(r0[False][::-1], T) + np.polyval(r1[False][::-1], T)
                           + 31 * np.polyval(r1[True][::-1], T))
            assert mp.act_row(fits, ac, T) == pytest.approx(want, rel=1e-6 if T == 128 else 1e-3)
    T = 256                                     # beyond: r0 continues the line through the two largest T
    r0_64, r0_128 = (np.polyval(r0[False][::-1], t) for t in (64, 128))
    r0_256 = r0_128 + 128 * (r0_128 - r0_64) / 64
    assert mp.act_row(fits, False, T) == pytest.approx(r0_256 + 32 * np.polyval(r1[False][::-1], T), rel=1e-6)
    res = mp.analyse(points, "transient")       # the same through the report's analysis
    last = [r for r in res["per_layer"] if r["T"] == 128]
    assert [r["r1_holdout"] for r in last] == pytest.approx([np.polyval(r1[r["ac"]][::-1], 128) for r in last])
    rows = mp.plan(fits, F, mp.MISTRAL_7B)
    n = mp.mistral7b_params(mp.MISTRAL_7B)
    assert 7.2e9 < n["total"] < 7.3e9           # Mistral-7B (untied head) plus the extras
    r = next(r for r in rows if (r["ranks"], r["B"], r["T"], r["ac"]) == (8, 2, 256, True))
    act = F[True] + 2 * mp.act_row(fits, True, 256)
    assert r["peak_gb"] == pytest.approx((16 * n["total"] / 8 + r["buffers_gb"] * 1e9 + act) / 1e9)
    assert r["fits_80gb"] == (r["peak_gb"] <= 72)


def test_run_folder_helpers_know_sharded_checkpoints(tmp_path):
    """--keep-last, --overwrite and a continued run handle stepNNNNNN/ folders (fsdp) like .pt files (ddp);
    a .tmp folder of a killed write is not a checkpoint and is cleaned up."""
    from quietstar.train import prepare_out_dir, prune_checkpoints, run_files, step_checkpoints
    for s in (2, 4, 6):
        (tmp_path / f"step{s:06d}").mkdir()
        (tmp_path / f"step{s:06d}" / ".metadata").write_text("x")
    (tmp_path / "step000008.tmp").mkdir()
    (tmp_path / "step000001.pt").write_text("x")
    assert [s for s, _ in step_checkpoints(tmp_path)] == [1, 2, 4, 6]
    prune_checkpoints(tmp_path, 2)
    assert [s for s, _ in step_checkpoints(tmp_path)] == [4, 6]
    prepare_out_dir(tmp_path, continuing=True, overwrite=False, start=4)
    assert [s for s, _ in step_checkpoints(tmp_path)] == [4] and not (tmp_path / "step000008.tmp").exists()
    (tmp_path / "final").mkdir()
    assert {p.name for p in run_files(tmp_path)} == {"final", "step000004"}
    prepare_out_dir(tmp_path, continuing=False, overwrite=True, start=0)
    assert run_files(tmp_path) == []
