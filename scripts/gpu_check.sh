#!/usr/bin/env bash
# gpu_check.sh: the one command to run on a lent GPU machine. Writes one report, $OUT/gpu_check.md
# (./out/gpu_check.md when $OUT is unset), with: device facts, measured copy bandwidth, the carried
# wheels installed, the CUDA test suite (no interpreter), compute-sanitizer on one small case per
# kernel, scripts/bench_kernels.py, and end to end per model: scripts/bench_engine.py at batch
# 1/8/64 and scripts/loadtest.py against a local `llamatron serve`, then SIGTERM and its exit code.
#
# From a session here, with the device tool:
#   scripts/prepare_gpu_wheels.sh                      # fills the ignored folder wheels/
#   run(command="bash scripts/gpu_check.sh", carry=["wheels"], timeout_s=600)
# The whole check wants more than one 10-minute call: steps run in order inside --budget seconds
# (default 570), and what did not fit is listed in the report. A plan that fits (install again in
# each call: a machine idle for 30 s is given back, and a fresh one is bare):
#   bash scripts/gpu_check.sh --only facts,install,bandwidth,tests
#   bash scripts/gpu_check.sh --only install,sanitizer,bench
#   bash scripts/gpu_check.sh --only install,bandwidth,e2e
# Each call returns its own $OUT/gpu_check.md.
#
# Models: a call carries 64 MiB in all, and the files are 98, 253 and 491 MB. By default the
# end-to-end step runs on zero-weight stand-ins built from wheels/models/NAME.head (same shapes,
# quant types and bytes per token, so the speed is real; the text is not). A real file can be
# carried in pieces while the machine stays warm (it goes back 30 s after a call):
#   scripts/prepare_gpu_wheels.sh --split smollm2-135m-instruct   # out/pieces/pNN/, 40 MiB each
#   run(command="bash scripts/gpu_check.sh --receive out/pieces/p00", carry=["out/pieces/p00"]); p01 ...
# Each piece lands in $LLAMATRON_HOME/.parts (default ~/.cache/llamatron); the next full run joins
# them, checks the sha256 from wheels/models/NAME.json and uses $LLAMATRON_HOME/NAME.gguf, where the
# registry (and so the test suite's model fixtures) finds it.
#
# --dry-run simulates every step on this CPU machine: prints each command, runs the cheap ones.
# Environment: PYTHON (default python3), BENCH_KERNELS_ARGS, BENCH_ENGINE_ARGS, LOADTEST_ARGS,
# GPU_CHECK_PORT (18080), GPU_CHECK_WHEELS (wheels), PYTEST_MARK (a pytest -m expression),
# GPU_CHECK_STANDIN=1 (the zero-weight stand-ins even where the real files are present),
# GPU_CHECK_DEVICE=cpu (run the steps for real on a CPU machine, e.g. --only e2e as a rehearsal),
# GPU_CHECK_MODELS (space-separated registry names; default the three models).
set -uo pipefail  # not -e: a failed step is reported and the next one still runs

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
DRY=0
ONLY="facts,install,bandwidth,tests,sanitizer,bench,e2e"
BUDGET=570
OUT_DIR=${OUT:-$ROOT/out}
RECEIVE=""
PORT=${GPU_CHECK_PORT:-18080}
WHEELS=${GPU_CHECK_WHEELS:-wheels}  # the carried folder (prepare_gpu_wheels.sh)
read -r -a MODELS <<< "${GPU_CHECK_MODELS:-smollm2-135m-instruct gemma-3-270m qwen2.5-coder-0.5b-instruct}"

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --only) ONLY=$2; shift ;;
        --budget) BUDGET=$2; shift ;;
        --out) OUT_DIR=$2; shift ;;
        --receive) RECEIVE=$2; shift ;;
        -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

export LLAMATRON_HOME=${LLAMATRON_HOME:-$HOME/.cache/llamatron}
if [ -n "$RECEIVE" ]; then  # one piece of a model file: park it outside the tree, which is re-sent
    mkdir -p "$LLAMATRON_HOME/.parts" && mv "$RECEIVE"/* "$LLAMATRON_HOME/.parts/" && ls -l "$LLAMATRON_HOME/.parts"
    exit $?
fi

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PIP_NO_INDEX=1  # no network there: a registry pull must fail at once, not wait on time-outs
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then export TRITON_INTERPRET=1; else unset TRITON_INTERPRET; fi
DEV=cuda; [ "$DRY" = 1 ] && DEV=cpu
DEV=${GPU_CHECK_DEVICE:-$DEV}  # cpu: rehearse the real (not dry) steps on a CPU machine

mkdir -p "$OUT_DIR"
REPORT=$OUT_DIR/gpu_check.md; [ "$DRY" = 1 ] && REPORT=$OUT_DIR/gpu_check_dryrun.md
WORK=$(mktemp -d)
SERVER_PID=""
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() { [ -n "$SERVER_PID" ] && kill -9 "$SERVER_PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
STATUS=()   # "step: ok|FAILED|..." lines for the summary
LEFT=()     # commands skipped for lack of time
FAILED=0

say() { printf '%s\n' "$*" >> "$REPORT"; }
wants() { [[ ",$ONLY," == *",$1,"* ]]; }
section() { say ""; say "## $1"; echo "== $1 (${SECONDS}s)" >&2; }

show() {  # a command line for the report; inline programs are abbreviated
    local a out=""
    for a in "$@"; do
        if [[ "$a" == *$'\n'* ]]; then out+=" '<program, $(wc -l <<< "$a") lines>'"
        elif [[ "$a" == *" "* ]]; then out+=" '$a'"
        else out+=" $a"; fi
    done
    printf '%s' "${out# }"
}

# run MODE LIMIT CMD...: MODE "cheap" runs in --dry-run too, "gpu" only prints there. The output's
# tail goes to the report; the return value is the command's (0 when not run).
run() {
    local mode=$1 limit=$2 rc t0 note=""; shift 2
    local left=$((BUDGET - SECONDS))
    [ "$limit" -gt "$left" ] && limit=$left
    say '```'
    say "\$ $(show "$@")"
    RAN=0
    if [ "$limit" -lt 5 ]; then
        say "(not run: the time budget is spent)"; say '```'; LEFT+=("$*"); RAN=budget; return 0
    fi
    if [ "$DRY" = 1 ] && [ "$mode" != cheap ]; then say "(dry run: not run)"; say '```'; RAN=dry; return 0; fi
    RAN=1
    t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$WORK/log" 2>&1
    rc=$?
    tail -n "${TAIL:-25}" "$WORK/log" >> "$REPORT"
    [ "$rc" = 124 ] && note=", timed out"
    say "(exit $rc after $((SECONDS - t0)) s$note)"
    say '```'
    return "$rc"
}

record() {  # record STEP RC: the outcome of the last run()
    if [ "$RAN" = dry ]; then STATUS+=("$1: dry run, not run")
    elif [ "$RAN" = budget ]; then STATUS+=("$1: not run, time budget spent")
    elif [ "$2" = 0 ]; then STATUS+=("$1: ok")
    else STATUS+=("$1: FAILED (exit $2)"); FAILED=1; fi
}
RAN=0

{ echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo ""
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); host ${HOSTNAME:-unknown}; steps $ONLY;"
  echo "budget ${BUDGET}s; python $PY$([ "$DRY" = 1 ] && echo '; DRY RUN on CPU: commands marked not run were only printed')"
} > "$REPORT"

PROBE='import sys, torch, triton
print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    l2 = getattr(p, "L2_cache_size", 0) / 2**20
    print(f"{p.name}: cc {p.major}.{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB,",
          f"L2 {l2:.0f} MiB, CUDA {torch.version.cuda}")
else:
    print("no CUDA device visible to torch")'

if wants facts; then
    section "Device facts"
    for tool in nvidia-smi nvcc compute-sanitizer; do
        command -v "$tool" >/dev/null || say "- $tool: not found"
    done
    if command -v nvidia-smi >/dev/null; then
        run cheap 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.memory,power.limit --format=csv
        TAIL=3 run cheap 30 nvidia-smi
    fi
    command -v nvcc >/dev/null && TAIL=2 run cheap 30 nvcc --version
    command -v compute-sanitizer >/dev/null && TAIL=2 run cheap 30 compute-sanitizer --version
    run cheap 60 "$PY" -c "$PROBE"; record facts $?
    say "- kernel $(uname -r), $(nproc) CPU cores"
fi

if wants install; then
    section "Carried wheels"
    if [ -f "$WHEELS/requirements.txt" ]; then
        if [ "$DRY" = 1 ]; then  # here: resolve the same requirements against the local env
            run cheap 120 "$PY" -m pip install --dry-run -q --no-index --find-links "$WHEELS" -r "$WHEELS/requirements.txt"
        else
            run gpu 180 "$PY" -m pip install -q --no-index --find-links "$WHEELS" -r "$WHEELS/requirements.txt"
        fi
        record install $?
    else
        say "no $WHEELS/requirements.txt: run scripts/prepare_gpu_wheels.sh here and carry [\"wheels\"]"
    fi
    run cheap 60 "$PY" -c 'import importlib.metadata as m, sys
missing = 0
for n in ("gguf", "starlette", "uvicorn", "pydantic", "llguidance", "openai", "jsonschema", "hypothesis", "pytest",
          "pytest-timeout", "tokenizers", "jinja2", "httpx", "prometheus-client", "tqdm", "numpy"):
    try:
        print(n, m.version(n))
    except m.PackageNotFoundError:
        print(n, "MISSING")
        missing += 1
sys.exit(1 if missing else 0)'
    record imports $?
fi

BW='import sys, time, torch
dev = sys.argv[1]
n = (1 << 30) if dev == "cuda" else (16 << 20)  # bytes per buffer
a = torch.empty(n, dtype=torch.uint8, device=dev).fill_(1)
b = torch.empty_like(a)
for _ in range(3):
    b.copy_(a)
iters = 20
if dev == "cuda":
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(); s.record()
    for _ in range(iters):
        b.copy_(a)
    e.record(); torch.cuda.synchronize(); dt = s.elapsed_time(e) / 1e3
else:
    t = time.perf_counter()
    for _ in range(iters):
        b.copy_(a)
    dt = time.perf_counter() - t
gbs = 2 * n * iters / dt / 1e9
print(f"device-to-device copy ({dev}): {gbs:.0f} GB/s counting bytes read + written ({n >> 20} MiB x {iters})")
open(sys.argv[2], "w").write(f"{gbs:.1f}\n")'

COPY_GBS=""
if wants bandwidth; then
    section "Copy bandwidth"
    run cheap 60 "$PY" -c "$BW" "$DEV" "$WORK/copy_gbs"; record bandwidth $?
    [ -s "$WORK/copy_gbs" ] && COPY_GBS=$(cat "$WORK/copy_gbs")
fi

if wants tests; then
    section "CUDA test suite (TRITON_INTERPRET unset)"
    MARK=${PYTEST_MARK:-"not big and not slow"}
    [ -z "${PYTEST_MARK:-}" ] && [ -f "$LLAMATRON_HOME/qwen2.5-coder-0.5b-instruct.gguf" ] && MARK="not slow"
    TAIL=40 run gpu 300 "$PY" -m pytest -q -rfEs --timeout 240 -m "$MARK" tests/
    record tests $?
fi

if wants sanitizer; then
    section "compute-sanitizer, one small case per kernel"
    say "PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that out-of-bounds accesses are not hidden in pooled blocks."
    CASES=$("$PY" scripts/sanitizer_cases.py --list) || CASES=""
    if [ "$DRY" = 1 ]; then  # the cases themselves, under the interpreter: cheap, proves the script
        run cheap 120 "$PY" scripts/sanitizer_cases.py --case store_kv --device cpu; record sanitizer-cases $?
    fi
    if [ "$DRY" = 0 ] && ! command -v compute-sanitizer >/dev/null; then
        say "compute-sanitizer not found"; STATUS+=("sanitizer: not available")
    else
        # One process for all cases: one CUDA context and Triton start-up under the sanitizer instead of
        # eleven; a finding names its kernel in the sanitizer's report, and the script names each case.
        TAIL=40 run gpu 300 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
            --error-exitcode 99 "$PY" scripts/sanitizer_cases.py --all
        record "memcheck ($(echo "$CASES" | wc -w) cases)" $?
        # shared-memory tiles: look for races too
        TAIL=12 run gpu 180 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck \
            --error-exitcode 99 "$PY" scripts/sanitizer_cases.py --case paged_attention,split_kv
        record "racecheck attention" $?
    fi
fi

if wants bench; then
    section "Kernel benchmarks"
    if [ -f scripts/bench_kernels.py ]; then
        # shellcheck disable=SC2086  # BENCH_KERNELS_ARGS is a list of words on purpose
        TAIL=60 run gpu 180 "$PY" scripts/bench_kernels.py ${BENCH_KERNELS_ARGS:-} ; record bench_kernels $?
    else
        say "scripts/bench_kernels.py not found"; STATUS+=("bench_kernels: missing")
    fi
fi

# shellcheck source=scripts/gpu_check_e2e.sh
source "$ROOT/scripts/gpu_check_e2e.sh"
wants e2e && e2e_all

section "Summary"
for s in "${STATUS[@]}"; do say "- $s"; done
if [ "${#LEFT[@]}" -gt 0 ]; then
    say "- left for lack of time (rerun with --only): ${#LEFT[@]} commands, first: \`${LEFT[0]}\`"
fi
say "- total ${SECONDS}s"
echo "report: $REPORT" >&2
exit "$FAILED"
