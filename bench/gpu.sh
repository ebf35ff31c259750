#!/usr/bin/env bash
# The prepared GPU check: one command of at most ~8 minutes on a bare GPU machine.
#
#   bash bench/gpu.sh                # on the GPU machine: results under $OUT
#   bash bench/gpu.sh --cpu-smoke    # here, tiny sizes on the CPU (tests/test_gpu_script.py)
#
# 1. installs mctool from this working tree without network (pip --no-index --no-deps into a
#    throwaway folder; kornia and kornia-rs from <repo>/wheels/ when the machine lacks them —
#    fill that folder with bench/fetch_wheels.sh and carry it along);
# 2. runs the device test subset (MCTOOL_TEST_DEVICE=cuda python -m pytest --device-only tests);
# 3. times at GPU sizes with the bench/*.py scripts, highest priority first, skipping a step
#    that would not fit the time left (and saying so in the summary).
#
# Writes three files under $OUT (or --out DIR): log.txt (everything printed), gpu.json (every
# step's status and every bench script's JSON) and summary.md (the tables for bench/README.md).
# Options: --budget SECONDS (default 470; smoke 300), --out DIR. Environment: PYTHON (default
# python3), GPU_COMMIT (the commit, when the copy of the tree has no .git).
set -uo pipefail

mode=gpu
budget=""
out="${OUT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) mode=smoke ;;
    --budget) budget="$2"; shift ;;
    --out) out="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "bench/gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
if [ -z "$budget" ]; then budget=$([ "$mode" = smoke ] && echo 300 || echo 470); fi
if [ -z "$out" ]; then
  if [ "$mode" = gpu ]; then echo "bench/gpu.sh: set OUT or pass --out DIR" >&2; exit 2; fi
  out="$(mktemp -d)"
fi
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
steps="$work/steps.jsonl"
: >"$steps"
start=$SECONDS

left() { echo $((budget - (SECONDS - start))); }

record() {  # record NAME STATUS SECONDS WHY
  "$py" -c 'import json, sys; print(json.dumps({"step": sys.argv[1], "status": sys.argv[2],
            "seconds": int(sys.argv[3]), "why": sys.argv[4]}))' "$1" "$2" "$3" "$4" >>"$steps"
}

# step NAME ESTIMATE_SECONDS COMMAND...: run it if ESTIMATE fits the time left, killed when the
# budget runs out; its status goes into gpu.json either way.
step() {
  local name="$1" estimate="$2"; shift 2
  local remaining; remaining=$(left)
  if [ "$remaining" -lt "$estimate" ]; then
    echo "=== $name: SKIPPED (needs ~${estimate} s, ${remaining} s left)"
    record "$name" skipped 0 "needs about ${estimate} s, ${remaining} s of the budget were left"
    return 0
  fi
  echo "=== $name ($remaining s left)"
  local t0=$SECONDS rc=0
  # A new bash runs the command (functions and variables exported), so timeout can stop a
  # shell function and all its processes alike.
  timeout --kill-after=5 "$remaining" bash -c '"$@"' step "$@" || rc=$?
  local took=$((SECONDS - t0))
  if [ "$rc" -eq 0 ]; then
    record "$name" ok "$took" ""
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "=== $name: STOPPED at the end of the budget"
    record "$name" timeout "$took" "stopped when the ${budget} s budget ran out"
  else
    echo "=== $name: FAILED (exit $rc)"
    record "$name" failed "$took" "exit status $rc"
  fi
}

placeholder() {  # placeholder NAME WHY: a row that cannot run yet
  echo "=== $1: NOT RUN ($2)"
  record "$1" "not run" 0 "$2"
}

main() {
commit="${GPU_COMMIT:-$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
echo "bench/gpu.sh $mode: repo $repo, commit $commit, budget $budget s, results in $out"
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
          "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")'
if [ "$mode" = gpu ]; then
  device=cuda
  if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu.sh: no CUDA device here (use --cpu-smoke on a CPU machine)" >&2
    return 1
  fi
else
  device=cpu
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi

# ---------------------------------------------------------------- 1. install, offline
install() {
  local wheels=() m
  for m in kornia kornia_rs; do
    if ! "$py" -c "import importlib.util as u, sys; sys.exit(u.find_spec('$m') is None)"; then
      local found=("$repo"/wheels/"$m"-[0-9]*.whl)
      if [ ! -e "${found[0]}" ]; then
        echo "missing $m and no wheels/$m-*.whl: run bash bench/fetch_wheels.sh and carry wheels/" >&2
        return 1
      fi
      wheels+=("${found[0]}")
    fi
  done
  echo "wheels from wheels/: ${wheels[*]:-none needed}"
  if ! "$py" -c 'import setuptools' 2>/dev/null; then
    echo "no setuptools: cannot build mctool offline" >&2
    return 1
  fi
  # Build from a copy, so the working tree gets no build/ or egg-info of its own.
  mkdir -p "$work/src"
  (cd "$repo" && tar --exclude=./wheels --exclude=./.git --exclude=./build --exclude='*.egg-info' \
     --exclude=./.ci/venv --exclude=./bench/results -cf - .) | tar -xf - -C "$work/src"
  "$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
    --disable-pip-version-check --target "$work/site" "$work/src" "${wheels[@]}" || return 1
  # From another folder: `python -c` puts the current one first on sys.path.
  (cd "$work" && PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}" "$py" -c '
import sys
import h5py, kornia, rich, torch, torchvision, typer
import mctool
print("installed mctool", mctool.__version__, "at", mctool.__file__)
assert mctool.__file__.startswith(sys.argv[1]), "not the installed copy"' "$work/site" \
    && PYTHONPATH="$work/site" "$py" -m mctool --help >/dev/null)
}
export py repo work
export -f install
step install 30 install
export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"  # bench scripts import the installed copy

in_repo() { (cd "$repo" && "$@"); }  # tests import `tests.devices` from the repository root
run_py() { in_repo "$py" "$@"; }
export -f in_repo run_py

# ---------------------------------------------------------------- 2. device test subset
if [ "$mode" = gpu ]; then
  step cuda-tests 150 in_repo env MCTOOL_TEST_DEVICE=cuda "$py" -m pytest --device-only -q -x -p no:cacheprovider tests
else
  step cpu-tests 20 in_repo env MCTOOL_TEST_DEVICE=cpu "$py" -m pytest --device-only -q -x -p no:cacheprovider \
    tests/test_ensemble.py -k "float32_differs or group_sizes"
fi

# ---------------------------------------------------------------- 3. timings
b="$repo/bench"
if [ "$mode" = gpu ]; then
  # One distillation iteration per --grad mode at N = 10…80, CIFAR-10 ipc 10; constant vs
  # constant-autograd is the second-order step through fastgrad vs autograd's double backward.
  step distill-cifar10-ipc10 170 run_py "$b/distill.py" --device cuda --steps 10,20,40,80 --full --no-ops \
    --out "$work/distill-cifar10-ipc10.json"
  step evaluate 45 run_py "$b/evaluate.py" --device cuda --ipc 1,10,50 --epochs 50 --runs 2 \
    --out "$work/evaluate.json"
  step evaluate-together 75 run_py "$b/evaluate.py" --device cuda --together 5 --ipc 1,10,50 --epochs 30 --reps 2 \
    --out "$work/evaluate-together.json"
  step experts 35 run_py "$b/experts.py" --device cuda --widths 128 --cifar-images 25600 --fmnist-images 0 \
    --batch 256 --reps 2 --out "$work/experts.json"
  # CIFAR-100 ipc 50: 5,000 images in every inner step (batch_syn = all); unrolled would hold
  # N steps of that graph, so it is left out; adjoint and constant-autograd up to N = 20.
  step distill-cifar100-ipc50 90 run_py "$b/distill.py" --device cuda --ipc 50 --classes 100 \
    --steps 10,20,40,80 --modes constant,constant-autograd,adjoint --max-exact-steps 20 --no-ops \
    --out "$work/distill-cifar100-ipc50.json"
  step experts-parallel 45 run_py "$b/experts.py" --device cuda --parallel 4 --widths 32,128 \
    --cifar-images 10240 --fmnist-images 0 --reps 2 --out "$work/experts-parallel.json"
else
  step distill-cifar10-ipc10 25 run_py "$b/distill.py" --device cpu --threads 1 --steps 2 --width 8 --ipc 1 \
    --modes constant --no-ops --out "$work/distill-cifar10-ipc10.json"
  step evaluate 15 run_py "$b/evaluate.py" --device cpu --threads 1 --ipc 1 --epochs 1 --width 8 \
    --test-images 100 --test-reps 1 --out "$work/evaluate.json"
  step evaluate-together 15 run_py "$b/evaluate.py" --device cpu --threads 1 --together 2 --ipc 1 --epochs 1 \
    --reps 1 --together-width 8 --out "$work/evaluate-together.json"
  step experts 15 run_py "$b/experts.py" --device cpu --threads 1 --widths 8 --cifar-images 64 --fmnist-images 0 \
    --batch 32 --reps 1 --out "$work/experts.json"
  step experts-parallel 15 run_py "$b/experts.py" --device cpu --threads 1 --parallel 2 --widths 8 \
    --cifar-images 64 --fmnist-images 0 --batch 32 --reps 1 --out "$work/experts-parallel.json"
fi
# ==== MICRO-BATCH ROWS ========================================================================
# Tiny ImageNet ipc 10 (2000 images 3x64x64, 200 classes, ConvNet depth 3) and CIFAR-100 ipc 50
# (5000 images): micro-batch auto vs whole steps where they fit, estimate vs measured peak, and
# the chunked/whole time ratio (bench/distill.py --large).
if [ "$mode" = gpu ]; then
  step distill-large 120 run_py "$b/distill.py" --device cuda --large --large-steps 10 --overhead-reps 2 \
    --out "$work/distill-large.json"
else
  placeholder distill-large "GPU sizes only (on the CPU: bench/distill.py --large --budget-gib 4, see bench/README.md)"
fi
# ===========================================================================================

local status=0
"$py" "$b/gpu_summary.py" --work "$work" --out "$out" --mode "$mode" --commit "$commit" --budget "$budget" \
  --seconds $((SECONDS - start)) || status=$?
echo "bench/gpu.sh: done in $((SECONDS - start)) s; $out/summary.md"
return $status
}

main 2>&1 | tee "$out/log.txt"
exit "${PIPESTATUS[0]}"
