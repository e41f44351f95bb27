"""The benchmark scripts run every provider path (smoke mode, CPU, tiny shapes) and check values.

Smoke runs go through a subprocess, as a user would run them; the can-fail tests import the scripts
and swap a public kernel for a wrong one, which the smoke check must catch.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def _run(args, timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def load_benchmark(name):
    """benchmarks/<name>.py imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _importable(name):
    return importlib.util.find_spec(name) is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="smoke mode is the CPU path")
def test_thought_attention_smoke(tmp_path):
    res = _run([str(BENCH / "bench_thought_attention.py"), "--smoke", "--out", str(tmp_path)])
    log = res.stdout[-6000:] + res.stderr[-6000:]
    assert res.returncode == 0, log
    rows = json.loads((tmp_path / "thought_attention_smoke.json").read_text())["rows"]
    assert (tmp_path / "thought_attention_smoke.md").exists()
    for case in ("sampling", "fwd", "bwd", "fwdbwd"):
        for provider in ("dense", "flex", "proxy", "ours"):
            got = [r for r in rows if r["case"] == case and r["provider"] == provider]
            assert len(got) == 3, (case, provider, log)          # two shapes, and one with packed documents
            assert sum(r["doc_len"] > 0 for r in got) == 1
            for r in got:
                if provider == "flex" and case in ("bwd", "fwdbwd"):
                    assert r["status"].startswith("skipped: flex backward"), r
                    continue
                if provider == "proxy" and r["doc_len"]:
                    assert r["status"] == "skipped: no document-masked proxy", r
                    continue
                assert r["status"] == "ok" and r["median_ms"] is not None, r
                if provider != "proxy":   # the proxy solves a different (unmasked) problem
                    assert r["max_err_vs_ref"] is not None and r["max_err_vs_ref"] <= 2e-4, r


@pytest.mark.skipif(torch.cuda.is_available(), reason="smoke mode is the CPU path")
def test_lm_head_smoke(tmp_path):
    res = _run([str(BENCH / "bench_lm_head.py"), "--smoke", "--out", str(tmp_path)])
    log = res.stdout[-6000:] + res.stderr[-6000:]
    assert res.returncode == 0, log
    rows = json.loads((tmp_path / "lm_head_smoke.json").read_text())["rows"]
    for case, providers in (("fwd", ("naive", "chunked", "liger", "cce", "ours")),
                            ("fwdbwd", ("naive", "chunked", "liger", "cce", "ours")),
                            ("sampling", ("naive", "chunked", "ours"))):
        for provider in providers:
            got = [r for r in rows if r["case"] == case and r["provider"] == provider]
            assert len(got) == 2, (case, provider, log)
            for r in got:
                if provider in ("liger", "cce"):    # need CUDA; not installed on the CPU machines
                    assert r["status"].startswith("skipped:"), r
                    continue
                if provider == "chunked" and not _importable("kernels.lm_head_chunked"):
                    assert r["status"].startswith("skipped:"), r
                    continue
                assert r["status"] == "ok", r
                assert r["max_err_vs_ref"] is not None and r["max_err_vs_ref"] <= 1e-4, r


@pytest.mark.skipif(not _importable("kernels.lm_head_chunked"), reason="kernels.lm_head_chunked not there yet")
def test_lm_head_cpu_mode_small(tmp_path):
    """--cpu at a small shape: both providers measured in fresh processes; chunked must use less memory."""
    res = _run([str(BENCH / "bench_lm_head.py"), "--cpu", "--N", "1024", "--d", "64", "--V", "16384",
                "--reps", "1", "--out", str(tmp_path)])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    rows = {r["provider"]: r for r in json.loads((tmp_path / "lm_head_cpu.json").read_text())["rows"]}
    assert set(rows) == {"naive", "chunked"} and all(r["status"] == "ok" for r in rows.values()), rows
    # full fp32 logits of 1024 x 16384 are 64 MiB; the naive fwd+bwd holds several such tensors
    assert rows["naive"]["peak_extra_mib"] > 64, rows
    assert rows["chunked"]["peak_extra_mib"] < rows["naive"]["peak_extra_mib"], rows
    assert (tmp_path / "lm_head_cpu.md").exists()


def test_thought_attention_smoke_catches_a_wrong_kernel(tmp_path, monkeypatch):
    bench = load_benchmark("bench_thought_attention")
    ref = bench.thought_attention_ref
    monkeypatch.setattr(bench.kernels, "thought_attention", lambda *a, **k: ref(*a, **k) * 1.001)
    rc = bench.main(["--smoke", "--cases", "fwd", "--providers", "dense,ours", "--shapes", "T=19",
                     "--out", str(tmp_path)])
    assert rc == 1
    rows = json.loads((tmp_path / "thought_attention_smoke.json").read_text())["rows"]
    assert [r["status"].split(":")[0] for r in rows] == ["ok", "FAILED check"], rows


def test_lm_head_smoke_catches_wrong_kernels(tmp_path, monkeypatch):
    bench = load_benchmark("bench_lm_head")
    ref = bench.mixed_logprob_ref
    monkeypatch.setattr(bench.kernels, "mixed_logprob", lambda *a, **k: ref(*a, **k) + 1e-3)
    greedy_plus_one = lambda h, weight, *a, **k: ((h.float() @ weight.float().T).argmax(-1) + 1) % weight.shape[0]  # noqa: E731
    monkeypatch.setattr(bench.kernels, "sample_thought_tokens", greedy_plus_one)
    rc = bench.main(["--smoke", "--cases", "fwd,sampling", "--providers", "naive,ours", "--out", str(tmp_path)])
    assert rc == 1
    rows = json.loads((tmp_path / "lm_head_smoke.json").read_text())["rows"]
    ours = [r for r in rows if r["provider"] == "ours"]
    assert ours and all(r["status"].startswith("FAILED check") for r in ours), ours
    assert all(r["status"] == "ok" for r in rows if r["provider"] == "naive"), rows


def test_eval_path_benchmark_checks_the_predictions(tmp_path, monkeypatch):
    """bench_eval.py times the evaluation's thought_predictions against the training forward it replaced and
    fails (exit 1) when their k = 1 log-probs disagree."""
    bench = load_benchmark("bench_eval")
    small = ["--model", "tiny", "--T", "12", "--M", "2", "--K", "2", "--repeats", "1", "--device", "cpu",
             "--out", str(tmp_path), "--tag", "e"]
    assert bench.main(small) == 0
    d = json.loads((tmp_path / "e.json").read_text())
    assert d["env"]["thoughts_equal"] is True and d["env"]["max_abs_diff_lp_k1"] < 1e-5
    assert [r["path"].split(" ")[0] for r in d["rows"]] == ["training", "thought_predictions"]
    assert all(r["s"] > 0 for r in d["rows"]) and "faster" in (tmp_path / "e.md").read_text()
    good = bench.thought_predictions

    def shifted(*a, **k):
        out = good(*a, **k)
        out.lp_mix = out.lp_mix - 1e-3
        return out
    monkeypatch.setattr(bench, "thought_predictions", shifted)
    assert bench.main(small) == 1
