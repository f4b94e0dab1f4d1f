//! Starting, stopping and talking to a real `courier serve`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use types::{BlobId, Secret, TokenKeys, UrlSigner, UserId};

pub(crate) fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

pub(crate) fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A running server. Killed (SIGKILL) when dropped; its data dir goes with the [`DataDir`].
pub(crate) struct Server {
    child: Child,
    pub(crate) base: String,
    pub(crate) data: PathBuf,
    pub(crate) http: reqwest::Client,
}

/// A temp data dir that outlives server restarts.
pub(crate) struct DataDir(tempfile::TempDir);

impl DataDir {
    pub(crate) fn new() -> Self {
        Self(tempfile::tempdir().unwrap())
    }

    pub(crate) fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Server {
    /// Starts `courier serve` on `data` with extra `COURIER_*` settings.
    pub(crate) fn start(data: &DataDir, env: &[(&str, &str)]) -> Self {
        Self::start_on(data, "127.0.0.1:0", env)
    }

    /// Starts `courier serve` on `listen` (a restart on the same address lets clients reconnect).
    pub(crate) fn start_on(data: &DataDir, listen: &str, env: &[(&str, &str)]) -> Self {
        Self::start_with(data, listen, &[], env)
    }

    /// [`Server::start_on`] with more flags.
    pub(crate) fn start_with(data: &DataDir, listen: &str, flags: &[&str], env: &[(&str, &str)]) -> Self {
        let mut args = vec!["serve".to_string(), "--listen".into(), listen.into(), "--data-dir".into()];
        args.push(data.path().display().to_string());
        args.extend(flags.iter().map(|f| f.to_string()));
        let (child, base) = spawn_courier(&args, env, "courier listening on ");
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        Self { child, base, data: data.path().to_owned(), http }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub(crate) fn token(&self, user: &str) -> String {
        let keys = TokenKeys::new(&self.key("token-signing.key"));
        keys.mint(&user.parse::<UserId>().unwrap(), now(), 3600)
    }

    pub(crate) fn key(&self, name: &str) -> Secret {
        std::fs::read_to_string(self.data.join(name)).unwrap().parse().unwrap()
    }

    pub(crate) fn signer(&self) -> UrlSigner {
        UrlSigner::new(&self.key("url-signing.key"))
    }

    pub(crate) async fn upload(&self, token: &str, mime: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.http
            .post(self.url("/v1/media"))
            .bearer_auth(token)
            .header("content-type", mime)
            .body(body)
            .send()
            .await
            .unwrap()
    }

    pub(crate) async fn media(&self, token: &str, id: &str) -> reqwest::Response {
        self.http.get(self.url(&format!("/v1/media/{id}"))).bearer_auth(token).send().await.unwrap()
    }

    /// Uploads and waits until the media is no longer processing; returns its JSON.
    pub(crate) async fn upload_ready(&self, token: &str, mime: &str, body: Vec<u8>) -> Value {
        let response = self.upload(token, mime, body).await;
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
        let created: Value = response.json().await.unwrap();
        self.wait_done(token, created["id"].as_str().unwrap()).await
    }

    pub(crate) async fn wait_done(&self, token: &str, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let media: Value = self.media(token, id).await.json().await.unwrap();
            if media["status"] != "processing" {
                return media;
            }
            assert!(Instant::now() < deadline, "media {id} still processing after a minute");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) async fn get(&self, path_and_query: &str) -> reqwest::Response {
        self.http.get(self.url(path_and_query)).send().await.unwrap()
    }

    /// Files under the data dir's `sub` folder, recursively.
    pub(crate) fn files_under(&self, sub: &str) -> Vec<PathBuf> {
        files_in(&self.data.join(sub))
    }

    /// The server's child processes (video workers), by pid.
    pub(crate) fn children(&self) -> Vec<u32> {
        let parent = self.child.id().to_string();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            // /proc/PID/stat: "pid (comm) state ppid …"; comm may hold spaces, so split after ')'.
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            let fields: Vec<&str> =
                stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
            if fields.get(1) == Some(&parent.as_str()) && fields.first() != Some(&"Z") {
                found.push(pid);
            }
        }
        found
    }

    /// The server's worker processes of pool `name` (`quick`, `video`, `probe`), by pid: those whose
    /// `--dir` is a folder named `{name}-N`.
    pub(crate) fn workers(&self, name: &str) -> Vec<u32> {
        let prefix = format!("{name}-");
        self.children()
            .into_iter()
            .filter(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
                args.windows(2).any(|pair| {
                    pair[0] == b"--dir"
                        && Path::new(std::str::from_utf8(pair[1]).unwrap_or_default())
                            .file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
                })
            })
            .collect()
    }

    pub(crate) async fn delete_media(&self, token: &str, id: &str) -> reqwest::Response {
        self.http.delete(self.url(&format!("/v1/media/{id}"))).bearer_auth(token).send().await.unwrap()
    }

    /// Uploads `body` as `mime` and checks the refusal: status, error code, a message.
    pub(crate) async fn refused(&self, mime: &str, body: impl Into<reqwest::Body>, status: u16, code: &str) {
        let response = self.upload(&self.token("mallory"), mime, body).await;
        assert_eq!(response.status(), status, "{mime} {code}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(!body["error"]["message"].as_str().unwrap().is_empty());
    }

    /// No blob, temp file, media record or job is left.
    pub(crate) async fn assert_nothing_left(&self) {
        assert_eq!(self.files_under("blobs"), Vec::<PathBuf>::new(), "a blob was left behind");
        assert_eq!(self.files_under("tmp"), Vec::<PathBuf>::new(), "a temp file was left behind");
        assert_eq!(self.count_rows("media").await, 0);
        assert_eq!(self.count_rows("jobs").await, 0);
    }

    pub(crate) async fn count_rows(&self, table: &str) -> i64 {
        self.count(&format!("SELECT COUNT(*) FROM {table}")).await
    }

    /// The one number `query` (a `SELECT COUNT(*) …`) gives on the server's embedded database.
    pub(crate) async fn count(&self, query: &str) -> i64 {
        let url = format!("sqlite://{}?mode=ro", self.data.join("courier.db").display());
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        let n = sqlx::query_scalar(query).fetch_one(&pool).await.unwrap();
        pool.close().await;
        n
    }

    pub(crate) fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status.
    pub(crate) fn terminate(mut self) -> std::process::ExitStatus {
        terminate(&mut self.child)
    }
}

/// Sends SIGTERM and waits (at most 30 s) for the process to exit.
fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "courier did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Files under `dir`, recursively; none when it does not exist.
pub(crate) fn files_in(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() { walk(&path, out) } else { out.push(path) }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out
}

/// Runs `courier ARGS…` with `env` and waits for the line that starts with `ready` and names the
/// address; returns the process and the base URL.
pub(crate) fn spawn_courier(args: &[String], env: &[(&str, &str)], ready: &str) -> (Child, String) {
    spawn_courier_via(&[], args, env, ready)
}

/// [`spawn_courier`] through `wrapper`, a program that runs the rest of its arguments in its own
/// process (`prlimit --nofile=64:`, say); empty for none.
pub(crate) fn spawn_courier_via(
    wrapper: &[&str],
    args: &[String],
    env: &[(&str, &str)],
    ready: &str,
) -> (Child, String) {
    let exe = env!("CARGO_BIN_EXE_courier");
    let mut command = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut command = Command::new(program);
            command.args(rest).arg(exe);
            command
        }
        None => Command::new(exe),
    };
    command
        .args(args)
        .env("COURIER_LOG", "warn")
        .env("COURIER_EDGE_LOG", "warn")
        // CI sets variables like this one for other suites; courier must not mistake them for settings.
        .env("COURIER_TEST_UNRELATED", "1")
        // Suites count originals after an upload: keep them (the lifecycle tests set 0 themselves).
        .env("COURIER_INGEST__KEEP_ORIGINALS_DAYS", "3650")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("starting courier");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("courier printed nothing").unwrap();
    let base = first.strip_prefix(ready).unwrap_or_else(|| panic!("unexpected: {first}")).to_owned();
    // Keep draining stdout so the process never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, base)
}

/// A running `courier edge`, killed when dropped.
pub(crate) struct Edge {
    child: Child,
    pub(crate) base: String,
    pub(crate) http: reqwest::Client,
}

impl Edge {
    /// An edge over `upstreams` with the URL key of `origin`, its disk tier in `cache`.
    pub(crate) fn start(origin: &Server, upstreams: &[&str], cache: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_with_key(&origin.data.join("url-signing.key"), upstreams, cache, env)
    }

    /// An edge with the URL key in the file `url_key`.
    pub(crate) fn start_with_key(url_key: &Path, upstreams: &[&str], cache: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_via(&[], url_key, upstreams, cache, env)
    }

    /// [`Edge::start_with_key`], run through `wrapper` (see [`spawn_courier_via`]).
    pub(crate) fn start_via(
        wrapper: &[&str],
        url_key: &Path,
        upstreams: &[&str],
        cache: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        let mut args = vec!["edge".to_string(), "--listen".into(), "127.0.0.1:0".into()];
        for upstream in upstreams {
            args.push("--upstream".into());
            args.push(upstream.to_string());
        }
        args.extend(["--cache-dir".into(), cache.display().to_string()]);
        args.extend(["--url-key".into(), url_key.display().to_string()]);
        let (child, base) = spawn_courier_via(wrapper, &args, env, "courier edge listening on ");
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        Self { child, base, http }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub(crate) async fn get(&self, path_and_query: &str) -> reqwest::Response {
        self.http.get(self.url(path_and_query)).send().await.unwrap()
    }

    pub(crate) fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status.
    pub(crate) fn terminate(mut self) -> std::process::ExitStatus {
        terminate(&mut self.child)
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One series of a Prometheus text page, such as `courier_blob_requests_total{status="200"}`; 0 if absent.
pub(crate) async fn metric(http: &reqwest::Client, base: &str, series: &str) -> f64 {
    let page = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    page.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

/// The bytes of a variant of `media`, fetched through its signed URL and checked against its blob.
pub(crate) async fn variant_bytes(server: &Server, media: &Value, name: &str) -> Vec<u8> {
    let variant = &media["variants"][name];
    let response = server.get(variant["url"].as_str().unwrap()).await;
    assert_eq!(response.status(), 200);
    let bytes = response.bytes().await.unwrap().to_vec();
    let blob: BlobId = variant["blob"].as_str().unwrap().parse().unwrap();
    assert!(blob.matches(&bytes), "served bytes do not match the variant's blob");
    assert_eq!(bytes.len() as u64, variant["bytes"].as_u64().unwrap());
    bytes
}

pub(crate) fn decode(bytes: &[u8]) -> image::RgbImage {
    image::load_from_memory_with_format(bytes, image::ImageFormat::Jpeg).expect("a JPEG").to_rgb8()
}

/// An empty schema on the test PostgreSQL server: a pool to inspect it, and a database URL whose
/// connections use it.
pub(crate) async fn fresh_schema(url: &str, schema: &str) -> (sqlx::PgPool, String) {
    let admin = sqlx::PgPool::connect(url).await.expect("COURIER_TEST_DATABASE_URL is set but unreachable");
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).execute(&admin).await.unwrap();
    sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&admin).await.unwrap();
    let separator = if url.contains('?') { '&' } else { '?' };
    (admin, format!("{url}{separator}options=-c%20search_path%3D{schema}"))
}
