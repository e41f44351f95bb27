"""The GPU suite in one device call of at most ~7 minutes: GPU tests, then the train step at the paper
shape, then thought attention at the compass shapes, then the LM head at the anchor shapes.

    python3 benchmarks/gpu_suite.py --out "$OUT"          # on the GPU machine (see benchmarks/README.md)
    python3 benchmarks/gpu_suite.py --out DIR --dry-run   # CPU rehearsal of the same call at smoke shapes

Speed needs no real weights: the train step runs a random-init model at SmolLM2-135M's exact shape
(`--model smollm2-135m-random`), the kernels run at Mistral-7B's and SmolLM2's attention / LM-head
shapes. The call carries only `.whl` (peer wheels, `scripts/gpu_carry.sh`) and `quietstar/data`.

Stages run one after another, each in its own process group under its own time cap (a stage that
overruns is killed and reported TIMEOUT; the benchmarks write their tables row by row, so what was
measured is kept). While the GPU tests run, a background process compiles FlexAttention and our
kernels for the attention benchmark's shapes (torch.compile and Triton cache on disk), so the timed
attention stage does not spend its cap compiling; it is stopped before the train step starts.

What comes back (at most 8 files in OUT, the device tool's limit): `digest.md` (printed last, at most
~8 KB: per stage status and the tables "ours / best peer / floor" with the targets), the result
tables `train_step.{md,json}`, `thought_attention.{md,json}`, `lm_head.{md,json}`, and
`suite.tar.gz` with everything else (every stage's full log, the test report, the environment).
The exit status is the number of failed stages (0 = all passed); without CUDA (and without
--dry-run) it exits 2 at once.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_FILES = 8            # the device tool brings back at most 8 files of $OUT
DIGEST_MAX_BYTES = 8192
PEER_WHEEL_MODULES = ("liger_kernel", "cut_cross_entropy")
TABLES = ("train_step", "thought_attention", "lm_head")


@dataclass
class Stage:
    name: str
    cap_s: int
    """Time cap in seconds; the stage's process group is killed when it runs past it."""
    cmd: list
    table: str | None = None
    """Stem of the result table the stage writes into OUT (None: no table)."""
    rc: int | None = None
    secs: float = 0.0
    status: str = "not run"
    notes: list = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# the stages (GPU) and their rehearsal (--dry-run: CPU, smoke shapes, the same scripts and flags)
# ----------------------------------------------------------------------------------------------
# kernel files first (with xdist the order only matters for what a timed-out stage reached)
GPU_TEST_FILES = ("tests/test_thought_attention.py", "tests/test_document_mask.py", "tests/test_lm_head.py",
                  "tests/test_graphs.py", "tests/test_quietstar.py", "tests/test_train.py", "tests/test_parallel.py",
                  "tests/test_eval.py", "tests/test_generate.py", "tests/test_kernel_memory.py")


def stages(out: Path, raw: Path, dry: bool, workers: int, caps: dict, test_files=GPU_TEST_FILES,
           train_paths="floor,fast-gpu,fast-gpu-graphs,reference") -> list[Stage]:
    py = sys.executable
    pytest_cmd = [py, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", "--durations=15",
                  f"--junitxml={raw / 'gpu_tests.xml'}", "-o", "addopts=-ra"] + (["-n", str(workers)] if workers else [])
    if _importable("pytest_timeout"):
        pytest_cmd += ["--timeout", str(caps.get("per_test", 90))]
    pytest_cmd += [f for f in test_files if (REPO / f).exists()]
    if dry:
        train = [py, "benchmarks/bench_train_step.py", "--model", "tiny", "--B", "1", "--T", "16", "--M", "2",
                 "--K", "2", "--P", "2", "--device", "cpu", "--paths", "floor,fast-cpu,reference", "--repeats", "1",
                 "--warmup", "0"]
        attn = [py, "benchmarks/bench_thought_attention.py", "--smoke", "--cases", "fwdbwd,sampling"]
        lm = [py, "benchmarks/bench_lm_head.py", "--smoke", "--cases", "fwdbwd,sampling"]
    else:
        # the paper shape: B=8 T=256, M=9 K=4 P=2 (L=14), bf16 autocast, SmolLM2-135M's exact shape
        train = [py, "benchmarks/bench_train_step.py", "--model", "smollm2-135m-random", "--B", "8", "--T", "256",
                 "--paths", train_paths, "--repeats", "3", "--warmup", "1"]
        attn = [py, "benchmarks/bench_thought_attention.py", "--cases", "fwdbwd,sampling"]
        lm = [py, "benchmarks/bench_lm_head.py", "--N", "8192", "--cases", "fwdbwd,sampling"]
    train += ["--out", str(out), "--tag", "train_step"]
    attn += ["--out", str(out)]
    lm += ["--out", str(out)]
    return [
        Stage("gpu_tests", caps.get("gpu_tests", 90), pytest_cmd),
        Stage("train_step", caps.get("train_step", 150), train, "train_step"),
        Stage("thought_attention", caps.get("thought_attention", 100), attn, "thought_attention"),
        Stage("lm_head", caps.get("lm_head", 50), lm, "lm_head"),
    ]


def warm_cmd(dry: bool) -> list:
    """The attention benchmark's compile work, untimed, run beside the GPU tests."""
    cmd = [sys.executable, "benchmarks/bench_thought_attention.py", "--compile-only", "--cases", "fwdbwd,sampling"]
    return cmd + (["--smoke"] if dry else [])


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------
def _importable(mod: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(mod) is not None


def _kill_group(p: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def start(cmd, log: Path, env, cwd: Path = REPO) -> subprocess.Popen:
    f = open(log, "w")
    f.write(f"$ {' '.join(map(str, cmd))}\n")
    f.flush()
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def run_stage(st: Stage, raw: Path, env, inject_failure: str | None, left_s: float) -> None:
    cmd = [sys.executable, "-c", f"import sys; print('injected failure of stage {st.name}'); sys.exit(3)"] \
        if st.name == inject_failure else st.cmd
    if left_s < 20:
        st.status, st.rc = "SKIPPED (suite budget spent)", None
        print(f"== {st.name}: {st.status}", flush=True)
        return
    if left_s < st.cap_s:
        st.notes.append(f"cap cut from {st.cap_s} s to the suite budget's {left_s:.0f} s")
        st.cap_s = int(left_s)
    print(f"== {st.name} (cap {st.cap_s} s)", flush=True)
    t0 = time.time()
    p = start(cmd, raw / f"{st.name}.log", env)
    try:
        st.rc = p.wait(timeout=st.cap_s)
        st.status = "ok" if st.rc == 0 else "FAILED"
    except subprocess.TimeoutExpired:
        _kill_group(p)
        st.rc, st.status = 124, "TIMEOUT"
    st.secs = time.time() - t0
    tail = (raw / f"{st.name}.log").read_text(errors="replace").strip().splitlines()[-1:] or [""]
    print(f"   {st.status} rc={st.rc} {st.secs:.0f} s | {tail[0][:160]}", flush=True)


def _cases(xml: Path) -> list:
    """The <testcase> elements of a JUnit report (none when it does not exist)."""
    return list(ET.parse(xml).getroot().iter("testcase")) if xml.exists() else []


def _failed(case) -> bool:
    return case.find("failure") is not None or case.find("error") is not None


def node_id(case, root: Path = REPO) -> str | None:
    """The pytest node id of a JUnit <testcase> (classname "tests.test_x" or "tests.test_x.TestC", name
    "test_f[p]") -> "tests/test_x.py[::TestC]::test_f[p]"; None when no such test file is under `root`."""
    parts = (case.get("classname") or "").split(".")
    for i in range(len(parts), 0, -1):
        if (root / Path(*parts[:i])).with_suffix(".py").is_file():
            return "/".join(parts[:i]) + ".py::" + "::".join(parts[i:] + [case.get("name")])
    return None


def rerun_passed(raw: Path) -> set[tuple]:
    """(classname, name) of every test that passed in the rerun's report (`rerun_failures`)."""
    return {(c.get("classname"), c.get("name")) for c in _cases(raw / "gpu_tests_rerun.xml")
            if not _failed(c) and c.find("skipped") is None}


def rerun_failures(st: Stage, raw: Path, env, cap_s: float, root: Path = REPO) -> None:
    """Run the gpu_tests stage's failed tests again, alone in one fresh process (no xdist), into
    gpu_tests_rerun.{xml,log}. Under xdist a test can fail for a reason outside it: a sticky CUDA error
    (an illegal access poisons its worker's CUDA context, and every later test there fails) or another
    worker's memory. `digest_tests` then lists a test that passes here as PASSED ON RERUN, with its first
    failure, and no longer as FAILED (the learning experiment's fallbacks read the FAILED lines); one that
    fails again, or that the rerun did not reach within `cap_s`, stays FAILED."""
    ids = [n for n in (node_id(c, root) for c in _cases(raw / "gpu_tests.xml") if _failed(c)) if n]
    if not ids:
        return
    if cap_s < 15:
        st.notes.append(f"no rerun of the {len(ids)} failed test(s): {cap_s:.0f} s left")
        return
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-o", "addopts=-ra",
           f"--junitxml={raw / 'gpu_tests_rerun.xml'}"]
    if _importable("pytest_timeout"):
        cmd += ["--timeout", str(int(min(60, cap_s)))]
    t0 = time.time()
    p = start(cmd + ids, raw / "gpu_tests_rerun.log", env, cwd=root)
    try:
        p.wait(timeout=cap_s)
    except subprocess.TimeoutExpired:       # pytest writes its report at the end: none, every failure stays
        _kill_group(p)
        st.notes.append(f"the rerun of the {len(ids)} failed test(s) was cut at {cap_s:.0f} s")
    n = len(rerun_passed(raw))
    if n == len(ids):
        st.status = "FAILED, passed on rerun"
    st.notes.append(f"rerun of the {len(ids)} failed test(s), alone: {n} passed ({time.time() - t0:.0f} s, "
                    "beyond the stage's time)")
    print(f"   {st.notes[-1]}", flush=True)


def install_wheels(raw: Path, env: dict) -> list[str]:
    """Peer wheels from .whl/ into /tmp/qs_site (the GPU machine has no registry); returns problems."""
    wheels = sorted(glob.glob(str(REPO / ".whl" / "*.whl")))
    if not wheels:
        return ["no .whl/ folder: run scripts/gpu_carry.sh here and carry .whl"]
    site = Path("/tmp/qs_site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                        str(site), *wheels], capture_output=True, text=True)
    (raw / "pip_install.log").write_text(r.stdout + r.stderr)
    if r.returncode:
        return [f"pip install of .whl/ failed (rc {r.returncode}), see pip_install.log"]
    env["PYTHONPATH"] = f"{site}{os.pathsep}{env['PYTHONPATH']}"
    sys.path.insert(0, str(site))
    return []


def environment(raw: Path, env) -> dict:
    code = ("import json, importlib, platform\n"
            "d = {'python': platform.python_version()}\n"
            "for m in ('torch', 'triton', 'transformers', 'numpy', 'liger_kernel', 'cut_cross_entropy', 'xdist',"
            " 'pytest_timeout'):\n"
            "    try:\n"
            "        mod = importlib.import_module(m); d[m] = getattr(mod, '__version__', 'installed')\n"
            "    except Exception as e:\n"
            "        d[m] = f'missing ({type(e).__name__})'\n"
            "import torch\n"
            "d['cuda'] = torch.version.cuda\n"
            "d['gpu'] = torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'\n"
            "print(json.dumps(d))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    info = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr[-500:]}
    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True) if shutil.which("nvidia-smi") else None
    (raw / "environment.txt").write_text(json.dumps(info, indent=1) + "\n\n" + (smi.stdout if smi else "no nvidia-smi"))
    info["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    info["host"] = platform.node()
    return info


# ----------------------------------------------------------------------------------------------
# the digest: per stage status, then "ours / best peer / floor" with the targets
# ----------------------------------------------------------------------------------------------
def _f(v, fmt="{:.3g}"):
    return "-" if v is None else fmt.format(v)


def _mark(ok):
    return "-" if ok is None else ("yes" if ok else "NO")


def _load(out: Path, stem: str):
    """A benchmark's JSON: `<stem>.json`, or `<stem>_smoke.json` (what --smoke writes, in the rehearsal)."""
    for p in (out / f"{stem}.json", out / f"{stem}_smoke.json"):
        if p.exists():
            return json.loads(p.read_text())
    return None


def digest_tests(raw: Path) -> list[str]:
    p = raw / "gpu_tests.xml"
    if not p.exists():
        # cut before pytest wrote its report: the failures its -v log shows so far (what a fallback reads)
        log = raw / "gpu_tests.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        # xdist: "[gw0] [ 10%] FAILED tests/f.py::name"; one process: "tests/f.py::name FAILED [ 10%]"
        found = re.findall(r"(?:FAILED|ERROR) tests/(\w+)\.py::(\S+)|tests/(\w+)\.py::(\S+) (?:FAILED|ERROR)", text)
        fails = sorted({(a or c, b or d) for a, b, c, d in found})
        return ([f"GPU tests: no report (the stage did not get to write one); {len(fails)} failed in its log "
                 f"before it ended"] + [f"- FAILED {f}::{n}: (from the log)" for f, n in fails] + [""])
    cases = _cases(p)
    fails, again, skipped = [], [], 0
    passed_alone = rerun_passed(raw)
    bad_cases = [c for c in cases if _failed(c)]
    width = 200 if len(bad_cases) <= 10 else 80         # many failures: shorter messages, every name whole
    for c in cases:
        bad = c.find("failure") if c.find("failure") is not None else c.find("error")
        if bad is not None:
            msg = (bad.get("message") or "").splitlines()[0][:width] if bad.get("message") else ""
            name = "::".join([x for x in (c.get("classname") or "").split(".") if x != "tests"] + [c.get("name")])
            if (c.get("classname"), c.get("name")) in passed_alone:
                again.append(f"- PASSED ON RERUN {name} (alone in a fresh process, after failing under xdist: {msg})")
            else:
                fails.append(f"- FAILED {name}: {msg}")
        elif c.find("skipped") is not None:
            skipped += 1
    passed = len(cases) - len(bad_cases) - skipped
    slow = sorted(cases, key=lambda c: -float(c.get("time") or 0))[:5]
    lines = [f"GPU tests: {passed} passed, {len(bad_cases)} failed, {skipped} skipped "
             f"(of {len(cases)} selected with -m gpu)"]
    if (raw / "gpu_tests_rerun.log").exists():
        lines.append(f"rerun of the {len(bad_cases)} failed, alone in a fresh process: {len(again)} passed, "
                     f"{len(fails)} failed or not reached")
    lines += fails + again                          # every one: the experiment's fallbacks read the FAILED lines
    lines.append("slowest: " + ", ".join(f"{c.get('name')} {float(c.get('time') or 0):.1f}s" for c in slow))
    return lines + [""]


def digest_train(out: Path) -> list[str]:
    d = _load(out, "train_step")
    if d is None:
        return ["train step: no results", ""]
    m = d["meta"]
    lines = [f"train step ({m['shape']}, {m['device']}, median of {m['repeats']}); targets: fast path <= 1.3x floor "
             "time and <= 1.1x floor memory, >= 3x faster than reference", "",
             "| path | step ms | peak extra MiB | x floor time | x floor mem | x faster than ref | loss rel diff | grad cos "
             "| MFU |", "|---|---|---|---|---|---|---|---|---|"]
    for r in d["results"]:
        if "step_ms" not in r or "error" in r:
            why = f"out of memory ({r['oom'][:80]})" if "oom" in r else f"FAILED: {str(r.get('error'))[:120]}"
            lines.append(f"| {r['path']} | {why} |")
            if "step_ms" not in r:
                continue
        lines.append(f"| {r['path']} | {r['step_ms']:.0f} | {r['peak_extra_mib']:.0f} | "
                     f"{_f(r.get('time_vs_floor'), '{:.2f}')} | {_f(r.get('mem_vs_floor'), '{:.2f}')} | "
                     f"{_f(r.get('speedup_vs_reference'), '{:.2f}')} | {_f(r.get('loss_rel_diff'), '{:.1e}')} | "
                     f"{_f(r.get('grad_cosine'), '{:.5f}')} | "
                     f"{_f(r.get('mfu'), '{:.1%}')} |")
    fast = [r for r in d["results"] if r["path"].startswith("fast") and "step_ms" in r and "error" not in r]
    for r in fast:
        ok = [r.get("time_vs_floor", 9) <= 1.3, r.get("mem_vs_floor", 9) <= 1.1]
        if "speedup_vs_reference" in r:
            ok.append(r["speedup_vs_reference"] >= 3)
        lines.append(f"{r['path']}: targets met: {_mark(all(ok))}")
    return lines + [""]


def digest_attention(out: Path) -> list[str]:
    d = _load(out, "thought_attention")
    if d is None:
        return ["thought attention: no results", ""]
    rows = d["rows"]
    lines = ["thought attention (ms, median; best peer = min(flex, dense); floor = proxy, flash SDPA over the same "
             "useful FLOPs); targets: fwd+bwd <= 0.5x flex and <= 1.3x proxy, peak MiB <= flex; sampling <= 1/3 flex",
             "", "| case | shape | ours | flex | dense | proxy | ours/best peer | ours/proxy | MiB ours/flex | "
             "TFLOP/s ours | target |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    problems = []
    for case in ("fwdbwd", "sampling", "fwd", "bwd"):
        for shape in dict.fromkeys(r["shape"] for r in rows if r["case"] == case):
            by = {r["provider"]: r for r in rows if r["case"] == case and r["shape"] == shape}
            ms = {p: by[p]["median_ms"] for p in by if by[p].get("median_ms")}
            for p, r in by.items():
                if r["status"] != "ok":
                    problems.append(f"- {case} {shape} {p}: {r['status'][:150]}")
            ours, flex = ms.get("ours"), ms.get("flex")
            peers = [ms[p] for p in ("flex", "dense") if p in ms]
            mo, mf = (by.get("ours") or {}).get("peak_mib"), (by.get("flex") or {}).get("peak_mib")
            target = None
            if ours and flex:
                if case == "fwdbwd":
                    target = ours <= 0.5 * flex and ("proxy" not in ms or ours <= 1.3 * ms["proxy"]) and \
                        (mo is None or mf is None or mo <= mf)
                elif case == "sampling":
                    target = ours <= flex / 3
            lines.append(f"| {case} | {shape} | {_f(ours, '{:.4g}')} | {_f(flex, '{:.4g}')} | "
                         f"{_f(ms.get('dense'), '{:.4g}')} | {_f(ms.get('proxy'), '{:.4g}')} | "
                         f"{_f(ours / min(peers) if ours and peers else None, '{:.2f}')} | "
                         f"{_f(ours / ms['proxy'] if ours and 'proxy' in ms else None, '{:.2f}')} | "
                         f"{_f(mo, '{:.0f}')}/{_f(mf, '{:.0f}')} | "
                         f"{_f((by.get('ours') or {}).get('tflops'))} | {_mark(target)} |")
    return lines + problems + [""]


def digest_lm_head(out: Path) -> list[str]:
    d = _load(out, "lm_head")
    if d is None:
        return ["LM head: no results", ""]
    rows = d["rows"]
    lines = ["LM head (ms / peak extra MiB; fwdbwd = mixed log-prob fwd+bwd, peers fed the mixed state; sampling vs "
             "full logits + Gumbel-argmax); target: faster than Liger and CCE, memory no higher", "",
             "| case | N, d, V | ours | liger | cce | naive | chunked | ours/best peer | target |",
             "|---|---|---|---|---|---|---|---|---|"]
    problems = []
    for case in ("fwdbwd", "sampling", "fwd"):
        for shp in dict.fromkeys((r["N"], r["d"], r["V"]) for r in rows if r["case"] == case):
            by = {r["provider"]: r for r in rows if r["case"] == case and (r["N"], r["d"], r["V"]) == shp}
            for p, r in by.items():
                if r["status"] != "ok":
                    problems.append(f"- {case} {shp} {p}: {r['status'][:150]}")
            cell = lambda p: (f"{_f(by[p]['median_ms'], '{:.4g}')} / {_f(by[p]['peak_mib'], '{:.0f}')}"  # noqa: E731
                              if p in by and by[p].get("median_ms") else "-")
            peer_names = ("liger", "cce") if case != "sampling" else ("naive", "chunked")
            peers = [by[p] for p in peer_names if p in by and by[p].get("median_ms")]
            ours = by.get("ours") if by.get("ours", {}).get("median_ms") else None
            best = min(peers, key=lambda r: r["median_ms"]) if peers else None
            target = None
            if ours and case == "fwdbwd" and len(peers) == 2:
                target = all(ours["median_ms"] < p["median_ms"] and
                             (ours["peak_mib"] or 0) <= (p["peak_mib"] or 0) for p in peers)
            lines.append(f"| {case} | {', '.join(map(str, shp))} | {cell('ours')} | {cell('liger')} | {cell('cce')} | "
                         f"{cell('naive')} | {cell('chunked')} | "
                         f"{_f(ours['median_ms'] / best['median_ms'] if ours and best else None, '{:.2f}')} | "
                         f"{_mark(target)} |")
    return lines + problems + [""]


def write_digest(out: Path, raw: Path, sts: list[Stage], info: dict, problems: list[str], dry: bool,
                 total_s: float) -> str:
    head = [f"# GPU suite digest{' (DRY RUN: CPU rehearsal at smoke shapes, not a measurement)' if dry else ''}", "",
            f"{info.get('gpu')} | {info.get('date')} | torch {info.get('torch')} | triton {info.get('triton')} | "
            f"transformers {info.get('transformers')} | CUDA {info.get('cuda')} | liger {info.get('liger_kernel')} | "
            f"cce {info.get('cut_cross_entropy')} | {total_s:.0f} s in all", "",
            "| stage | status | rc | s | cap s |", "|---|---|---|---|---|"]
    head += [f"| {s.name} | {s.status} | {_f(s.rc, '{}')} | {s.secs:.0f} | {s.cap_s} |" for s in sts]
    head += [f"- {s.name}: {n}" for s in sts for n in s.notes]
    head += [""] + [f"- problem: {p}" for p in problems] + ([""] if problems else [])
    # the status and every test failure stay whole (learn_experiment.sh's fallbacks read the FAILED lines);
    # beyond 8 KB the tables' tails are cut
    keep = "\n".join(line for part in (head, digest_tests(raw)) for line in part)
    rest = "\n".join(line for part in (digest_train(out), digest_attention(out), digest_lm_head(out)) for line in part)
    room = max(0, DIGEST_MAX_BYTES - 80 - len(keep.encode()) - 1)
    if len(rest.encode()) > room:
        rest = rest.encode()[:room].decode(errors="ignore") + \
            "\n... (digest cut at 8 KB; the full tables are in the .md files)\n"
    text = keep + "\n" + rest
    (out / "digest.md").write_text(text)
    return text


def pack(out: Path, raw: Path) -> None:
    """Everything into suite.tar.gz; OUT keeps the digest, the tables and the archive (<= 8 files).
    The logs name this machine's paths; they are written as $OUT, ".", python3 and <site-packages>, so
    that a committed log reads the same on any clone."""
    for log in raw.glob("*.log"):
        text = log.read_text(errors="replace")
        for path, name in ((str(out), "$OUT"), (str(REPO), "."), (sys.executable, "python3"),
                           (sysconfig.get_paths()["purelib"], "<site-packages>")):
            text = text.replace(path, name)
        log.write_text(text)
    with tarfile.open(out / "suite.tar.gz", "w:gz") as tar:
        for p in sorted(out.iterdir()):
            if p.name != "suite.tar.gz":
                tar.add(p, arcname=f"suite/{p.name}")
    shutil.rmtree(raw)
    for p in out.iterdir():    # anything else lives only in the archive
        keep = p.name in ("suite.tar.gz", "digest.md") or p.name in {f"{t}{smoke}.{e}" for t in TABLES
                                                                       for smoke in ("", "_smoke") for e in ("md", "json")}
        if not keep:
            p.unlink() if p.is_file() else shutil.rmtree(p)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--out", required=True, help="output folder ($OUT on the GPU machine); emptied first")
    ap.add_argument("--dry-run", action="store_true", help="CPU rehearsal: the same stages at smoke shapes")
    ap.add_argument("--stages", default="", help="comma-separated subset of the stages (default: all)")
    ap.add_argument("--caps", default="", help="override time caps, e.g. gpu_tests=120,lm_head=80,per_test=60")
    ap.add_argument("--workers", type=int, default=None, help="pytest-xdist workers (default 8 on GPU, 2 dry)")
    ap.add_argument("--no-warm", action="store_true", help="do not compile the attention benchmark beside the tests")
    ap.add_argument("--tests", default=",".join(GPU_TEST_FILES), help="test files of the gpu_tests stage")
    ap.add_argument("--train-paths", default="floor,fast-gpu,fast-gpu-graphs,reference",
                    help="bench_train_step.py --paths of the train_step stage")
    ap.add_argument("--budget-s", type=float, default=420,
                    help="the whole call's time: a stage's cap is cut to what is left (minus 15 s for the "
                         "digest and the archive), a stage with under 20 s left is skipped and reported")
    ap.add_argument("--inject-failure", default=None, help=argparse.SUPPRESS)   # tests: a stage that fails
    args = ap.parse_args(argv)
    t_start = time.time()
    dry = args.dry_run
    os.environ["PYTHONUNBUFFERED"] = "1"
    import torch
    if not dry and not torch.cuda.is_available():
        print("error: gpu_suite needs a CUDA GPU (torch.cuda.is_available() is False); "
              "use --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    caps = {k: int(v) for k, v in (kv.split("=") for kv in args.caps.split(",") if kv)}
    out = Path(args.out).resolve()
    if out.exists():
        for p in out.iterdir():
            p.unlink() if p.is_file() else shutil.rmtree(p)
    raw = out / "raw"
    raw.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO)
    problems = []
    if not dry:
        problems += install_wheels(raw, env)
    info = environment(raw, env)
    if not dry:
        missing = [m for m in PEER_WHEEL_MODULES if str(info.get(m, "missing")).startswith("missing")]
        if missing:
            problems.append(f"peers not importable: {', '.join(missing)} (their LM-head rows will say skipped)")
    if not _importable("xdist"):
        problems.append("pytest-xdist missing: GPU tests run in one process")
    print(f"gpu_suite: {info.get('gpu')} torch {info.get('torch')} triton {info.get('triton')}"
          f"{' DRY RUN' if dry else ''}", flush=True)
    workers = args.workers if args.workers is not None else (2 if dry else 8)
    sts = stages(out, raw, dry, workers if _importable("xdist") else 0, caps,
                 tuple(f for f in args.tests.split(",") if f), args.train_paths)
    wanted = [s for s in args.stages.split(",") if s]
    unknown = [s for s in wanted if s not in {st.name for st in sts}]
    if unknown:
        ap.error(f"--stages: unknown {unknown}; known: {[st.name for st in sts]}")
    if wanted:    # in the order given
        by_name = {st.name: st for st in sts}
        sts = [by_name[n] for n in wanted]
    warm = None
    for i, st in enumerate(sts):
        if st.name == "gpu_tests" and not args.no_warm and any(s.name == "thought_attention" for s in sts):
            warm = start(warm_cmd(dry), raw / "attention_compile.log", env)
        run_stage(st, raw, env, args.inject_failure, args.budget_s - 15 - (time.time() - t_start))
        if warm is not None:   # never beside a timed stage (nor beside the rerun)
            try:
                warm.wait(timeout=max(5, caps.get("warm_extra", 30)))
            except subprocess.TimeoutExpired:
                _kill_group(warm)
                problems.append("the background attention compile was stopped unfinished (see attention_compile.log)")
            if warm.returncode not in (0, None, -15, -9):
                problems.append(f"the background attention compile exited {warm.returncode}")
            warm = None
        if st.name == "gpu_tests" and st.rc == 1:    # 1: tests failed (not cut, not a usage error)
            # from what the budget leaves beyond the later stages' caps: the rerun never cuts a benchmark
            spare = args.budget_s - 15 - (time.time() - t_start) - sum(later.cap_s for later in sts[i + 1:])
            rerun_failures(st, raw, env, min(caps.get("rerun", 60), spare))
    text = write_digest(out, raw, sts, info, problems, dry, time.time() - t_start)
    pack(out, raw)
    n_files = len(list(out.iterdir()))
    if n_files > MAX_FILES:
        text += f"\nERROR: {n_files} files in OUT, more than the {MAX_FILES} that come back\n"
    print("\n" + text, flush=True)
    failed = sum(st.status != "ok" for st in sts)
    return failed if n_files <= MAX_FILES else failed + 1


if __name__ == "__main__":
    sys.exit(main())
