#!/usr/bin/env bash
# The learning experiment (benchmarks/learn_experiment.py) on a lent GPU, in two back-to-back device
# calls: the real SmolLM2-135M file (98 MB) is over what one call carries, so it travels in two parts
# (`bash scripts/gpu_carry.sh --model` splits it here). State that the second call needs stays on the
# warm machine under runs/learn/ (git-ignored, kept between calls): issue call 2 AT ONCE after call 1
# (the machine goes back 30 s after a call, and part1 with it).
#
#   call 1: bash benchmarks/learn_experiment.sh "$OUT" measure   carry [".whl", "quietstar/data", ".smollm2/part1"]
#           (ends by --call-s, default 300 s: the device call's timeout_s is 330)
#           1. the GPU tests (gpu_suite.py's gpu_tests stage; --suite-budget-s, default 130, 0 skips them:
#              the tests get 90 s, the rest is for a rerun, alone, of the ones that failed)
#           2. both arms' step times, set-up times and evaluation times on a random-init model of the same
#              shape (runs/learn/step_times.json: call 2 sizes its steps from it); a kernel family whose
#              GPU tests failed is replaced by its plain-PyTorch path in both calls (learn_experiment.py
#              --gpu-tests: FALLBACKS)
#           3. issue 17's FSDP2 measurement, bench_fsdp.py (--fsdp-budget-s, default 100, 0 skips it)
#   call 2: bash benchmarks/learn_experiment.sh "$OUT" run --budget-s 400    carry [".smollm2/part2"]
#           joins the parts (sha256-checked by quietstar.assets), sizes the steps to what is left of
#           --budget-s after the "before" evaluation, and runs the experiment; extra arguments go to
#           learn_experiment.py (--budget-s S or --train-budget-s S or --steps N)
#   recovery (the machine went back before call 2: part1, the wheels, quietstar/data and runs/learn/ are gone):
#           copy call 1's step_times.json to .smollm2/step_times.json here, then two calls back to back:
#           bash benchmarks/learn_experiment.sh "$OUT" stage   carry [".whl", "quietstar/data", ".smollm2/part1",
#                                                                   ".smollm2/step_times.json"]   (seconds)
#           and call 2 as above, carry [".smollm2/part2", ".smollm2/step_times.json"]
#   rehearsal: bash benchmarks/learn_experiment.sh DIR smoke     (CPU, the tiny model, ~1-2 min)
set -u
OUT="${1:?usage: benchmarks/learn_experiment.sh OUTDIR measure|run|stage|smoke [options]}"
MODE="${2:?usage: benchmarks/learn_experiment.sh OUTDIR measure|run|stage|smoke [options]}"
shift 2
cd "$(dirname "${BASH_SOURCE[0]}")/.."
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
STATE=runs/learn
case "$MODE" in measure|run|stage|smoke) ;;
  *) echo "learn_experiment.sh: MODE must be measure, run, stage or smoke, got '$MODE'"; exit 2 ;; esac
mkdir -p "$OUT" "$STATE"

if [ "$MODE" != smoke ]; then
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || { echo "learn_experiment.sh $MODE: no CUDA GPU here (use 'smoke' on a CPU)"; exit 2; }
  if compgen -G ".whl/*.whl" > /dev/null; then      # gguf (reads the model file), the suite's peers
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/qs_site .whl/*.whl > /dev/null 2>&1 \
      && export PYTHONPATH="/tmp/qs_site:$PYTHONPATH"
  fi
fi

case "$MODE" in
  measure)
    suite_budget=130 fsdp_budget=100 CALL1_S=300 rest=()
    while [ $# -gt 0 ]; do
      case "$1" in
        --suite-budget-s) suite_budget="$2"; shift 2 ;;
        --fsdp-budget-s) fsdp_budget="$2"; shift 2 ;;
        --call-s) CALL1_S="$2"; shift 2 ;;
        *) rest+=("$1"); shift ;;
      esac
    done
    rm -f "$STATE/gpu_tests.txt"
    if [ "$suite_budget" -gt 0 ]; then
      # 60 s per test (pytest-timeout): a hung test fails alone and the report (what call 2 reads) is written;
      # failed tests run again alone in a fresh process (gpu_suite.py rerun_failures) with what is left
      bash benchmarks/gpu_suite.sh "$OUT/suite" --stages gpu_tests --caps gpu_tests=$((suite_budget - 40)),per_test=60 \
        --budget-s "$suite_budget" > "$OUT/suite.log" 2>&1
      src=$?
      echo "GPU suite (tests): exit $src (digest: $OUT/suite/digest.md)"
      tail -c 3000 "$OUT/suite/digest.md" 2>/dev/null
      # one line for call 2's results.json: the tests' counts and the failed ones
      line="$(grep -E '^(GPU tests:|rerun of|- FAILED|- PASSED ON RERUN)' "$OUT/suite/digest.md" 2>/dev/null | paste -sd ';')"
      echo "${line:-GPU tests: no result (gpu_suite.py exit $src, see suite.log)}" > "$STATE/gpu_tests.txt"
      for f in "$OUT"/suite/*; do [ -e "$f" ] && mv "$f" "$OUT/suite_$(basename "$f")"; done; rmdir "$OUT/suite" 2>/dev/null
    fi
    fb=()
    [ -f "$STATE/gpu_tests.txt" ] && fb=(--gpu-tests "$STATE/gpu_tests.txt")
    set -o pipefail
    # the whole call ends by CALL1_S (the device call's timeout is 330 s). The step times come first (call 2
    # cannot size its run without them): measure may take all but 40 s; the FSDP part gets what is left
    # (skipped under 30 s; it writes its table after each configuration)
    m_left=$((CALL1_S - SECONDS - (fsdp_budget > 0 ? 40 : 0)))
    timeout -k 5 $((m_left > 60 ? m_left : 60)) \
      "$PY" benchmarks/learn_experiment.py --measure --out "$STATE" "${fb[@]}" "${rest[@]}" 2>&1 | tee "$OUT/measure.log" \
      | grep -v "it/s\]$\|s/it\]$"
    rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then   # not the device tool's own timeout codes: say what was cut
      echo "learn_experiment.py --measure: cut at its share of the call (step_times.json holds what it timed)"
      rc=3
    fi
    cp "$STATE/step_times.json" "$OUT/" 2>/dev/null
    left=$((CALL1_S - SECONDS - 30))
    [ "$fsdp_budget" -gt "$left" ] && fsdp_budget=$left
    if [ "$fsdp_budget" -le 0 ] && [ "$left" -gt 0 ]; then
      echo "bench_fsdp.py: skipped (--fsdp-budget-s 0)"
    elif [ "$fsdp_budget" -ge 30 ]; then
      # its own hard stop too: the budget plus the last table's time
      timeout $((fsdp_budget + 25)) "$PY" benchmarks/bench_fsdp.py --out "$OUT" --budget-s "$fsdp_budget" \
        > "$OUT/fsdp.log" 2>&1
      echo "bench_fsdp.py: exit $?"
      cat "$OUT/fsdp_ws1.md" 2>/dev/null
    else
      echo "bench_fsdp.py: skipped, ${left} s left of the call's ${CALL1_S} s"
    fi
    n=$(find "$OUT" -maxdepth 1 -type f | wc -l)
    [ "$n" -le 8 ] || echo "WARNING: $n files in $OUT, the device tool brings back 8"
    exit $rc ;;
  stage)
    # recovery when the machine went back between call 1 and call 2 (part1, the wheels and runs/learn/ with it):
    # this call only deposits what it carries; call 2 follows at once and takes the step times from
    # .smollm2/step_times.json (call 1's, copied there and carried in both calls)
    ls -l .smollm2 2>&1
    [ -f .smollm2/part1 ] || { echo "stage: carry .smollm2/part1"; exit 2; }
    [ -f .smollm2/step_times.json ] || echo "stage: no .smollm2/step_times.json: call 2 will need --steps N"
    echo "staged: now call 2 (run) AT ONCE"
    exit 0 ;;
  run)
    if [ ! -f "$STATE/step_times.json" ] && [ -f .smollm2/step_times.json ]; then
      cp .smollm2/step_times.json "$STATE/step_times.json"      # a fresh machine: call 1's, carried
    fi
    if [ ! -f "$STATE/smollm2.gguf" ]; then
      [ -f .smollm2/part1 ] && [ -f .smollm2/part2 ] \
        || { echo "run: .smollm2/part1 (call 1) and .smollm2/part2 (this call) must both be here"; exit 2; }
      cat .smollm2/part1 .smollm2/part2 > "$STATE/smollm2.gguf"
    fi
    export QUIETSTAR_SMOLLM2_GGUF="$PWD/$STATE/smollm2.gguf"
    times=()
    [ -f "$STATE/step_times.json" ] && times=(--step-times "$STATE/step_times.json")
    set -o pipefail
    [ -f "$STATE/gpu_tests.txt" ] && times+=(--gpu-tests "$STATE/gpu_tests.txt")
    # --mirror: results, table, curves, hard-token mask and training logs are copied into $OUT as they grow
    # (every 20 s and after each phase), so a call killed at its time limit still returns them
    "$PY" benchmarks/learn_experiment.py --out "$STATE/exp" --mirror "$OUT" "${times[@]}" "$@" 2>&1 \
      | tee "$OUT/run.log" | grep -v "it/s\]$\|s/it\]$"
    exit $? ;;
  smoke)
    "$PY" benchmarks/learn_experiment.py --smoke --out "$OUT" "$@" ;;
esac
