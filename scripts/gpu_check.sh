#!/usr/bin/env bash
# gpu_check.sh: the one command for a lent GPU machine (H100/H200, torch 2.11 + triton 3.6, no network).
# One run ends inside 7 minutes: every step has a hard cap (timeout), and the caps add up to 420 s.
#
# From a session here, with the device tool:
#   scripts/prepare_gpu_wheels.sh            # fills the ignored folder wheels/ (wheels + model headers)
#   run(command="bash scripts/gpu_check.sh", carry=["wheels"], timeout_s=480)
# Here, first: bash scripts/gpu_check.sh --dry-run   (prints every step's command, runs the cheap ones)
#
# Steps (name, cap in seconds; `--list-steps` prints them):
#   setup       30  install the carried wheels (gguf, starlette, uvicorn, pydantic, llguidance, ...),
#                   build full-size random-byte stand-in models from the carried headers (gpu_standin.py)
#   device      15  device facts and copy bandwidth (gpu_device.py facts)
#   graph       15  the floor cost of one graph node: 1000 empty kernels in a CUDA graph, replayed
#   precompile  80  every Triton variant the later steps launch, compiled in parallel processes into one
#                   TRITON_CACHE_DIR (gpu_precompile.py); runs in the background during tests+sanitizer
#   tests       90  the GPU test subset, pytest -v --timeout 90 (no compile-only or dry-run tests)
#   sanitizer   45  compute-sanitizer memcheck on sanitizer_cases.py, the real K = 576/640/896 rows included
#   kernels     45  bench_kernels.py: the real decode shapes vs bf16 torch.matmul and the copy bandwidth
#   logits      40  gpu_logits.py: full-size CUDA logits vs the torch reference on CPU, random weights
#   decode      60  gpu_decode.py: batch 1/8/64 per model, tok/s and graph/lm_head/sampler/host ms
# The timed steps (kernels, logits, decode) wait for the precompile step first.
#
# Output: at most 8 files under $OUT (./out when unset), each written as its step runs:
#   summary.md, device.log (setup, device, graph), precompile.log, tests.log, sanitizer.log,
#   kernels.log, logits.log, decode.log. The summary prints last (the device tool returns the tail).
# A failed step is reported and the next one still runs; exit status 1 if any step failed.
# Models: stand-ins of the real size, quant types and header (tokenizer, metadata) with random
# weights (speed is real; logits are numbers worth comparing; text is meaningless). The real files
# (98-491 MB) do not fit the 64 MiB a call carries.
# Environment: PYTHON (default python3; .venv/bin/python in --dry-run), GPU_CHECK_WHEELS (wheels),
# GPU_CHECK_MODELS (registry names), GPU_CHECK_STANDIN (where stand-ins are built; /tmp/llamatron-standin),
# TRITON_CACHE_DIR (default /tmp/llamatron-triton-cache), GPU_CHECK_PYTEST_WORKERS (4; 0: no xdist),
# GPU_CHECK_DRY_LITE=1 (--dry-run only prints the interpreter runs of sanitizer, kernels and logits:
# tests/test_gpu_check.py, which runs those scripts' pieces on its own).
set -uo pipefail  # not -e: a failed step is reported and the next one still runs

STEPS=(setup:30 device:15 graph:15 precompile:80 tests:90 sanitizer:45 kernels:45 logits:40 decode:60)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
DRY=0
OUT_DIR=${OUT:-$ROOT/out}
WHEELS=${GPU_CHECK_WHEELS:-wheels}
read -r -a MODELS <<< "${GPU_CHECK_MODELS:-smollm2-135m-instruct gemma-3-270m qwen2.5-coder-0.5b-instruct}"

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT_DIR=$2; shift ;;
        --list-steps) printf '%s\n' "${STEPS[@]}"; exit 0 ;;
        -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

cap() {  # cap NAME -> seconds
    local s
    for s in "${STEPS[@]}"; do [ "${s%%:*}" = "$1" ] && { echo "${s#*:}"; return; }; done
    echo "no step $1" >&2; exit 2
}

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PIP_NO_INDEX=1  # no network there: a registry pull must fail at once, not wait on time-outs
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/llamatron-triton-cache}
STANDIN=${GPU_CHECK_STANDIN:-/tmp/llamatron-standin}
if [ "$DRY" = 1 ]; then export TRITON_INTERPRET=1; else unset TRITON_INTERPRET; fi
HEAVY=cheap  # the mode of the dry run's interpreter runs (sanitizer cases, kernels, logits)
[ "${GPU_CHECK_DRY_LITE:-0}" = 1 ] && HEAVY=gpu
mkdir -p "$OUT_DIR" "$TRITON_CACHE_DIR"
WORK=$(mktemp -d)
BG_PID=""
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() { [ -n "$BG_PID" ] && kill "$BG_PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
SUMMARY=$OUT_DIR/summary.md
: > "$WORK/status"

show() {  # a command line for the logs; inline programs are abbreviated
    local a out=""
    for a in "$@"; do
        if [[ "$a" == *$'\n'* ]]; then out+=" '<program, $(wc -l <<< "$a") lines>'"
        elif [[ "$a" == *" "* ]]; then out+=" '$a'"
        else out+=" $a"; fi
    done
    printf '%s' "${out# }"
}

# step NAME MODE LOG CMD...: run CMD under NAME's cap, its output appended to $OUT_DIR/LOG.
# MODE "cheap" also runs in --dry-run; "gpu" is only printed there. Appends "NAME|status|seconds"
# to $WORK/status (also from a background step) and returns the command's exit status.
step() {
    local name=$1 mode=$2 log=$OUT_DIR/$3 limit rc t0 status; shift 3
    limit=$(cap "$name")
    { echo ""; echo "== $name (cap ${limit}s, at ${SECONDS}s) \$ $(show "$@")"; } >> "$log"
    echo "== $name (cap ${limit}s): $(show "$@")" >&2
    if [ "$DRY" = 1 ] && [ "$mode" != cheap ]; then
        echo "(dry run: not run)" >> "$log"; echo "$name|dry run, not run|0" >> "$WORK/status"; return 0
    fi
    t0=$SECONDS
    timeout --kill-after=3 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="FAILED: hit its ${limit}s cap" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    echo "(exit $rc after $((SECONDS - t0)) s)" >> "$log"
    echo "$name|$status|$((SECONDS - t0))" >> "$WORK/status"
    return "$rc"
}

note() { echo "$*" >> "$OUT_DIR/$1"; }  # note LOG TEXT...

# ---- setup: wheels, stand-in models, tools --------------------------------------------------------
LOG=device.log
{ echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "host ${HOSTNAME:-unknown}, kernel $(uname -r), $(nproc) cores; python $PY; TRITON_CACHE_DIR $TRITON_CACHE_DIR"
  [ "$DRY" = 1 ] && echo "DRY RUN on CPU: steps marked 'not run' were only printed"
  for tool in nvidia-smi nvcc compute-sanitizer; do
      command -v "$tool" > /dev/null && echo "$tool: $(command -v "$tool")" || echo "$tool: not found"
  done
} > "$OUT_DIR/$LOG"

SETUP=$(cat <<'EOF'
set -u
PY=$1 WHEELS=$2 STANDIN=$3 DRY=$4; shift 4
rc=0
if [ -f "$WHEELS/requirements.txt" ]; then
    if [ "$DRY" = 1 ]; then  # here: resolve the same requirements against the local environment
        "$PY" -m pip install --dry-run -q --no-index --find-links "$WHEELS" -r "$WHEELS/requirements.txt" || rc=1
    else
        "$PY" -m pip install -q --no-index --find-links "$WHEELS" -r "$WHEELS/requirements.txt" || rc=1
    fi
else
    echo "no $WHEELS/requirements.txt: run scripts/prepare_gpu_wheels.sh here and carry [\"wheels\"]"
fi
"$PY" - <<'PYEOF' || rc=1
import importlib.metadata as m, sys
missing = []
for n in ("gguf", "starlette", "uvicorn", "pydantic", "llguidance", "jsonschema", "pytest", "pytest-timeout",
          "tokenizers", "jinja2", "numpy", "torch", "triton"):
    try:
        print(n, m.version(n), end="; ")
    except m.PackageNotFoundError:
        print(n, "MISSING", end="; ")
        missing.append(n)
print()
sys.exit(1 if set(missing) - {"pytest-timeout"} else 0)  # without pytest-timeout: the step cap alone
PYEOF
[ "$DRY" = 1 ] && set -- "${@:1:1}"  # here: the first model only (a few seconds)
HOMEDIR=${LLAMATRON_HOME:-$HOME/.cache/llamatron}
if [ $# = 0 ]; then
    echo "no models named (GPU_CHECK_MODELS)"
elif [ -d "$WHEELS/models" ]; then
    "$PY" scripts/gpu_standin.py --heads "$WHEELS/models" --dest "$STANDIN" --jobs 3 "$@" || rc=1
elif [ "$DRY" = 1 ] && [ -f "$HOMEDIR/$1.gguf" ]; then  # no headers carried: the real file's
    "$PY" scripts/gpu_standin.py --from-file "$HOMEDIR/$1.gguf" --dest "$STANDIN" || rc=1
else
    echo "no $WHEELS/models: no stand-in models (prepare_gpu_wheels.sh writes their headers)"; rc=1
fi
# tests/synth.py builds its tiny models with smollm2's tokenizer from ~/.cache/llamatron: the stand-in
# carries the real header, so it serves where the real file is absent.
if [ -f "$STANDIN/smollm2-135m-instruct.gguf" ] && [ ! -e "$HOME/.cache/llamatron/smollm2-135m-instruct.gguf" ]; then
    mkdir -p "$HOME/.cache/llamatron" && ln -s "$STANDIN/smollm2-135m-instruct.gguf" "$HOME/.cache/llamatron/"
fi
ls -l "$STANDIN" 2>/dev/null
exit $rc
EOF
)
step setup cheap "$LOG" bash -c "$SETUP" setup "$PY" "$WHEELS" "$STANDIN" "$DRY" "${MODELS[@]}"
STANDINS=()
for name in "${MODELS[@]}"; do
    [ -f "$STANDIN/$name.gguf" ] && STANDINS+=("$STANDIN/$name.gguf")
done
note "$LOG" "stand-in models: ${STANDINS[*]:-none}"

# ---- device facts, copy bandwidth, graph-node floor -----------------------------------------------
step device cheap "$LOG" "$PY" scripts/gpu_device.py facts --json "$WORK/device.json"
COPY_GBS=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["copy_gbs"])' "$WORK/device.json" \
           2>/dev/null || echo 0)
if [ "$DRY" = 0 ] && command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit \
        --format=csv >> "$OUT_DIR/$LOG" 2>&1
fi
step graph cheap "$LOG" "$PY" scripts/gpu_device.py graph-floor --nodes 1000 --json "$WORK/graph.json"

# ---- precompile (background) while the tests and the sanitizer run --------------------------------
PRE_WORKERS=$(( $(nproc) > 6 ? $(nproc) - 4 : 2 ))
if [ "$DRY" = 1 ]; then  # the plan only (no GPU): which worker compiles what
    step precompile cheap precompile.log "$PY" scripts/gpu_precompile.py --dry-run --workers "$PRE_WORKERS" \
        "${STANDINS[@]}"
else
    step precompile gpu precompile.log "$PY" scripts/gpu_precompile.py --workers "$PRE_WORKERS" "${STANDINS[@]}" &
    BG_PID=$!
fi

# ---- GPU test subset ------------------------------------------------------------------------------
TESTS=(tests/test_cuda_qmatmul.py tests/test_cuda_attention.py tests/test_qmatmul_triton.py
       tests/test_attention_triton.py tests/test_dequant_triton.py tests/test_small_kernels_triton.py
       "tests/test_engine.py::test_triton_backend_runs_the_engine")
PYTEST=("$PY" -m pytest -v -rfEs -p no:cacheprovider)
if "$PY" -c 'import pytest_timeout' 2>/dev/null; then PYTEST+=(--timeout 90)
else note tests.log "pytest-timeout not installed: the step's ${STEPS[4]#*:} s cap is the only limit"; fi
NW=${GPU_CHECK_PYTEST_WORKERS:-4}
if [ "$NW" -gt 0 ] && "$PY" -c 'import xdist' 2>/dev/null; then PYTEST+=(-n "$NW"); fi
step tests gpu tests.log "${PYTEST[@]}" "${TESTS[@]}"
if [ "$DRY" = 1 ]; then  # the selection names files and tests that exist
    for t in "${TESTS[@]}"; do
        f=${t%%::*}
        if [ ! -f "$f" ] || { [ "$t" != "$f" ] && ! grep -q "def ${t##*::}(" "$f"; }; then
            note tests.log "missing test: $t"; echo "tests|FAILED: missing $t|0" >> "$WORK/status"
        fi
    done
fi

# ---- compute-sanitizer memcheck -------------------------------------------------------------------
note sanitizer.log "PYTORCH_NO_CUDA_MEMORY_CACHING=1: an out-of-bounds access is not hidden inside a pooled block"
if [ "$DRY" = 1 ]; then  # the real-shape cases under the interpreter: proves the script and its shapes
    step sanitizer "$HEAVY" sanitizer.log "$PY" scripts/sanitizer_cases.py --device cpu --case store_kv,qmatmul_real_k
elif command -v compute-sanitizer > /dev/null; then
    step sanitizer gpu sanitizer.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
        --error-exitcode 99 "$PY" scripts/sanitizer_cases.py --all
else
    note sanitizer.log "compute-sanitizer not found"; echo "sanitizer|FAILED: compute-sanitizer not found|0" >> "$WORK/status"
fi

# ---- the timed steps: after the precompile --------------------------------------------------------
if [ -n "$BG_PID" ]; then
    wait "$BG_PID"
    BG_PID=""
fi
if [ "$DRY" = 1 ]; then
    step kernels "$HEAVY" kernels.log "$PY" scripts/bench_kernels.py --device cpu --shapes tiny --types Q4_1,Q5_0 \
        --ms 1,8 --no-attention --out "$WORK/bench_kernels.md"
else
    step kernels gpu kernels.log "$PY" scripts/bench_kernels.py --copy-gbs "$COPY_GBS" --budget 35 \
        --out "$WORK/bench_kernels.md"
fi

if [ "$DRY" = 1 ]; then  # the same script on a tiny synthetic model, Triton interpreter vs torch
    TINY=$WORK/tiny.gguf
    [ "$HEAVY" = cheap ] && "$PY" -c 'import sys; sys.path.insert(0, "tests"); from synth import write_tiny_model
write_tiny_model(sys.argv[1], weight_type="Q5_0", n_layers=1, vocab_size=512)' "$TINY" >> "$OUT_DIR/logits.log" 2>&1
    step logits "$HEAVY" logits.log "$PY" scripts/gpu_logits.py --device triton "$TINY"
    note logits.log "on the GPU: $(show "$PY" scripts/gpu_logits.py --threads 16 "${STANDINS[@]}")"
else
    step logits gpu logits.log "$PY" scripts/gpu_logits.py --threads "$(nproc)" "${STANDINS[@]}"
fi

step decode cheap decode.log "$PY" scripts/gpu_decode.py --batches 1,8,64 --copy-json "$WORK/device.json" \
    --json "$WORK/decode.json" "${STANDINS[@]}"

# ---- summary: last, short ------------------------------------------------------------------------
FAILED=0
{
    echo "# gpu_check summary ($([ "$DRY" = 1 ] && echo 'DRY RUN, CPU' || echo "$(nproc) cores"), ${SECONDS}s of 420)"
    echo ""
    echo "| step | cap s | took s | status |"
    echo "|---|---|---|---|"
    for s in "${STEPS[@]}"; do
        line=$(grep "^${s%%:*}|" "$WORK/status" | tail -n 1)
        IFS='|' read -r _ st took <<< "${line:-${s%%:*}|not run|0}"
        echo "| ${s%%:*} | ${s#*:} | $took | $st |"
        [[ "$st" == FAILED* || "$st" == "not run" ]] && FAILED=1
    done
    echo ""
    grep -h -m1 "^python .*torch" "$OUT_DIR/device.log"
    grep -h "^graph floor" "$OUT_DIR/device.log"
    grep -h -E "^(precompile: [0-9]+ jobs)" "$OUT_DIR/precompile.log"
    grep -h -E "^=+ .*(passed|failed|error).* in " "$OUT_DIR/tests.log" | tail -n 1
    grep -h -E "ERROR SUMMARY|^(ok|FAIL|MISSING) " "$OUT_DIR/sanitizer.log" | tail -n 14
    sed -n '/^## summary/,/^(exit/p' "$OUT_DIR/kernels.log" | grep -v '^(exit' | tail -n 14
    grep -h -E "^  (ok|FAIL)|^== .*gguf \(|^gpu_logits" "$OUT_DIR/logits.log" | tail -n 13
    sed -n '/^| model | B |/,/^(exit/p' "$OUT_DIR/decode.log" | grep -v '^(exit' | tail -n 11
    echo ""
    echo "full logs in ${OUT_DIR}: $(find "$OUT_DIR" -maxdepth 1 -type f -printf '%f\n' | sort | tr '\n' ' ')"
} > "$SUMMARY" 2>/dev/null
cat "$SUMMARY"
exit "$FAILED"
