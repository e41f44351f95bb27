"""Compile every Triton kernel config for an H100 that is not here and check its resources.

No GPU is needed: ``triton.compile`` targets sm_90 directly, and the cuobjdump / nvdisasm shipped
in triton's wheel read the cubin. For each compile case a kernel module exports, this reports:

    registers per thread, dynamic shared memory (what the launch asks for; Triton itself raises
    OutOfResources at launch above the device's 227 KB opt-in), static shared memory, LOCAL and
    STACK bytes (register spills), and the number of tensor-core instructions (HGMMA = sm_90
    warpgroup MMA, HMMA = sm_80-style mma.sync).

A case FAILS on: a compile error, LOCAL or STACK > 0 (spills), dynamic shared memory > 232448 bytes
(227 KB), or ``has_dot`` with no HGMMA/HMMA in the SASS. Exit status 1 when any case fails, 2 on a
usage error (e.g. TRITON_INTERPRET set: the interpreter patches triton.language, so compiled code
would not be the real thing).

The compile-case contract (each kernel module defines ``h100_compile_cases() -> list[dict]``):

    {"kernel": str, "config": str, "fn": <raw @triton.jit function>,
     "signature": {arg: "*bf16" | "*fp32" | "*i64" | "i32" | "i64" | "fp32" ...}   # NON-constexpr args
     "constexprs": {arg: value},          # every tl.constexpr arg (defaults are filled in)
     "num_warps": int, "num_stages": int, "has_dot": bool,
     # optional:
     "divisible_by_16": [arg, ...]}       # default: every pointer and every int arg (see below)

What ``triton.compile`` in triton 3.6.0 wants (verified here; compare triton/runtime/jit.py):
  * ``ASTSource(fn, signature, constexprs, attrs)``; signature keys MUST be argument names (str).
    The JIT passes every argument in order, constexprs with the type string "constexpr"; a
    signature that simply omits the constexprs compiles to the same TTIR in 3.6, but this script
    builds the full JIT form.
  * ``constexprs`` may be keyed by name or by index tuple ``(i,)`` (ASTSource maps names to
    ``(fn.arg_names.index(name),)``). Any argument can be made constexpr this way: the JIT does so
    for an int argument equal to 1 (a unit stride), so put unit strides in "constexprs" to check
    the kernel the GPU really runs.
  * ``attrs`` must be keyed by index tuple ``(i,)`` with a list of ``[name, value]`` pairs, e.g.
    ``{(0,): [["tt.divisibility", 16]]}``; attrs keyed by name are silently ignored. The JIT marks
    pointers 16-byte aligned and ints that are multiples of 16 this way, and it matters a lot: a
    bf16 128x128x64 matmul tile compiles to 110 registers and a 3-stage cp.async pipeline with the
    attributes, but to 255 registers and no pipelining (1 stage of shared memory) without them.
    Every shape in DESIGN.md section 8 makes all ints multiples of 16, hence the default; a case can
    narrow it with "divisible_by_16".
  * ``target=GPUTarget("cuda", 90, 32)``, ``options={"num_warps": .., "num_stages": ..}``;
    ``kernel.asm["cubin"]`` is the binary, ``kernel.metadata.shared`` the dynamic shared memory.

Usage:
    python benchmarks/h100_static_check.py [--only thought_attention] [--out benchmarks/results]
        [--module path/or.dotted.name] [--jobs N] [--fresh-cache]
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODULES = ("kernels.thought_attention", "kernels.lm_head")
SMEM_LIMIT = 232448          # H100 cudaDevAttrMaxSharedMemoryPerBlockOptin: 227 KB
TARGET = ("cuda", 90, 32)    # sm_90, warp size 32
REQUIRED_KEYS = ("kernel", "config", "fn", "signature", "constexprs", "num_warps", "num_stages", "has_dot")

_TRUTHY = ("1", "true", "on", "yes")


def interpreter_is_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUTHY


# ----------------------------------------------------------------------------------------------
# loading the cases
# ----------------------------------------------------------------------------------------------
def import_module(spec: str):
    """Import a dotted module name, or a .py file by path (used by the self-test's toy kernels)."""
    if spec.endswith(".py"):
        path = Path(spec).resolve()
        name = "_h100_static_" + re.sub(r"\W", "_", path.stem)
        mspec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mspec)
        sys.modules[name] = module
        mspec.loader.exec_module(module)
        return module
    return importlib.import_module(spec)


def load_cases(spec: str):
    """(cases, None) or (None, reason the module is skipped). Raises nothing for a missing module."""
    try:
        module = import_module(spec)
    except ModuleNotFoundError as e:
        if e.name and (spec == e.name or spec.startswith(e.name + ".")):
            return None, f"module {spec} does not exist (yet)"
        return None, f"module {spec} failed to import: {e!r}"   # a real import error: reported, fails
    fn = getattr(module, "h100_compile_cases", None)
    if fn is None:
        return None, f"module {spec} has no h100_compile_cases()"
    return list(fn()), None


def full_signature(case):
    """The JIT form: every argument in order, constexprs typed "constexpr"; plus index-keyed attrs."""
    fn = case["fn"]
    names = list(fn.arg_names)
    constexprs = dict(case["constexprs"])
    for p in fn.params:                       # fill in defaults of constexpr args the case left out
        if p.is_constexpr and p.name not in constexprs and p.has_default:
            constexprs[p.name] = p.default
    unknown = (set(case["signature"]) | set(constexprs)) - set(names)
    if unknown:
        raise ValueError(f"arguments {sorted(unknown)} are not parameters of {fn.__name__}{tuple(names)}")
    sig = {}
    for p in fn.params:
        if p.name in constexprs:
            sig[p.name] = "constexpr"
        elif p.is_constexpr:
            raise ValueError(f"constexpr argument {p.name!r} of {fn.__name__} has no value in 'constexprs'")
        elif p.name in case["signature"]:
            sig[p.name] = case["signature"][p.name]
        else:
            raise ValueError(f"argument {p.name!r} of {fn.__name__} is missing from 'signature'")
    div = case.get("divisible_by_16")
    if div is None:   # what the JIT sees at the DESIGN.md section 8 shapes: aligned pointers, ints % 16 == 0
        div = [n for n, t in sig.items() if t.startswith("*") or t in ("i32", "i64", "u32", "u64")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div if sig.get(n, "constexpr") != "constexpr"}
    return sig, constexprs, attrs


# ----------------------------------------------------------------------------------------------
# compiling and reading the cubin
# ----------------------------------------------------------------------------------------------
def _nv_tool(name: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def parse_resource_usage(text: str, fn_name: str) -> dict:
    """cuobjdump --dump-resource-usage: 'Function NAME:' then 'REG:.. STACK:.. SHARED:.. LOCAL:..'."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("Function ") and line.strip().rstrip(":").split()[-1] == fn_name:
            usage = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", lines[i + 1]))
            return {k: int(v) for k, v in usage.items()}
    raise RuntimeError(f"no resource usage for {fn_name} in cuobjdump output:\n{text}")


def count_tensor_core_ops(sass: str) -> dict:
    ops = re.findall(r"\b(HGMMA|HMMA|IMMA|QGMMA|IGMMA)\.", sass)
    return {op: ops.count(op) for op in sorted(set(ops))}


def _sass_cache_dir() -> Path:
    """Next to Triton's own cache (so --fresh-cache, which empties that, empties this too)."""
    base = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return Path(base) / "h100_static_sass"


def tensor_core_ops(cubin: Path) -> dict:
    """Tensor-core instruction counts of a cubin's SASS. nvdisasm costs ~0.3 s a call, most of a warm
    run, so the counts are cached by the cubin's sha256 (same bytes, same SASS)."""
    key = hashlib.sha256(cubin.read_bytes()).hexdigest()
    cache = _sass_cache_dir() / f"{key}.json"
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    sass = subprocess.run([_nv_tool("nvdisasm"), str(cubin)], capture_output=True, text=True, check=True).stdout
    tc = count_tensor_core_ops(sass)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(tc))
        tmp.replace(cache)
    except OSError:
        pass
    return tc


def compile_case(case: dict, workdir: str) -> dict:
    """Compile one case for sm_90 and return its table row (status 'ok' or 'FAIL: ...')."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"kernel": str(case.get("kernel")), "config": str(case.get("config")),
           "num_warps": case.get("num_warps"), "num_stages": case.get("num_stages"),
           "has_dot": case.get("has_dot"), "registers": None, "smem_bytes": None, "static_smem_bytes": None,
           "local_bytes": None, "stack_bytes": None, "tc_ops": None, "tc_breakdown": None,
           "compile_s": None, "status": None, "errors": [], "notes": []}
    missing = [k for k in REQUIRED_KEYS if k not in case]
    if missing:
        row["errors"].append(f"case lacks keys {missing}")
        row["status"] = "FAIL: bad case"
        return row
    t0 = time.perf_counter()
    try:
        sig, constexprs, attrs = full_signature(case)
        kernel = triton.compile(ASTSource(case["fn"], sig, constexprs, attrs), target=GPUTarget(*TARGET),
                                options={"num_warps": int(case["num_warps"]), "num_stages": int(case["num_stages"])})
    except Exception as e:  # noqa: BLE001 - any compile error is a failed check, reported in the table
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        msg = "".join(traceback.format_exception_only(type(e), e)).strip()
        row["errors"].append("compile error: " + msg[-2000:])
        row["status"] = "FAIL: compile error"
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    strides = [n for n in case["fn"].arg_names if n.startswith("stride")]
    row["unit_stride_hint"] = bool(strides) and not any(n in constexprs for n in strides)
    name = kernel.metadata.name
    safe = re.sub(r"[^\w.-]", "_", f"{row['kernel']}__{row['config']}")
    cubin = Path(workdir) / f"{safe}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    usage = parse_resource_usage(
        subprocess.run([_nv_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                       capture_output=True, text=True, check=True).stdout, name)
    tc = tensor_core_ops(cubin)
    row.update(registers=usage.get("REG"), smem_bytes=int(kernel.metadata.shared),
               static_smem_bytes=usage.get("SHARED"), local_bytes=usage.get("LOCAL"),
               stack_bytes=usage.get("STACK"), tc_ops=sum(tc.values()), tc_breakdown=tc)
    codes = []
    # a case may allow a few bytes of stack where a GPU measurement showed the config faster anyway
    allowed = int(case.get("max_stack_bytes") or 0)
    if row["local_bytes"] or (row["stack_bytes"] or 0) > allowed:
        codes.append("spills")
        row["errors"].append(f"spills: LOCAL={row['local_bytes']} STACK={row['stack_bytes']} bytes"
                             + (f" (allowed stack: {allowed})" if allowed else ""))
    elif row["stack_bytes"]:
        row["notes"].append(f"STACK={row['stack_bytes']} bytes, within this case's allowance of {allowed} "
                            "(measured faster on a GPU than the spill-free configs; see the launcher's comment)")
    if row["smem_bytes"] > SMEM_LIMIT:
        codes.append("smem > 227 KB")
        row["errors"].append(f"shared memory {row['smem_bytes']} B > {SMEM_LIMIT} B (227 KB)")
    if case["has_dot"] and row["tc_ops"] == 0:
        codes.append("no tensor-core op")
        row["errors"].append("has_dot but no HGMMA/HMMA instruction in the SASS")
    row["status"] = "FAIL: " + ", ".join(codes) if codes else "ok"
    return row


_WORKER_CASES: dict = {}


def _worker(spec: str, index: int, workdir: str) -> dict:
    """Run in a pool process: re-import the module (jit functions do not pickle) and compile one case."""
    if spec not in _WORKER_CASES:       # h100_compile_cases() once per module per process
        _WORKER_CASES[spec] = load_cases(spec)
    cases, reason = _WORKER_CASES[spec]
    if cases is None:
        raise RuntimeError(reason)
    row = compile_case(cases[index], workdir)
    row["module"] = spec
    return row


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def _fmt(v):
    return "-" if v is None else str(v)


def write_report(rows, skipped, meta, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "h100_static_check.json").write_text(json.dumps({"meta": meta, "skipped": skipped, "rows": rows}, indent=2))
    lines = [
        "# H100 static check (sm_90 compile, no GPU)",
        "",
        f"date {meta['date']} | triton {meta['triton']} | torch {meta['torch']} | python {meta['python']} | "
        f"target {meta['target']} | host {meta['host']} | wall {meta['wall_s']} s ({meta['jobs']} job(s), "
        f"{'fresh' if meta['fresh_cache'] else 'warm'} triton cache)",
        "",
        "Registers per thread; smem = dynamic shared memory bytes the launch requests (limit 232448 = 227 KB); "
        "static smem from cuobjdump; local/stack = spill bytes (must be 0, but for a stack allowance a case states "
        "where a GPU measurement chose the config); TC = HGMMA + HMMA instructions "
        "in the SASS (must be > 0 when the kernel has a tl.dot).",
        "",
        "| module | kernel | config | warps | stages | registers | smem B | static smem B | local/stack B | TC ops "
        "| compile s | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tc = _fmt(r["tc_ops"])
        if r["tc_breakdown"]:
            tc += " (" + ", ".join(f"{k} {v}" for k, v in r["tc_breakdown"].items()) + ")"
        lines.append(f"| {r['module']} | {r['kernel']} | {r['config']} | {_fmt(r['num_warps'])} | "
                     f"{_fmt(r['num_stages'])} | {_fmt(r['registers'])} | {_fmt(r['smem_bytes'])} | "
                     f"{_fmt(r['static_smem_bytes'])} | {_fmt(r['local_bytes'])}/{_fmt(r['stack_bytes'])} | {tc} | "
                     f"{_fmt(r['compile_s'])} | {r['status']} |")
    if skipped:
        lines += ["", "Skipped modules:", ""] + [f"- {s['module']}: {s['reason']}" for s in skipped]
    hints = [r for r in rows if r.get("unit_stride_hint")]
    if hints:
        lines += ["", f"Hint: {len(hints)} case(s) pass every stride_* argument as a runtime int "
                  f"({', '.join(sorted({r['kernel'] for r in hints}))}). If one of them is 1 at run time (the unit "
                  "stride of a contiguous dim), the JIT compiles it as a constexpr, which lets loads vectorise; "
                  "put it in 'constexprs' with value 1 to check the kernel the GPU runs (seen here: that changed "
                  "a thought-attention forward from 255 registers + spills to 181 and none)."]
    notes = [(r, n) for r in rows for n in r.get("notes", [])]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {r['kernel']} / {r['config']}: {n}" for r, n in notes]
    errors = [(r, e) for r in rows for e in r["errors"]]
    if errors:
        lines += ["", "Failures:", ""] + [f"- {r['kernel']} / {r['config']}: {e}" for r, e in errors]
    (out / "h100_static_check.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="check one module only: thought_attention, lm_head (or a dotted name)")
    ap.add_argument("--module", action="append", default=[],
                    help="check this module (dotted name or .py path) instead of the defaults; repeatable")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="output directory")
    ap.add_argument("--jobs", type=int, default=1, help="compile cases in N processes (CPU-heavy)")
    ap.add_argument("--fresh-cache", action="store_true",
                    help="compile in an empty TRITON_CACHE_DIR so compile_s is the cold compile time")
    args = ap.parse_args(argv)

    if interpreter_is_on():
        print("error: TRITON_INTERPRET is set in the environment. The interpreter patches triton.language, so "
              "nothing compiled in this process would be the real sm_90 code. Run with it unset, e.g. "
              "`env -u TRITON_INTERPRET python benchmarks/h100_static_check.py`.", file=sys.stderr)
        return 2
    if args.fresh_cache:
        fresh = tempfile.mkdtemp(prefix="h100_static_cache_")
        os.environ["TRITON_CACHE_DIR"] = fresh
        import atexit
        import shutil
        atexit.register(shutil.rmtree, fresh, True)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))

    import torch
    import triton

    modules = list(args.module) or list(DEFAULT_MODULES)
    if args.only:
        want = args.only if "." in args.only or args.only.endswith(".py") else f"kernels.{args.only}"
        if want not in modules:
            ap.error(f"--only {args.only}: not one of {modules}")
        modules = [want]

    t_start = time.perf_counter()
    jobs, skipped, rows = [], [], []
    for spec in modules:
        try:
            cases, reason = load_cases(spec)
        except Exception as e:  # noqa: BLE001 - h100_compile_cases() itself raised
            cases, reason = None, f"h100_compile_cases() of {spec} raised {e!r}"
            rows.append({"module": spec, "kernel": "h100_compile_cases", "config": "-", "num_warps": None,
                         "num_stages": None, "has_dot": None, "registers": None, "smem_bytes": None,
                         "static_smem_bytes": None, "local_bytes": None, "stack_bytes": None, "tc_ops": None,
                         "tc_breakdown": None, "compile_s": None, "status": "FAIL: cases raised",
                         "errors": [reason]})
            continue
        if cases is None:
            print(f"skipping {spec}: {reason}")
            skipped.append({"module": spec, "reason": reason})
            if "failed to import" in reason:   # a broken module is a failure, not a skip
                rows.append({"module": spec, "kernel": "import", "config": "-", "num_warps": None,
                             "num_stages": None, "has_dot": None, "registers": None, "smem_bytes": None,
                             "static_smem_bytes": None, "local_bytes": None, "stack_bytes": None,
                             "tc_ops": None, "tc_breakdown": None, "compile_s": None,
                             "status": "FAIL: import error", "errors": [reason]})
            continue
        print(f"{spec}: {len(cases)} case(s)")
        jobs += [(spec, i) for i in range(len(cases))]

    with tempfile.TemporaryDirectory(prefix="h100_static_") as workdir:
        if args.jobs > 1 and len(jobs) > 1:
            from concurrent.futures import ProcessPoolExecutor
            import multiprocessing as mp
            with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(_worker, spec, i, workdir) for spec, i in jobs]
                rows += [f.result() for f in futures]
        else:
            cache = {}
            for spec, i in jobs:
                if spec not in cache:
                    cache[spec] = load_cases(spec)[0]
                row = compile_case(cache[spec][i], workdir)
                row["module"] = spec
                rows.append(row)
                print(f"  {row['kernel']:<28} {row['config']:<40} regs={_fmt(row['registers']):>4} "
                      f"smem={_fmt(row['smem_bytes']):>6} spill={_fmt(row['local_bytes'])}/{_fmt(row['stack_bytes'])} "
                      f"tc={_fmt(row['tc_ops'])} {row['compile_s']}s {row['status']}", flush=True)

    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "target": "cuda sm_90 (H100), warp 32", "host": platform.node(), "modules": modules,
            "jobs": args.jobs, "fresh_cache": args.fresh_cache, "smem_limit_bytes": SMEM_LIMIT,
            "wall_s": round(time.perf_counter() - t_start, 1), "n_cases": len(rows),
            "n_failed": sum(r["status"] != "ok" for r in rows)}
    table = write_report(rows, skipped, meta, Path(args.out))
    print(table)
    if meta["n_failed"]:
        print(f"\n{meta['n_failed']} of {len(rows)} case(s) FAILED", file=sys.stderr)
        return 1
    print(f"\nall {len(rows)} case(s) passed in {meta['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
