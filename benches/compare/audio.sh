#!/usr/bin/env bash
# Courier's audio pipeline against the ffmpeg CLI making the same voice note from the same file.
#
# Both decode a 10-minute stereo 44.1 kHz MP3, mix it to mono, resample to 48 kHz and encode Opus
# (VBR 28 kb/s, complexity 10, VoIP tuning) into Ogg. ffmpeg decodes with libavcodec and resamples
# with libswresample; Courier decodes with symphonia and resamples with rubato; both encode with
# the same libopus. Courier runs in a warm sandboxed `courier transcode-worker`, as `courier serve`
# runs voice notes (CPU counts both processes; peak RSS is the larger one's). Prints wall time, CPU
# time and peak RSS (median of RUNS runs) side by side.
#
# Usage: benches/compare/audio.sh [RUNS]   (default 3; needs ffmpeg and GNU time)
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-3}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/courier-target}"
command -v ffmpeg >/dev/null || { echo "ffmpeg missing: apt-get install ffmpeg" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "/usr/bin/time missing: apt-get install time" >&2; exit 1; }

cargo build -q --release -p benches --bin transcode-audio
cargo build -q --release --bin courier
bin="$CARGO_TARGET_DIR/release"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/ffmpeg" "$work/courier"

# Ten minutes of a voice-like signal: a wandering pitch with noise, stereo, as a phone's MP3.
ffmpeg -v error -y -f lavfi -i "aevalsrc=0.3*sin(2*PI*(180+60*sin(2*PI*0.7*t))*t)+0.05*(random(0)-0.5)|0.3*sin(2*PI*(181+60*sin(2*PI*0.7*t))*t):s=44100:d=600" \
  -c:a libmp3lame -b:a 128k "$work/in.mp3"

ffmpeg_cmd=(ffmpeg -v error -y -i "$work/in.mp3" -ac 1 -ar 48000 -c:a libopus -b:a 28k -vbr on
  -compression_level 10 -application voip "$work/ffmpeg/in.ogg")
courier_cmd=("$bin/transcode-audio" --worker "$bin/courier" "$work/courier" "$work/in.mp3")

# Runs "$@" RUNS times; prints the median run's "wall_s cpu_s peak_kib".
measure() {
  for _ in $(seq 1 "$runs"); do
    /usr/bin/time -f "%e %U %S %M" -o "$work/time.log" "$@" >/dev/null
    awk '{ printf "%.3f %.3f %d\n", $1, $2 + $3, $4 }' "$work/time.log"
  done | sort -n | awk -v n="$runs" 'NR == int((n + 1) / 2)'
}
"${ffmpeg_cmd[@]}" && "${courier_cmd[@]}"   # warm-up: input and binaries in the page cache
read -r f_wall f_cpu f_peak < <(measure "${ffmpeg_cmd[@]}")
read -r c_wall c_cpu c_peak < <(measure "${courier_cmd[@]}")

printf '\n10 min stereo 44.1 kHz MP3 -> mono 48 kHz Opus 28 kb/s in Ogg; median of %d runs\n\n' "$runs"
printf '%-10s %9s %9s %10s %12s %12s\n' "" "wall s" "CPU s" "peak RSS" "output bytes" "duration s"
for side in ffmpeg courier; do
  w=${side:0:1}_wall; c=${side:0:1}_cpu; p=${side:0:1}_peak
  out=$(ls "$work/$side"/*.ogg)
  dur=$(ffprobe -v error -show_entries format=duration -of csv=p=0 "$out")
  printf '%-10s %9.2f %9.2f %6d MiB %12d %12.3f\n' "$side" "${!w}" "${!c}" $((${!p} / 1024)) "$(stat -c %s "$out")" "$dur"
done
awk -v f="$f_wall" -v c="$c_wall" 'BEGIN { printf "\ncourier wall time vs ffmpeg: %+.1f %%\n", (c / f - 1) * 100 }'
