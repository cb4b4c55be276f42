# Sourced by the bench scripts: start and stop a throwaway release hub.
#
# Needs BIN, OUT, PORT and HTTP_PORT set. `start_hub [VAR=value ...]` starts
# `ferrohub serve --allow-anonymous` (with those environment variables) on a fresh data directory
# OUT/data, logs to OUT/hub.log, and waits for its MQTT port; `stop_hub` stops it (also at exit).

HUB_PID=

start_hub() {
    rm -rf "$OUT/data"
    env "$@" "$BIN" serve --allow-anonymous --data-dir "$OUT/data" \
        --mqtt-listen 127.0.0.1:$PORT --http-listen 127.0.0.1:$HTTP_PORT --ws-listen "" \
        >"$OUT/hub.log" 2>&1 &
    HUB_PID=$!
    wait_port "$PORT" || { echo "the hub did not start; see $OUT/hub.log" >&2; exit 1; }
}

# Waits up to 10 s for something to listen on 127.0.0.1:$1.
wait_port() {
    for _ in $(seq 100); do
        (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

stop_hub() {
    [[ -n $HUB_PID ]] && kill "$HUB_PID" 2>/dev/null && wait "$HUB_PID" 2>/dev/null || true
    HUB_PID=
}
trap stop_hub EXIT
