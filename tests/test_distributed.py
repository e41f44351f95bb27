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
