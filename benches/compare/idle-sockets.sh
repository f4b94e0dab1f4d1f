#!/usr/bin/env bash
# What 5,000 sockets that never finish a request cost `courier serve`, and how long it holds them:
# a third send nothing, a third half an HTTP/1.1 request, a third `PRI * HTTP/2.0\r\n` and then
# nothing. Prints the server's open descriptors and RSS before, with the sockets open, and after,
# and the seconds until the server had closed every one (its default 10 s first-request deadline).
#
#   benches/compare/idle-sockets.sh [SOCKETS]      COURIER_BIN=… to measure another build
set -euo pipefail
cd "$(dirname "$0")/../.."
SOCKETS="${1:-5000}"
TARGET="${CARGO_TARGET_DIR:-target}"
BIN="${COURIER_BIN:-$TARGET/release/courier}"
[ -x "$BIN" ] || cargo build --release --bin courier

work=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
port=$((20000 + RANDOM % 10000))
# Every socket comes from 127.0.0.1, so the per-address cap is lifted: this measures the deadline.
COURIER_LOG=warn COURIER_HTTP__MAX_CONNECTIONS_PER_ADDRESS=0 \
  "$BIN" serve --listen "127.0.0.1:$port" --data-dir "$work/data" > "$work/serve.out" &
server=$!
for _ in $(seq 1 100); do grep -q listening "$work/serve.out" 2>/dev/null && break; sleep 0.1; done

python3 - "$port" "$server" "$SOCKETS" <<'EOF'
import resource, selectors, socket, sys, time

port, pid, count = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

def server_state():
    import os
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:"))
    return fds, rss

fds0, rss0 = server_state()
sel = selectors.DefaultSelector()
started = time.monotonic()
socks = []
# Non-blocking connects in batches of 200 (the listen backlog holds 1,024), each batch waited for.
for first in range(0, count, 200):
    batch = []
    for _ in range(min(200, count - first)):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        batch.append(s)
    writable = selectors.DefaultSelector()
    for s in batch:
        writable.register(s, selectors.EVENT_WRITE)
    waiting = len(batch)
    deadline = time.monotonic() + 10
    while waiting and time.monotonic() < deadline:
        for key, _ in writable.select(timeout=1):
            writable.unregister(key.fileobj)
            waiting -= 1
    time.sleep(0.05)
    for s in batch:
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            socks.append(s)
        else:
            s.close()
for i, s in enumerate(socks):
    try:
        if i % 3 == 1:
            s.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        elif i % 3 == 2:
            s.send(b"PRI * HTTP/2.0\r\n")
    except OSError:
        pass
    sel.register(s, selectors.EVENT_READ)
count = len(socks)
opened = time.monotonic()
time.sleep(1)
fds1, rss1 = server_state()
left = count
while left and time.monotonic() - started < 300:
    for key, _ in sel.select(timeout=1):
        try:
            data = key.fileobj.recv(4096)
        except OSError:
            data = b""
        if not data:
            sel.unregister(key.fileobj)
            key.fileobj.close()
            left -= 1
closed = time.monotonic()
time.sleep(1)
fds2, rss2 = server_state()
print(f"sockets {count}: opened in {opened - started:.1f} s; the last closed by the server "
      f"{closed - opened:.1f} s after the last was opened" + (f" ({left} still open after 300 s)" if left else ""))
print(f"{'':16} {'open fds':>9} {'RSS KiB':>9}")
print(f"{'before':16} {fds0:>9} {rss0:>9}")
print(f"{'sockets open':16} {fds1:>9} {rss1:>9}")
print(f"{'after':16} {fds2:>9} {rss2:>9}")
held = fds1 - fds0
print(f"per socket held: {(rss1 - rss0) * 1024 / max(held, 1):.0f} bytes of RSS ({held} held when measured)")
EOF
