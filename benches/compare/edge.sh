#!/usr/bin/env bash
# courier edge against nginx serving the same blobs from disk, under the same wrk load on loopback.
#
# Blobs of 4 KiB, 64 KiB and 1 MiB are laid out as an object store folder (variants/xx/hash). nginx
# serves them straight from that folder (sendfile, open_file_cache). courier edge fills from the same
# folder (file:// upstream) and answers from memory, or, in a second node with the memory tier
# turned off, from its disk tier. Every URL is signed; nginx ignores the query.
# Prints req/s, p99 latency, the server's CPU time per request (medians over the rounds) and RSS
# side by side.
#
# Usage: benches/compare/edge.sh [SECONDS_PER_RUN] [ROUNDS]   (defaults 5 and 3; needs nginx and wrk)
# COURIER_BIN=path runs that courier binary instead of building this tree's (to compare two builds);
# EDGE_SIZES and EDGE_CONNS narrow the grid (defaults "4096 65536 1048576" and "16 64 256").
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-5}
rounds=${2:-3}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/courier-target}"
command -v nginx >/dev/null || { echo "nginx missing: apt-get install nginx-light" >&2; exit 1; }
command -v wrk >/dev/null || { echo "wrk missing: apt-get install wrk" >&2; exit 1; }

if [ -n "${COURIER_BIN:-}" ]; then
  courier=$COURIER_BIN
else
  cargo build -q --release -p server --bin courier
  courier="$CARGO_TARGET_DIR/release/courier"
fi
work=$(mktemp -d)
chmod 755 "$work"   # nginx workers run as another user
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.5; rm -rf "$work"; }
trap cleanup EXIT

head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/url.key"
declare -A path_of
for size in 4096 65536 1048576; do
  head -c "$size" /dev/urandom > "$work/blob"
  path_of[$size]=$("$courier" sign-url --url-key "$work/url.key" --file "$work/blob" --ttl 86400)
  hash=${path_of[$size]#/b/}; hash=${hash%%\?*}
  mkdir -p "$work/store/variants/${hash:0:2}"
  mv "$work/blob" "$work/store/variants/${hash:0:2}/$hash"
done

cat > "$work/nginx.conf" <<NGINX
worker_processes auto;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  open_file_cache max=10000 inactive=60s;
  open_file_cache_valid 60s;
  keepalive_requests 100000;
  server {
    listen 127.0.0.1:18090;
    location ~ "^/b/(..)([0-9a-f]{62})\$" {
      alias $work/store/variants/\$1/\$1\$2;
      default_type application/octet-stream;
      add_header Cache-Control "public, max-age=31536000, immutable";
    }
  }
}
NGINX
nginx -c "$work/nginx.conf" -g 'daemon off;' & pids+=($!)
nginx_pid=$!
COURIER_EDGE_LOG=warn COURIER_EDGE_HTTP__MAX_CONNECTIONS_PER_ADDRESS=0 "$courier" edge --listen 127.0.0.1:18091 --upstream "file://$work/store" \
  --url-key "$work/url.key" --cache-dir "$work/edge-mem" --memory-bytes 1073741824 \
  >/dev/null & pids+=($!)
mem_pid=$!
COURIER_EDGE_LOG=warn COURIER_EDGE_HTTP__MAX_CONNECTIONS_PER_ADDRESS=0 COURIER_EDGE_MEMORY_MAX_OBJECT_BYTES=0 "$courier" edge --listen 127.0.0.1:18092 \
  --upstream "file://$work/store" --url-key "$work/url.key" --cache-dir "$work/edge-disk" \
  >/dev/null & pids+=($!)
disk_pid=$!
sleep 1

rss_kib() { awk '/VmRSS/ { s += $2 } END { print s }' "$@" 2>/dev/null; }
nginx_pids() { echo "$nginx_pid" $(pgrep -P "$nginx_pid"); }   # the master and its workers

# CPU time (clock ticks, user + system) of every thread of the given processes.
cpu_ticks() { cat $(printf '/proc/%s/task/*/stat ' "$@") 2>/dev/null | awk '{ s += $14 + $15 } END { print s }'; }
pids_of() { case $1 in 18090) nginx_pids ;; 18091) echo "$mem_pid" ;; 18092) echo "$disk_pid" ;; esac; }
rss_of() { rss_kib $(printf '/proc/%s/status ' $(pids_of "$1")); }   # port
hz=$(getconf CLK_TCK)

# One wrk run: prints "req/s p99_ms server_cpu_us_per_request".
measure() { # port path conns
  curl -sf -o /dev/null "http://127.0.0.1:$1$2" || { echo ":$1 does not serve $2" >&2; cat "$work/nginx-error.log" >&2; return 1; }   # warm: fill the tiers, open the file cache
  local pids before out
  pids=$(pids_of "$1")
  before=$(cpu_ticks $pids)
  out=$(wrk -t2 -c"$3" -d"${secs}s" --latency "http://127.0.0.1:$1$2")
  awk -v ticks="$(( $(cpu_ticks $pids) - before ))" -v hz="$hz" '
    /requests in/ { n = $1 }
    /Requests\/sec/ { rps = $2 }
    $1 == "99%" { v = $2; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v)
                  p99 = (u == "us") ? v / 1000 : (u == "s") ? v * 1000 : v }
    END { printf "%s %.2f %.1f\n", rps, p99, ticks / hz * 1e6 / n }' <<<"$out"
}

median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# Each setting runs ROUNDS times, the three servers taking turns, so a slow spell of the machine
# falls on all of them; the table shows the median req/s and the median p99.
printf '%-22s %8s %6s %12s %10s %12s %10s\n' server body conns req/s p99 "CPU µs/req" RSS
for size in ${EDGE_SIZES:-4096 65536 1048576}; do
  label=$((size / 1024))KiB
  for conns in ${EDGE_CONNS:-16 64 256}; do
    declare -A results=()
    for ((round = 0; round < rounds; round++)); do
      for port in 18090 18091 18092; do
        results[$port]+="$(measure "$port" "${path_of[$size]}" "$conns")"$'\n'
      done
    done
    for port in 18090 18091 18092; do
      case $port in
        18090) name=nginx ;;
        18091) name="courier edge memory" ;;
        18092) name="courier edge disk" ;;
      esac
      rps=$(awk 'NF { print $1 }' <<<"${results[$port]}" | median)
      p99=$(awk 'NF { print $2 }' <<<"${results[$port]}" | median)
      cpu=$(awk 'NF { print $3 }' <<<"${results[$port]}" | median)
      printf '%-22s %8s %6s %12s %8sms %12s %7d KiB\n' "$name" "$label" "$conns" "$rps" "$p99" "$cpu" "$(rss_of "$port")"
    done
  done
done
