"""benchmarks/h100_static_check.py: every kernel config compiles for sm_90 without spills, within
227 KB of shared memory, and with tensor-core instructions where it has a tl.dot.

The script runs in a subprocess with TRITON_INTERPRET removed from the environment (conftest.py sets
it for this process, and the interpreter patches triton.language). The self-test compiles toy kernels
written to a temporary file and checks that the checker passes a good one and fails bad ones, so a
green run of the real check means something.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "h100_static_check.py"
MODULES = ("kernels.thought_attention", "kernels.lm_head")


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _run(args, env=None, timeout=900):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


def _present_cases(module):
    """(kernel, config) of every case a module exports, read in a clean process; None if absent."""
    code = textwrap.dedent(f"""
        import importlib, json, sys
        try:
            m = importlib.import_module({module!r})
        except ModuleNotFoundError as e:
            if e.name and {module!r}.startswith(e.name):
                print("null"); sys.exit(0)
            raise
        f = getattr(m, "h100_compile_cases", None)
        print("null" if f is None else json.dumps([[c["kernel"], c["config"]] for c in f()]))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"importing {module} failed:\n{out.stderr}"
    cases = json.loads(out.stdout.strip().splitlines()[-1])
    return None if cases is None else [tuple(c) for c in cases]


@pytest.mark.slow
def test_every_kernel_config_passes_on_sm90(tmp_path):
    res = _run(["--out", str(tmp_path)])
    log = res.stdout + res.stderr
    assert res.returncode == 0, f"h100_static_check failed (rc={res.returncode}):\n{log}"
    report = json.loads((tmp_path / "h100_static_check.json").read_text())
    assert (tmp_path / "h100_static_check.md").exists()
    got = {(r["module"], r["kernel"], r["config"]) for r in report["rows"]}
    skipped = {s["module"] for s in report["skipped"]}
    for module in MODULES:
        cases = _present_cases(module)
        if cases is None:
            assert module in skipped, f"{module} has no cases but the report does not say it was skipped"
            continue
        assert cases, f"{module}.h100_compile_cases() returned no cases"
        assert len(set(cases)) == len(cases), f"{module}: (kernel, config) pairs must be unique: {cases}"
        missing = {(module, k, c) for k, c in cases} - got
        assert not missing, f"cases not in the report: {sorted(missing)}\n{log}"
    assert all(r["status"] == "ok" for r in report["rows"])


TOYS = '''
import triton
import triton.language as tl


@triton.jit
def toy_mm(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr = False):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rm[:, None] * stride_am + (k + rk)[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & ((k + rk)[None, :] < K), other=0.0)
        b = tl.load(b_ptr + (k + rk)[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=((k + rk)[:, None] < K) & (rn[None, :] < N), other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc,
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def toy_spill(x_ptr, y_ptr, BLOCK: tl.constexpr):
    # a BLOCK x BLOCK fp32 tile kept live in one warp: 512 values per thread
    r = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + r[:, None] * BLOCK + r[None, :])
    y = x - tl.sum(x, axis=0)[None, :] - tl.sum(x, axis=1)[:, None]
    tl.store(y_ptr + r[:, None] * BLOCK + r[None, :], y)


def _mm(config, dt, bm, bn, bk, warps, stages, ieee=False):
    sig = {"a_ptr": "*" + dt, "b_ptr": "*" + dt, "c_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
           "stride_am": "i32", "stride_bk": "i32", "stride_cm": "i32"}
    ce = {"stride_ak": 1, "stride_bn": 1, "stride_cn": 1, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
          "IEEE": ieee}
    return {"kernel": "toy_mm", "config": config, "fn": toy_mm, "signature": sig, "constexprs": ce,
            "num_warps": warps, "num_stages": stages, "has_dot": True}


def h100_compile_cases():
    return [
        _mm("good_bf16", "bf16", 128, 128, 64, 8, 3),
        _mm("fp32_ieee_no_tc", "fp32", 64, 64, 32, 4, 2, ieee=True),
        _mm("bf16_smem_too_big", "bf16", 128, 256, 64, 8, 5),
        {"kernel": "toy_spill", "config": "spills", "fn": toy_spill,
         "signature": {"x_ptr": "*fp32", "y_ptr": "*fp32"}, "constexprs": {"BLOCK": 128},
         "num_warps": 1, "num_stages": 1, "has_dot": False},
        {"kernel": "toy_spill", "config": "spills_beyond_allowance", "fn": toy_spill,
         "signature": {"x_ptr": "*fp32", "y_ptr": "*fp32"}, "constexprs": {"BLOCK": 128},
         "num_warps": 1, "num_stages": 1, "has_dot": False, "max_stack_bytes": 8},
        {"kernel": "toy_spill", "config": "bad_signature", "fn": toy_spill,
         "signature": {"x_ptr": "*fp32"}, "constexprs": {"BLOCK": 128},
         "num_warps": 1, "num_stages": 1, "has_dot": False},
    ]
'''


def test_checker_can_fail(tmp_path):
    toys = tmp_path / "toys.py"
    toys.write_text(TOYS)
    res = _run(["--module", str(toys), "--out", str(tmp_path / "out")])
    log = res.stdout + res.stderr
    assert res.returncode == 1, f"the checker must fail on the bad toys (rc={res.returncode}):\n{log}"
    rows = {r["config"]: r for r in json.loads((tmp_path / "out" / "h100_static_check.json").read_text())["rows"]}
    assert set(rows) == {"good_bf16", "fp32_ieee_no_tc", "bf16_smem_too_big", "spills", "spills_beyond_allowance",
                         "bad_signature"}, log

    good = rows["good_bf16"]   # a bf16 tile on sm_90 must become warpgroup MMA
    assert good["status"] == "ok", log
    assert good["tc_breakdown"].get("HGMMA", 0) > 0, good
    assert 0 < good["registers"] <= 255 and good["local_bytes"] == 0 and good["stack_bytes"] == 0, good
    assert good["smem_bytes"] >= 3 * (128 * 64 + 64 * 128) * 2, f"3-stage pipeline expected: {good}"

    ieee = rows["fp32_ieee_no_tc"]
    assert ieee["tc_ops"] == 0 and ieee["status"] == "FAIL: no tensor-core op", ieee

    big = rows["bf16_smem_too_big"]   # 5 stages x (128x64 + 64x256) bf16 = 245760 B > 232448 B
    assert big["smem_bytes"] > 232448 and "smem > 227 KB" in big["status"], big

    spill = rows["spills"]
    assert spill["local_bytes"] + spill["stack_bytes"] > 0 and "spills" in spill["status"], spill

    beyond = rows["spills_beyond_allowance"]   # an allowance below the spill does not pass it
    assert "spills" in beyond["status"] and "allowed stack: 8" in beyond["errors"][0], beyond

    bad = rows["bad_signature"]
    assert bad["status"] == "FAIL: compile error" and "y_ptr" in bad["errors"][0], bad


def test_refuses_interpreter(tmp_path):
    env = _env()
    env["TRITON_INTERPRET"] = "1"
    res = _run(["--out", str(tmp_path)], env=env, timeout=120)
    assert res.returncode == 2 and "TRITON_INTERPRET" in res.stderr, res.stdout + res.stderr
    assert not (tmp_path / "h100_static_check.json").exists()
