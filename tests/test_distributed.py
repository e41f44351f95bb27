"""Data-parallel training (DDP over gloo on CPU): two ranks give the update of one rank with the
doubled batch. Thoughts are sampled near-greedily (tau_sample=1e-6) so that both runs sample the
same thoughts however the rows are split across ranks."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model-hidden-size", "32", "--model-num-layers", "2", "--model-num-heads", "4", "--model-num-kv-heads",
        "2", "--model-head-dim", "8", "--model-intermediate-size", "64", "--M", "2", "--K", "2", "--P", "2",
        "--seq-len", "16", "--lm-head", "reference", "--attention", "reference", "--steps", "2", "--lr", "3e-3",
        "--tau-sample", "1e-6", "--grad-clip", "0", "--device", "cpu"]


def run(args, out, nproc=1):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = "1"
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "quietstar.train"]
    else:
        cmd = [sys.executable, "-m", "quietstar.train"]
    r = subprocess.run(cmd + TINY + args + ["--out-dir", str(out)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return torch.load(out / "final.pt", weights_only=False)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """2 steps on 2 ranks x B=1, with a checkpoint after step 1: (final checkpoint, its folder)."""
    out = tmp_path_factory.mktemp("two")
    return run(["--batch-size", "1", "--ckpt-every", "1"], out, nproc=2), out


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_doubled_batch(two_ranks, tmp_path):
    two = two_ranks[0]
    one = run(["--batch-size", "2"], tmp_path / "one")
    half = run(["--batch-size", "1"], tmp_path / "half")
    a, b, c = two["model"], one["model"], half["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
    # the comparison can fail: one rank with the undoubled batch is a different update
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-4


@pytest.mark.slow
def test_checkpoint_of_two_ranks_resumes_on_one(two_ranks, tmp_path):
    """A 2-rank checkpoint (rank 0's full state dicts) continues on 1 rank with the doubled batch and
    ends where the 2-rank run ended."""
    two, out = two_ranks
    resumed = run(["--batch-size", "2", "--resume", str(out / "step000001.pt")], tmp_path / "resumed")
    assert resumed["step"] == two["step"] == 2
    for k in two["model"]:
        torch.testing.assert_close(resumed["model"][k], two["model"][k], rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{k}: {m}")
    # and the checkpoint matters: resuming from step 1 is not the same as stopping there
    ck1 = torch.load(out / "step000001.pt", weights_only=False)["model"]
    assert max((ck1[k] - two["model"][k]).abs().max().item() for k in ck1) > 1e-4


@pytest.mark.slow
def test_checkpoint_of_two_ranks_resumes_on_two_bit_for_bit(tmp_path):
    """With sampled thoughts (tau 1: each rank's draws matter), every rank's RNG state is in the checkpoint
    and comes back to that rank, so a 2-rank run resumed on 2 ranks ends exactly where the uninterrupted
    one ends."""
    sampled = ["--batch-size", "1", "--tau-sample", "1"]
    full = run(sampled + ["--ckpt-every", "1"], tmp_path / "full", nproc=2)
    ck = torch.load(tmp_path / "full" / "step000001.pt", weights_only=False)
    assert len(ck["rng_ranks"]) == 2 and not torch.equal(ck["rng_ranks"][0]["sampler"], ck["rng_ranks"][1]["sampler"])
    resumed = run(sampled + ["--resume", str(tmp_path / "full" / "step000001.pt")], tmp_path / "resumed", nproc=2)
    assert resumed["step"] == full["step"] == 2
    for k in full["model"]:
        assert torch.equal(resumed["model"][k], full["model"][k]), k


WORKER = """import os, sys
import quietstar.train as T
real = T.build_decoder
def build_decoder(*a, **k):     # this rank cannot read the model (e.g. a node without the --model folder)
    if os.environ["RANK"] == os.environ["FAIL_RANK"]:
        raise ValueError("--model: rank " + os.environ["RANK"] + " cannot read the weights")
    return real(*a, **k)
T.build_decoder = build_decoder
sys.exit(T.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("fail_rank", [0, 1])
def test_a_rank_that_cannot_build_ends_every_rank_in_one_line(fail_rank, tmp_path):
    """DDP: every rank builds the whole model. One rank's build error reaches the other before DDP's
    constructor, where it would wait for the failed rank until torchrun stopped it: every rank prints the
    one-line error. (torchrun checks its workers every --monitor-interval seconds and stops the others once
    one has exited: 5 s (default 0.1) gives the other rank time to print, and before the fix it was still
    waiting in DDP's constructor then.)"""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", FAIL_RANK=str(fail_rank))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--monitor-interval", "5", str(worker)]
    r = subprocess.run(cmd + TINY + ["--batch-size", "1", "--out-dir", str(tmp_path / "out")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    line = f"quietstar-train: error: --model: rank {fail_rank} cannot read the weights"
    assert r.stderr.count(line) == 2, r.stderr[-3000:]         # both ranks, not only the one that failed
    assert "/quietstar/" not in r.stderr, r.stderr[-3000:]      # no rank's traceback (torchrun's own is there)
    assert not (tmp_path / "out" / "final.pt").exists()
