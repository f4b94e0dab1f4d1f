#!/usr/bin/env bash
# Photos per second of `courier worker` processes on a shared queue: an API-only `courier serve`
# (`--transcode-workers 0`) takes N distinct 12 MP JPEGs, queued without waiting; then the workers
# are started and timed until the queue is empty. Runs three set-ups on the same machine, one after
# the other, each on a fresh schema: one worker process with one transcode process, one worker
# process with two, and two worker processes with one each (two "nodes" on one box).
#
# Usage: benches/compare/worker-throughput.sh [N]   (default 60)
# Needs PostgreSQL (COURIER_TEST_DATABASE_URL, default postgres://postgres@127.0.0.1:5432/test; a
# schema `worker_bench` is recreated for each set-up).
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-60}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/courier-target}"
db=${COURIER_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
cargo build -q --release -p server -p benches --bin courier --bin make-image
bin="$CARGO_TARGET_DIR/release"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

for i in $(seq 1 "$N"); do
  # 12 MP each, a column apart so every file is different bytes.
  "$bin/make-image" "$work/$i.jpg" $((4000 + i)) 3000 90
done
mkdir -p "$work/keys"
openssl rand -hex 32 > "$work/keys/token.key"
openssl rand -hex 32 > "$work/keys/url.key"
separator='?'; [[ "$db" == *\?* ]] && separator='&'
export COURIER_DATABASE_URL="${db}${separator}options=-c%20search_path%3Dworker_bench"
export COURIER_TOKEN_KEY_FILE="$work/keys/token.key" COURIER_URL_KEY_FILE="$work/keys/url.key"
export COURIER_LOG=warn COURIER_INGEST__WAIT_FOR_READY_MS=0
# One user uploads everything: lift their quotas.
export COURIER_INGEST__QUOTA__QUEUED_JOBS=1000000 COURIER_INGEST__QUOTA__BYTES_PER_DAY=1000000000000

wait_for() { # file pattern
  for _ in $(seq 200); do grep -q "$2" "$1" 2>/dev/null && return; sleep 0.05; done
  echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; exit 1
}

# Queued jobs in the whole queue, read from a worker's /metrics.
queued() { curl -s "http://$1/metrics" | sed -n 's/^courier_jobs_queued //p'; }

run() { # label processes transcode_workers_each
  local label=$1 processes=$2 each=$3
  PGOPTIONS="--client-min-messages=warning" psql -q "$db" -c "DROP SCHEMA IF EXISTS worker_bench CASCADE" \
    -c "CREATE SCHEMA worker_bench"
  rm -rf "$work/blobs" "$work/api" "$work"/w*
  "$bin/courier" serve --listen 127.0.0.1:0 --data-dir "$work/api" --blobs "$work/blobs" \
    --transcode-workers 0 > "$work/api.out" 2> "$work/api.err" &
  local api=$!
  pids+=("$api")
  wait_for "$work/api.out" "listening on"
  local base
  base=$(sed -n 's/^courier listening on //p' "$work/api.out" | head -1)
  local token
  token=$("$bin/courier" token --data-dir "$work/api" --user bench)
  for i in $(seq 1 "$N"); do
    curl -sf -o /dev/null -H "Authorization: Bearer $token" -H "Content-Type: image/jpeg" \
      --data-binary "@$work/$i.jpg" "$base/v1/media"
  done
  local started
  started=$(date +%s.%N)
  local workers=() first=""
  for w in $(seq 1 "$processes"); do
    "$bin/courier" worker --listen 127.0.0.1:0 --data-dir "$work/w$w" --blobs "$work/blobs" \
      --transcode-workers "$each" > "$work/w$w.out" 2> "$work/w$w.err" &
    workers+=($!)
    pids+=($!)
    wait_for "$work/w$w.out" "serving /healthz"
    [ -n "$first" ] || first=$(sed -n 's|.* on http://||p' "$work/w$w.out" | head -1)
  done
  until [ "$(queued "$first")" = "0" ]; do sleep 0.05; done
  local ended
  ended=$(date +%s.%N)
  kill "${workers[@]}" "$api" 2>/dev/null || true
  wait "${workers[@]}" "$api" 2>/dev/null || true
  awk -v label="$label" -v n="$N" -v a="$started" -v b="$ended" \
    'BEGIN { t = b - a; printf "%-40s %6.1f s %8.2f photos/s\n", label, t, n / t }'
}

echo "$N photos of 12 MP, each to a 1600 px JPEG, a 320 px thumb and a preview; $(nproc) cores"
run "1 worker process x 1 transcode process" 1 1
run "1 worker process x 2 transcode processes" 1 2
run "2 worker processes x 1 transcode process" 2 1
