#!/usr/bin/env bash
# Courier's image pipeline against libvips' vipsthumbnail on the same 12 MP JPEGs, one core each.
#
# Both make a 1600 px and a 320 px JPEG (q80, metadata stripped) of every input. vipsthumbnail runs
# twice per input (once per size, as it makes one output per run); Courier decodes once and cascades.
# Prints CPU seconds per image, images per CPU-second, peak RSS and output sizes side by side.
#
# Usage: benches/compare/images.sh [COUNT]   (default 8 inputs; needs libvips-tools and GNU time)
set -euo pipefail
cd "$(dirname "$0")/../.."
count=${1:-8}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/courier-target}"
command -v vipsthumbnail >/dev/null || { echo "vipsthumbnail missing: apt-get install libvips-tools" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "/usr/bin/time missing: apt-get install time" >&2; exit 1; }

cargo build -q --release -p benches --bin make-image --bin transcode-files
bin="$CARGO_TARGET_DIR/release"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/in" "$work/vips" "$work/courier"
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

size() { du -cb "$@" | tail -1 | cut -f1; }
printf '\n%d inputs of ~12 MP (synthetic, q90), 1600 px + 320 px JPEG q80 each, one core\n\n' "$count"
printf '%-16s %12s %12s %12s %14s %14s\n' "" "CPU s/image" "images/CPU-s" "peak RSS" "1600px bytes" "320px bytes"
for side in vips courier; do
  cpu_var=${side}_cpu; peak_var=${side}_peak
  cpu=${!cpu_var}; peak=${!peak_var}
  printf '%-16s %12.3f %12.2f %9d MiB %14d %14d\n' "$([ $side = vips ] && echo vipsthumbnail || echo courier)" \
    "$(awk "BEGIN { print $cpu / $count }")" "$(awk "BEGIN { print $count / $cpu }")" $((peak / 1024)) \
    "$(size "$work/$side"/*-1600.jpg)" "$(size "$work/$side"/*-320.jpg)"
done
