"""The training loop: the loss falls, --resume continues bit-identically, the CLI parses."""
import json

import pytest
import torch

from quietstar.train import config_from_args, train

TINY = ["--model-hidden-size", "32", "--model-num-layers", "2", "--model-num-heads", "4", "--model-num-kv-heads",
        "2", "--model-head-dim", "8", "--model-intermediate-size", "64", "--M", "2", "--K", "2", "--P", "2",
        "--seq-len", "16", "--batch-size", "2", "--lm-head", "reference", "--attention", "reference"]


def read_metrics(path):
    return [json.loads(line) for line in open(path)]


def test_loss_falls(tmp_path, capsys):
    cfg = config_from_args(TINY + ["--steps", "20", "--lr", "3e-3", "--out-dir", str(tmp_path)])
    out = train(cfg, progress=False)
    assert "--warmup-steps" not in capsys.readouterr().out            # 20 steps reach the warm-up's end
    m = read_metrics(out["metrics"])
    assert len(m) == 20
    lm = [r["nll_base"] + r["nll_talk"] for r in m]
    assert sum(lm[-5:]) / 5 < sum(lm[:3]) / 3 - 1.0, lm
    assert all(torch.isfinite(torch.tensor(lm)))


@pytest.mark.parametrize("legacy", [False, True], ids=["current", "without-shared-params"])
def test_resume_is_bit_identical(tmp_path, legacy, capsys):
    """A resumed run ends where the uninterrupted one does; also from a checkpoint written before checkpoints
    stored how parameters are shared (such a run builds the model from its weights, as a fresh run does). The
    flags given again are the stored ones: no conflict (--banned-ids was parsed as text, which differed)."""
    common = TINY + ["--steps", "4", "--ckpt-every", "2", "--lr", "3e-3", "--banned-ids", "5", "7"]
    full = train(config_from_args(common + ["--out-dir", str(tmp_path / "a")]), progress=False)
    # 4 steps of the tiny preset's 5-step warm-up: said (the H200 learning run's 19 steps of 20 never reached its lr)
    assert "note: --warmup-steps 5 is longer than --steps 4: the learning rate reaches only 4/5 of --lr 0.003" \
        in capsys.readouterr().out
    ck = tmp_path / "a" / "step000002.pt"
    saved = torch.load(ck, weights_only=False)
    assert [sorted(ns) for ns, _ in saved["shared_params"] if len(ns) > 1] == [["lm.lm_head.weight",
                                                                                 "lm.model.embed_tokens.weight"]]
    if legacy:
        del saved["shared_params"]
        ck = tmp_path / "legacy.pt"
        torch.save(saved, ck)
    resumed = train(config_from_args(common + ["--out-dir", str(tmp_path / "b"), "--resume", str(ck)]),
                    progress=False)
    assert f"resumed: {ck} at step 2, on to step 4 in {tmp_path / 'b'}\n" in capsys.readouterr().out
    a = read_metrics(full["metrics"])
    b = read_metrics(resumed["metrics"])
    assert [r["step"] for r in b] == [3, 4]
    for ra, rb in zip(a[2:], b):
        for k in ("loss", "nll_base", "nll_talk", "policy", "w_mean", "reward", "grad_norm"):
            assert ra[k] == rb[k], (k, ra[k], rb[k])
    sa, sb = full["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # and a run resumed from a different checkpoint state would differ: the comparison can fail
    assert a[1]["loss"] != a[3]["loss"]


@pytest.mark.parametrize("tied", [False, True, "config-only"], ids=["untied", "tied", "config-tied-weights-untied"])
def test_resume_reads_no_base_weights(tmp_path, tied, base_folder):
    """--resume builds the model empty and the checkpoint fills it: the base model's weight files (Mistral-7B:
    ~14 GB) are not read again, the embeddings come back tied or untied as they were (so the optimizer has
    the same parameters; a config that says tied over two trained tensors trained untied, and resumes so),
    and RoPE's computed buffers are right: the resumed run ends bit-identical to the uninterrupted one."""
    folder = base_folder(tied)
    common = ["--model", str(folder), "--M", "2", "--K", "2", "--P", "2", "--seq-len", "16", "--batch-size", "1",
              "--steps", "3", "--ckpt-every", "1", "--lr", "3e-3", "--attention", "split", "--lm-head", "reference"]
    full = train(config_from_args(common + ["--out-dir", str(tmp_path / "a")]), progress=False)
    for f in folder.glob("*.safetensors"):
        f.unlink()                                            # the base weights are gone
    resumed = train(config_from_args(["--resume", str(tmp_path / "a" / "step000001.pt"),
                                      "--out-dir", str(tmp_path / "b")]), progress=False)
    a, b = read_metrics(full["metrics"]), read_metrics(resumed["metrics"])
    assert [r["step"] for r in b] == [2, 3]
    assert [r["loss"] for r in a[1:]] == [r["loss"] for r in b]
    sa, sb = full["model"].state_dict(), resumed["model"].state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for lm in (full["model"].lm, resumed["model"].lm):
        assert (lm.lm_head.weight is lm.model.embed_tokens.weight) == (tied is True)
    # a fresh run does need them: the files are really gone
    with pytest.raises(ValueError, match="--model .*: its weights cannot be read .*no file named model.safetensors"):
        train(config_from_args(common + ["--out-dir", str(tmp_path / "c")]), progress=False)


def test_resume_after_the_base_model_moved(tmp_path, base_folder):
    """The base model's folder moved: --resume takes `--model NEW` (a flag that otherwise must not change) and
    ends bit-identical to the uninterrupted run, once the new folder's tokenizer and config.json are the ones
    the checkpoint's fingerprint names; another tokenizer or config, or a checkpoint without a fingerprint, is
    refused naming --model."""
    import shutil
    folder = base_folder(False)
    common = ["--model", str(folder), "--M", "2", "--K", "2", "--P", "2", "--seq-len", "16", "--batch-size", "1",
              "--steps", "3", "--ckpt-every", "1", "--lr", "3e-3", "--attention", "split", "--lm-head", "reference"]
    full = train(config_from_args(common + ["--out-dir", str(tmp_path / "a")]), progress=False)
    ck = tmp_path / "a" / "step000001.pt"
    moved = tmp_path / "moved"
    shutil.move(folder, moved)
    with pytest.raises(ValueError, match=f"--model {folder}: folder not found.*if it moved, give --model"):
        config_from_args(["--resume", str(ck), "--out-dir", str(tmp_path / "b")])
    resumed = train(config_from_args(["--resume", str(ck), "--model", str(moved), "--out-dir", str(tmp_path / "b")]),
                    progress=False)
    a, b = read_metrics(full["metrics"]), read_metrics(resumed["metrics"])
    assert [r["step"] for r in b] == [2, 3] and [r["loss"] for r in a[1:]] == [r["loss"] for r in b]
    # a folder that is not the same base model
    other = tmp_path / "other"
    shutil.copytree(moved, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-3}))
    with pytest.raises(ValueError, match=f"--model {other}: its config.json is not the one of the run in --resume"):
        train(config_from_args(["--resume", str(ck), "--model", str(other), "--out-dir", str(tmp_path / "c")]),
              progress=False)
    (other / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first = next(iter(vocab))
    vocab["x" + first] = vocab.pop(first)                   # one token's string changed
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match=f"--model {other}: its tokenizer is not the one of the run in --resume"):
        train(config_from_args(["--resume", str(ck), "--model", str(other), "--out-dir", str(tmp_path / "c")]),
              progress=False)
    # a checkpoint written before the fingerprint was stored cannot be checked: refused
    old = torch.load(ck, weights_only=False)
    del old["base"]
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=f"--model {moved}: .*before checkpoints recorded .*put the base model back"):
        train(config_from_args(["--resume", str(tmp_path / "old.pt"), "--model", str(moved),
                                "--out-dir", str(tmp_path / "c")]), progress=False)
    # a preset never stands in for a folder (nor the other way round)
    with pytest.raises(ValueError, match="--model 'smollm2-135m-random' \\(the checkpoint's run has"):
        config_from_args(["--resume", str(ck), "--model", "smollm2-135m-random"])
    # the folder the run names, changed in place since (files rewritten, not moved): refused, before any data
    ck_moved = tmp_path / "b" / "final.pt"
    shutil.copy(other / "tokenizer.json", moved / "tokenizer.json")
    with pytest.raises(ValueError, match=f"--model {moved}: its tokenizer changed since the run in --resume"):
        train(config_from_args(["--resume", str(ck_moved), "--out-dir", str(tmp_path / "d"), "--steps", "4"]),
              progress=False)


def test_cli_defaults_and_errors():
    cfg = config_from_args([])
    assert (cfg.thought.M, cfg.thought.K, cfg.thought.P) == (9, 4, 2)
    assert cfg.train.attention == ("triton" if torch.cuda.is_available() else "split")
    with pytest.raises(SystemExit):
        config_from_args(["--attention", "dense"])
    with pytest.raises(ValueError, match="--seq-len must be >= 2"):
        config_from_args(["--seq-len", "1"])
    assert cfg.train.cuda_graphs is False
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="--cuda-graphs needs --lm-head triton"):
            config_from_args(["--cuda-graphs", "--lm-head", "chunked"])
        assert config_from_args(["--cuda-graphs"]).train.cuda_graphs
    else:
        with pytest.raises(ValueError, match="--cuda-graphs needs a CUDA GPU"):
            config_from_args(["--cuda-graphs"])


@pytest.mark.gpu
def test_cuda_graphs_train_the_same_run(tmp_path):
    """--cuda-graphs replays the sampling loop: the same thoughts, so the same first step and the same run."""
    args = TINY[:-4]
    args[args.index("--model-head-dim") + 1] = "16"          # the Triton kernels take D = 16, 32, ..., 128
    common = args + ["--lm-head", "triton", "--attention", "triton", "--steps", "4", "--lr", "3e-3",
                     "--device", "cuda"]
    eager = train(config_from_args(common + ["--out-dir", str(tmp_path / "e")]), progress=False)
    graphed = train(config_from_args(common + ["--cuda-graphs", "--out-dir", str(tmp_path / "g")]), progress=False)
    a, b = read_metrics(eager["metrics"]), read_metrics(graphed["metrics"])
    assert len(a) == len(b) == 4
    # step 1: same weights, same thoughts, deterministic forward: the same numbers exactly
    for k in ("loss", "nll_base", "nll_talk", "policy", "reward"):
        assert a[0][k] == b[0][k], (k, a[0][k], b[0][k])
    # later steps: the backward (flash attention's dq accumulation) is not bit-deterministic on a GPU,
    # so the weights may differ in the last bits; the runs must still track each other
    for ra, rb in zip(a[1:], b[1:]):
        assert abs(ra["nll_base"] - rb["nll_base"]) <= 1e-2 * abs(ra["nll_base"]), (ra, rb)


@pytest.mark.gpu
def test_gpu_quietstar_train_cli(tmp_path):
    """`quietstar-train` on CUDA with its GPU defaults (Triton attention and LM head, bf16 autocast), and
    `--resume` there (the model built empty on the meta device, RoPE's buffers computed and moved to CUDA)."""
    import subprocess
    import sys
    args = TINY[:-4]
    args[args.index("--model-head-dim") + 1] = "16"
    r = subprocess.run([sys.executable, "-m", "quietstar.train", *args, "--steps", "3", "--lr", "3e-3",
                        "--ckpt-every", "2", "--device", "cuda", "--out-dir", str(tmp_path / "a")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = read_metrics(tmp_path / "a" / "metrics.jsonl")
    steps = [x for x in m if "loss" in x and "step" in x]
    assert [x["step"] for x in steps] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in steps)
    assert (tmp_path / "a" / "final.pt").exists()
    r = subprocess.run([sys.executable, "-m", "quietstar.train", "--resume", str(tmp_path / "a" / "step000002.pt"),
                        "--out-dir", str(tmp_path / "b")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = [x for x in read_metrics(tmp_path / "b" / "metrics.jsonl") if "loss" in x and "step" in x]
    # step 3's loss comes from the forward alone: the same weights and thoughts give it again (a tolerance,
    # as cuBLAS may pick other kernels in another process)
    assert [x["step"] for x in resumed] == [3] and abs(resumed[0]["loss"] - steps[2]["loss"]) <= 1e-4 * abs(
        steps[2]["loss"]), (resumed, steps)
    cfg = config_from_args(args + ["--device", "cuda"])
    assert (cfg.train.attention, cfg.train.lm_head) == ("triton", "triton")


def test_no_thoughts_control_is_the_plain_lm_loss(tmp_path):
    """--no-thoughts (the learning experiment's control arm): loss = the mean cross-entropy of x_{t+1}
    over the scored targets, its decoder gradient is Quiet-STaR's with betas (1, 0, 0), the extras get
    none, and the training loop runs it."""
    import torch.nn.functional as F

    from quietstar.config import LossConfig
    from quietstar.thoughts import Backends, plain_lm_forward, quietstar_forward
    cfg = config_from_args(TINY + ["--steps", "2", "--no-thoughts", "--eval-rows", "2", "--eval-every", "2",
                                   "--out-dir", str(tmp_path)])
    assert cfg.train.thoughts is False
    from quietstar.model import QuietStarModel, build_decoder
    torch.manual_seed(0)
    model = QuietStarModel(build_decoder(cfg.model), cfg.thought, marker_init_id=5)
    ids = torch.randint(3, 1000, (2, 16))
    vn = torch.ones(2, 16, dtype=torch.bool)
    vn[0, 10:] = False
    vn[:, -1] = False
    loss, m, _ = plain_lm_forward(model, ids, vn, Backends("reference", "chunked"))
    logits = model.lm(input_ids=ids).logits.float()
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    want = (ce * vn[:, :-1].flatten()).sum() / vn.sum()
    assert torch.allclose(loss, want, rtol=1e-5), (loss, want)
    assert set(m) == {"loss", "nll_base"}
    loss.backward()
    g_plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert not any(n.startswith(("markers", "mixing_head")) for n in g_plain)
    model.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(0)
    qloss, _, _ = quietstar_forward(model, ids, vn, LossConfig(beta_base=1.0, beta_talk=0.0, beta_policy=0.0),
                                    "sample-then-train", Backends("reference", "chunked"), gen)
    qloss.backward()
    for n, g in g_plain.items():
        assert torch.allclose(g, model.get_parameter(n).grad, atol=1e-6, rtol=1e-4), n
    out = train(cfg, progress=False)
    records = read_metrics(out["metrics"])
    rows = [r for r in records if "step" in r]
    assert [r["step"] for r in rows] == [1, 2] and all("nll_talk" not in r for r in rows)
    assert rows[0]["loss"] == rows[0]["nll_base"]
    evals = [r["eval"] for r in records if "eval" in r]
    # the control's held-out evaluation scores the base prediction only: it has no thoughts to sample
    assert [e["step"] for e in evals] == [0, 2] and all("heldout_nll_thought" not in e for e in evals)
    assert all(e["heldout_nll_base"] > 0 and e["heldout_targets"] > 0 for e in evals)
    with pytest.raises(ValueError, match="--no-thoughts"):
        config_from_args(["--no-thoughts", "--cuda-graphs"])
    with pytest.raises(ValueError, match="--thoughts-every 2: --no-thoughts samples no thoughts"):
        config_from_args(["--no-thoughts", "--thoughts-every", "2"])


def test_no_thoughts_control_masks_documents_like_the_base_pass():
    """With packed documents the control's base pass is the Quiet-STaR base pass: causal within documents."""
    from quietstar.config import LossConfig
    from quietstar.model import QuietStarModel, build_decoder
    from quietstar.thoughts import Backends, plain_lm_forward, quietstar_forward
    cfg = config_from_args(TINY)
    torch.manual_seed(0)
    model = QuietStarModel(build_decoder(cfg.model), cfg.thought, marker_init_id=5)
    ids = torch.randint(3, 1000, (2, 16))
    doc_start = torch.tensor([[0] * 5 + [5] * 11, [0] * 9 + [9] * 7], dtype=torch.int32)
    be = Backends("split", "chunked")
    plain, _, _ = plain_lm_forward(model, ids, None, be, doc_start=doc_start)
    _, m, _ = quietstar_forward(model, ids, None, LossConfig(), "sample-then-train", be,
                                torch.Generator().manual_seed(0), doc_start=doc_start)
    assert torch.allclose(plain, m["nll_base"], rtol=1e-5, atol=1e-6), (plain, m["nll_base"])
    unmasked, _, _ = plain_lm_forward(model, ids, None, be)
    assert abs(float(unmasked - plain)) > 1e-4        # the masks matter here: the comparison can fail
