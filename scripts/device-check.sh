#!/usr/bin/env bash
# One call that checks the kit's CUDA path on a machine with a GPU, in under 8
# minutes, one summary line per check (scripts/device_check.py says which):
# the GPU and both frameworks seeing it, the GPU memory budget and the OOM path
# in both frameworks, a CNN throughput sweep in all three modes through the
# real harness, the memory page's CUDA allocator path, and the DP correctness
# tests on CUDA at full float32. The runs' own output goes to device-check.log.
#
#   scripts/device-check.sh [LOG]
#
# The Python: $PYTHON if set, else .venv/bin/python, else the machine's python3.
# If that one cannot run the frameworks on CUDA (no JAX CUDA plugin, say) and a
# folder wheels/ is beside the project, .venv-device is made from those wheels
# alone (no registry needed; README "CUDA: a GPU machine without registry
# access" says how to fetch them). The kit runs from this checkout (PYTHONPATH).
# Without a GPU it stops at the first check, saying so (exit status 1).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
serves_cuda() {
  "$1" -c 'import sys; from privbench.runners.local import platform_problems; import jax, torch
sys.exit(1 if platform_problems("cuda") else 0)' 2>/dev/null
}
if ! serves_cuda "$python"; then
  if [ -d wheels ]; then
    echo "device-check: $python cannot run the frameworks on CUDA; making .venv-device from wheels/"
    [ -x .venv-device/bin/python ] || python3 -m venv .venv-device
    .venv-device/bin/pip install --quiet --no-index --find-links wheels \
      -r envs/requirements.txt -r envs/requirements-cuda.txt -c envs/constraints.txt
    python=.venv-device/bin/python
  else
    echo "device-check: $python cannot run the frameworks on CUDA and there is no wheels/ folder;" \
         "the checks below will say what is missing"
  fi
fi
echo "device-check: $("$python" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
exec timeout 470 "$python" scripts/device_check.py "${1:-device-check.log}"
