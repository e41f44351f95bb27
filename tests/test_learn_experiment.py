"""The learning experiment's CPU rehearsal (benchmarks/learn_experiment.py --smoke): both arms run on the
same rows, the table and the PNG are written, a killed run still leaves its metrics, the run is sized
from measured step times, and the intervals are right."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("learn_experiment", ROOT / "benchmarks" / "learn_experiment.py")
lx = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lx)

SMALL = ["--smoke", "--eval-docs", "2", "--bench-items", "1", "--eval-batch", "8"]


def test_bootstrap_diff_is_paired_and_exact_for_a_constant_shift():
    n = [3.0, 5.0, 2.0, 7.0]
    a = [6.0, 4.0, 1.0, 9.0]
    same = lx.bootstrap_diff(a, n, a, n)
    assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "units": 4}
    b = [x + 0.25 * k for x, k in zip(a, n)]              # every token 0.25 nats worse
    d = lx.bootstrap_diff(a, n, b, n)
    assert d["diff"] == pytest.approx(0.25) and d["lo"] == pytest.approx(0.25) and d["hi"] == pytest.approx(0.25)
    noisy = lx.bootstrap_diff(a, n, [x + (k if i % 2 else -k) * 0.5 for i, (x, k) in enumerate(zip(a, n))], n)
    assert noisy["lo"] < noisy["diff"] < noisy["hi"]


def test_steps_sized_from_measured_step_times(tmp_path):
    st = tmp_path / "step_times.json"
    st.write_text(json.dumps({"quietstar_ms": 400.0, "control_ms": 100.0}))
    args = lx.build_parser().parse_args(["--step-times", str(st), "--train-budget-s", "60", "--policy-weights", "1"])
    assert lx.plan_steps(args) == 120
    args = lx.build_parser().parse_args(["--step-times", str(st), "--train-budget-s", "90"])   # two Quiet-STaR arms
    assert lx.plan_steps(args) == 100
    args = lx.build_parser().parse_args(["--step-times", str(st), "--train-budget-s", "60", "--max-steps", "50"])
    assert lx.plan_steps(args) == 50
    with pytest.raises(SystemExit, match="--step-times"):
        lx.plan_steps(lx.build_parser().parse_args([]))
    # --budget-s: what is left after the "before" phase, less each arm's measured set-up and evaluation
    with pytest.raises(SystemExit, match="quietstar_overhead_s, control_overhead_s, eval_thought_s, eval_base_s"):
        lx.plan_steps(lx.build_parser().parse_args(["--step-times", str(st)]), left_s=300)
    st.write_text(json.dumps({"quietstar_ms": 400.0, "control_ms": 100.0, "quietstar_overhead_s": 10.0,
                              "control_overhead_s": 5.0, "eval_thought_s": 20.0, "eval_base_s": 4.0}))
    m, slack = lx.SIZING_MARGIN, lx.SIZING_SLACK_S
    args = lx.build_parser().parse_args(["--step-times", str(st)])                       # two Quiet-STaR arms
    assert lx.plan_steps(args, left_s=300) == int((300 - m * (2 * (10 + 20) + 5 + 4) - slack) / 0.9)
    args = lx.build_parser().parse_args(["--step-times", str(st), "--policy-weights", "1"])
    assert lx.plan_steps(args, left_s=300) == int((300 - m * (10 + 20 + 5 + 4) - slack) / 0.5)
    # every arm loads the real model again: this run's load time, once per arm (here 2 arms)
    assert lx.plan_steps(args, left_s=300, load_s=7) == int((300 - m * (10 + 20 + 5 + 4 + 2 * 7) - slack) / 0.5)
    with pytest.raises(SystemExit, match="no time to train"):
        lx.plan_steps(args, left_s=m * 39 + slack)
    # the first step's cold compiles (part of each overhead) are paid once per run, not once per arm
    st.write_text(json.dumps({"quietstar_ms": 400.0, "control_ms": 100.0, "quietstar_overhead_s": 10.0,
                              "control_overhead_s": 5.0, "eval_thought_s": 20.0, "eval_base_s": 4.0,
                              "quietstar_compile_s": 6.0, "control_compile_s": 1.0}))
    args = lx.build_parser().parse_args(["--step-times", str(st)])                       # two Quiet-STaR arms
    assert lx.plan_steps(args, left_s=300) == int((300 - m * (2 * (4 + 20) + 4 + 4 + 6) - slack) / 0.9)
    # a --measure cut after its first arm: the run refuses at its start, before loading or evaluating anything
    st.write_text(json.dumps({"quietstar_ms": 400.0, "quietstar_overhead_s": 10.0, "eval_thought_s": 20.0}))
    with pytest.raises(SystemExit, match="--budget-s needs control_ms, control_overhead_s, eval_base_s"):
        lx.main(SMALL + ["--step-times", str(st), "--budget-s", "300", "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never" / "results.json").exists()


def test_failed_gpu_tests_fall_back_to_plain_paths():
    args = lx.build_parser().parse_args(["--attention", "triton", "--lm-head", "triton"])
    assert lx.apply_fallbacks(args, "GPU tests: 32 passed, 0 failed, 0 skipped (of 32 selected with -m gpu)") == []
    assert (args.attention, args.lm_head, args.document_mask, args.cuda_graphs) == ("triton", "triton", True, True)
    line = ("GPU tests: 29 passed, 3 failed, 0 skipped;- FAILED test_document_mask::test_gpu_graph_replay_with_documents"
            "[triton]: x;- FAILED test_lm_head::test_gpu_bf16_multi_chunk_and_memory: logp: non-finite values;"
            "- FAILED test_lm_head::test_gpu_other: y")
    assert lx.apply_fallbacks(args, line) == ["cuda_graphs=False", "lm_head=chunked"]   # masks: only graphs failed
    assert (args.attention, args.lm_head, args.document_mask, args.cuda_graphs) == ("triton", "chunked", True, False)
    args = lx.build_parser().parse_args(["--attention", "triton"])
    assert lx.apply_fallbacks(args, "GPU tests: 1 failed;- FAILED test_thought_attention::test_gpu_x[128]: a") == \
        ["attention=split"]
    args = lx.build_parser().parse_args(["--attention", "triton"])     # the evaluation's step kernel at M, M + 1
    assert lx.apply_fallbacks(args, "GPU tests: 1 failed;- FAILED test_eval::test_gpu_thought_predictions_equal"
                                    "_the_training_forward: a") == ["attention=split"]
    args = lx.build_parser().parse_args([])
    line = ("GPU tests: 2 failed;- FAILED test_document_mask::test_gpu_bf16_kernels_with_documents[1-4-2-64-5-64]: "
            "a;- FAILED test_train::test_cuda_graphs_train_the_same_run: b")
    assert lx.apply_fallbacks(args, line) == ["cuda_graphs=False", "document_mask=False"]
    # the end-to-end comparison of the fused path (both Triton families at once) replaces both
    args = lx.build_parser().parse_args([])
    assert lx.apply_fallbacks(args, "GPU tests: 1 failed;- FAILED test_quietstar::test_gpu_fused_path_matches_reference"
                                    "[autocast]: x") == ["attention=split", "lm_head=chunked"]
    # a failure of a memory bound (tests/test_kernel_memory.py) replaces no kernel family
    args = lx.build_parser().parse_args([])
    assert lx.apply_fallbacks(args, "GPU tests: 1 failed;- FAILED test_kernel_memory::test_lm_head_backward_peak"
                                    "[cuda]: x") == []


def test_measure_then_budgeted_run(tmp_path):
    """--measure writes every number --budget-s needs; a budgeted run sizes its steps after the 'before' phase."""
    (tmp_path / "tests.txt").write_text("GPU tests: 12 passed, 1 failed;- FAILED test_document_mask::"
                                        "test_gpu_bf16_kernels_with_documents[x]: y")
    lx.main(SMALL + ["--measure", "--measure-steps", "2", "--measure-eval-rows", "1", "--out", str(tmp_path),
                     "--gpu-tests", str(tmp_path / "tests.txt")])
    st = json.loads((tmp_path / "step_times.json").read_text())
    for k in ("quietstar_ms", "control_ms", "quietstar_overhead_s", "control_overhead_s", "eval_thought_s", "eval_base_s"):
        assert st[k] > 0, k
    assert 0 <= st["quietstar_compile_s"] < st["quietstar_overhead_s"] and 0 <= st["control_compile_s"]
    assert st["gpu_tests"].startswith("GPU tests: 12 passed, 1 failed;")
    assert not (tmp_path / "measure").exists()
    # a run on another machine (the recovery path of learn_experiment.sh): no --gpu-tests file, the GPU tests'
    # result and its fallbacks come with the step times
    out, mirror = tmp_path / "exp", tmp_path / "OUT"
    # an earlier run in the same folder trained an arm this run does not: its log must not be mirrored beside
    # this run's results (the H200 run's third call returned the second call's metrics_quietstar_b1e6.jsonl)
    # nor an arm's earlier log that this run trains again, before it does
    for arm in ("quietstar_b1e6", "quietstar_b1", "control"):
        (out / f"train_{arm}").mkdir(parents=True)
        (out / f"train_{arm}" / "metrics.jsonl").write_text('{"stale": true}\n')
    real_train_arm = lx.train_arm

    def train_arm(*a, **k):
        lx.mirror_files(out, mirror)
        assert not any("stale" in p.read_text() for p in mirror.glob("metrics_*")), "an earlier run's log mirrored"
        return real_train_arm(*a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(lx, "train_arm", train_arm)
    try:
        lx.main(SMALL + ["--policy-weights", "1", "--step-times", str(tmp_path / "step_times.json"), "--budget-s",
                         "1e5", "--max-steps", "2", "--out", str(out), "--mirror", str(mirror)])
    finally:
        mp.undo()
    assert not (out / "train_quietstar_b1e6").exists()
    assert sorted(p.name for p in mirror.glob("metrics_*")) == ["metrics_control.jsonl", "metrics_quietstar_b1.jsonl"]
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["steps"] == 2 and res["meta"]["gpu_tests"].startswith("GPU tests: 12 passed, 1 failed;")
    assert res["meta"]["fallbacks"] == ["document_mask=False"] and res["meta"]["document_mask"] is False
    assert [r["step"] for r in lx.read_metrics(lx.metrics_path(out, "quietstar_b1"))] == [1, 2]
    table = (out / "table.md").read_text()
    assert "Before the run, on the same machine: GPU tests: 12 passed, 1 failed" in table
    assert "**Fallback** (a kernel family failed its GPU tests): document_mask=False" in table
    assert "document masking off" in table


def test_smoke_runs_both_arms_and_writes_table_and_curves(tmp_path):
    out, mirror = tmp_path / "exp", tmp_path / "OUT"
    lx.main(SMALL + ["--steps", "2", "--policy-weights", "1,1e6", "--thoughts-every", "1", "--out", str(out),
                     "--mirror", str(mirror)])
    res = json.loads((out / "results.json").read_text())
    # the mirror (a device call's $OUT): flat, the final files, nothing else (the tool brings back 8 files)
    assert sorted(p.name for p in mirror.iterdir()) == sorted(
        ["results.json", "table.md", "curves.png", "hard_mask.pt", "metrics_control.jsonl",
         "metrics_quietstar_b1.jsonl", "metrics_quietstar_b1e6.jsonl"])
    for name in ("results.json", "table.md", "curves.png", "hard_mask.pt"):
        assert (mirror / name).read_bytes() == (out / name).read_bytes(), name
    assert (mirror / "metrics_control.jsonl").read_bytes() == lx.metrics_path(out, "control").read_bytes()
    assert res["meta"]["arms"] == {"quietstar_b1": 1.0, "quietstar_b1e6": 1e6, "control": None}
    for arm in res["meta"]["arms"]:
        steps = lx.read_metrics(lx.metrics_path(out, arm))
        assert [r["step"] for r in steps] == [1, 2], arm
    # the same rows in the same order: step 1 of both arms starts from the same model on the same batch
    assert list(res["meta"]["arms"]) == ["control", "quietstar_b1", "quietstar_b1e6"]     # the control trains first
    q1, q2, c1 = (lx.read_metrics(lx.metrics_path(out, a))[0] for a in ("quietstar_b1", "quietstar_b1e6", "control"))
    assert q1["nll_base"] == pytest.approx(c1["nll_base"], rel=1e-5)
    # the arms differ only in the policy weight: at step 1 w = 0, so every advantage and the policy term are 0
    # and both arms take the same update; at step 2 the same policy term, weighted differently
    assert q1["policy"] == q2["policy"] == 0 and q1["loss"] == q2["loss"]
    s1, s2 = (lx.read_metrics(lx.metrics_path(out, a))[1] for a in ("quietstar_b1", "quietstar_b1e6"))
    assert s1["policy"] == s2["policy"] != 0 and s1["loss"] != s2["loss"]
    logged = [json.loads(line) for line in lx.metrics_path(out, "quietstar_b1").read_text().splitlines()]
    assert [r["thoughts"]["step"] for r in logged if "thoughts" in r] == [1, 2]       # decoded thoughts logged
    assert all("thought_gain" in r for r in lx.read_metrics(lx.metrics_path(out, "quietstar_b1")))
    before, qs, ctl = res["before"]["eval"], res["quietstar_b1"]["eval"], res["control"]["eval"]
    assert {"heldout_all_thought", "heldout_hard_thought", "gsm8k_thought", "csqa_thought"} <= set(qs)
    assert not any(k.endswith("_thought") for k in list(before) + list(ctl))
    assert sum(before["heldout_hard_base"]["n"]) == res["hard_targets"] > 0
    assert sum(before["heldout_all_base"]["n"]) == res["meta"]["sizes"]["heldout_targets"]
    # training moved the model (lr 1e-3 on a random init)
    assert lx.mean_of(ctl["heldout_all_base"]) != lx.mean_of(before["heldout_all_base"])
    table = (out / "table.md").read_text()
    assert "not run" not in table and "Quiet-STaR after minus control after" in table
    assert "(regression to the mean)" in table        # the hard tokens' caveat, under the before/after table
    # the heading names the weights exactly: "smollm2-135m" is the instruct model's 4-bit GGUF
    assert table.splitlines()[0].endswith("(tiny)") and res["meta"]["weights"] == "tiny"
    real = dict(res, meta=dict(res["meta"], model="smollm2-135m", weights=lx.weights_description("smollm2-135m")))
    assert "(smollm2-135m = SmolLM2-135M-Instruct.Q4_1.gguf (the instruct model, 4-bit GGUF dequantised" in \
        lx.render_table(real).splitlines()[0]
    # rows per arm; QS - control; with - without thoughts per Quiet-STaR arm
    assert table.count("| held-out NLL, hardest 10% (nats/token) |") == 5 + 4 + 2
    own = [line for line in table.splitlines() if line.startswith("| held-out NLL, all targets (nats/token) | beta_policy")]
    d = lx.bootstrap_diff(qs["heldout_all_base"]["sum"], qs["heldout_all_base"]["n"],
                          qs["heldout_all_thought"]["sum"], qs["heldout_all_thought"]["n"])
    assert own[0] == f"| held-out NLL, all targets (nats/token) | beta_policy 1 | {lx._fmt_ci(d, 4)} |"
    # --retable: the same table from results.json alone (a run fetched from a GPU, re-rendered here)
    again = tmp_path / "fetched"
    again.mkdir()
    (again / "results.json").write_bytes((out / "results.json").read_bytes())
    assert lx.main(["--retable", str(again)]) == 0 and (again / "table.md").read_text() == table
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_killed_run_leaves_its_metrics(tmp_path):
    out, mirror = tmp_path / "exp", tmp_path / "OUT"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "learn_experiment.py"), *SMALL, "--steps", "50",
                          "--out", str(out), "--mirror", str(mirror), "--mirror-every", "0.5"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = mirror / "metrics_control.jsonl"     # what a device call killed at its limit returns: the mirror
    try:
        deadline = time.time() + 600
        while time.time() < deadline and len(lx.read_metrics(metrics)) < 2:
            assert p.poll() is None, "the run ended before it could be killed"
            time.sleep(0.5)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert len(lx.read_metrics(metrics)) >= 2
    assert len(lx.read_metrics(lx.metrics_path(out, "control"))) >= 2
    res = json.loads((mirror / "results.json").read_text())       # replaced atomically: never half a file
    assert res == json.loads((out / "results.json").read_text())
    assert "before" in res and "control" not in res
    table = (out / "table.md").read_text()
    assert "not run" in table and (out / "curves.png").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_wrapper_refuses_without_cuda_and_bad_modes(tmp_path):
    sh = str(ROOT / "benchmarks" / "learn_experiment.sh")
    for mode, msg in (("measure", "no CUDA GPU"), ("run", "no CUDA GPU"), ("train", "MODE must be")):
        r = subprocess.run(["bash", sh, str(tmp_path), mode], capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stdout, (mode, r.stdout, r.stderr)


def test_mirror_copies_in_progress_live_beside_the_mirror(tmp_path, monkeypatch):
    """A kill in mid-copy must not leave a ninth entry in $OUT: the copy in progress is written beside the
    mirror (same file system, atomic rename), inside it only where beside is impossible."""
    out, mirror = tmp_path / "exp", tmp_path / "OUT"
    out.mkdir()
    (out / "table.md").write_text("t\n")
    seen = []
    real = lx.shutil.copyfile
    monkeypatch.setattr(lx.shutil, "copyfile", lambda src, dst: (seen.append(Path(dst).parent), real(src, dst))[1])
    assert lx.mirror_files(out, mirror) == ["table.md"]
    assert seen == [tmp_path / ".OUT_mirror_tmp"] and not seen[0].exists()
    assert [p.name for p in mirror.iterdir()] == ["table.md"]
    real_mkdir = Path.mkdir

    def no_beside(self, *a, **k):
        if self.name.endswith("_mirror_tmp") and self.parent == tmp_path:
            raise PermissionError(self)
        return real_mkdir(self, *a, **k)
    monkeypatch.setattr(Path, "mkdir", no_beside)
    seen.clear()
    assert lx.mirror_files(out, mirror) == ["table.md"]
    assert seen == [mirror / "_mirror_tmp"] and [p.name for p in mirror.iterdir()] == ["table.md"]
    monkeypatch.setattr(Path, "mkdir", real_mkdir)
    monkeypatch.chdir(mirror)                  # --mirror . : beside the real folder, not "./._mirror_tmp"
    seen.clear()
    assert lx.mirror_files(out, Path(".")) == ["table.md"]
    assert seen == [tmp_path / ".OUT_mirror_tmp"] and [p.name for p in mirror.iterdir()] == ["table.md"]


def test_evaluation_time_estimate_leaves_out_each_sets_first_compile(monkeypatch):
    """eval_seconds times each set after an untimed batch of that set: a one-off cost on a new row length (the
    GPU's compiles) must not be scaled by the set's size. Simulated: 0.3 s the first time a length is seen."""
    import torch
    from types import SimpleNamespace
    from quietstar import evaluate as qeval
    seen = set()

    def fake_token_nll(model, ids, valid, *a, **k):
        if ids.shape[1] not in seen:
            seen.add(ids.shape[1])
            time.sleep(0.3)
        return None, None

    monkeypatch.setattr(qeval, "token_nll", fake_token_nll)
    part = lambda n, t: (torch.zeros(n, t, dtype=torch.long), torch.ones(n, t, dtype=torch.bool))  # noqa: E731
    (rows, valid), gsm, csqa = part(40, 16), part(40, 24), part(40, 32)
    sets = SimpleNamespace(rows=rows, valid=valid, gsm=gsm, csqa=csqa)
    est = lx.eval_seconds(None, sets, False, None, 2, torch.device("cpu"), None, rows=4)
    assert est < 0.3, est         # the three one-off costs, scaled x10, would give 6 s
    assert seen == {16, 24, 32}
