#!/usr/bin/env bash
# The first GPU session's check: focaldet's `gpu` tests and the CUDA benchmark, in < 8 minutes.
#
#   scripts/gpu_check.sh --prepare   here (package registry reachable): download into .whl/ the
#                                    wheels the GPU machine lacks (it has torch, torchvision,
#                                    lightning, opencv, pytest; not these). ~10 MB.
#   scripts/gpu_check.sh             on the GPU machine, from the repo root, e.g. with the device
#                                    tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"],
#                                    timeout_s=540). Installs .whl/ into /tmp/site, then runs
#                                      1. environment report (nvidia-smi, versions)
#                                      2. pytest -m gpu tests/test_gpu.py
#                                      3. focaldet bench --device cuda --amp bf16 --size 800 --batch 8
#                                    and writes logs, bench.json and bench.png under $OUT.
#   scripts/gpu_check.sh --cpu       the same steps on CPU (gpu tests via FOCALDET_GPU_TESTS_DEVICE=cpu,
#                                    bench --device cpu --quick): a dry run of this script.
#
# Every step has its own time limit; a failing step is reported and the next one still runs;
# the exit status is that of the first failed step (0 if all passed). summary.txt lists them.
set -euo pipefail

MODE=gpu
case "${1:-}" in
  --prepare) MODE=prepare ;;
  --cpu) MODE=cpu ;;
  "") ;;
  -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
  *) echo "gpu_check.sh: unknown option $1 (use --prepare, --cpu or nothing)" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
REPO=$PWD
# the wheels the GPU image lacks (versions as in the development venv), for Python 3.12 x86-64
WHEELS=(albumentations==2.0.8 albucore==0.0.24 stringzilla==5.3.2 simsimd==6.5.16 pydantic==2.14.4
        pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
        pycocotools==2.0.11 faster-coco-eval==1.8.0 jsonargparse==4.53.0 docstring_parser==0.18.0
        typeshed_client==2.15.0)

if [[ $MODE == prepare ]]; then
  PY=${PY:-python3}
  echo "== downloading ${#WHEELS[@]} wheels into $REPO/.whl (cp312, manylinux x86_64)"
  mkdir -p .whl
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
  ls -1 .whl; du -sh .whl
  exit 0
fi

OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
START=$(date +%s)
FIRST_FAILURE=0

log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }

# step NAME SECONDS CMD...: runs CMD with a time limit, output to $OUT/NAME.log and the console
step() {
  local name=$1 limit=$2; shift 2
  log "start $name (limit ${limit}s): $*"
  local status=0
  timeout --kill-after=10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1 || status=$?
  wait  # let tee finish
  if [[ $status -eq 0 ]]; then
    log "ok    $name"
  else
    [[ $status -eq 124 || $status -eq 137 ]] && log "TIMEOUT $name after ${limit}s" || log "FAILED $name (status $status)"
    [[ $FIRST_FAILURE -eq 0 ]] && FIRST_FAILURE=$status
  fi
}

if [[ $MODE == gpu ]]; then
  PY=${PY:-python3}  # the GPU image's python3 holds torch
  if [[ -d .whl ]] && compgen -G ".whl/*.whl" > /dev/null; then
    log "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
  else
    log "no .whl/ carried: run 'scripts/gpu_check.sh --prepare' here and carry .whl"
  fi
  DEVICE=cuda
  BENCH=(--device cuda --amp bf16 --size 800 --batch 8)
else
  PY=${PY:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
  export FOCALDET_GPU_TESTS_DEVICE=cpu
  DEVICE=cpu
  BENCH=(--device cpu --amp bf16 --quick --cases train_step,loss,postprocess,inference,memory)
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

step env 60 bash -c "
  date -u; uname -a; (nvidia-smi || echo 'nvidia-smi: not available'); echo
  '$PY' - <<'EOF'
import importlib, torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
if torch.cuda.is_available():
    print('device', torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
for name in ('torchvision', 'lightning', 'albumentations', 'pycocotools', 'jsonargparse', 'cv2', 'numpy'):
    m = importlib.import_module(name)
    print(name, getattr(m, '__version__', '?'), m.__file__)
import focaldet.cli  # the package imports with these versions
EOF"

if [[ $MODE == gpu ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  log "CUDA is not available to $PY: the gpu tests would all be skipped; stopping"
  exit 3
fi

# the gpu tests (each test bounded by pytest-timeout where installed) and the CPU-side branch tests
TIMEOUT_ARGS=()
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARGS=(--timeout 120)
step gpu_tests 300 "$PY" -m pytest -q -rA "${TIMEOUT_ARGS[@]}" tests/test_gpu.py --durations=0 \
  --junitxml "$OUT/gpu_tests.xml"

step bench 240 "$PY" -m focaldet.cli bench "${BENCH[@]}" --json "$OUT/bench.json" --plot "$OUT/bench.png"

log "done in $(( $(date +%s) - START ))s on $DEVICE; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$FIRST_FAILURE"
