"""The one-call GPU suite, rehearsed on CPU (benchmarks/gpu_suite.sh --dry-run): the same wrapper, stages,
scripts and flags at smoke shapes. Checks what the device call depends on: every stage runs and
passes, at most 8 files come back in OUT, the digest is there and under 8 KB, the archive holds
every stage's log, a failing or skipped stage makes the call exit non-zero and says so, and without
CUDA a real run refuses at once."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from test_benchmarks import load_benchmark

REPO = Path(__file__).resolve().parents[1]
STAGES = ("gpu_tests", "train_step", "thought_attention", "lm_head")


def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _suite(out, *args, timeout=900):
    return subprocess.run(["bash", "benchmarks/gpu_suite.sh", str(out), "--dry-run", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _stage_rows(digest: str) -> dict:
    rows = {}
    for line in digest.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0] in STAGES:
            rows[cells[0]] = cells[1]
    return rows


@pytest.mark.slow
def test_dry_run_rehearses_the_device_call(tmp_path):
    out = tmp_path / "out"
    r = _suite(out)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all((out / f).is_file() for f in files), files
    assert {"digest.md", "suite.tar.gz", "train_step.md", "train_step.json", "thought_attention_smoke.md",
            "lm_head_smoke.md"} <= set(files), files
    digest = (out / "digest.md").read_text()
    assert len(digest.encode()) <= 8192
    assert r.stdout.rstrip().endswith(digest.rstrip().splitlines()[-1]), "the digest must be printed last"
    assert _stage_rows(digest) == {s: "ok" for s in STAGES}, digest
    assert "DRY RUN" in digest and "| fast-cpu |" in digest and "| sampling | smoke T=21 4 steps |" in digest
    assert "GPU tests: 0 passed, 0 failed" in digest      # every GPU test is collected and skipped on CPU
    with tarfile.open(out / "suite.tar.gz") as tar:
        names = set(tar.getnames())
    for stage in STAGES:
        assert f"suite/raw/{stage}.log" in names, names
    assert {"suite/raw/environment.txt", "suite/raw/gpu_tests.xml", "suite/raw/attention_compile.log"} <= names
    rows = json.loads((out / "train_step.json").read_text())["results"]
    assert {x["path"] for x in rows} == {"floor", "fast-cpu", "reference"}
    assert all(x["grad_nonfinite"] == 0 for x in rows if "grad_nonfinite" in x)


def test_a_failing_stage_fails_the_call(tmp_path):
    r = _suite(tmp_path / "out", "--stages", "lm_head", "--inject-failure", "lm_head")
    assert r.returncode == 1, r.stdout + r.stderr
    digest = (tmp_path / "out" / "digest.md").read_text()
    assert _stage_rows(digest) == {"lm_head": "FAILED"}, digest
    assert len(list((tmp_path / "out").iterdir())) <= 8


def test_a_stage_past_the_budget_is_skipped_and_reported(tmp_path):
    r = _suite(tmp_path / "out", "--stages", "lm_head,train_step", "--budget-s", "30")
    assert r.returncode == 2, r.stdout + r.stderr
    assert _stage_rows((tmp_path / "out" / "digest.md").read_text()) == {
        "lm_head": "SKIPPED (suite budget spent)", "train_step": "SKIPPED (suite budget spent)"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_the_real_call_refuses_at_once(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--out", str(tmp_path / "out")], cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_profile_refuses_without_cuda(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/gpu_profile.py", "--out", str(tmp_path)], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr, r.stderr


def test_a_cut_test_stage_still_names_its_failures(tmp_path):
    """pytest writes its JUnit report at the end; a stage cut at its cap has only its -v log. The digest then
    names the failures the log shows (with and without xdist), which learn_experiment.py's fallbacks read."""
    gs = load_benchmark("gpu_suite")
    (tmp_path / "gpu_tests.log").write_text(
        "[gw1] [ 10%] PASSED tests/test_lm_head.py::test_gpu_a\n"
        "[gw0] [ 20%] FAILED tests/test_document_mask.py::test_gpu_graph_replay_with_documents[triton] \n"
        "tests/test_train.py::test_cuda_graphs_train_the_same_run FAILED [ 30%]\n")
    lines = gs.digest_tests(tmp_path)
    assert lines[0].startswith("GPU tests: no report") and "2 failed in its log" in lines[0]
    assert lines[1:3] == ["- FAILED test_document_mask::test_gpu_graph_replay_with_documents[triton]: (from the log)",
                          "- FAILED test_train::test_cuda_graphs_train_the_same_run: (from the log)"]
    assert gs.digest_tests(tmp_path / "none")[0].startswith("GPU tests: no report") and "0 failed" in \
        gs.digest_tests(tmp_path / "none")[0]


def test_the_digest_names_every_failure(tmp_path, monkeypatch):
    """The learning experiment's fallbacks read digest.md's FAILED lines: a failure listed late (here the 20th
    of 20) must be there, or its kernel family would run the experiment untrusted; and the 8 KB cut of
    digest.md takes the tables' tails, never a failure (35 failures with long messages, 20 KB of tables)."""
    gs = load_benchmark("gpu_suite")
    cases = [f'<testcase classname="tests.test_graphs" name="test_gpu_{i}"><failure message="boom {i}"/></testcase>'
             for i in range(19)]
    cases.append('<testcase classname="tests.test_lm_head" name="test_gpu_last"><failure message="late"/></testcase>')
    cases.append('<testcase classname="tests.test_lm_head" name="test_gpu_ok"/>')
    (tmp_path / "gpu_tests.xml").write_text(f"<testsuites><testsuite>{''.join(cases)}</testsuite></testsuites>")
    lines = gs.digest_tests(tmp_path)
    assert lines[0].startswith("GPU tests: 1 passed, 20 failed")
    assert sum(x.startswith("- FAILED ") for x in lines) == 20
    assert "- FAILED test_lm_head::test_gpu_last: late" in lines
    cases = [f'<testcase classname="tests.test_graphs" name="test_gpu_{i}"><failure message="{"m" * 300}"/>'
             f'</testcase>' for i in range(34)] + cases[-2:]
    (tmp_path / "gpu_tests.xml").write_text(f"<testsuites><testsuite>{''.join(cases)}</testsuite></testsuites>")
    monkeypatch.setattr(gs, "digest_lm_head", lambda out: [f"| row {i} | " + "y" * 100 for i in range(200)])
    text = gs.write_digest(tmp_path, tmp_path, [], {}, [], False, 1.0)
    assert (tmp_path / "digest.md").read_text() == text and len(text.encode()) <= gs.DIGEST_MAX_BYTES
    assert all(f"- FAILED test_graphs::test_gpu_{i}: {'m' * 80}\n" in text for i in range(34))
    assert "- FAILED test_lm_head::test_gpu_last: late" in text and "digest cut at 8 KB" in text
    assert "| row 0 |" in text and "| row 199 |" not in text


def test_failed_tests_run_again_alone_and_only_repeat_failures_stay_failed(tmp_path):
    """Under xdist a test can fail for a reason outside it (a sticky CUDA error left in its worker by another
    test, another worker's memory). gpu_suite.py reruns the stage's failures alone in a fresh process: one that
    passes there is listed PASSED ON RERUN with its first failure, not FAILED, so that the learning experiment
    does not switch a sound kernel family off; one that fails again stays FAILED. Node ids are rebuilt from the
    JUnit report, for module-level, class and parametrized tests."""
    gs = load_benchmark("gpu_suite")
    lx = load_benchmark("learn_experiment")
    proj, raw = tmp_path / "proj", tmp_path / "raw"
    (proj / "tests").mkdir(parents=True)
    raw.mkdir()
    flag = tmp_path / "first_run_done"
    (proj / "tests" / "test_thought_attention.py").write_text(
        "import os, pathlib, pytest\n"
        f"FLAG = pathlib.Path({str(flag)!r})\n"
        "def test_ok():\n    pass\n"
        "def test_poisoned():      # fails the first time only, as after another test's sticky CUDA error\n"
        "    assert FLAG.exists(), 'CUDA error: an illegal memory access was encountered'\n"
        "@pytest.mark.parametrize('n', [1, 2])\n"
        "def test_param(n):\n    assert FLAG.exists() or n == 1\n"
        "class TestK:\n    def test_m(self):\n        assert FLAG.exists()\n")
    (proj / "tests" / "test_lm_head.py").write_text("def test_broken():\n    assert 1 == 2, 'wrong'\n")
    first = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            f"--junitxml={raw / 'gpu_tests.xml'}", "tests"], cwd=proj, capture_output=True, text=True,
                           timeout=120)
    assert first.returncode == 1, first.stdout
    flag.touch()
    st = gs.Stage("gpu_tests", 90, [], rc=1, status="FAILED")
    gs.rerun_failures(st, raw, _env(), 60, root=proj)
    rerun_log = (raw / "gpu_tests_rerun.log").read_text()
    for nid in ("tests/test_thought_attention.py::test_poisoned", "tests/test_thought_attention.py::test_param[2]",
                "tests/test_thought_attention.py::TestK::test_m", "tests/test_lm_head.py::test_broken"):
        assert nid in rerun_log, rerun_log                  # each failure, and only those, ran again
    assert "test_ok" not in rerun_log and "test_param[1]" not in rerun_log
    assert st.status == "FAILED"                             # test_broken failed again
    lines = gs.digest_tests(raw)
    assert lines[0] == "GPU tests: 2 passed, 4 failed, 0 skipped (of 6 selected with -m gpu)", lines
    assert lines[1] == "rerun of the 4 failed, alone in a fresh process: 3 passed, 1 failed or not reached"
    assert [x for x in lines if x.startswith("- FAILED")] == ["- FAILED test_lm_head::test_broken: AssertionError: "
                                                              "wrong"]
    assert "- PASSED ON RERUN test_thought_attention::TestK::test_m (alone in a fresh process, after failing under " \
           "xdist: AssertionError: assert False" in "\n".join(lines)
    assert any(x.startswith("- PASSED ON RERUN test_thought_attention::test_poisoned") and "illegal memory access"
               in x for x in lines)
    # what learn_experiment.sh hands call 2: only the repeated failure switches its family to a fallback
    line = ";".join(x for x in lines if x.startswith(("GPU tests:", "rerun of", "- FAILED", "- PASSED ON RERUN")))
    args = lx.build_parser().parse_args([])
    assert lx.apply_fallbacks(args, line) == ["lm_head=chunked"] and args.attention != "split"
    # every failure passing alone marks the stage; a rerun with too little time left leaves the failures as they were
    (proj / "tests" / "test_lm_head.py").write_text("def test_broken():\n    pass\n")
    gs.rerun_failures(st, raw, _env(), 60, root=proj)
    assert st.status == "FAILED, passed on rerun"
    st2 = gs.Stage("gpu_tests", 90, [], rc=1, status="FAILED")
    (raw / "gpu_tests_rerun.xml").unlink()
    (raw / "gpu_tests_rerun.log").unlink()
    gs.rerun_failures(st2, raw, _env(), 5, root=proj)
    assert st2.status == "FAILED" and "no rerun of the 4 failed test(s)" in st2.notes[0]
    assert sum(x.startswith("- FAILED") for x in gs.digest_tests(raw)) == 4
