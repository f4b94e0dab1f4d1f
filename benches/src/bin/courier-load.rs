//! `courier-load`: a load generator for the messaging gateway.
//!
//! Starts `courier serve` on loopback with a fresh data dir (or uses `--server` with its
//! `--data-dir`), links one device per simulated user, pairs users in direct conversations, opens
//! one WebSocket per device, measures the server's memory per idle connection, then sends
//! `--messages` messages from one side of each pair to the other at `--rate` per second. Every
//! message is checked to arrive exactly once and in seq order; the report gives delivered msgs/s,
//! latency percentiles (send → receipt, on one clock) and the server's RSS per connection.
//! Exits non-zero if any message was lost, doubled or out of order.

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
    /// Use a running server at this base URL instead of starting one (needs --data-dir for its key).
    #[arg(long, requires = "data_dir")]
    server: Option<String>,
    /// Data dir of the server given with --server.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Extra `KEY=VALUE` environment for the started server (e.g. COURIER_CHAT__OUTBOUND_QUEUE=512).
    #[arg(long = "server-env")]
    server_env: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // One descriptor per connection on each side: take what the hard limit allows.
    let limit = rlimit::increase_nofile_limit(u64::MAX).context("raising the file descriptor limit")?;
    if (limit as usize) < args.connections + 64 {
        bail!("this process may open {limit} files; {} connections need more (see ulimit -Hn)", args.connections);
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(args))
}

struct Server {
    child: Option<Child>,
    base: String,
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
    if let (Some(base), Some(data_dir)) = (&args.server, &args.data_dir) {
        return Ok(Server { child: None, base: base.clone(), data_dir: data_dir.clone(), _temp: None });
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
    Ok(Server { child: Some(child), base, data_dir: temp.path().to_owned(), _temp: Some(temp) })
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
}

async fn run(args: Args) -> anyhow::Result<()> {
    let server = start_server(&args)?;
    let pid = server.child.as_ref().map(Child::id);
    let http = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
    let key: types::Secret = std::fs::read_to_string(server.data_dir.join("token-signing.key"))?.trim().parse()?;
    let keys = TokenKeys::new(&key);
    let n = args.connections & !1;
    if n < 2 {
        bail!("--connections must be at least 2");
    }

    // Devices, and a direct conversation per pair.
    let setup = Instant::now();
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let devices = (0..n).map(|i| {
        let user_token = keys.mint(&format!("load{i}").parse::<UserId>().expect("valid id"), now, 86_400);
        ("/v1/devices", user_token, json!({"name": "load"}))
    });
    let tokens = post_all(&http, &server.base, devices.collect(), "access_token").await?;
    let pairs = (0..n / 2).map(|p| {
        let body = json!({"type": "direct", "members": [format!("load{}", 2 * p + 1)]});
        ("/v1/conversations", tokens[2 * p].clone(), body)
    });
    let conversations = post_all(&http, &server.base, pairs.collect(), "id").await?;
    eprintln!("set up {n} devices and {} conversations in {:.1?}", n / 2, setup.elapsed());

    // Connections.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = pid.map(rss).unwrap_or(0);
    let tally = Arc::new(Tally::default());
    let latencies = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?));
    let ws_base = server.base.replacen("http://", "ws://", 1);
    let connect = Instant::now();
    let senders: Vec<mpsc::Sender<String>> = stream::iter(tokens.into_iter().enumerate())
        .map(|(i, token)| {
            let url = format!("{ws_base}/v1/ws?token={token}");
            let (tally, latencies) = (tally.clone(), latencies.clone());
            let conversation = conversations[i / 2].clone();
            async move {
                let (socket, _) = tokio_tungstenite::connect_async(&url).await?;
                let (tx, rx) = mpsc::channel(1024);
                tokio::spawn(connection(socket, rx, conversation, tally, latencies));
                anyhow::Ok(tx)
            }
        })
        .buffered(128)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    eprintln!("opened {n} connections in {:.1?}", connect.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_connected = pid.map(rss).unwrap_or(0);

    // Messages: from the even member of each pair to the odd one, round-robin over pairs.
    let filler = "x".repeat(args.body_bytes.saturating_sub(20));
    let start = Instant::now();
    let first_send_us = now_micros();
    let pairs = n / 2;
    for k in 0..args.messages {
        if args.rate > 0.0 {
            let due = start + Duration::from_secs_f64(k as f64 / args.rate);
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
        senders[2 * p].send(frame.to_string()).await.context("a connection task died")?;
    }
    let sent_in = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60);
    while tally.delivered.load(Ordering::Relaxed) < args.messages && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Receivers hand their latencies over every 100 ms.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let delivered = tally.delivered.load(Ordering::Relaxed);
    let span = Duration::from_micros(tally.last_delivery_us.load(Ordering::Relaxed).saturating_sub(first_send_us));
    let rss_end = pid.map(rss).unwrap_or(0);
    let h = latencies.lock().await;

    println!("connections:        {n}");
    println!("messages sent:      {} in {:.2?} (target {} msg/s)", args.messages, sent_in, args.rate);
    println!("delivered:          {delivered} ({} confirmed by `sent`)", tally.confirmed.load(Ordering::Relaxed));
    println!("delivered msg/s:    {:.0}", delivered as f64 / span.as_secs_f64());
    println!(
        "latency ms:         p50 {:.2}  p99 {:.2}  max {:.2}",
        h.value_at_quantile(0.50) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    );
    if pid.is_some() {
        println!(
            "server RSS:         {:.1} MiB idle before connecting, {:.1} MiB with {n} connections, {:.1} MiB at the end",
            rss_before as f64 / 1048576.0,
            rss_connected as f64 / 1048576.0,
            rss_end as f64 / 1048576.0
        );
        println!(
            "RSS per connection: {:.1} KiB",
            (rss_connected.saturating_sub(rss_before)) as f64 / n as f64 / 1024.0
        );
    }
    let (disorder, errors) = (tally.out_of_order.load(Ordering::Relaxed), tally.errors.load(Ordering::Relaxed));
    println!("out of order/dup:   {disorder}");
    println!("error frames:       {errors}");
    if delivered != args.messages || disorder != 0 || errors != 0 {
        bail!("delivery was not exactly once and in order");
    }
    Ok(())
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One device: writes what it is given, checks what it receives, and acks 100 ms after the first
/// unacknowledged message (an idle connection costs the generator no timer wake-ups).
async fn connection(
    socket: Socket,
    mut outgoing: mpsc::Receiver<String>,
    conversation: String,
    tally: Arc<Tally>,
    latencies: Arc<Mutex<Histogram<u64>>>,
) {
    let (mut sink, mut stream) = socket.split();
    let mut last_seq = 0i64;
    let mut acked = 0i64;
    let mut ack_at: Option<tokio::time::Instant> = None;
    let mut local = Vec::new();
    loop {
        tokio::select! {
            frame = outgoing.recv() => {
                let Some(frame) = frame else { break };
                if sink.send(WsMessage::text(frame)).await.is_err() {
                    break;
                }
            }
            incoming = stream.next() => {
                let Some(Ok(WsMessage::Text(text))) = incoming else {
                    if matches!(incoming, Some(Ok(_))) { continue }
                    break;
                };
                let Ok(frame) = serde_json::from_str::<Value>(text.as_str()) else { continue };
                match frame["type"].as_str() {
                    Some("message") => {
                        let now = now_micros();
                        let seq = frame["seq"].as_i64().unwrap_or(0);
                        if frame["conversation"] != conversation.as_str() || seq != last_seq + 1 {
                            tally.out_of_order.fetch_add(1, Ordering::Relaxed);
                        }
                        last_seq = last_seq.max(seq);
                        let sent_at = frame["body"]["text"].as_str().and_then(|t| t.split(' ').next()).and_then(|t| t.parse::<u64>().ok()).unwrap_or(now);
                        local.push(now.saturating_sub(sent_at).max(1));
                        tally.delivered.fetch_add(1, Ordering::Relaxed);
                        tally.last_delivery_us.fetch_max(now, Ordering::Relaxed);
                        ack_at.get_or_insert_with(|| tokio::time::Instant::now() + Duration::from_millis(100));
                    }
                    Some("sent") => {
                        tally.confirmed.fetch_add(1, Ordering::Relaxed);
                    }
                    Some("error") => {
                        tally.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
            _ = tokio::time::sleep_until(ack_at.unwrap_or_else(tokio::time::Instant::now)), if ack_at.is_some() => {
                ack_at = None;
                if !local.is_empty() {
                    let mut h = latencies.lock().await;
                    for v in local.drain(..) {
                        let _ = h.record(v);
                    }
                }
                if last_seq > acked {
                    let frame = json!({"type": "ack", "conversation": conversation, "seq": last_seq}).to_string();
                    if sink.send(WsMessage::text(frame)).await.is_err() {
                        break;
                    }
                    acked = last_seq;
                }
            }
        }
    }
}
