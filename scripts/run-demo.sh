#!/usr/bin/env bash
# Starts the laneguard demo: the rate-limit service, the demo upstream and Envoy with
# envoy/demo/envoy.yaml, then waits until you press Ctrl-C. On any exit it stops exactly
# the processes it started. Use `make run`, which bootstraps and builds first.
#
# If the rate-limit service exits (a crash, `kill`), Envoy stays up and each class's failure
# mode applies while it is down (`closed` classes 503, `local` ones served from the
# workers' own buckets); the script reports the exit and starts the service again after
# SERVICE_RESTART_DELAY_S seconds. `make demo-chaos` (scripts/demo-chaos.sh) does that on a
# schedule and shows each class's outcomes every second.
#
#   ENVOY   the Envoy command (default .venv/bin/envoy); may be several words,
#           for example ENVOY="func-e run"
#   SERVICE_RESTART_DELAY_S   seconds before a service that exited is started again
#           (default 1)
#   DEMO_RUN_DIR, DEMO_ENVOY_CONFIG, DEMO_SERVICE_ADDR, DEMO_UPSTREAM_ADDR,
#   DEMO_METRICS_ADDR, DEMO_GATEWAY_PORT, DEMO_ADMIN_PORT   other directories, a config
#           and ports (the tests run the script on ephemeral ports with these)
#
# Logs and output go to .run/ (envoy.log, access.log, service.log, upstream.log), and the
# service's hash-chained audit log to .run/audit.log (laneguard-audit verify|query).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

ENVOY=${ENVOY:-$ROOT/.venv/bin/envoy}
read -r -a ENVOY_CMD <<<"$ENVOY"

SERVICE_BIN=target/debug/laneguard-service
UPSTREAM_BIN=target/debug/laneguard-upstream
WASM=target/wasm32-wasip1/release/laneguard_wasm.wasm
ENVOY_CONFIG=${DEMO_ENVOY_CONFIG:-envoy/demo/envoy.yaml}
RUN_DIR=${DEMO_RUN_DIR:-.run}

SERVICE_ADDR=${DEMO_SERVICE_ADDR:-127.0.0.1:8081}
SERVICE_METRICS_ADDR=${DEMO_METRICS_ADDR:-127.0.0.1:9102}
UPSTREAM_ADDR=${DEMO_UPSTREAM_ADDR:-127.0.0.1:8080}
GATEWAY_PORT=${DEMO_GATEWAY_PORT:-10000}
ADMIN_PORT=${DEMO_ADMIN_PORT:-9901}
GATEWAY=http://127.0.0.1:$GATEWAY_PORT
ADMIN=http://127.0.0.1:$ADMIN_PORT
RESTART_DELAY_S=${SERVICE_RESTART_DELAY_S:-1}

READY_TIMEOUT_S=30 # per process; Envoy compiles the .wasm with V8 on start

die() {
  echo "run-demo: $*" >&2
  exit 1
}

# --- preflight ------------------------------------------------------------------------------
for f in "$SERVICE_BIN" "$UPSTREAM_BIN" "$WASM"; do
  [ -e "$f" ] || die "$f is missing: run 'make build' (or 'make run', which builds first)"
done
command -v "${ENVOY_CMD[0]}" >/dev/null 2>&1 ||
  die "Envoy command '${ENVOY_CMD[0]}' not found: run scripts/bootstrap.sh, or set ENVOY"
command -v curl >/dev/null 2>&1 || die "curl not found (used to poll Envoy's admin /ready)"

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in "${UPSTREAM_ADDR##*:}" "${SERVICE_ADDR##*:}" "$ADMIN_PORT" "$GATEWAY_PORT"; do
  if port_in_use "$port"; then
    die "127.0.0.1:$port is already in use (another demo still running?); stop it first"
  fi
done

mkdir -p "$RUN_DIR"

# --- process management ---------------------------------------------------------------------
# Each child runs in its own session (setsid), so a Ctrl-C reaches only this script, and
# the trap below stops the children in order: Envoy first, then the service and upstream.
# Each child leads its own process group (PGID = PID), so killing the group by that id
# also stops what the child itself started (func-e starts Envoy as its child), and
# nothing else.
PIDS=()
NAMES=()

start() { # start NAME LOGFILE CMD... ; sets STARTED_PID
  local name=$1 log=$2
  shift 2
  setsid "$@" >"$log" 2>&1 </dev/null &
  STARTED_PID=$!
  PIDS+=("$STARTED_PID")
  NAMES+=("$name")
}

# shellcheck disable=SC2317 # called by the EXIT trap
stop_all() {
  local i pid deadline
  trap - EXIT INT TERM
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    pid=${PIDS[$i]}
    kill -0 "$pid" 2>/dev/null || continue
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 5))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "run-demo: ${NAMES[$i]} (pid $pid) ignored SIGTERM; killing it" >&2
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
}
trap stop_all EXIT
trap 'echo; echo "run-demo: stopping"; exit 130' INT
trap 'exit 143' TERM

# ready_lines LOG: how many LANEGUARD_READY lines LOG holds (a restarted service appends).
ready_lines() { grep -c '^LANEGUARD_READY addr=' "$1" 2>/dev/null || true; }

# wait_ready NAME PID LOG [BEFORE]: wait for a LANEGUARD_READY line (docs/architecture.md)
# beyond the BEFORE (default 0) the log already held. Returns 1 if the process exits or is
# not ready in time.
wait_ready() {
  local name=$1 pid=$2 log=$3 before=${4:-0} deadline=$((SECONDS + READY_TIMEOUT_S))
  until (($(ready_lines "$log") > before)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "run-demo: $name exited before it was ready; last lines of $log:" >&2
      tail -n 20 "$log" >&2
      return 1
    fi
    if ((SECONDS >= deadline)); then
      echo "run-demo: $name not ready after ${READY_TIMEOUT_S}s; last lines of $log:" >&2
      tail -n 20 "$log" >&2
      return 1
    fi
    sleep 0.1
  done
}

# start_service: start laneguard-service, appending to its log; sets SERVICE_PID and
# SERVICE_READY_BEFORE, and writes the pid to $RUN_DIR/service.pid (scripts/demo-chaos.sh).
start_service() {
  SERVICE_READY_BEFORE=$(ready_lines "$RUN_DIR/service.log")
  setsid "$SERVICE_BIN" --listen "$SERVICE_ADDR" --store "${REDIS:-memory}" \
    --audit-log "$RUN_DIR/audit.log" --metrics-addr "$SERVICE_METRICS_ADDR" \
    >>"$RUN_DIR/service.log" 2>&1 </dev/null &
  SERVICE_PID=$!
  PIDS+=("$SERVICE_PID")
  NAMES+=(laneguard-service)
  echo "$SERVICE_PID" >"$RUN_DIR/service.pid"
}

# --- start ----------------------------------------------------------------------------------
# REDIS (from `make run REDIS=redis://...`) moves the buckets to Redis; default: in memory.
: >"$RUN_DIR/service.log"
start_service
start laneguard-upstream "$RUN_DIR/upstream.log" "$UPSTREAM_BIN" --listen "$UPSTREAM_ADDR"
UPSTREAM_PID=$STARTED_PID
wait_ready laneguard-service "$SERVICE_PID" "$RUN_DIR/service.log" || exit 1
wait_ready laneguard-upstream "$UPSTREAM_PID" "$RUN_DIR/upstream.log" || exit 1

# Envoy's own log (stderr) goes to envoy.log, its access log (stdout) to access.log.
setsid "${ENVOY_CMD[@]}" -c "$ENVOY_CONFIG" --concurrency 2 --disable-hot-restart \
  >"$RUN_DIR/access.log" 2>"$RUN_DIR/envoy.log" </dev/null &
ENVOY_PID=$!
PIDS+=("$ENVOY_PID")
NAMES+=(envoy)

deadline=$((SECONDS + READY_TIMEOUT_S))
until [ "$(curl -s -m 1 "$ADMIN/ready" 2>/dev/null)" = LIVE ]; do
  if ! kill -0 "$ENVOY_PID" 2>/dev/null; then
    echo "run-demo: Envoy exited during startup; last lines of $RUN_DIR/envoy.log:" >&2
    tail -n 40 "$RUN_DIR/envoy.log" >&2
    exit 1
  fi
  if ((SECONDS >= deadline)); then
    echo "run-demo: Envoy not LIVE on $ADMIN/ready after ${READY_TIMEOUT_S}s; last lines of $RUN_DIR/envoy.log:" >&2
    tail -n 40 "$RUN_DIR/envoy.log" >&2
    exit 1
  fi
  sleep 0.2
done

# --- how to try it --------------------------------------------------------------------------
cat <<EOF
laneguard demo is up:
  gateway  $GATEWAY    (Envoy admin $ADMIN)
  service  $SERVICE_ADDR      upstream $UPSTREAM_ADDR
  service metrics http://$SERVICE_METRICS_ADDR/metrics

In another terminal, from $ROOT:

  set -a; . envoy/demo/tokens.env; set +a

  # a customer click (tenant northwind, principal web): 200, lane shared
  curl -i -H "Authorization: Bearer \$NORTHWIND_WEB" $GATEWAY/orders/1

  # the reconciliation worker repairing an order: 200, lane protected
  curl -i -H "Authorization: Bearer \$NORTHWIND_RECON" -H 'x-traffic-class: repair' $GATEWAY/orders/1

  # no token: 401 from jwt_authn
  curl -i $GATEWAY/orders/1

  # flood the ERP integration; its 200s turn into 429s while repair stays 200
  for i in \$(seq 20); do
    erp=\$(for j in 1 2 3 4 5; do curl -s -o /dev/null -w '%{http_code} ' \\
      -H "Authorization: Bearer \$NORTHWIND_ERP" $GATEWAY/orders/sync; done)
    repair=\$(curl -s -o /dev/null -w '%{http_code}' \\
      -H "Authorization: Bearer \$NORTHWIND_RECON" -H 'x-traffic-class: repair' $GATEWAY/orders/1)
    echo "erp: \$erp  repair: \$repair"; sleep 0.5
  done

  # the other principals: \$NORTHWIND_SUPPORT (recovery), \$NORTHWIND_EXPORT (export),
  # \$ACME_WEB (tenant acme). The policy is in $ENVOY_CONFIG; see docs/policy.md.

Logs: $RUN_DIR/envoy.log (Envoy), $RUN_DIR/access.log (one line per request, with its
      audit record), $RUN_DIR/service.log, $RUN_DIR/upstream.log
Audit: target/debug/laneguard-audit query $RUN_DIR/audit.log --tenant northwind
       target/debug/laneguard-audit verify $RUN_DIR/audit.log   (docs/operations.md)
Press Ctrl-C to stop.
EOF

# Run until Ctrl-C. Envoy or the upstream exiting ends the demo; the rate-limit service
# exiting does not: Envoy keeps serving with each class's failure mode, and the service is
# started again.
delay=$RESTART_DELAY_S
while true; do
  sleep 0.5
  for pid_name in "$ENVOY_PID:envoy" "$UPSTREAM_PID:laneguard-upstream"; do
    if ! kill -0 "${pid_name%%:*}" 2>/dev/null; then
      echo "run-demo: ${pid_name#*:} exited unexpectedly; see $RUN_DIR/" >&2
      exit 1
    fi
  done
  kill -0 "$SERVICE_PID" 2>/dev/null && continue
  status=0
  wait "$SERVICE_PID" 2>/dev/null || status=$?
  echo "run-demo: laneguard-service (pid $SERVICE_PID) exited with status $status at $(date -u +%H:%M:%S)." >&2
  echo "run-demo: Envoy stays up; each class's failure mode applies (closed: 503, local: served by the workers alone). Restarting the service in ${delay}s." >&2
  sleep "$delay"
  start_service
  if wait_ready laneguard-service "$SERVICE_PID" "$RUN_DIR/service.log" "$SERVICE_READY_BEFORE"; then
    echo "run-demo: laneguard-service is back (pid $SERVICE_PID) at $(date -u +%H:%M:%S)" >&2
    delay=$RESTART_DELAY_S
  else
    kill -KILL -- "-$SERVICE_PID" 2>/dev/null || true
    # Failing again at once (a bad flag, a port still held): back off, up to 30 s.
    delay=$((delay * 2 > 30 ? 30 : (delay * 2 > 0 ? delay * 2 : 1)))
  fi
done
