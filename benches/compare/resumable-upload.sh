#!/usr/bin/env bash
# Resumable uploads (tus, /v1/uploads) on loopback against the disk's raw write speed: one SIZE_MIB
# file sent in CHUNK_MIB PATCHes (each waits for its answer, as tus-js-client does) through to the
# last request's answer, beside `dd` writing as many bytes with fsync to the same filesystem. Then
# the server's RSS while OPEN uploads each have a PATCH streaming in (1 MiB of an 8 MiB body sent,
# the rest held back), against its RSS at rest.
#
#   benches/compare/resumable-upload.sh [SIZE_MIB] [CHUNK_MIB] [OPEN]   COURIER_BIN=… for another build
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZE_MIB="${1:-1024}"
CHUNK_MIB="${2:-8}"
OPEN="${3:-100}"
TARGET="${CARGO_TARGET_DIR:-target}"
BIN="${COURIER_BIN:-$TARGET/release/courier}"
[ -x "$BIN" ] || cargo build --release --bin courier

work=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}")
server=""
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$work"' EXIT

# The disk: as many bytes, in the same chunks, flushed to it, on the filesystem the server writes to.
start=$(date +%s.%N)
dd if=/dev/zero of="$work/dd.bin" bs="${CHUNK_MIB}M" count=$((SIZE_MIB / CHUNK_MIB)) conv=fsync status=none
end=$(date +%s.%N)
rm -f "$work/dd.bin"
dd_mibs=$(python3 -c "print(f'{$SIZE_MIB / ($end - $start):.0f}')")

# A file the sniff takes for an MP4 (an `ftyp` box), the rest pseudo-random (not all zeros).
python3 - "$work/video.mp4" "$SIZE_MIB" <<'EOF'
import random, sys
path, mib = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
block = rng.randbytes(1 << 20)
with open(path, "wb") as f:
    f.write(b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41")
    for i in range(mib):
        f.write(block[i % 997:] + block[: i % 997] if i else block[32:])
EOF

port=$((20000 + RANDOM % 10000))
limit=$(((SIZE_MIB + 16) * 1024 * 1024))
COURIER_LOG=warn \
  COURIER_INGEST__WAIT_FOR_READY_MS=0 \
  COURIER_INGEST__VIDEO__MAX_BYTES=$limit \
  COURIER_INGEST__QUOTA__BYTES_PER_DAY=$((limit * 4)) \
  COURIER_INGEST__QUOTA__BYTES_STORED=$((limit * 4)) \
  COURIER_INGEST__QUOTA__UPLOADS_AT_ONCE=$((OPEN + 1)) \
  COURIER_INGEST__MAX_CONCURRENT_UPLOADS=$((OPEN + 1)) \
  COURIER_INGEST__RESUMABLE_OPEN_PER_USER=$((OPEN + 2)) \
  COURIER_INGEST__RESUMABLE_OPEN_BYTES_PER_USER=$((limit * 4 + OPEN * 8 * 1024 * 1024)) \
  COURIER_HTTP__MAX_CONNECTIONS_PER_ADDRESS=0 \
  "$BIN" serve --listen "127.0.0.1:$port" --data-dir "$work/data" > "$work/serve.out" 2>&1 &
server=$!
for _ in $(seq 1 100); do grep -q listening "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
token=$("$BIN" token --data-dir "$work/data" --user bench)

python3 - "$port" "$server" "$token" "$work/video.mp4" "$CHUNK_MIB" "$OPEN" "$dd_mibs" <<'EOF'
import base64, http.client, mmap, os, socket, sys, time

port, pid, token, path, chunk_mib, open_count, dd_mibs = sys.argv[1:]
port, pid, chunk, open_count = int(port), int(pid), int(chunk_mib) << 20, int(open_count)
size = os.path.getsize(path)
auth = {"Authorization": f"Bearer {token}", "Tus-Resumable": "1.0.0"}
meta = "filetype " + base64.b64encode(b"video/mp4").decode()

def rss_kib():
    return next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:"))

def create(conn, length):
    conn.request("POST", "/v1/uploads", headers={**auth, "Upload-Length": str(length), "Upload-Metadata": meta})
    response = conn.getresponse()
    response.read()
    assert response.status == 201, response.status
    return response.getheader("Location")

conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
with open(path, "rb") as f:
    data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
location = create(conn, size)
started = time.monotonic()
offset = 0
while offset < size:
    body = memoryview(data)[offset : offset + chunk]
    headers = {**auth, "Content-Type": "application/offset+octet-stream", "Upload-Offset": str(offset)}
    conn.request("PATCH", location, body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    assert response.status == 204, (response.status, offset)
    offset = int(response.getheader("Upload-Offset"))
    body.release()
elapsed = time.monotonic() - started
status = response.getheader("Courier-Media-Status")
mibs = size / elapsed / (1 << 20)
print(f"upload: {size >> 20} MiB in {chunk >> 20} MiB PATCHes, {elapsed:.1f} s, {mibs:.0f} MiB/s "
      f"(last answer: {status}); dd with fsync: {dd_mibs} MiB/s; ratio {mibs / float(dd_mibs):.0%}")

# OPEN uploads, each with a PATCH under way: 1 MiB of an 8 MiB body sent, the rest held back.
time.sleep(2)
at_rest = rss_kib()
socks = []
for _ in range(open_count):
    target = create(conn, 8 << 20)
    s = socket.create_connection(("127.0.0.1", port))
    head = (f"PATCH {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nTus-Resumable: 1.0.0\r\n"
            f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\nContent-Length: {8 << 20}\r\n\r\n")
    s.sendall(head.encode() + bytes(data[: 1 << 20]))
    socks.append(s)
time.sleep(2)
held = rss_kib()
print(f"RSS: {at_rest / 1024:.0f} MiB at rest, {held / 1024:.0f} MiB with {open_count} PATCHes under way "
      f"({(held - at_rest) / open_count:.0f} KiB each)")
for s in socks:
    s.close()
EOF
