# shellcheck shell=bash
# shellcheck disable=SC2034  # RAN and LEFT belong to gpu_check.sh, which reads them
# The end-to-end step of scripts/gpu_check.sh (sourced by it; uses its run/say/record/section).
# Per model: scripts/bench_engine.py at batch 1/8/64, then `llamatron serve` on 127.0.0.1 with
# scripts/loadtest.py at concurrency 1/8/64, batch-1 decode as a fraction of the copy bandwidth,
# and SIGTERM with streams in flight (they must end cleanly and the server must exit 0).

json_field() {  # json_field FILE KEY -> value or nothing
    [ -f "$1" ] && "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2" 2>/dev/null
}

assemble_parts() {  # join the pieces parked by --receive into $LLAMATRON_HOME/NAME.gguf
    local parts=$LLAMATRON_HOME/.parts name want got tmp
    [ -d "$parts" ] || return 0
    for name in "${MODELS[@]}"; do
        compgen -G "$parts/$name.gguf.part*" > /dev/null || continue
        tmp=$LLAMATRON_HOME/$name.gguf.joining
        cat "$parts/$name.gguf.part"* > "$tmp"  # the glob sorts part00, part01, ...
        want=$(json_field "$WHEELS/models/$name.json" sha256)
        got=$(sha256sum "$tmp" | cut -d' ' -f1)
        if [ -n "$want" ] && [ "$want" = "$got" ]; then
            mv "$tmp" "$LLAMATRON_HOME/$name.gguf" && rm -f "$parts/$name.gguf.part"*
            say "- $name: joined from the carried pieces, sha256 ok"
        else
            rm -f "$tmp"
            say "- $name: pieces incomplete or corrupt (sha256 $got, want ${want:-unknown}); kept"
        fi
    done
}

model_for() {  # model_for NAME -> "PATH real|stand-in", or nothing
    local name=$1 real=$LLAMATRON_HOME/$1.gguf size
    size=$(json_field "$WHEELS/models/$name.json" size)
    if [ -z "${GPU_CHECK_STANDIN:-}" ] && [ -f "$real" ] && { [ -z "$size" ] || [ "$(stat -c %s "$real")" = "$size" ]; }; then
        echo "$real real"
    elif [ -f "$WHEELS/models/$name.head" ] && [ -n "$size" ]; then
        # header as carried, then zeros to the full size: a sparse file, no disk or transfer cost
        mkdir -p "$WORK/standin"
        cp "$WHEELS/models/$name.head" "$WORK/standin/$name.gguf" && truncate -s "$size" "$WORK/standin/$name.gguf"
        echo "$WORK/standin/$name.gguf stand-in"
    fi
}

wait_health() {  # wait_health URL SECONDS PID -> 0 once /health answers 200; 2 if PID exited
    "$PY" - "$1" "$2" "$3" <<'EOF'
import os, sys, time, urllib.request
url, limit, pid = sys.argv[1] + "/health", float(sys.argv[2]), int(sys.argv[3])
end = time.time() + limit
while time.time() < end:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(2)
    try:
        if urllib.request.urlopen(url, timeout=2).status == 200:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.5)
sys.exit(1)
EOF
}

wait_running() {  # wait_running URL SECONDS N: until /metrics shows N requests running (or time is up)
    "$PY" - "$1" "$2" "$3" <<'EOF'
import re, sys, time, urllib.request
end, want = time.time() + float(sys.argv[2]), float(sys.argv[3])
while time.time() < end:
    try:
        text = urllib.request.urlopen(sys.argv[1] + "/metrics", timeout=2).read().decode()
        m = re.search(r"^llamatron:num_requests_running (\S+)", text, re.M)
        if m and float(m.group(1)) >= want:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.2)
sys.exit(1)
EOF
}

decode_fraction() {  # decode_fraction LOADTEST_JSON MODEL_PATH: batch-1 TPOT against bandwidth
    "$PY" - "$1" "$2" "${COPY_GBS:-}" <<'EOF' >> "$REPORT"
import json, os, sys
res, size = json.load(open(sys.argv[1])), os.path.getsize(sys.argv[2])
p = next((p for p in res["points"] if p.get("concurrency") == 1), None)
tpot = p and p["tpot_ms"]["p50"]
if not tpot or tpot != tpot:
    sys.exit(0)
gbs = size / (tpot / 1e3) / 1e9
line = f"batch-1 decode: TPOT p50 {tpot:.2f} ms = {1e3 / tpot:.0f} tok/s; reading the {size / 1e6:.0f} MB of weights per token is {gbs:.0f} GB/s"
if sys.argv[3]:
    line += f", {100 * gbs / float(sys.argv[3]):.0f}% of the measured copy bandwidth ({float(sys.argv[3]):.0f} GB/s)"
print("\n" + line + " (KV reads not counted)")
EOF
}

stop_server() {  # stop_server -> the server's exit code; SIGTERM, then SIGKILL after 30 s
    local i rc
    kill -TERM "$SERVER_PID" 2> /dev/null
    for ((i = 0; i < 60; i++)); do
        kill -0 "$SERVER_PID" 2> /dev/null || break
        sleep 0.5
    done
    if kill -0 "$SERVER_PID" 2> /dev/null; then kill -9 "$SERVER_PID"; rc=137; wait "$SERVER_PID" 2> /dev/null
    else wait "$SERVER_PID"; rc=$?; fi
    SERVER_PID=""
    return "$rc"
}

serve_and_load() {  # serve_and_load NAME PATH TEMPERATURE
    local name=$1 path=$2 temp=$3 url="http://127.0.0.1:$PORT" rc t0
    local serve=("$PY" -m api.cli_serve "$path" --host 127.0.0.1 --port "$PORT" --device "$DEV" --parallel 64
                 --grace-period 15)
    # shellcheck disable=SC2206  # LOADTEST_ARGS is a list of words on purpose
    local load=("$PY" scripts/loadtest.py --base-url "$url" --concurrency "1,8,64" --num-requests 64 --max-tokens 64
                --input-len 128 --ignore-eos --temperature "$temp" --max-duration 30 --no-progress
                --json "$WORK/load_$name.json" ${LOADTEST_ARGS:-})
    local term=("$PY" scripts/loadtest.py --base-url "$url" --concurrency 8 --num-requests 8 --max-tokens 400
                --ignore-eos --temperature "$temp" --warmup 0 --no-progress --json "$WORK/term_$name.json")
    if [ "$DRY" = 1 ] || [ $((BUDGET - SECONDS)) -lt 90 ]; then
        say '```'
        say "\$ $(show "${serve[@]}") &"
        say "\$ $(show "${load[@]}")"
        say "\$ $(show "${term[@]}") &  (once /metrics shows requests running) kill -TERM <server>"
        if [ "$DRY" = 1 ]; then say "(dry run: not run)"; RAN=dry
        else say "(not run: the time budget is spent)"; LEFT+=("e2e $name"); RAN=budget; fi
        say '```'
        record "serve+loadtest+sigterm $name" 0
        return 0
    fi
    "${serve[@]}" > "$WORK/server.log" 2>&1 &
    SERVER_PID=$!
    if ! wait_health "$url" 300 "$SERVER_PID"; then
        say "server exited or did not become healthy in 300 s:"; say '```'; tail -n 20 "$WORK/server.log" >> "$REPORT"
        say '```'
        kill -9 "$SERVER_PID" 2> /dev/null; SERVER_PID=""; RAN=1; record "serve $name" 1; return 1
    fi
    say "$(grep -m1 '^llamatron:' "$WORK/server.log")"
    TAIL=12 run gpu 240 "${load[@]}"; record "loadtest $name" $?
    [ -f "$WORK/load_$name.json" ] && decode_fraction "$WORK/load_$name.json" "$path"
    # SIGTERM with 8 streams in flight: each must end with a finish_reason or an error event, exit 0
    "${term[@]}" > "$WORK/term.log" 2>&1 &
    local term_pid=$!
    wait_running "$url" 60 8  # SIGTERM once the 8 streams run (the loadtest's 1-request probe is not enough)
    t0=$SECONDS
    stop_server; rc=$?
    wait "$term_pid"
    say "SIGTERM with 8 streams in flight: server exit $rc after $((SECONDS - t0)) s (grace 15 s)."
    say '```'
    # clean: every stream ran to its finish_reason or ended with an error event; not a cut connection
    "$PY" - "$WORK/term_$name.json" >> "$REPORT" 2>&1 <<'EOF'
import json, sys
try:
    p = json.load(open(sys.argv[1]))["points"][0]
except (OSError, ValueError, IndexError, KeyError) as e:
    print("no loadtest result:", e)
    sys.exit(1)
unclean = {k: n for k, n in p["errors"].items() if not k.startswith("error event")}
print(f"streams: {p['ok']} finished, {p['failed'] - sum(unclean.values())} ended by an error event, "
      f"{p['cancelled']} cancelled by the client; other failures: {unclean or 'none'}")
sys.exit(1 if unclean or p["ok"] + p["failed"] < 8 else 0)
EOF
    local streams=$?
    if [ "$rc" != 0 ] || [ "$streams" != 0 ]; then  # the server's own account of its shutdown
        grep -E "ERROR|CRITICAL|terminate|Fatal|Shutting down|Finished server" "$WORK/server.log" | tail -n 12 >> "$REPORT"
    fi
    say '```'
    [ "$rc" = 0 ] && rc=$streams
    RAN=1; record "sigterm $name" "$rc"
}

e2e_all() {
    local name path kind temp
    section "End to end (engine batch 1/8/64, server under load, SIGTERM)"
    assemble_parts
    for name in "${MODELS[@]}"; do
        path=""; kind=""
        read -r path kind < <(model_for "$name")
        if [ -z "$path" ]; then
            say "- $name: no file in $LLAMATRON_HOME and no $WHEELS/models/$name.head: skipped"; continue
        fi
        say ""; say "### $name ($kind: $path)"
        TAIL=2 run cheap 60 "$PY" -c 'import sys; from engine.loading.gguf import GGUFFile
f = GGUFFile(sys.argv[1]); print(len(f.tensors), "tensors;", f.metadata.get("general.architecture"))' "$path"
        record "model file $name" $?
        temp=0
        if [ "$kind" = stand-in ]; then
            temp=1.0; say "Zero weights: sampling at temperature 1 so the tokens vary. Speed only; the text means nothing."
        fi
        if [ -f scripts/bench_engine.py ]; then
            # shellcheck disable=SC2086  # BENCH_ENGINE_ARGS is a list of words on purpose
            TAIL=30 run gpu 150 "$PY" scripts/bench_engine.py --model "$path" --seqs 1 8 64 --device "$DEV" \
                ${BENCH_ENGINE_ARGS:-}
            record "bench_engine $name" $?
        else
            say "scripts/bench_engine.py not found"
        fi
        serve_and_load "$name" "$path" "$temp"
    done
}
