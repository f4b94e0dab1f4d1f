//! `courier-load`: a load generator for the messaging gateway.
//!
//! Starts `courier serve` on loopback with a fresh data dir and no per-address connection cap (or
//! uses `--server` with its `--data-dir`), links one device per simulated user, pairs users in
//! direct conversations, opens one WebSocket per device, measures the server's memory per idle connection, then sends
//! `--messages` messages from one side of each pair to the other at `--rate` per second. Every
//! message is checked to arrive exactly once and in seq order; the report gives delivered msgs/s,
//! latency percentiles (send → receipt, on one clock) and the server's RSS per connection.
//! Exits non-zero if any message was lost, doubled or out of order.
//!
//! For a cluster: `--server` may repeat (running nodes sharing one token key, found in
//! `--data-dir`); device `i` connects to server `i mod n`, so with two servers every message
//! crosses from one node to the other. `--processes N` splits the connections, messages and rate
//! over N child processes of this tool (each process may hold only so many sockets), which set up
//! and connect their share, start sending together, and report back; latencies are merged. With
//! `--server-pid` for each server, the report gives the servers' memory per connection.
//!
//! With `--reconnect`, a device whose connection the server closes (4008 when it falls too far
//! behind, or any other close) connects again at once, replays from its acked cursor, skips what it
//! already had and sends again what was not confirmed (same client ids): the exactly-once check
//! then holds past saturation too, and the report counts the reconnects.

#![allow(clippy::print_stdout, reason = "the report is this tool's output")]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Parser;
use futures_util::{SinkExt, StreamExt, stream};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::{Mutex, mpsc};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use types::{TokenKeys, UserId};

#[derive(Parser, Debug)]
#[command(about = "Load-test Courier's WebSocket gateway: N connections, M messages at a target rate")]
struct Args {
    /// WebSocket connections (one device each; users are paired in direct conversations).
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Messages to send in all.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Target messages per second (0: as fast as the server confirms them).
    #[arg(long, default_value_t = 5000.0)]
    rate: f64,
    /// Bytes of text per message.
    #[arg(long, default_value_t = 64)]
    body_bytes: usize,
    /// The `courier` binary to start [default: next to this one].
    #[arg(long)]
    courier: Option<PathBuf>,
    /// Use running servers at these base URLs instead of starting one (needs --data-dir for their
    /// token key); may repeat: device i connects to server i mod n.
    #[arg(long, requires = "data_dir")]
    server: Vec<String>,
    /// A folder holding the servers' `token-signing.key`, with --server.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Process ids of the servers given with --server, to report their memory per connection.
    #[arg(long = "server-pid")]
    server_pid: Vec<u32>,
    /// Extra `KEY=VALUE` environment for the started server (e.g. COURIER_CHAT__OUTBOUND_QUEUE=512).
    #[arg(long = "server-env")]
    server_env: Vec<String>,
    /// Generator processes to split the work over (with --server).
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// Reconnect (and replay, and resend what was not confirmed) when the server closes a
    /// connection, instead of counting its messages lost.
    #[arg(long)]
    reconnect: bool,
    /// Which share a child process runs (set by the parent).
    #[arg(long, hide = true)]
    slice: Option<usize>,
    /// Where a child writes its outcome (set by the parent).
    #[arg(long, hide = true)]
    report: Option<PathBuf>,
}

impl Args {
    /// This process's connections, messages and rate.
    fn share(&self) -> (usize, u64, f64) {
        let p = self.processes.max(1);
        (self.connections / p, self.messages / p as u64, self.rate / p as f64)
    }

    /// The parent of several generator processes holds no connections itself.
    fn is_parent(&self) -> bool {
        self.processes > 1 && self.slice.is_none()
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if args.is_parent() {
        return runtime.block_on(parent(args));
    }
    // One descriptor per connection on each side: take what the hard limit allows.
    let limit = rlimit::increase_nofile_limit(u64::MAX).context("raising the file descriptor limit")?;
    let (connections, _, _) = args.share();
    if (limit as usize) < connections + 64 {
        bail!(
            "this process may open {limit} files; {connections} connections need more (see ulimit -Hn, or --processes)"
        );
    }
    runtime.block_on(run(args))
}

struct Server {
    child: Option<Child>,
    bases: Vec<String>,
    pids: Vec<u32>,
    data_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn start_server(args: &Args) -> anyhow::Result<Server> {
    if let (false, Some(data_dir)) = (args.server.is_empty(), &args.data_dir) {
        let (bases, pids) = (args.server.clone(), args.server_pid.clone());
        return Ok(Server { child: None, bases, pids, data_dir: data_dir.clone(), _temp: None });
    }
    let courier = match &args.courier {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("courier"),
    };
    let temp = tempfile::tempdir()?;
    let mut command = Command::new(&courier);
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(temp.path())
        .env("COURIER_LOG", "warn")
        // Every simulated device connects from 127.0.0.1: the per-address cap (256) is for
        // strangers, not for this generator. --server-env may set it back.
        .env("COURIER_HTTP__MAX_CONNECTIONS_PER_ADDRESS", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for pair in &args.server_env {
        let (k, v) = pair.split_once('=').context("--server-env takes KEY=VALUE")?;
        command.env(k, v);
    }
    let mut child = command.spawn().with_context(|| format!("starting {}", courier.display()))?;
    let mut out = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().context("no stdout")?));
    let first = out.next().context("courier printed nothing")??;
    let base = first.strip_prefix("courier listening on ").context("unexpected first line")?.to_owned();
    std::thread::spawn(move || for _ in out {});
    let pids = vec![child.id()];
    Ok(Server { child: Some(child), bases: vec![base], pids, data_dir: temp.path().to_owned(), _temp: Some(temp) })
}

/// POSTs each `(path, token, body)` to the server, 32 at a time, and returns the string `field` of
/// every answer, in order.
async fn post_all(
    http: &reqwest::Client,
    base: &str,
    requests: Vec<(&'static str, String, Value)>,
    field: &'static str,
) -> anyhow::Result<Vec<String>> {
    stream::iter(requests)
        .map(|(path, token, body)| async move {
            let answer: Value = http
                .post(format!("{base}{path}"))
                .bearer_auth(token)
                .json(&body)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            anyhow::Ok(answer[field].as_str().with_context(|| format!("no {field} from {path}"))?.to_owned())
        })
        .buffered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn now_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// What all receivers add up.
#[derive(Default)]
struct Tally {
    delivered: AtomicU64,
    confirmed: AtomicU64,
    out_of_order: AtomicU64,
    errors: AtomicU64,
    last_delivery_us: AtomicU64,
    reconnects: AtomicU64,
    /// Per conversation, the highest seq its receiver has had.
    last_seqs: std::sync::Mutex<std::collections::HashMap<String, i64>>,
}

/// What one generator process saw.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Outcome {
    connections: usize,
    messages: u64,
    sent_in_secs: f64,
    delivered: u64,
    confirmed: u64,
    out_of_order: u64,
    errors: u64,
    #[serde(default)]
    reconnects: u64,
    /// Conversations whose receiver did not end at the seq of the last message sent there.
    #[serde(default)]
    wrong_ends: u64,
    first_send_us: u64,
    last_delivery_us: u64,
    /// Send → receipt, microseconds, one per delivered message.
    latencies_us: Vec<u64>,
}

/// Total resident memory of `pids`.
fn rss_of(pids: &[u32]) -> u64 {
    pids.iter().map(|pid| rss(*pid)).sum()
}

async fn run(args: Args) -> anyhow::Result<()> {
    let server = start_server(&args)?;
    let (connections, messages, rate) = args.share();
    let http = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
    let key: types::Secret = std::fs::read_to_string(server.data_dir.join("token-signing.key"))?.trim().parse()?;
    let keys = TokenKeys::new(&key);
    let n = connections & !1;
    if n < 2 {
        bail!("--connections must be at least 2 per process");
    }
    let slice = args.slice.unwrap_or(0);
    let base = &server.bases[0];

    // Devices, and a direct conversation per pair.
    let setup = Instant::now();
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let user = |i: usize| format!("load-{slice}-{i}");
    let devices = (0..n).map(|i| {
        let user_token = keys.mint(&user(i).parse::<UserId>().expect("valid id"), now, 86_400);
        ("/v1/devices", user_token, json!({"name": "load"}))
    });
    let tokens = post_all(&http, base, devices.collect(), "access_token").await?;
    let pairs = (0..n / 2).map(|p| {
        let body = json!({"type": "direct", "members": [user(2 * p + 1)]});
        ("/v1/conversations", tokens[2 * p].clone(), body)
    });
    let conversations = post_all(&http, base, pairs.collect(), "id").await?;
    eprintln!("set up {n} devices and {} conversations in {:.1?}", n / 2, setup.elapsed());

    // Connections: device i to server i mod n, so with two servers each pair spans both.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_of(&server.pids);
    let tally = Arc::new(Tally::default());
    let latencies = Arc::new(Mutex::new(Vec::<u64>::new()));
    let ws_bases: Vec<String> = server.bases.iter().map(|b| b.replacen("http://", "ws://", 1)).collect();
    let connect = Instant::now();
    let senders: Vec<mpsc::Sender<(u64, String)>> = stream::iter(tokens.into_iter().enumerate())
        .map(|(i, token)| {
            let url = format!("{}/v1/ws?token={token}", ws_bases[i % ws_bases.len()]);
            let (tally, latencies) = (tally.clone(), latencies.clone());
            let conversation = conversations[i / 2].clone();
            let reconnect = args.reconnect;
            async move {
                let (socket, _) = tokio_tungstenite::connect_async(&url).await?;
                let (tx, rx) = mpsc::channel(1024);
                let device = Device { url, conversation, reconnect, tally, latencies };
                tokio::spawn(device.run(socket, rx));
                anyhow::Ok(tx)
            }
        })
        .buffered(128)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    eprintln!("opened {n} connections in {:.1?}", connect.elapsed());
    if args.slice.is_some() {
        // Ready: wait for the parent's go, so every process starts sending at once.
        println!("ready");
        use std::io::Write as _;
        std::io::stdout().flush()?;
        tokio::task::spawn_blocking(|| std::io::stdin().read_line(&mut String::new())).await??;
    } else {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let rss_connected = rss_of(&server.pids);

    // Messages: from the even member of each pair to the odd one, round-robin over pairs.
    let filler = "x".repeat(args.body_bytes.saturating_sub(20));
    let start = Instant::now();
    let first_send_us = now_micros();
    let pairs = n / 2;
    for k in 0..messages {
        if rate > 0.0 {
            let due = start + Duration::from_secs_f64(k as f64 / rate);
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
        }
        let p = (k as usize) % pairs;
        let frame = json!({
            "type": "send",
            "client_id": format!("m{k}"),
            "conversation": conversations[p],
            "body": {"text": format!("{} {filler}", now_micros())},
        });
        senders[2 * p].send((k, frame.to_string())).await.context("a connection task died")?;
    }
    let sent_in = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60);
    // Past saturation a sender may still be reconnecting to have its last sends confirmed.
    while (tally.delivered.load(Ordering::Relaxed) < messages || tally.confirmed.load(Ordering::Relaxed) < messages)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Receivers hand their latencies over every 100 ms.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Each conversation's log holds exactly the messages sent there: its receiver ends at that seq
    // (a message stored twice or lost shows here even when the totals balance).
    let wrong_ends = {
        let last_seqs = tally.last_seqs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        (0..pairs)
            .filter(|&p| {
                let sent = messages / pairs as u64 + u64::from((p as u64) < messages % pairs as u64);
                last_seqs.get(&conversations[p]).copied().unwrap_or(0) != sent as i64
            })
            .count() as u64
    };
    let outcome = Outcome {
        connections: n,
        messages,
        sent_in_secs: sent_in.as_secs_f64(),
        delivered: tally.delivered.load(Ordering::Relaxed),
        confirmed: tally.confirmed.load(Ordering::Relaxed),
        out_of_order: tally.out_of_order.load(Ordering::Relaxed),
        errors: tally.errors.load(Ordering::Relaxed),
        reconnects: tally.reconnects.load(Ordering::Relaxed),
        wrong_ends,
        first_send_us,
        last_delivery_us: tally.last_delivery_us.load(Ordering::Relaxed),
        latencies_us: std::mem::take(&mut *latencies.lock().await),
    };
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_vec(&outcome)?)?;
        return Ok(());
    }
    let memory = (!server.pids.is_empty()).then(|| (rss_before, rss_connected, rss_of(&server.pids)));
    report(&outcome, args.rate, memory)
}

/// Runs `--processes` children of this tool, each with its share, starts them sending together
/// and reports what they saw together.
async fn parent(args: Args) -> anyhow::Result<()> {
    let Some(data_dir) = &args.data_dir else { bail!("--processes needs running servers (--server, --data-dir)") };
    if args.server.is_empty() {
        bail!("--processes needs running servers (--server, --data-dir)");
    }
    let temp = tempfile::tempdir()?;
    let rss_before = rss_of(&args.server_pid);
    let mut children = Vec::new();
    for slice in 0..args.processes {
        let mut command = Command::new(std::env::current_exe()?);
        command
            .args(["--connections", &args.connections.to_string(), "--messages", &args.messages.to_string()])
            .args(["--rate", &args.rate.to_string(), "--body-bytes", &args.body_bytes.to_string()])
            .args(["--processes", &args.processes.to_string(), "--slice", &slice.to_string()])
            .args(args.reconnect.then_some("--reconnect"))
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--report")
            .arg(temp.path().join(format!("{slice}.json")))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for server in &args.server {
            command.args(["--server", server]);
        }
        let mut child = command.spawn().context("starting a generator process")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let ready = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).map(|_| line)
        });
        children.push((child, ready));
    }
    let mut running = Vec::new();
    for (child, ready) in children {
        let line = ready.await??;
        if line.trim() != "ready" {
            bail!("a generator process failed before it was ready");
        }
        running.push(child);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_connected = rss_of(&args.server_pid);
    for child in &mut running {
        use std::io::Write as _;
        writeln!(child.stdin.as_mut().context("no stdin")?, "go")?;
    }
    let mut total = Outcome { first_send_us: u64::MAX, ..Outcome::default() };
    for (slice, mut child) in running.into_iter().enumerate() {
        let status = tokio::task::spawn_blocking(move || child.wait()).await??;
        let part: Outcome = serde_json::from_slice(&std::fs::read(temp.path().join(format!("{slice}.json")))?)
            .with_context(|| format!("generator process {slice} ({status}) left no report"))?;
        total.connections += part.connections;
        total.messages += part.messages;
        total.sent_in_secs = total.sent_in_secs.max(part.sent_in_secs);
        total.delivered += part.delivered;
        total.confirmed += part.confirmed;
        total.out_of_order += part.out_of_order;
        total.errors += part.errors;
        total.reconnects += part.reconnects;
        total.wrong_ends += part.wrong_ends;
        total.first_send_us = total.first_send_us.min(part.first_send_us);
        total.last_delivery_us = total.last_delivery_us.max(part.last_delivery_us);
        total.latencies_us.extend(part.latencies_us);
    }
    let memory = (!args.server_pid.is_empty()).then(|| (rss_before, rss_connected, rss_of(&args.server_pid)));
    report(&total, args.rate, memory)
}

/// Prints what was measured; fails if anything was lost, doubled or out of order.
fn report(outcome: &Outcome, rate: f64, memory: Option<(u64, u64, u64)>) -> anyhow::Result<()> {
    let n = outcome.connections;
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for v in &outcome.latencies_us {
        let _ = h.record(*v);
    }
    let span = Duration::from_micros(outcome.last_delivery_us.saturating_sub(outcome.first_send_us));
    println!("connections:        {n}");
    println!("messages sent:      {} in {:.2}s (target {rate} msg/s)", outcome.messages, outcome.sent_in_secs);
    println!("delivered:          {} ({} confirmed by `sent`)", outcome.delivered, outcome.confirmed);
    println!("delivered msg/s:    {:.0}", outcome.delivered as f64 / span.as_secs_f64());
    println!(
        "latency ms:         p50 {:.2}  p99 {:.2}  max {:.2}",
        h.value_at_quantile(0.50) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    );
    if let Some((before, connected, end)) = memory {
        println!(
            "server RSS:         {:.1} MiB idle before connecting, {:.1} MiB with {n} connections, {:.1} MiB at the end",
            before as f64 / 1048576.0,
            connected as f64 / 1048576.0,
            end as f64 / 1048576.0
        );
        println!("RSS per connection: {:.1} KiB", (connected.saturating_sub(before)) as f64 / n as f64 / 1024.0);
    }
    println!("out of order/dup:   {}", outcome.out_of_order);
    println!("error frames:       {}", outcome.errors);
    println!("reconnects:         {}", outcome.reconnects);
    println!("wrong log ends:     {}", outcome.wrong_ends);
    if outcome.delivered != outcome.messages
        || outcome.confirmed != outcome.messages
        || outcome.out_of_order != 0
        || outcome.errors != 0
        || outcome.wrong_ends != 0
    {
        bail!("delivery was not exactly once and in order");
    }
    Ok(())
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One simulated device.
struct Device {
    url: String,
    conversation: String,
    /// Connect again when the server closes the connection (see `--reconnect`).
    reconnect: bool,
    tally: Arc<Tally>,
    latencies: Arc<Mutex<Vec<u64>>>,
}

/// What a device has seen, kept across its connections.
#[derive(Default)]
struct Seen {
    /// The highest seq delivered to the "application", in order.
    last_seq: i64,
    /// Where it stood when it last reconnected: the replay brings back what it had but had not
    /// acked, up to here, and only up to here may a seq come twice.
    replayed_upto: i64,
    acked: i64,
    /// Sends not yet confirmed by `sent`, by client id, in the order they were made.
    pending: std::collections::BTreeMap<u64, String>,
    /// Latencies not yet handed over.
    local: Vec<u64>,
}

impl Device {
    /// Runs connections until the generator is done (or, without `--reconnect`, until the first
    /// one ends).
    async fn run(self, socket: Socket, mut outgoing: mpsc::Receiver<(u64, String)>) {
        let mut seen = Seen::default();
        let mut socket = Some(socket);
        loop {
            let Some(current) = socket.take() else { break };
            let finished = self.connection(current, &mut outgoing, &mut seen).await;
            if finished || !self.reconnect {
                break;
            }
            seen.replayed_upto = seen.last_seq;
            // Closed by the server: connect again (the replay brings back what was not acked).
            loop {
                match tokio_tungstenite::connect_async(&self.url).await {
                    Ok((next, _)) => {
                        self.tally.reconnects.fetch_add(1, Ordering::Relaxed);
                        socket = Some(next);
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        if !seen.local.is_empty() {
            self.latencies.lock().await.append(&mut seen.local);
        }
    }

    /// One connection: sends again what is pending, writes what it is given, checks what it
    /// receives, and acks 100 ms after the first unacknowledged message (an idle connection costs
    /// the generator no timer wake-ups). Returns whether the generator is done with this device
    /// (`false`: the connection ended first).
    async fn connection(&self, socket: Socket, outgoing: &mut mpsc::Receiver<(u64, String)>, seen: &mut Seen) -> bool {
        let (mut sink, mut stream) = socket.split();
        for frame in seen.pending.values() {
            if sink.send(WsMessage::text(frame.clone())).await.is_err() {
                return false;
            }
        }
        let mut ack_at: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                frame = outgoing.recv() => {
                    let Some((k, frame)) = frame else { return true };
                    if self.reconnect {
                        seen.pending.insert(k, frame.clone());
                    }
                    if sink.send(WsMessage::text(frame)).await.is_err() {
                        return false;
                    }
                }
                incoming = stream.next() => {
                    let Some(Ok(WsMessage::Text(text))) = incoming else {
                        if matches!(incoming, Some(Ok(_))) { continue }
                        return false;
                    };
                    let Ok(frame) = serde_json::from_str::<Value>(text.as_str()) else { continue };
                    match frame["type"].as_str() {
                        Some("message") => {
                            let now = now_micros();
                            let seq = frame["seq"].as_i64().unwrap_or(0);
                            if frame["conversation"] == self.conversation.as_str() && seq <= seen.replayed_upto {
                                // Replayed after a reconnect: had already, not acked yet.
                                continue;
                            }
                            if frame["conversation"] != self.conversation.as_str() || seq != seen.last_seq + 1 {
                                self.tally.out_of_order.fetch_add(1, Ordering::Relaxed);
                            }
                            seen.last_seq = seen.last_seq.max(seq);
                            let sent_at = frame["body"]["text"].as_str().and_then(|t| t.split(' ').next()).and_then(|t| t.parse::<u64>().ok()).unwrap_or(now);
                            seen.local.push(now.saturating_sub(sent_at).max(1));
                            self.tally.delivered.fetch_add(1, Ordering::Relaxed);
                            self.tally.last_delivery_us.fetch_max(now, Ordering::Relaxed);
                            self.tally
                                .last_seqs
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .insert(self.conversation.clone(), seen.last_seq);
                            ack_at.get_or_insert_with(|| tokio::time::Instant::now() + Duration::from_millis(100));
                        }
                        Some("sent") => {
                            // A send made again after a reconnect may be confirmed twice.
                            let first = frame["client_id"].as_str().is_none_or(|c| {
                                !self.reconnect || seen.pending.remove(&number_of(c)).is_some()
                            });
                            if first {
                                self.tally.confirmed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Some("error") => {
                            self.tally.errors.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
                _ = tokio::time::sleep_until(ack_at.unwrap_or_else(tokio::time::Instant::now)), if ack_at.is_some() => {
                    ack_at = None;
                    if !seen.local.is_empty() {
                        self.latencies.lock().await.append(&mut seen.local);
                    }
                    if seen.last_seq > seen.acked {
                        let frame = json!({"type": "ack", "conversation": self.conversation, "seq": seen.last_seq}).to_string();
                        if sink.send(WsMessage::text(frame)).await.is_err() {
                            return false;
                        }
                        seen.acked = seen.last_seq;
                    }
                }
            }
        }
    }
}

/// The number in a client id (`m{k}`), which orders a device's sends.
fn number_of(client_id: &str) -> u64 {
    client_id.strip_prefix('m').and_then(|k| k.parse().ok()).unwrap_or(0)
}
