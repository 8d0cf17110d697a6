#!/usr/bin/env bash
# `make demo-chaos`: the demo (scripts/run-demo.sh) on a Redis store of its own, with the
# rate-limit service and Redis killed and restarted on a schedule, and each class's outcomes
# printed every second. Watch repair and recovery stay 200 while the service or Redis is
# down, export (failure mode `closed`) turn 503, and the `local` classes keep being served.
#
#   CHAOS_DEMO_SECONDS  how long to run (default 90; 0: until Ctrl-C)
#   CHAOS_CYCLE_S       one cycle of the schedule (default 30): at 10 s the service is
#                       killed (run-demo.sh restarts it SERVICE_RESTART_DELAY_S later,
#                       default 5 here), at 20 s Redis is killed, at 25 s it is restarted
#   DEMO_REDIS_PORT     the Redis this script starts (default 6399)
#
# Stops everything it started on exit (the demo by its pid, which stops its children).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
RUN_DIR=${DEMO_RUN_DIR:-.run}
case $RUN_DIR in /*) ;; *) RUN_DIR=$ROOT/$RUN_DIR ;; esac
GATEWAY=http://127.0.0.1:${DEMO_GATEWAY_PORT:-10000}
ADMIN=http://127.0.0.1:${DEMO_ADMIN_PORT:-9901}
REDIS_PORT=${DEMO_REDIS_PORT:-6399}
SECONDS_TO_RUN=${CHAOS_DEMO_SECONDS:-90}
CYCLE=${CHAOS_CYCLE_S:-30}
export SERVICE_RESTART_DELAY_S=${SERVICE_RESTART_DELAY_S:-5}

die() {
  echo "demo-chaos: $*" >&2
  exit 1
}
command -v redis-server >/dev/null || die "redis-server not found: run scripts/bootstrap.sh --with-redis (make demo-chaos does)"
command -v redis-cli >/dev/null || die "redis-cli not found: run scripts/bootstrap.sh --with-redis"
mkdir -p "$RUN_DIR"

REDIS_PID=
DEMO_PID=
start_redis() {
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --logfile "$RUN_DIR/redis.log" </dev/null >/dev/null 2>&1 &
  REDIS_PID=$!
  for _ in $(seq 50); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "redis-server on port $REDIS_PORT did not answer PING; see $RUN_DIR/redis.log"
}
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  trap - EXIT INT TERM
  if [ -n "$DEMO_PID" ] && kill -0 "$DEMO_PID" 2>/dev/null; then
    kill -TERM "$DEMO_PID" 2>/dev/null || true
    wait "$DEMO_PID" 2>/dev/null || true
  fi
  if [ -n "$REDIS_PID" ]; then
    kill -KILL "$REDIS_PID" 2>/dev/null || true
    wait "$REDIS_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'echo; exit 130' INT
trap 'exit 143' TERM

start_redis
REDIS="redis://127.0.0.1:$REDIS_PORT" scripts/run-demo.sh >"$RUN_DIR/demo-chaos.run-demo.log" 2>&1 &
DEMO_PID=$!
for _ in $(seq 600); do
  [ "$(curl -s -m 1 "$ADMIN/ready" 2>/dev/null)" = LIVE ] && break
  kill -0 "$DEMO_PID" 2>/dev/null || die "the demo did not start; see $RUN_DIR/demo-chaos.run-demo.log"
  sleep 0.2
done
[ "$(curl -s -m 1 "$ADMIN/ready" 2>/dev/null)" = LIVE ] || die "Envoy not LIVE; see $RUN_DIR/"

set -a
# shellcheck disable=SC1091
. envoy/demo/tokens.env
set +a

if [ -t 1 ]; then
  GREEN=$'\e[32m' RED=$'\e[31m' YELLOW=$'\e[33m' OFF=$'\e[0m'
else
  GREEN= RED= YELLOW= OFF=
fi
color() { # color STATUS
  case $1 in
  200) printf '%s%s%s' "$GREEN" "$1" "$OFF" ;;
  429) printf '%s%s%s' "$YELLOW" "$1" "$OFF" ;;
  *) printf '%s%s%s' "$RED" "$1" "$OFF" ;;
  esac
}
hit() { # hit TOKEN PATH [HEADER]: the status of one request (000: no answer within 2 s)
  local args=(-s -o /dev/null -m 2 -w '%{http_code}' -H "Authorization: Bearer $1")
  [ -n "${3:-}" ] && args+=(-H "$3")
  curl "${args[@]}" "$GATEWAY$2" || true
}

echo "demo-chaos: gateway $GATEWAY, Redis 127.0.0.1:$REDIS_PORT; each cycle of ${CYCLE}s: service killed at 10s (back after ${SERVICE_RESTART_DELAY_S}s), Redis killed at 20s, restarted at 25s"
echo "demo-chaos: each class sends at its own pace, under its budget except integration, which"
echo "demo-chaos: sends every second (over its 30/min: 429s); '-' is a second it did not send."
echo "demo-chaos: repair and recovery (the protected lanes) stay 200; export (closed) is 503 while"
echo "demo-chaos: the service cannot decide; the others are served by the workers alone meanwhile."
# name|token|path|header|every N seconds
CLASSES=(
  "interactive|$NORTHWIND_WEB|/orders/1||2"
  "integration|$NORTHWIND_ERP|/orders/sync||1"
  "repair|$NORTHWIND_RECON|/orders/1|x-traffic-class: repair|3"
  "recovery|$NORTHWIND_SUPPORT|/orders/1||4"
  "export|$NORTHWIND_EXPORT|/exports/daily||4"
)
start=$SECONDS
done_service=-1 done_redis_kill=-1 done_redis_start=-1
while ((SECONDS_TO_RUN == 0 || SECONDS - start < SECONDS_TO_RUN)); do
  t=$((SECONDS - start))
  cycle=$((t / CYCLE)) phase=$((t % CYCLE))
  service_pid=$(cat "$RUN_DIR/service.pid" 2>/dev/null || echo 0)
  if ((phase >= 10 && done_service < cycle)); then
    done_service=$cycle
    echo "demo-chaos: killing laneguard-service (pid $service_pid)"
    kill -KILL "$service_pid" 2>/dev/null || true
  fi
  if ((phase >= 20 && done_redis_kill < cycle)) && [ -n "$REDIS_PID" ]; then
    done_redis_kill=$cycle
    echo "demo-chaos: killing Redis (pid $REDIS_PID)"
    kill -KILL "$REDIS_PID" 2>/dev/null || true
    wait "$REDIS_PID" 2>/dev/null || true
    REDIS_PID=
  fi
  if ((phase >= 25 && done_redis_start < cycle)) && [ -z "$REDIS_PID" ]; then
    done_redis_start=$cycle
    echo "demo-chaos: restarting Redis (empty)"
    start_redis
  fi
  kill -0 "$DEMO_PID" 2>/dev/null || die "the demo stopped; see $RUN_DIR/demo-chaos.run-demo.log"
  service=up
  kill -0 "$(cat "$RUN_DIR/service.pid" 2>/dev/null || echo 0)" 2>/dev/null || service=DOWN
  redis=up
  [ -n "$REDIS_PID" ] || redis=DOWN
  line=$(printf '%3ds service %-4s redis %-4s |' "$t" "$service" "$redis")
  for spec in "${CLASSES[@]}"; do
    IFS='|' read -r name token path header every <<<"$spec"
    if ((t % every == 0)); then
      line+=" $name $(color "$(hit "$token" "$path" "$header")") |"
    else
      line+=" $name  -  |"
    fi
  done
  echo "$line"
  while ((SECONDS - start <= t)); do sleep 0.1; done
done
echo "demo-chaos: done after ${SECONDS_TO_RUN}s; logs in $RUN_DIR/ (service.log holds every restart)"
