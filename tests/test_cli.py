"""quietstar-train as a new user meets it: bad input ends in one line naming the argument (no traceback,
non-zero exit, nothing written), run folders are not silently replaced, --resume continues the stored
run, checkpoints are pruned, held-out data and decoded thoughts are logged, --help shows defaults."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quietstar.train import build_parser, config_from_args, main, train

from test_benchmarks import load_benchmark
from test_train import TINY, read_metrics

ROOT = Path(__file__).resolve().parents[1]
RUN = TINY + ["--lr", "3e-3"]


def fail(argv, capsys, *needles, cli=None, prog="quietstar-train"):
    """`cli(argv)` (default: quietstar-train's main) must exit 2 with one stderr line, `PROG: error: ...`, holding
    every needle, no traceback, and (quietstar-train) nothing printed of the data: refused before the corpus
    was tokenized."""
    rc = (cli or main)(argv)
    out, err = capsys.readouterr()
    err = err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    assert "data: " not in out, out
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    """4 steps with a checkpoint every step, the last two kept: (folder, metrics)."""
    out = tmp_path_factory.mktemp("run4")
    train(config_from_args(RUN + ["--steps", "4", "--ckpt-every", "1", "--keep-last", "2", "--thoughts-every", "2",
                                  "--out-dir", str(out)]), progress=False)
    return out, read_metrics(out / "metrics.jsonl")


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv,needles", [
    (["--attention", "triton"], ["--attention triton needs a CUDA GPU"]),
    (["--attention", "triton", "--schedule", "sequential"], ["--attention triton needs a CUDA GPU"]),
    (["--lm-head", "triton"], ["--lm-head triton needs a CUDA GPU"]),
    (["--attention", "flex"], ["--attention flex cannot train on CPU", "--attention split"]),
])
def test_gpu_only_backends_without_cuda_are_one_line(argv, needles, capsys, monkeypatch, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)      # the tests' CPU interpreter is not a user's setup
    fail(TINY[:-4] + argv + ["--out-dir", str(tmp_path / "o")], capsys, *needles)
    assert not (tmp_path / "o").exists()


def test_argparse_errors_are_one_line_with_a_suggestion(capsys):
    """argparse's own errors (an unknown or mistyped option, a bad choice) are one line like every other error here,
    naming the closest option; they printed the whole usage first (40 lines for quietstar-train)."""
    from quietstar.evaluate import eval_main as evaluate
    from quietstar.generate import main as generate
    from quietstar.parallel import main as convert
    cases = [(main, ["--attnetion", "split"], "quietstar-train: error: unrecognized arguments: --attnetion split "
                                              "(--attnetion: did you mean --attention?) (--help lists the options)"),
             (main, ["--lm-head", "fused"], "quietstar-train: error: argument --lm-head: invalid choice: 'fused'"),
             (main, ["--stpes=3", "--zzz"], "unrecognized arguments: --stpes=3 --zzz (--stpes=3: did you mean --steps?)"),
             (generate, ["x", "--max-new-tokenz", "3"], "quietstar-generate: error: unrecognized arguments: "
                                                        "--max-new-tokenz 3 (--max-new-tokenz: did you mean "
                                                        "--max-new-tokens?)"),
             (evaluate, ["x", "--taks", "gsm8k"], "quietstar-eval: error: unrecognized arguments: --taks gsm8k "
                                                  "(--taks: did you mean --tasks?)"),
             (convert, ["a", "b", "--overwirte"], "did you mean --overwrite?")]
    for cli, argv, needle in cases:
        with pytest.raises(SystemExit) as e:
            cli(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and needle in err[0], (argv, err)


def test_bad_input_is_one_line_naming_the_argument(capsys, tmp_path, run4):
    out = tmp_path / "o"
    base = RUN + ["--steps", "2", "--out-dir", str(out)]
    fail(base + ["--model", "/nonexistent"], capsys, "--model /nonexistent", "folder not found")
    fail(base + ["--model", "/bin/ls"], capsys, "--model /bin/ls: a file; give the folder that holds it (/bin)")
    fail(base + ["--data", "/bin/ls"], capsys, "--data /bin/ls", "UTF-8")
    fail(base + ["--data", str(tmp_path / "nope.txt")], capsys, "--data", "does not exist")
    fail(base + ["--data", str(tmp_path)], capsys, f"--data {tmp_path}", "is a folder")
    zeros = tmp_path / "zeros.txt"
    zeros.write_bytes(b"\0" * 5000)
    fail(base + ["--data", str(zeros)], capsys, f"--data {zeros}", "is not text (a NUL byte")
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes(("plain ASCII text. " * 100).encode("utf-16-le"))     # no byte-order mark
    fail(base + ["--data", str(utf16)], capsys, f"--data {utf16}", "UTF-16")
    fail(base + ["--seq-len", "0"], capsys, "--seq-len must be >= 2, got 0")
    fail(base + ["--seed", "-1"], capsys, "--seed must be in [0, 2**62), got -1")
    fail(base + ["--seed", str(2**64)], capsys, "--seed must be in [0, 2**62)")
    afile = tmp_path / "afile"
    afile.write_text("x")
    fail(RUN + ["--out-dir", str(afile)], capsys, f"--out-dir {afile}: a file is there, not a folder")
    fail(RUN + ["--out-dir", str(afile / "sub")], capsys, f"--out-dir {afile / 'sub'}: cannot be created",
         f"({afile} is not a writable folder)")
    fail(base + ["--no-thoughts", "--thoughts-every", "1"], capsys, "--thoughts-every 1: --no-thoughts")
    fail(base + ["--marker-init-text", ""], capsys, "--marker-init-text", "tokenizes to nothing")
    fail(base + ["--P", "1"], capsys, "--P 1")
    fail(base + ["--betas", "0.9"], capsys, "--betas")
    # a config field's check names the flag that sets it, not the field
    fail(base + ["--lr", "-1"], capsys, "--lr must be >= 0")
    fail(base + ["--M", "0"], capsys, "--M must be >= 1")
    fail(base + ["--model-num-heads", "3"], capsys, "--model-num-heads=3 must be a multiple of --model-num-kv-heads=2")
    fail(base + ["--banned-ids", "999999"], capsys, "--banned-ids [999999] are outside the vocabulary")
    fail(base + ["--model-vocab-size", "1000"], capsys, "the tokenizer has 32000 ids", "(--model-vocab-size)")
    # the size flags belong to the random-init model: with another --model they were ignored without a word
    fail(["--model", "smollm2-135m-random", "--model-hidden-size", "64", "--model-num-layers", "2"], capsys,
         "--model-hidden-size, --model-num-layers: the random-init model's size, for --model tiny only; "
         "--model smollm2-135m-random has its own")
    fail(base + ["--parallel", "tp"], capsys, "--parallel")
    fail(base + ["--eval-every", "2"], capsys, "--eval-rows")
    text = tmp_path / "train.txt"
    text.write_text("some training text. " * 200)
    fail(base + ["--data", str(text), "--eval-rows", "1"], capsys, "--eval-rows", "--eval-data")
    # --resume: missing, truncated, not a checkpoint, another model size
    fail(base + ["--resume", str(tmp_path / "missing.pt")], capsys, "--resume", "no such checkpoint")
    ck = run4[0] / "step000003.pt"
    cut = tmp_path / "cut.pt"
    cut.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    fail(base + ["--resume", str(cut)], capsys, f"--resume {cut}", "not a readable checkpoint")
    torch.save({"hello": 1}, tmp_path / "other.pt")
    fail(base + ["--resume", str(tmp_path / "other.pt")], capsys, "--resume", "not a quietstar-train checkpoint")
    fail(["--resume", str(ck), "--model-hidden-size", "64", "--out-dir", str(out)], capsys,
         "--model-hidden-size 64 (the checkpoint's run has 32)")
    fail(["--resume", str(ck), "--steps", "3", "--out-dir", str(out)], capsys, "--steps 3: --resume",
         "already at step 3")
    fail(["--resume", str(ck), "--batch-size", "3", "--out-dir", str(out)], capsys, "--batch-size 3 x 1 rank(s)")
    big = torch.load(ck, weights_only=False)
    big["config"]["model"]["hidden_size"] = 64          # a checkpoint whose weights are of another size
    torch.save(big, tmp_path / "big.pt")
    msg = fail(["--resume", str(tmp_path / "big.pt"), "--out-dir", str(out)], capsys, "--resume", "do not fit",
               "checkpoint (32000, 32), model (32000, 64)")
    assert len(msg) < 500
    del big["shared_params"]            # written before they were stored: found when the state dict is loaded
    torch.save(big, tmp_path / "big_old.pt")
    with pytest.raises(ValueError, match="do not fit .*size mismatch"):
        train(config_from_args(["--resume", str(tmp_path / "big_old.pt"), "--out-dir", str(out)]), progress=False)
    assert not out.exists()                                  # nothing half-written


def test_a_local_model_folder_trains_with_its_own_tokenizer(tmp_path, tiny_export, capsys):
    """A local Hugging Face folder (here an export: a stock Mistral decoder + tokenizer.json) as --model: its
    tokenizer is read from tokenizer.json, not through AutoTokenizer (which routes a Mistral folder to
    mistral-common's class and needs tiktoken, not installed)."""
    from quietstar.assets import mistral_tokenizer
    from quietstar.config import ModelConfig
    from quietstar.train import load_tokenizer
    exp = tiny_export(P=2)
    tok = load_tokenizer(ModelConfig(name=str(exp)))
    text = "Let x + 3 = 7. Then x = 4."
    assert tok(text)["input_ids"] == mistral_tokenizer()(text)["input_ids"]
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    out = tmp_path / "o"
    assert main(["--model", str(exp), "--M", "2", "--K", "2", "--P", "2", "--seq-len", "16", "--batch-size", "2",
                 "--steps", "1", "--out-dir", str(out)]) == 0, capsys.readouterr().err
    assert len(read_metrics(out / "metrics.jsonl")) == 1 and (out / "export" / "tokenizer.json").exists()
    # no tokenizer.json: AutoTokenizer's failure for a missing package is one line naming --model
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (plain / f).write_bytes((exp / f).read_bytes())
    with pytest.raises((ValueError, OSError), match="plain"):
        load_tokenizer(ModelConfig(name=str(plain)))
    # no tokenizer file at all; a config.json that is not JSON: one line naming --model, before any data
    (plain / "tokenizer_config.json").unlink()
    capsys.readouterr()
    args = ["--M", "2", "--K", "2", "--P", "2", "--seq-len", "16", "--steps", "1", "--out-dir", str(tmp_path / "o2")]
    fail(["--model", str(plain)] + args, capsys, f"--model {plain}: the folder has no tokenizer")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("model.safetensors", "tokenizer.json"):
        (broken / f).write_bytes((exp / f).read_bytes())
    (broken / "config.json").write_text('{"model_type": "mistral",')
    fail(["--model", str(broken)] + args, capsys, f"--model {broken}: its config.json cannot be read")
    assert not (tmp_path / "o2").exists()


def test_the_command_line_exits_nonzero_without_traceback_and_debug_shows_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "quietstar.train", "--model", "/nonexistent", "--out-dir", str(tmp_path / "o")]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == ["quietstar-train: error: --model /nonexistent: folder not found (give "
                                             "tiny, smollm2-135m, smollm2-135m-random or a local Hugging Face model "
                                             "folder; nothing is downloaded)"]
    r = subprocess.run(cmd + ["--debug"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" in r.stderr and "folder not found" in r.stderr


def test_a_pt_checkpoint_converts_to_an_export(run4, tmp_path, capsys):
    """python -m quietstar.parallel also takes the .pt checkpoint of a single-process / DDP run: the export
    holds exactly the checkpoint's weights, with the run's tokenizer."""
    from quietstar import QuietStarModel
    from quietstar.model import load_export_tokenizer
    from quietstar.parallel import main as convert
    ck = run4[0] / "step000003.pt"
    assert convert([str(ck), str(tmp_path / "exp")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"export: {tmp_path / 'exp'}"     # labelled, as train's
    saved = torch.load(ck, weights_only=False)["model"]
    got = QuietStarModel.from_pretrained(tmp_path / "exp").state_dict()
    assert got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)
    assert load_export_tokenizer(tmp_path / "exp")("x + 1")["input_ids"]
    capsys.readouterr()
    assert convert([str(tmp_path / "missing"), str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file or folder" in err[0] and not (tmp_path / "e2").exists(), err
    assert convert([str(run4[0]), str(tmp_path / "e2")]) == 2          # a run folder, not a checkpoint
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"checkpoint {run4[0]} is a run folder, not a checkpoint" in err[0], err
    assert str(run4[0] / "step000003.pt") in err[0], err                 # its checkpoints are named, final first
    assert err[0].index(str(run4[0] / "final.pt")) < err[0].index(str(run4[0] / "step000003.pt")), err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert([str(empty), str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"checkpoint {empty}: not a complete sharded checkpoint" in err[0], err
    (tmp_path / "afile").write_text("x")
    assert convert([str(ck), str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"export {tmp_path / 'afile'}: a file is there" in err[0], err


def _convert_fails(argv, capsys, *needles):
    from quietstar.parallel import main as convert
    fail(argv, capsys, *needles, cli=convert, prog="python -m quietstar.parallel")


def test_the_converter_replaces_an_export_only_with_overwrite(run4, tmp_path, capsys, monkeypatch):
    """A folder holding an export is refused before any loading unless --overwrite, which replaces it whole (no
    file of the earlier export is left); a folder holding anything else is refused even with --overwrite; an
    empty one is written into."""
    from quietstar import QuietStarModel, parallel
    ck2, ck3, exp = run4[0] / "step000002.pt", run4[0] / "step000003.pt", tmp_path / "exp"
    assert parallel.main([str(ck3), str(exp)]) == 0
    capsys.readouterr()
    exp.chmod(0o750)
    (exp / "notes.txt").write_text("kept?")
    before = {p.name: p.stat().st_mtime_ns for p in exp.iterdir()}
    real_load = parallel.load_plain
    monkeypatch.setattr(parallel, "load_plain", lambda *a: pytest.fail("loaded before checking the destination"))
    _convert_fails([str(ck2), str(exp)], capsys, f"export {exp} already holds an export", "--overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in exp.iterdir()} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("x")
    for extra in ([], ["--overwrite"]):
        _convert_fails([str(ck2), str(other)] + extra, capsys, f"export {other} is not empty (mine.txt)",
                       "holds no Quiet-STaR export")
    assert [p.name for p in other.iterdir()] == ["mine.txt"]
    monkeypatch.setattr(parallel, "load_plain", real_load)
    capsys.readouterr()
    assert parallel.main([str(ck2), str(exp), "--overwrite", "--no-tokenizer"]) == 0
    assert capsys.readouterr().out.strip() == f"export: {exp}"
    assert not (exp / "notes.txt").exists() and not (exp / "tokenizer.json").exists()
    assert (exp.stat().st_mode & 0o777) == 0o750 and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    saved = torch.load(ck2, weights_only=False)["model"]
    got = QuietStarModel.from_pretrained(exp).state_dict()
    assert got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert parallel.main([str(ck2), str(empty)]) == 0 and QuietStarModel.is_export(empty)


def test_the_converter_takes_a_moved_base_model(tmp_path, base_folder, capsys):
    """The base-model folder a run recorded has moved: the converter says to give --model, and --model PATH reads
    the config and tokenizer there (the export equals the checkpoint); a model of another architecture, or a
    --model that is no model folder, is refused in one line naming --model, nothing written."""
    from quietstar import ModelConfig, QuietStarModel, build_decoder
    from quietstar.model import load_export_tokenizer
    from quietstar.parallel import main as convert
    folder = base_folder(False)
    run = tmp_path / "run"
    train(config_from_args(["--model", str(folder), "--M", "2", "--K", "2", "--P", "2", "--seq-len", "16",
                            "--batch-size", "1", "--steps", "1", "--out-dir", str(run)]), progress=False)
    moved = folder.rename(tmp_path / "base_moved")
    ck, exp = run / "final.pt", tmp_path / "exp"
    capsys.readouterr()
    _convert_fails([str(ck), str(exp)], capsys, f"checkpoint {ck}: the run's base model folder {folder} is not there",
                   "--model PATH")
    _convert_fails([str(ck), str(exp), "--model", str(tmp_path / "nowhere")], capsys,
                   f"--model {tmp_path / 'nowhere'}: folder not found")
    other = tmp_path / "wider"             # a Mistral folder of another size: its parameters do not fit
    build_decoder(ModelConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                              intermediate_size=96)).save_pretrained(other)
    capsys.readouterr()
    _convert_fails([str(ck), str(exp), "--model", str(other)], capsys, f"--model {other}: the checkpoint's parameters "
                   "do not fit", "checkpoint (32, 64), model (32, 96)")
    # the same shapes but another attention layout (2 heads of 16 for 4 of 8): the checkpoint's fingerprint of the
    # base model's config.json tells them apart
    import json
    import shutil
    relaid = tmp_path / "relaid"
    shutil.copytree(moved, relaid)
    cfg = json.loads((relaid / "config.json").read_text())
    (relaid / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 2, "num_key_value_heads": 1,
                                                    "head_dim": 16}))
    capsys.readouterr()
    _convert_fails([str(ck), str(exp), "--model", str(relaid)], capsys,
                   f"--model {relaid}: its config.json is not the one of the run in checkpoint {ck}")
    assert not exp.exists()
    assert convert([str(ck), str(exp), "--model", str(moved)]) == 0
    saved = torch.load(ck, weights_only=False)["model"]
    got = QuietStarModel.from_pretrained(exp)
    sd = got.state_dict()
    assert sd.keys() == saved.keys() and all(torch.equal(sd[k], saved[k]) for k in saved)
    assert got.lm.generation_config.temperature == 0.6                  # the moved folder's generation config
    assert load_export_tokenizer(exp)("x + 1")["input_ids"]


# ---------------------------------------------------------------------------------------------- run folders
def test_a_second_run_into_a_used_folder_is_refused_unless_overwrite(capsys, run4, tmp_path):
    out, _ = run4
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    fail(RUN + ["--steps", "2", "--out-dir", str(out)], capsys, f"--out-dir {out} already holds a run",
         "--overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # --overwrite replaces the run: only the new run's records and checkpoints remain
    new = tmp_path / "copy"
    import shutil
    shutil.copytree(out, new)
    assert main(RUN + ["--steps", "2", "--out-dir", str(new), "--overwrite"]) == 0
    assert [r["step"] for r in read_metrics(new / "metrics.jsonl") if "loss" in r] == [1, 2]
    assert sorted(p.name for p in new.glob("step*.pt")) == []


def test_keep_last_and_decoded_thoughts(run4):
    out, m = run4
    assert sorted(p.name for p in out.glob("step*.pt")) == ["step000002.pt", "step000003.pt"]
    assert (out / "final.pt").exists()
    th = [r["thoughts"] for r in m if "thoughts" in r]
    assert [t["step"] for t in th] == [2, 4]
    for t in th:
        assert 1 <= len(t["samples"]) <= 3
        for s in t["samples"]:
            assert isinstance(s["thought"], str) and s["context"] and isinstance(s["gain"], float)
    steps = [r for r in m if "loss" in r]
    assert all("thought_gain" in r for r in steps)


def test_resume_uses_the_stored_config_and_continues_the_same_folder(run4, tmp_path, capsys):
    src, m = run4
    out = tmp_path / "r"
    import shutil
    shutil.copytree(src, out)
    (out / "step000009.tmp").write_bytes(b"half a checkpoint")          # a killed checkpoint write
    # --steps not beyond the checkpoint: refused, nothing written
    before = (out / "final.pt").read_bytes()
    fail(["--resume", str(out / "step000003.pt"), "--steps", "2"], capsys, "--steps 2", "already at step 3")
    assert (out / "final.pt").read_bytes() == before
    fail(["--resume", str(out / "step000003.pt"), "--lr", "0.5"], capsys, "--lr 0.5 (the checkpoint's run has 0.003)")
    # only --resume: the stored config is used, in the checkpoint's folder
    assert main(["--resume", str(out / "step000002.pt")]) == 0
    m2 = read_metrics(out / "metrics.jsonl")
    steps = [r for r in m2 if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]                   # no duplicated steps
    assert [r["thoughts"]["step"] for r in m2 if "thoughts" in r] == [2, 4]
    for a, b in zip([r for r in m if "loss" in r], steps):
        assert a["loss"] == b["loss"], (a, b)                            # the same run, bit for bit
    assert not list(out.glob("*.tmp"))
    a = torch.load(src / "final.pt", weights_only=False)["model"]
    b = torch.load(out / "final.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_data_and_eval_every(tmp_path):
    train_txt, held = tmp_path / "train.txt", tmp_path / "held.jsonl"
    train_txt.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    held.write_text(json.dumps({"text": "Completely different held-out words: alpha beta gamma delta. " * 8}) + "\n")
    out = tmp_path / "o"
    train(config_from_args(RUN + ["--steps", "4", "--data", str(train_txt), "--eval-data", str(held), "--eval-rows",
                                  "1", "--eval-every", "2", "--out-dir", str(out)]), progress=False)
    ev = [r["eval"] for r in read_metrics(out / "metrics.jsonl") if "eval" in r]
    assert [e["step"] for e in ev] == [0, 2, 4]
    # the scored rows are the held-out file's: its targets, not the training text's (15 of 16 per row)
    from quietstar import assets
    from quietstar.train import load_rows
    tok = assets.mistral_tokenizer()
    rows, valid = load_rows((str(held),), tok, 16)
    assert ev[0]["heldout_targets"] == int(valid[:1, :-1].sum())
    train_rows, _ = load_rows((str(train_txt),), tok, 16)
    assert not torch.equal(rows[0], train_rows[0])


def test_help_shows_every_default():
    text = " ".join(build_parser().format_help().split())
    for needle in ("--weight-decay", "(default: 0.001)", "(default: 0.9 0.999)", "(default: 20; with --model tiny: 5)",
                   "(default: 1000000.0; with --model tiny: 1.0)", "--keep-last", "--eval-data", "(default: 2)",
                   "(default: triton on CUDA, split on CPU)", "--parallel {ddp,fsdp}"):
        assert needle in text, needle
    parser = build_parser()
    missing = [a.option_strings for a in parser._actions if a.option_strings and a.dest != "help"
               and "default:" not in (a.help or "")]
    assert not missing, missing


def test_plot_metrics_shows_gain_and_thoughts(run4, tmp_path, capsys):
    plot = load_benchmark("plot_metrics")
    out, m = run4
    plot.main([str(out / "metrics.jsonl"), str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").stat().st_size > 10_000
    printed = capsys.readouterr().out.splitlines()
    samples = [s for r in m if "thoughts" in r for s in r["thoughts"]["samples"]]
    assert len(printed) == len(samples) and all("gain" in line for line in printed)
    assert f"{samples[0]['gain']:+.3f}" in printed[0]
    steps, _, thoughts = plot.read(out / "metrics.jsonl")
    assert len(steps) == 4 and [t["step"] for t in thoughts] == [2, 4]
    # --title is the figure's title (a panel's name overwrote it), none without; the reward has a legend entry
    fig = plot.figure(steps, [], thoughts, "MY RUN")
    assert fig._suptitle.get_text() == "MY RUN"
    assert [t.get_text() for t in fig.axes[3].get_legend().get_texts()] == ["thought gain", "mean reward"]
    assert plot.figure(steps, [], thoughts, "")._suptitle is None


def test_parquet_data_and_max_documents(tmp_path):
    """--data a Parquet shard (the paper's OpenWebMath ships so) and --max-documents: only that slice is packed."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    shard = tmp_path / "owm.parquet"
    pq.write_table(pa.table({"text": [f"Theorem {i}. Let x be a real number; then x^2 >= 0." for i in range(400)]}),
                   shard)
    out = tmp_path / "o"
    train(config_from_args(RUN + ["--steps", "1", "--data", str(shard), "--max-documents", "40",
                                  "--out-dir", str(out)]), progress=False)
    assert len(read_metrics(out / "metrics.jsonl")) == 1
    from quietstar import assets
    from quietstar.train import load_rows
    rows40, _ = load_rows((str(shard),), assets.mistral_tokenizer(), 16, max_documents=40)
    rows_all, _ = load_rows((str(shard),), assets.mistral_tokenizer(), 16)
    assert rows40.shape[0] < rows_all.shape[0] / 5 and torch.equal(rows40, rows_all[: rows40.shape[0]])
    # the slice reaches train(): one document is too little for a batch of 4 rows (all 400 would do)
    with pytest.raises(ValueError, match="need at least"):
        train(config_from_args(RUN + ["--steps", "1", "--data", str(shard), "--max-documents", "1",
                                      "--batch-size", "4", "--out-dir", str(tmp_path / "p")]), progress=False)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_converter_reads_no_base_weights(tmp_path, tied, base_folder):
    """A run's checkpoint converts without the base model's weight files (a 7B folder's ~14 GB are not read
    again: the architecture is built empty and the checkpoint fills it), tied embeddings stay tied, and
    RoPE's computed buffers are right: the export equals the trained model, logits included."""
    from quietstar import QuietStarModel
    from quietstar.parallel import main as convert
    folder = base_folder(tied)
    out = tmp_path / "run"
    res = train(config_from_args(["--model", str(folder), "--M", "2", "--K", "2", "--P", "2", "--seq-len", "16",
                                  "--batch-size", "1", "--steps", "1", "--out-dir", str(out)]), progress=False)
    for f in folder.glob("*.safetensors"):
        f.unlink()                                            # the base weights are gone
    assert convert([str(out / "final.pt"), str(tmp_path / "exp")]) == 0
    got = QuietStarModel.from_pretrained(tmp_path / "exp")
    want = res["model"].cpu()
    sa, sb = want.state_dict(), got.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (got.lm.lm_head.weight is got.lm.model.embed_tokens.weight) == tied
    assert (got.lm.generation_config.temperature, got.lm.generation_config.eos_token_id) == (0.6, [2, 7])
    ids = torch.randint(3, 1000, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(got.lm(ids).logits, want.lm(ids).logits)


def test_retie_follows_the_loaded_weights():
    """A config that ties the embeddings over two different trained tensors (transformers then loads them
    untied) stays untied; equal ones (a model trained tied) are tied again."""
    from quietstar import ModelConfig, build_decoder
    from quietstar.model import retie_embeddings
    lm = build_decoder(ModelConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                                   intermediate_size=64, tie_word_embeddings=True))
    lm.lm_head.weight = torch.nn.Parameter(lm.model.embed_tokens.weight.detach() + 1)
    retie_embeddings(lm)
    assert lm.lm_head.weight is not lm.model.embed_tokens.weight
    lm.lm_head.weight = torch.nn.Parameter(lm.model.embed_tokens.weight.detach().clone())
    retie_embeddings(lm)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight


def test_plot_metrics_takes_math_text_and_no_thought_runs(run4, tmp_path):
    """Decoded thoughts of MATH text hold "$...$" (not mathtext for the plot), and a --no-thoughts run logs no
    thought terms: both still plot."""
    plot = load_benchmark("plot_metrics")
    out, _ = run4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for r in rows:
        for smp in r.get("thoughts", {}).get("samples", []):
            smp["thought"] = 'label("$\\\\ell$", (-0.2,1.2' + smp["thought"]
            smp["context"] += " $x^{2"
    (tmp_path / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot.main([str(tmp_path / "math.jsonl"), str(tmp_path / "math.png")])
    assert (tmp_path / "math.png").stat().st_size > 10_000
    thought_keys = {"nll_talk", "policy", "w_mean", "w_std", "reward", "thought_gain"}
    plain = [{k: v for k, v in r.items() if k not in thought_keys} for r in rows if "thoughts" not in r]
    assert plain and all("nll_base" in r for r in plain if "step" in r)
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plain))
    plot.main([str(tmp_path / "plain.jsonl"), str(tmp_path / "plain.png")])
    assert (tmp_path / "plain.png").stat().st_size > 10_000


def _plot_fails(plot, argv, capsys, *needles):
    """plot_metrics.main(argv) must return 2 with one stderr line holding every needle, and write no image."""
    fail(argv, capsys, *needles, cli=plot.main, prog="plot_metrics.py")
    assert not Path(argv[1]).is_file(), argv[1]


def test_plot_metrics_bad_input_is_one_line_naming_the_argument(run4, tmp_path, capsys):
    """A missing file, a folder that is not a run's, non-UTF-8 bytes, eval.json, a bad line in the middle, no step
    records, an image in a folder that does not exist: one line naming the argument, exit status 2, no image."""
    plot = load_benchmark("plot_metrics")
    lines = (run4[0] / "metrics.jsonl").read_text().splitlines()
    png = str(tmp_path / "p.png")
    _plot_fails(plot, [str(tmp_path / "missing.jsonl"), png], capsys, f"metrics {tmp_path / 'missing.jsonl'}",
                "no such file")
    _plot_fails(plot, [str(tmp_path), png], capsys, f"metrics {tmp_path}: a folder without metrics.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(lines[0].encode() + b"\n\xe9t\xe9\n")
    _plot_fails(plot, [str(tmp_path / "latin1.jsonl"), png], capsys, "latin1.jsonl: not UTF-8 text")
    (tmp_path / "eval.json").write_text(json.dumps({"heldout": {"nll": 1.0}, "meta": {"step": 4}}, indent=1))
    _plot_fails(plot, [str(tmp_path / "eval.json"), png], capsys, "eval.json: one JSON document, not",
                "metrics.jsonl")
    (tmp_path / "mid.jsonl").write_text("\n".join([lines[0], lines[1][:20]] + lines[2:]) + "\n")
    _plot_fails(plot, [str(tmp_path / "mid.jsonl"), png], capsys, "mid.jsonl line 2: not a JSON object")
    (tmp_path / "nostep.jsonl").write_text(json.dumps({"eval": {"step": 0, "heldout_nll_base": 1.0}}) + "\n")
    _plot_fails(plot, [str(tmp_path / "nostep.jsonl"), png], capsys, "nostep.jsonl: holds no step records")
    nodir = tmp_path / "nodir" / "p.png"
    _plot_fails(plot, [str(run4[0] / "metrics.jsonl"), str(nodir)], capsys, f"png {nodir}",
                f"folder {nodir.parent} does not exist")
    assert not nodir.parent.exists()
    _plot_fails(plot, [str(run4[0] / "metrics.jsonl"), str(tmp_path)], capsys, f"png {tmp_path}: a folder")
    # from the command line: the same one line and exit status 2, no traceback
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot_metrics.py"), str(tmp_path / "eval.json"),
                        png], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("plot_metrics.py: error: metrics "), r.stderr


def test_plot_metrics_takes_a_run_folder_and_a_cut_off_last_line(run4, tmp_path, capsys):
    """A run folder reads its metrics.jsonl; the last line of a run killed while writing it is skipped with a
    note on stderr (as quietstar-train --resume drops it), the records before it are plotted."""
    plot = load_benchmark("plot_metrics")
    out, m = run4
    assert plot.main([str(out), str(tmp_path / "run.png")]) == 0
    assert (tmp_path / "run.png").stat().st_size > 10_000
    assert plot.read(out) == plot.read(out / "metrics.jsonl")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    last_step = max(i for i, line in enumerate(lines) if '"loss"' in line)
    cut = lines[:last_step] + [lines[last_step][: len(lines[last_step]) // 2]]      # no newline: killed mid-write
    (tmp_path / "cut.jsonl").write_text("\n".join(cut))
    capsys.readouterr()
    assert plot.main([str(tmp_path / "cut.jsonl"), str(tmp_path / "cut.png")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"plot_metrics.py: note: {tmp_path / 'cut.jsonl'} line {len(cut)}, the last, is not JSON (cut off "
                   "by a killed run?): skipped"], err
    assert (tmp_path / "cut.png").stat().st_size > 10_000
    steps = plot.read(tmp_path / "cut.jsonl")[0]
    assert steps == [r for r in m if "loss" in r][:-1]


def test_plot_metrics_help_describes_every_argument():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot_metrics.py"), "--help"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    plot = load_benchmark("plot_metrics")
    help_text = " ".join(r.stdout.split())
    for needle in ("metrics a run's metrics.jsonl", "or the run folder OUT_DIR itself", "png the image to write",
                   "--title TITLE a title above the panels"):
        assert needle in help_text, (needle, help_text)
    assert plot.PROG in r.stdout
