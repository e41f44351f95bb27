"""What the kernel benchmarks share: a provider that cannot run here (`Skip`), one timing and peak-memory
protocol for every provider (`measure`), the run's environment, and number formatting.

Importing this module imports neither triton nor kernels, so a script can set TRITON_INTERPRET first.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch


class Skip(Exception):
    """A provider that cannot run here; the message says why."""


def fmt(v, spec: str = "{:.3g}") -> str:
    """A table cell: "-" for a missing value."""
    return "-" if v is None else spec.format(v)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device: torch.device, leaves, smoke: bool):
    """(first_call_s, median_ms, peak_mib) of `fn`.

    The first call's time includes JIT / torch.compile. On CUDA: peak MiB = growth of
    max_memory_allocated during one call that starts with the `leaves`' .grad reset (so a backward
    allocates its gradients inside the window, as in a training step), then the median of
    triton.testing.do_bench, which resets those gradients between calls. On CPU, or with `smoke`, one
    timed call proves the path runs: it is not a measurement, and there is no memory figure."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    if smoke or device.type != "cuda":
        return first, 1e3 * first, None
    import triton
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(leaves) or None, return_mode="median")
    return first, ms, peak


def environment(device: torch.device, smoke: bool, **ours) -> dict:
    """The run's machine and versions, plus `ours`: name -> the function measured as "ours"."""
    import triton
    return {
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else
        f"none (CPU: {platform.processor() or platform.machine()})",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "cuda": torch.version.cuda, "host": platform.node(), "smoke": smoke,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        **{f"ours_{name}": f"{f.__module__}.{f.__name__}" for name, f in ours.items()},
    }


def begin_report(out_dir: Path, stem: str, env: dict, rows: list, title: str, ours: str, units: str) -> list[str]:
    """Write out_dir/stem.json (the environment and every row) and return the first lines of stem.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    smoke = " (SMOKE: CPU, tiny shapes, not a measurement)" if env["smoke"] else ""
    return [f"# {title}{smoke}", "",
            f"GPU {env['gpu']} | date {env['date']} | torch {env['torch']} | triton {env['triton']} | "
            f"CUDA {env['cuda']} | python {env['python']}", "", f"ours = {ours}", "", units, ""]
