#!/usr/bin/env bash
# Two `courier serve` nodes on one PostgreSQL database and one NATS bus, and `courier-load` driving
# WebSocket connections split over both: every message is sent through one node and delivered by
# the other (the sender of each pair is on node A, the receiver on node B). Each process here may
# hold 20,000 descriptors, so the generator runs as several processes and each node holds half the
# connections.
#
# Usage: benches/compare/cluster-load.sh CONNECTIONS MESSAGES RATE [PROCESSES]
#   e.g. benches/compare/cluster-load.sh 38000 50000 5000 2
# Needs PostgreSQL (COURIER_TEST_DATABASE_URL, default postgres://postgres@127.0.0.1:5432/test; a
# schema `cluster_load` is recreated) and NATS (COURIER_TEST_NATS_URL, default nats://127.0.0.1:4222).
set -euo pipefail
cd "$(dirname "$0")/../.."
connections=${1:?connections}
messages=${2:?messages}
rate=${3:?rate}
processes=${4:-2}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/courier-target}"
db=${COURIER_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
nats=${COURIER_TEST_NATS_URL:-nats://127.0.0.1:4222}

cargo build -q --release -p server -p benches --bin courier --bin courier-load
bin="$CARGO_TARGET_DIR/release"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

PGOPTIONS="--client-min-messages=warning" psql -q "$db" -c "DROP SCHEMA IF EXISTS cluster_load CASCADE" \
  -c "CREATE SCHEMA cluster_load"
separator='?'; [[ "$db" == *\?* ]] && separator='&'
export COURIER_DATABASE_URL="${db}${separator}options=-c%20search_path%3Dcluster_load"
mkdir -p "$work/keys"
openssl rand -hex 32 > "$work/keys/token-signing.key"
openssl rand -hex 32 > "$work/keys/url-signing.key"
export COURIER_TOKEN_KEY_FILE="$work/keys/token-signing.key" COURIER_URL_KEY_FILE="$work/keys/url-signing.key"
export COURIER_CHAT__BUS_URL="$nats" COURIER_CHAT__BUS_SUBJECT="courier.load.$$" COURIER_LOG=warn
# The default per-connection queue; sign-up limits are per IP and every device comes from loopback.
# Every generated client comes from 127.0.0.1: no per-address connection cap; and up to 19,500
# connections a node (the default keeps a tenth of the 20,000 descriptors spare).
export COURIER_HTTP__MAX_CONNECTIONS_PER_ADDRESS=0 COURIER_HTTP__MAX_CONNECTIONS=19500
servers=()
server_pids=()
for node in a b; do
  mkdir -p "$work/$node"
  "$bin/courier" serve --listen 127.0.0.1:0 --data-dir "$work/$node" --transcode-workers 0 \
    > "$work/$node.out" 2> "$work/$node.err" &
  pid=$!
  pids+=("$pid")
  server_pids+=(--server-pid "$pid")
  for _ in $(seq 100); do grep -q "listening on" "$work/$node.out" 2>/dev/null && break; sleep 0.1; done
  servers+=(--server "$(sed -n 's/^courier listening on //p' "$work/$node.out" | head -1)")
done
echo "nodes: ${servers[*]} (pids ${pids[*]})"
# The generator fills the tables in seconds; a live system's autovacuum would have their statistics
# current, so the planner uses the indexes the connect path needs. Refresh them every 15 s here.
( while sleep 15; do psql -q "$COURIER_DATABASE_URL" -c ANALYZE > /dev/null 2>&1 || true; done ) &
pids+=("$!")
"$bin/courier-load" --connections "$connections" --messages "$messages" --rate "$rate" \
  --processes "$processes" --data-dir "$work/keys" "${servers[@]}" "${server_pids[@]}"
