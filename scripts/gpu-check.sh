#!/usr/bin/env bash
# On a machine with a usable CUDA device: run the GPU tests (pytest -m gpu) and the
# benchmarks (pytest benchmarks/, on the "auto" backend, which is CuPy there), and
# keep everything under benchmarks/results/<UTC date>-<device>/ to be committed.
#
#   scripts/gpu-check.sh [extra pytest arguments for the benchmarks, e.g. --no-large]
#
# PYTHON picks the interpreter (default: python). Exit status: that of the GPU tests,
# else that of the benchmarks; 2 when no GPU is usable (with the reason).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}

device=$("$PY" - <<'PYEOF'
import sys
import bpgpu as bp
status = bp.gpu_status()
if not status.usable:
    sys.exit(f"gpu-check: no usable GPU: {status.reason}")
import cupy
name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
name = name.decode() if isinstance(name, bytes) else name
print("-".join("".join(c if c.isalnum() else " " for c in name).lower().split()))
PYEOF
) || exit 2

out="benchmarks/results/$(date -u +%Y-%m-%d)-$device"
mkdir -p "$out"
echo "gpu-check: writing to $out"

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    git rev-parse HEAD 2>/dev/null
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
    "$PY" - <<'PYEOF'
import platform, numpy, cupy, bpgpu
from cupy.cuda import runtime
print(f"python {platform.python_version()}, numpy {numpy.__version__}, cupy {cupy.__version__}, "
      f"CUDA runtime {runtime.runtimeGetVersion()}, driver {runtime.driverGetVersion()}, bpgpu {bpgpu.__version__}")
print(bpgpu.gpu_status().reason)
PYEOF
} > "$out/environment.txt" 2>&1

"$PY" -m pytest -m gpu -ra -p no:cacheprovider --junitxml="$out/gpu-tests.xml" 2>&1 | tee "$out/gpu-tests.txt"
tests_status=${PIPESTATUS[0]}

bench_status=0
if [ -d benchmarks ]; then
    "$PY" -m pytest benchmarks/ -ra -p no:cacheprovider --benchmark-json="$out/benchmarks.json" "$@" 2>&1 \
        | tee "$out/benchmarks.txt"
    bench_status=${PIPESTATUS[0]}
fi

echo "gpu-check: GPU tests exit $tests_status, benchmarks exit $bench_status; results in $out"
[ "$tests_status" -ne 0 ] && exit "$tests_status"
exit "$bench_status"
