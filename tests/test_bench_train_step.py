"""benchmarks/bench_train_step.py runs end to end (tiny model, CPU) and its agreement columns hold."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_train_step_tiny(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run([sys.executable, "benchmarks/bench_train_step.py", "--model", "tiny", "--B", "1", "--T", "16",
                        "--M", "2", "--K", "2", "--P", "2", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                        "--paths", "floor,reference,fast-cpu", "--out", str(tmp_path), "--tag", "t"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = {x["path"]: x for x in json.loads((tmp_path / "t.json").read_text())["results"]}
    assert set(res) == {"floor", "reference", "fast-cpu"}
    assert all(x["step_ms"] > 0 and x["peak_extra_mib"] > 0 for x in res.values())
    fast = res["fast-cpu"]
    assert fast["loss_rel_diff"] < 1e-4 and fast["grad_cosine"] > 0.9999
    assert fast["time_vs_floor"] > 0 and "speedup_vs_reference" in fast
    assert (tmp_path / "t.md").read_text().count("\n| ") >= 4
