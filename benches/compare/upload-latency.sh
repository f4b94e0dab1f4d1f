#!/usr/bin/env bash
# Upload → `ready` latency of 12 MP JPEGs on an idle `courier serve`: each upload waits for its
# transcode (wait_for_ready_ms), so curl's total time is what a phone sees. N distinct photos (so
# none is deduplicated), one at a time; prints p50, p99 and the mean.
#
#   benches/compare/upload-latency.sh [N]      COURIER_BIN=… to measure another build
set -euo pipefail
cd "$(dirname "$0")/../.."
N="${1:-50}"
TARGET="${CARGO_TARGET_DIR:-target}"
BIN="${COURIER_BIN:-$TARGET/release/courier}"
MAKE_IMAGE="${MAKE_IMAGE_BIN:-$TARGET/release/make-image}"
[ -x "$BIN" ] || cargo build --release --bin courier
[ -x "$MAKE_IMAGE" ] || cargo build --release -p benches --bin make-image

work=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
for i in $(seq 1 "$N"); do
  # 12 MP each, a column apart so every file is different bytes.
  "$MAKE_IMAGE" "$work/$i.jpg" $((4000 + i)) 3000 90
done

port=$((20000 + RANDOM % 10000))
COURIER_LOG=warn "$BIN" serve --listen "127.0.0.1:$port" --data-dir "$work/data" > "$work/serve.out" &
server=$!
for _ in $(seq 1 100); do grep -q listening "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
token=$("$BIN" token --data-dir "$work/data" --user bench)

for i in $(seq 1 "$N"); do
  curl -s -o "$work/out.json" -w '%{time_total}\n' -H "Authorization: Bearer $token" \
    -H 'Content-Type: image/jpeg' --data-binary "@$work/$i.jpg" "http://127.0.0.1:$port/v1/media" >> "$work/times"
  grep -q '"status":"ready"' "$work/out.json" || { echo "upload $i not ready: $(cat "$work/out.json")" >&2; exit 1; }
done
sort -n "$work/times" | awk -v n="$N" '
  { t[NR] = $1 * 1000; sum += $1 * 1000 }
  END {
    p50 = t[int((n + 1) / 2)]; i99 = int(n * 0.99 + 0.999); if (i99 > n) i99 = n
    printf "uploads %d  p50 %.1f ms  p99 %.1f ms  mean %.1f ms\n", n, p50, t[i99], sum / n
  }'
