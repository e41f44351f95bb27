"""Every script in tests/sanitize/*.py runs clean under ``triton-sanitizer`` (no out-of-bounds access).

How triton-sanitizer (PyPI triton-viz 3.0) behaves, as seen here with triton 3.6.0 / torch 2.13 CPU:

* ``triton-sanitizer SCRIPT [ARGS]`` imports triton, replaces ``triton.jit`` / ``triton.autotune``
  with wrappers, then runs SCRIPT with ``runpy.run_path(..., run_name="__main__")``. Only kernels
  decorated AFTER that (i.e. imported by the script) are checked, which is every kernel in
  ``kernels/``. Every launch runs in Triton's CPU interpreter with each load/store address checked
  symbolically (z3) against the valid byte range of the tensor its pointer came from; the first
  violation prints an "ILLEGAL MEMORY ACCESS DETECTED" report (file, line, tensor, symbolic
  expression) and exits with status 1.
* It does not need TRITON_INTERPRET (it builds the interpreted function itself). The runner removes
  it from the environment: with it set, the LM-head launchers pick their small interpreter tiles
  instead of the GPU tiles, and triton-viz 3.0 mishandles tl.randint. Tensors are CPU tensors (the interpreter copies
  CUDA tensors to the host, so scripts also run on a GPU machine, slowly).
* It does not compute values: outputs are garbage under it, so a sanitize script must launch
  kernels at shapes that exercise the masks (sizes that are not multiples of the blocks) and must
  NOT assert on values. Any uncaught exception also gives a non-zero exit status.
* Limits seen with triton-viz 3.0: ``tl.dot(a, tl.trans(b))`` (also ``b.T``, ``tl.permute``) fails
  inside the sanitizer's symbolic mode ("input and other must have equal ranks >= 2" / "len() of
  unsized object" / "axes don't match array") although it is valid Triton; an enclosing loop's
  iterator is unbounded while an inner loop's accesses are checked (false positives); non-contiguous
  tensors are refused ("only supports contiguously stored tensors"). tests/sanitize/_viz_patches.py
  (the kernel engineers') backports upstream fixes; sanitize scripts import it first. Files whose
  name starts with "_" are helpers, not scripts, and are not run.
* runpy puts the script's own directory first on sys.path, not the repository root, so the runner
  sets PYTHONPATH to the repository root for ``import kernels``.
* Environment knobs (triton_viz/core/config.py): ENABLE_SANITIZER (default 1),
  SANITIZER_ENABLE_FAKE_TENSOR (1 = no real memory reads), TRITON_VIZ_VERBOSE,
  TRITON_VIZ_NUM_SMS (emulated concurrent programs, default 1). The runner sets none of them.

The self-checks run every tests/sanitize_selfcheck/*.py, each a kernel with a real out-of-bounds
access (oob_copy.py: a copy with an off-by-one mask; the others check that the patches above do not
hide real bugs), and require a non-zero exit with the sanitizer's "ILLEGAL MEMORY ACCESS" report, so
a green run above means the sanitizer was active and able to see the bug classes that matter here.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "tests" / "sanitize").glob("*.py"))
SCRIPTS = [s for s in SCRIPTS if not s.name.startswith("_")]
SELFCHECKS = [s for s in sorted((REPO / "tests" / "sanitize_selfcheck").glob("*.py")) if not s.name.startswith("_")]
TIMEOUT_S = 600


def _sanitizer() -> str:
    """The triton-sanitizer console script of this Python (not whatever is first on PATH)."""
    here = Path(sys.executable).parent / "triton-sanitizer"
    exe = str(here) if here.exists() else shutil.which("triton-sanitizer")
    if exe is None:
        pytest.fail("triton-sanitizer not found: pip install triton-viz==3.0 (it is in the dev extra)")
    return exe


def _run(script: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([_sanitizer(), str(script.relative_to(REPO))], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def _log(res: subprocess.CompletedProcess, limit: int = 20000) -> str:
    out = f"--- stdout ---\n{res.stdout}\n--- stderr ---\n{res.stderr}"
    return out if len(out) <= limit else out[:2000] + "\n[...]\n" + out[-(limit - 2000):]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_sanitize_script(script):
    res = _run(script)
    assert res.returncode == 0, f"triton-sanitizer {script.name} exited {res.returncode}:\n{_log(res)}"
    assert "ILLEGAL MEMORY ACCESS" not in res.stdout + res.stderr, _log(res)


def test_selfcheck_oob_copy_exists():
    assert any(s.name == "oob_copy.py" for s in SELFCHECKS), SELFCHECKS


@pytest.mark.parametrize("script", SELFCHECKS, ids=[s.stem for s in SELFCHECKS])
def test_sanitizer_catches_bug(script):
    res = _run(script)
    log = res.stdout + res.stderr
    assert res.returncode != 0, f"{script.name} has an out-of-bounds access but passed the sanitizer:\n{_log(res)}"
    assert "ILLEGAL MEMORY ACCESS" in log, f"{script.name} failed for another reason than the OOB access:\n{_log(res)}"
