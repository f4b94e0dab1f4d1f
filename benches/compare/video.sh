#!/usr/bin/env bash
# Courier's video pipeline against the ffmpeg CLI making the same outputs from the same file.
#
# The input is a 30 s 1080p30 H.264 + AAC phone-like MP4. Both make a 1280×720 H.264 (High,
# yuv420p, CRF 23, preset veryfast, libx264's own thread count) + AAC 96 kb/s 48 kHz MP4 with the
# moov atom first, and a JPEG poster one second in. Courier is the sandboxed worker process `courier
# serve` runs a video job in (`courier transcode-worker`, driven by `transcode-video` as the server's
# pool drives it; the parent's CPU is counted too), which also runs its poster
# through the image pipeline (poster, thumb, preview) and hashes the outputs. Prints wall time,
# CPU time and peak RSS (median of RUNS runs) side by side.
#
# Usage: benches/compare/video.sh [RUNS] [SECONDS]   (default 3 runs of a 30 s input; needs ffmpeg, GNU time)
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-3}
secs=${2:-30}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/courier-target}"
command -v ffmpeg >/dev/null || { echo "ffmpeg missing: apt-get install ffmpeg" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "/usr/bin/time missing: apt-get install time" >&2; exit 1; }

cargo build -q --release -p server
cargo build -q --release -p benches --bin transcode-video
bin="$CARGO_TARGET_DIR/release"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/ffmpeg" "$work/courier"

ffmpeg -v error -y -f lavfi -i "testsrc2=size=1920x1080:rate=30:duration=$secs" \
  -f lavfi -i "sine=frequency=300:sample_rate=44100:duration=$secs" \
  -c:v libx264 -preset veryfast -crf 18 -pix_fmt yuv420p -c:a aac -b:a 128k "$work/in.mp4"

# The MP4, then the poster with an input seek (what a script around the CLI would run; a second
# output on the first command costs ffmpeg 5.1 about two seconds more).
ffmpeg_cmd=(sh -c "ffmpeg -v error -y -i '$work/in.mp4' \
  -vf scale=1280:720:flags=bicubic,setsar=1,format=yuv420p -c:v libx264 -preset veryfast -crf 23 -profile:v high \
  -c:a aac -b:a 96k -ar 48000 -movflags +faststart '$work/ffmpeg/standard.mp4' \
  && ffmpeg -v error -y -ss 1 -i '$work/in.mp4' -frames:v 1 -vf scale=1280:720:flags=bicubic -q:v 2 '$work/ffmpeg/poster.jpg'")
courier_cmd=("$bin/transcode-video" "$bin/courier" "$work/courier" "$work/in.mp4")

# Runs "$@" RUNS times; prints the median run's "wall_s cpu_s peak_kib".
measure() {
  for _ in $(seq 1 "$runs"); do
    /usr/bin/time -f "%e %U %S %M" -o "$work/time.log" "$@" >/dev/null
    awk '{ printf "%.3f %.3f %d\n", $1, $2 + $3, $4 }' "$work/time.log"
  done | sort -n | awk -v n="$runs" 'NR == int((n + 1) / 2)'
}
"${ffmpeg_cmd[@]}" && "${courier_cmd[@]}" >/dev/null   # warm-up: input and binaries in the page cache
read -r f_wall f_cpu f_peak < <(measure "${ffmpeg_cmd[@]}")
read -r c_wall c_cpu c_peak < <(measure "${courier_cmd[@]}")

printf '\n%d s 1080p30 H.264+AAC -> 720p H.264 CRF 23 veryfast + AAC 96k, faststart, + poster; median of %d runs\n\n' "$secs" "$runs"
printf '%-10s %9s %9s %10s %14s %12s\n' "" "wall s" "CPU s" "peak RSS" "MP4 bytes" "duration s"
for side in ffmpeg courier; do
  w=${side:0:1}_wall; c=${side:0:1}_cpu; p=${side:0:1}_peak
  out=$(ls "$work/$side"/*standard.mp4)
  dur=$(ffprobe -v error -show_entries format=duration -of csv=p=0 "$out")
  printf '%-10s %9.2f %9.2f %6d MiB %14d %12.3f\n' "$side" "${!w}" "${!c}" $((${!p} / 1024)) "$(stat -c %s "$out")" "$dur"
done
awk -v f="$f_wall" -v c="$c_wall" 'BEGIN { printf "\ncourier wall time vs ffmpeg: %+.1f %%\n", (c / f - 1) * 100 }'
