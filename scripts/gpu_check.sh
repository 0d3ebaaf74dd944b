#!/usr/bin/env bash
# One prepared GPU check, under 8 minutes on a machine with CUDA:
#   1. installs this checkout (pip install -e, no dependency downloads needed when torch & co. are present);
#   2. runs every GPU-marked test (pytest -m gpu: torch and CuPy backends, the callback on accelerator="gpu",
#      fp32/fp64 policy, offline --device cuda);
#   3. runs benchmarks/bench_gpu.py (Llama-2-7B shapes generated on the device, 224 matrices: seconds per model,
#      torch vs CuPy, batched vs one by one);
#   4. writes summary.json and summary.md (plus every log) into $OUT (default ./gpu_check_out).
# Usage: scripts/gpu_check.sh [OUT_DIR]        Environment: PYTHON (default python3), OUT.
#   GPU_CHECK_SMOKE=1 runs the same steps on the CPU without installing (GPU tests skip, a tiny benchmark): a check
#   of the script itself on a machine without CUDA.
# Exit codes: 0 all passed, 1 a test or the benchmark failed, 2 no CUDA device here.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-${OUT:-$ROOT/gpu_check_out}}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
START=$(date +%s)

SMOKE="${GPU_CHECK_SMOKE:-0}"
BENCH_ARGS=()
[ "$SMOKE" = 1 ] && BENCH_ARGS=(--device cpu --layers 1 --hidden 128 --mlp 344)
if [ "$SMOKE" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        >"$OUT/cuda.log" 2>&1; then
    echo "gpu_check: no CUDA device visible to $PY (torch.cuda.is_available() is False); nothing to check" \
        | tee "$OUT/summary.md"
    exit 2
fi
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true

# 1. install (offline-friendly: the dependencies are expected to be there; try the extras, but never wait long)
INSTALL=0
if [ "$SMOKE" != 1 ]; then
    timeout 90 "$PY" -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
    INSTALL=$?
    for extra in pytest safetensors tqdm pandas lightning; do
        "$PY" -c "import $extra" 2>/dev/null || timeout 60 "$PY" -m pip install "$extra" >>"$OUT/install.log" 2>&1
    done
    "$PY" -c "import cupy" 2>/dev/null || timeout 60 "$PY" -m pip install "cupy-cuda12x>=13" >>"$OUT/install.log" 2>&1
fi

# 2. GPU-marked tests
timeout 180 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" tests \
    >"$OUT/gpu_tests.log" 2>&1
TESTS=$?

# 3. benchmark
timeout 180 "$PY" benchmarks/bench_gpu.py "${BENCH_ARGS[@]}" --json "$OUT/gpu_bench.json" >"$OUT/gpu_bench.log" 2>&1
BENCH=$?

# 4. summary
"$PY" - "$OUT" "$INSTALL" "$TESTS" "$BENCH" "$START" <<'EOF'
import json, sys, time, xml.etree.ElementTree as ET
from pathlib import Path

out, install, tests, bench, start = Path(sys.argv[1]), *map(int, sys.argv[2:6])
summary = {"install_rc": install, "tests_rc": tests, "bench_rc": bench, "wall_s": round(time.time() - start)}
try:
    suite = ET.parse(out / "gpu_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    summary["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    summary["failed"] = [c.get("classname", "") + "::" + c.get("name", "") for c in suite.iter("testcase")
                         if c.find("failure") is not None or c.find("error") is not None]
except Exception as err:  # noqa: BLE001 - report what is missing instead of failing the summary
    summary["tests"] = f"no junit report ({err})"
try:
    summary["bench"] = json.loads((out / "gpu_bench.json").read_text())
except Exception as err:  # noqa: BLE001
    summary["bench"] = f"no benchmark result ({err})"
(out / "summary.json").write_text(json.dumps(summary, indent=1))
lines = ["# GPU check", "", f"- wall time: {summary['wall_s']} s; install rc {install}, tests rc {tests}, "
         f"benchmark rc {bench}", f"- tests: {summary['tests']}"]
lines += [f"  - FAILED {name}" for name in summary.get("failed", [])]
if isinstance(summary["bench"], dict):
    b = summary["bench"]
    lines += ["", f"Benchmark on {b['device']} (torch {b['torch']}): {b['layers']} layers x 7 matrices, hidden "
              f"{b['hidden']}, MLP {b['mlp']}", "", "| backend | mode | seconds per model | float64 redone |",
              "|---|---|---:|---:|"]
    lines += [f"| {r['backend']} | {r['mode']} | {r['seconds']:.2f} | {r['float64']} |" for r in b["results"]]
else:
    lines.append(f"- benchmark: {summary['bench']}")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

[ "$TESTS" -eq 0 ] && [ "$BENCH" -eq 0 ] && exit 0
exit 1
