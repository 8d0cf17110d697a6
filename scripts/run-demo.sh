#!/usr/bin/env bash
# Starts the laneguard demo: the rate-limit service, the demo upstream and Envoy with
# envoy/demo/envoy.yaml, then waits until you press Ctrl-C. On any exit it stops exactly
# the processes it started. Use `make run`, which bootstraps and builds first.
#
#   ENVOY   the Envoy command (default .venv/bin/envoy); may be several words,
#           for example ENVOY="func-e run"
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
ENVOY_CONFIG=envoy/demo/envoy.yaml
RUN_DIR=.run

SERVICE_ADDR=127.0.0.1:8081
SERVICE_METRICS_ADDR=127.0.0.1:9102
UPSTREAM_ADDR=127.0.0.1:8080
GATEWAY=http://127.0.0.1:10000
ADMIN=http://127.0.0.1:9901

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
for port in 8080 8081 9901 10000; do
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

# wait_ready NAME PID LOG: wait for the LANEGUARD_READY line (docs/architecture.md).
wait_ready() {
  local name=$1 pid=$2 log=$3 deadline=$((SECONDS + READY_TIMEOUT_S))
  until grep -q '^LANEGUARD_READY addr=' "$log" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "run-demo: $name exited before it was ready; last lines of $log:" >&2
      tail -n 20 "$log" >&2
      exit 1
    fi
    if ((SECONDS >= deadline)); then
      echo "run-demo: $name not ready after ${READY_TIMEOUT_S}s; last lines of $log:" >&2
      tail -n 20 "$log" >&2
      exit 1
    fi
    sleep 0.1
  done
}

# --- start ----------------------------------------------------------------------------------
# REDIS (from `make run REDIS=redis://...`) moves the buckets to Redis; default: in memory.
start laneguard-service "$RUN_DIR/service.log" "$SERVICE_BIN" --listen "$SERVICE_ADDR" --store "${REDIS:-memory}" \
  --audit-log "$RUN_DIR/audit.log" --metrics-addr "$SERVICE_METRICS_ADDR"
SERVICE_PID=$STARTED_PID
start laneguard-upstream "$RUN_DIR/upstream.log" "$UPSTREAM_BIN" --listen "$UPSTREAM_ADDR"
UPSTREAM_PID=$STARTED_PID
wait_ready laneguard-service "$SERVICE_PID" "$RUN_DIR/service.log"
wait_ready laneguard-upstream "$UPSTREAM_PID" "$RUN_DIR/upstream.log"

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

# Run until Ctrl-C, or until one of the processes dies on its own.
set +e
wait -n "${PIDS[@]}"
set -e
for i in "${!PIDS[@]}"; do
  if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
    echo "run-demo: ${NAMES[$i]} exited unexpectedly; see $RUN_DIR/" >&2
  fi
done
exit 1
