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
for i in range(count):
    s = socket.create_connection(("127.0.0.1", port))
    if i % 3 == 1:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    elif i % 3 == 2:
        s.sendall(b"PRI * HTTP/2.0\r\n")
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
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
print(f"sockets {count}: opened in {opened - started:.1f} s; all closed by the server after "
      f"{closed - started:.1f} s" + (f" ({left} still open after 300 s)" if left else ""))
print(f"{'':16} {'open fds':>9} {'RSS KiB':>9}")
print(f"{'before':16} {fds0:>9} {rss0:>9}")
print(f"{'sockets open':16} {fds1:>9} {rss1:>9}")
print(f"{'after':16} {fds2:>9} {rss2:>9}")
print(f"per socket: {(rss1 - rss0) * 1024 / count:.0f} bytes of RSS")
EOF
