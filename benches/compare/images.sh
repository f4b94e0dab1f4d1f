#!/usr/bin/env bash
# Courier's image pipeline against libvips' vipsthumbnail on the same 12 MP JPEGs, one core each.
#
# Both make a 1600 px and a 320 px JPEG (q80, metadata stripped) of every input. vipsthumbnail runs
# twice per input (once per size, as it makes one output per run); Courier decodes once and cascades.
# Courier runs twice: its pipeline in-process, and through a warm sandboxed `courier
# transcode-worker` as `courier serve` runs photos (the CPU of both processes is counted; peak RSS
# is the worker's, the parent's is printed below the table). Prints CPU seconds per image, images
# per CPU-second, peak RSS and output sizes side by side.
#
# Usage: benches/compare/images.sh [COUNT]   (default 8 inputs; needs libvips-tools and GNU time)
set -euo pipefail
cd "$(dirname "$0")/../.."
count=${1:-8}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/courier-target}"
command -v vipsthumbnail >/dev/null || { echo "vipsthumbnail missing: apt-get install libvips-tools" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "/usr/bin/time missing: apt-get install time" >&2; exit 1; }

cargo build -q --release -p benches --bin make-image --bin transcode-files
cargo build -q --release --bin courier
bin="$CARGO_TARGET_DIR/release"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/in" "$work/vips" "$work/courier" "$work/sandboxed"
for i in $(seq 1 "$count"); do
  # Slightly different sizes so no run benefits from an identical previous one.
  "$bin/make-image" "$work/in/photo$i.jpg" $((4000 + i * 8)) $((3000 + i * 6)) 90
done
inputs=("$work"/in/*.jpg)

# Runs "$@" pinned to one core and prints "cpu_seconds peak_kib" (the peak of any one process).
measure() {
  local log=$work/time.log
  /usr/bin/time -f "%U %S %M" -o "$log" taskset -c 0 "$@" >/dev/null
  awk '{ printf "%.3f %d\n", $1 + $2, $3 }' "$log"
}

vips_run() {
  for f in "${inputs[@]}"; do
    local stem; stem=$(basename "$f" .jpg)
    vipsthumbnail "$f" --size 1600 -o "$work/vips/${stem}-1600.jpg[Q=80,strip]"
    vipsthumbnail "$f" --size 320 -o "$work/vips/${stem}-320.jpg[Q=80,strip]"
  done
}
export -f vips_run
export work
export inputs_list="${inputs[*]}"

# One warm-up pass each so both read their inputs from the page cache.
"$bin/transcode-files" "$work/courier" "${inputs[@]}"
vips_run

read -r vips_cpu vips_peak < <(measure bash -c 'inputs=($inputs_list); vips_run')
read -r courier_cpu courier_peak < <(measure "$bin/transcode-files" "$work/courier" "${inputs[@]}")
"$bin/transcode-files" --worker "$bin/courier" "$work/sandboxed" "${inputs[@]}" >/dev/null
/usr/bin/time -f "%U %S" -o "$work/time.log" taskset -c 0 \
  "$bin/transcode-files" --worker "$bin/courier" "$work/sandboxed" "${inputs[@]}" >"$work/peaks"
sandboxed_cpu=$(awk '{ printf "%.3f", $1 + $2 }' "$work/time.log")
parent_peak=$(sed -n 's/.*parent_peak_kib=\([0-9]*\).*/\1/p' "$work/peaks")
worker_peak=$(sed -n 's/.*worker_peak_kib=\([0-9]*\).*/\1/p' "$work/peaks")

size() { du -cb "$@" | tail -1 | cut -f1; }
printf '\n%d inputs of ~12 MP (synthetic, q90), 1600 px + 320 px JPEG q80 each, one core\n\n' "$count"
row() { # name cpu peak-text dir
  printf '%-20s %12.3f %12.2f %12s %14d %14d\n' "$1" "$(awk "BEGIN { print $2 / $count }")" \
    "$(awk "BEGIN { print $count / $2 }")" "$3" "$(size "$4"/*-1600.jpg)" "$(size "$4"/*-320.jpg)"
}
printf '%-20s %12s %12s %12s %14s %14s\n' "" "CPU s/image" "images/CPU-s" "peak RSS" "1600px bytes" "320px bytes"
row vipsthumbnail "$vips_cpu" "$((vips_peak / 1024)) MiB" "$work/vips"
row "courier in-process" "$courier_cpu" "$((courier_peak / 1024)) MiB" "$work/courier"
row "courier sandboxed" "$sandboxed_cpu" "$((worker_peak / 1024)) MiB" "$work/sandboxed"
printf '\n(sandboxed: peak RSS is the worker process; the parent that stages, checks and rehashes peaked at %d MiB)\n' \
  $((parent_peak / 1024))
