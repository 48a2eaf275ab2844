//! End-to-end: several `tether serve --cluster` nodes on loopback sharing presence and
//! routing through a real `redis-server` on a private port (docs/CLUSTER.md). Clients are the
//! `tether` library's `Client`. Timing bounds are loose and two-sided.
//!
//! Without `redis-server` every test prints `SKIP: <test>: redis-server not installed` and
//! returns (scripts/test installs it as root and counts those lines as skipped).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tether::{BackoffConfig, Client, ClientConfig, ClientEvent};

const BIN: &str = env!("CARGO_BIN_EXE_tether");

/// A private `redis-server`, killed (by its pid) when dropped.
struct Redis {
    child: Child,
    port: u16,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Redis {
    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts one on a free port; `None` when redis-server is not installed.
    fn start() -> Option<Redis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Redis::on(port)
    }

    fn on(port: u16) -> Option<Redis> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let r = Redis { child, port };
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "redis-server did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(r)
    }
}

/// The redis-server of a test, or a SKIP line and return.
macro_rules! redis_or_skip {
    ($name:literal) => {
        match Redis::start() {
            Some(r) => r,
            None => {
                println!(concat!("SKIP: ", $name, ": redis-server not installed"));
                return;
            }
        }
    };
}

/// A running `tether serve --cluster`, killed (SIGKILL, by its pid) when dropped.
struct Node {
    child: Child,
    listen: SocketAddr,
    http: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the node said, for the failure's diagnosis.
            for l in self.log.lock().unwrap().iter() {
                eprintln!("node {}: {l}", self.http);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node(redis: &Redis, id: &str, dead_after: &str) -> Node {
    node_with(&redis.url(), id, dead_after, &[])
}

/// A node on the Redis at `url`, with `extra` flags.
fn node_with(url: &str, id: &str, dead_after: &str, extra: &[&str]) -> Node {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(["--detect-within", "3s", "--cluster", url, "--node-id", id])
        .args(["--cluster-dead-after", dead_after])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let keep = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            keep.lock().unwrap().push(line.clone());
            let _ = tx.send(line);
        }
    });
    let (mut listen, mut http) = (None, None);
    while listen.is_none() || http.is_none() {
        let l = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("serve printed its addresses");
        if let Some(a) = l.split("addr=").nth(1) {
            listen = a.split_whitespace().next().and_then(|a| a.parse().ok());
        }
        if l.contains("status-page") {
            if let Some(a) = l.split("http://").nth(1) {
                http = a.trim_end_matches('/').parse().ok();
            }
        }
    }
    Node {
        child,
        listen: listen.unwrap(),
        http: http.unwrap(),
        log,
    }
}

impl Node {
    fn logged(&self, what: &str) -> bool {
        self.count(what) > 0
    }

    /// Waits (10 s at most) for a log line: the node's stderr is read by a thread, a moment
    /// after what the line reports is visible through the API.
    fn wait_logged(&self, what: &str) -> bool {
        let t = Instant::now();
        while !self.logged(what) {
            if t.elapsed() > WITHIN {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    fn count(&self, what: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(what))
            .count()
    }
}

/// One API call: (status, JSON body).
async fn call(http: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let client = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{http}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("answered within 10 s")
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn get_text(http: SocketAddr, path: &str) -> String {
    let client = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = hyper::Request::builder()
        .uri(format!("http://{http}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("answered within 10 s")
        .unwrap();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// (state, node, reason) of a client as `http` sees it.
async fn seen(http: SocketAddr, id: &str) -> Option<(String, String, String)> {
    let (status, v) = call(http, "GET", &format!("/api/clients/{id}"), "").await;
    let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
    (status == 200).then(|| (s("state"), s("node"), s("reason")))
}

/// Waits until `http` sees `id` in `state` on `node`; returns how long that took.
async fn wait_seen(
    http: SocketAddr,
    id: &str,
    state: &str,
    node: &str,
    within: Duration,
) -> Duration {
    let t = Instant::now();
    loop {
        let s = seen(http, id).await;
        if s.as_ref()
            .is_some_and(|(st, n, _)| st == state && n == node)
        {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < within,
            "{http} never saw {id} {state} on {node} within {within:?} (last: {s:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every client `http` lists, as (id, state, node).
async fn listed(http: SocketAddr) -> Vec<(String, String, String)> {
    let (status, v) = call(http, "GET", "/api/clients?limit=1000", "").await;
    assert_eq!(status, 200, "{v}");
    v["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or("").to_owned();
            (s("id"), s("state"), s("node"))
        })
        .collect()
}

fn client(addr: SocketAddr, id: &str) -> Client {
    let mut cfg = ClientConfig::new(addr, id);
    cfg.backoff = BackoffConfig {
        base: Duration::from_millis(50),
        cap: Duration::from_millis(200),
        max_attempts: None,
    };
    Client::start(cfg)
}

/// Client → server: `c0`..`c{n-1}`, one every 10 ms.
fn send_numbered(phone: &Client, n: usize) -> tokio::task::JoinHandle<()> {
    let up = phone.sender();
    tokio::spawn(async move {
        for i in 0..n {
            up.send(Bytes::from(format!("c{i}"))).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

/// `POST /api/clients/phone/messages` with `text` on the node whose API is `http`.
async fn post_to_phone(http: SocketAddr, text: &str) -> (u16, Value) {
    call(
        http,
        "POST",
        "/api/clients/phone/messages",
        &serde_json::json!({ "text": text }).to_string(),
    )
    .await
}

async fn connected(c: &mut Client) {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), c.next_event())
            .await
            .expect("connected within 10 s")
        {
            Some(ClientEvent::Connected { .. }) => return,
            Some(ClientEvent::GaveUp { reason, .. }) => panic!("client gave up: {reason}"),
            Some(_) => {}
            None => panic!("client stopped"),
        }
    }
}

/// The client's next message within `within`, skipping connection events.
async fn next_message(c: &mut Client, within: Duration) -> Option<Bytes> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, c.next_event()).await {
            Ok(Some(ClientEvent::Message(m))) => return Some(m),
            Ok(Some(ClientEvent::GaveUp { reason, .. })) => panic!("client gave up: {reason}"),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return None,
        }
    }
}

const WITHIN: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_seen_from_every_node_with_its_node() {
    let redis = redis_or_skip!("presence_is_seen_from_every_node_with_its_node");
    let (a, b, c) = (
        node(&redis, "a", "3s"),
        node(&redis, "b", "3s"),
        node(&redis, "c", "3s"),
    );
    let mut pa = client(a.listen, "phone-a");
    let mut pb = client(b.listen, "phone-b");
    connected(&mut pa).await;
    connected(&mut pb).await;
    for n in [&a, &b, &c] {
        wait_seen(n.http, "phone-a", "online", "a", WITHIN).await;
        wait_seen(n.http, "phone-b", "online", "b", WITHIN).await;
    }
    let on_c = listed(c.http).await;
    assert!(
        on_c.contains(&("phone-a".into(), "online".into(), "a".into())),
        "{on_c:?}"
    );
    assert!(
        on_c.contains(&("phone-b".into(), "online".into(), "b".into())),
        "{on_c:?}"
    );
    // The status page shows the node too.
    // The cluster line counts the nodes at c's last heartbeat (every second here).
    let t = Instant::now();
    let mut page = get_text(c.http, "/").await;
    while !page.contains("this is node c · Redis up · 3 nodes alive") {
        assert!(t.elapsed() < WITHIN, "status page without the cluster line");
        tokio::time::sleep(Duration::from_millis(50)).await;
        page = get_text(c.http, "/").await;
    }
    assert!(
        page.contains("on a</span>") && page.contains("on b</span>"),
        "status page without nodes"
    );
    // A transition travels too: phone-a leaves, every node sees it gone from online.
    pa.close();
    let t = Instant::now();
    loop {
        let s = seen(c.http, "phone-a").await.unwrap();
        if s.0 != "online" && s.0 != "suspect" {
            assert_eq!(s.1, "a", "{s:?}");
            break;
        }
        assert!(t.elapsed() < WITHIN, "c still sees phone-a {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(pb);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_send_and_close_on_b_reach_a_client_on_a_and_broadcast_reaches_every_node() {
    let redis = redis_or_skip!(
        "api_send_and_close_on_b_reach_a_client_on_a_and_broadcast_reaches_every_node"
    );
    let (a, b) = (node(&redis, "a", "3s"), node(&redis, "b", "3s"));
    let mut pa = client(a.listen, "phone-a");
    let mut pb = client(b.listen, "phone-b");
    connected(&mut pa).await;
    connected(&mut pb).await;
    wait_seen(b.http, "phone-a", "online", "a", WITHIN).await;
    wait_seen(a.http, "phone-b", "online", "b", WITHIN).await;

    for i in 0..20 {
        let (st, v) = call(
            b.http,
            "POST",
            "/api/clients/phone-a/messages",
            &serde_json::json!({ "text": format!("m{i}") }).to_string(),
        )
        .await;
        assert_eq!(st, 202, "{v}");
        assert_eq!(v["status"], "routed", "{v}");
        assert_eq!(v["node"], "a", "{v}");
    }
    for i in 0..20 {
        let m = next_message(&mut pa, WITHIN)
            .await
            .expect("routed message arrives");
        assert_eq!(m, Bytes::from(format!("m{i}")), "in order");
    }

    // A routed send retried with its Idempotency-Key (its first answer may have been lost:
    // a 503 after the response timeout for a send Redis ran) is answered as the first and
    // not routed again; another key is another message.
    for _ in 0..2 {
        let (st, v) = post_keyed(b.http, "phone-a", "keyed", "phone-a-1")
            .await
            .expect("an answer");
        assert_eq!(
            (st, &v["status"], &v["node"]),
            (202, &"routed".into(), &"a".into()),
            "{v}"
        );
    }
    let (st, v) = post_keyed(b.http, "phone-a", "next", "phone-a-2")
        .await
        .expect("an answer");
    assert_eq!(st, 202, "{v}");
    assert_eq!(
        next_message(&mut pa, WITHIN).await,
        Some(Bytes::from("keyed"))
    );
    assert_eq!(
        next_message(&mut pa, WITHIN).await,
        Some(Bytes::from("next")),
        "the retried key was delivered once"
    );

    let (st, v) = call(b.http, "POST", "/api/broadcast", r#"{"text":"all"}"#).await;
    assert_eq!(st, 202, "{v}");
    assert_eq!(v["cluster"], "published", "{v}");
    assert_eq!(
        next_message(&mut pb, WITHIN).await.unwrap(),
        Bytes::from("all")
    );
    assert_eq!(
        next_message(&mut pa, WITHIN).await.unwrap(),
        Bytes::from("all")
    );

    // An unknown client is still a 404 on any node.
    let (st, _) = call(
        b.http,
        "POST",
        "/api/clients/nobody/messages",
        r#"{"text":"x"}"#,
    )
    .await;
    assert_eq!(st, 404);

    let (st, v) = call(
        b.http,
        "POST",
        "/api/clients/phone-a/close",
        r#"{"code":1000,"reason":"bye"}"#,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["status"], "routed", "{v}");
    let t = Instant::now();
    loop {
        match tokio::time::timeout(WITHIN, pa.next_event())
            .await
            .expect("closed in time")
        {
            Some(ClientEvent::Disconnected { disconnect }) => {
                assert!(
                    disconnect.reason.to_string().contains("bye"),
                    "{disconnect:?}"
                );
                break;
            }
            Some(ClientEvent::GaveUp { .. }) | None => break,
            Some(_) => {}
        }
        assert!(t.elapsed() < WITHIN);
    }
    assert!(a.wait_logged("phone-a"), "a logged its client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_node_marks_its_clients_node_lost_on_the_others_within_the_bound() {
    let redis = redis_or_skip!(
        "kill_9_of_a_node_marks_its_clients_node_lost_on_the_others_within_the_bound"
    );
    let mut a = node(&redis, "a", "2s");
    let b = node(&redis, "b", "2s");
    let c = node(&redis, "c", "2s");
    let ids: Vec<String> = (0..5).map(|i| format!("dev-{i}")).collect();
    let mut clients = Vec::new();
    for id in &ids {
        let mut cl = client(a.listen, id);
        connected(&mut cl).await;
        clients.push(cl);
    }
    let mut on_b = client(b.listen, "dev-b");
    connected(&mut on_b).await;
    for id in &ids {
        wait_seen(b.http, id, "online", "a", WITHIN).await;
        wait_seen(c.http, id, "online", "a", WITHIN).await;
    }
    // kill -9: no goodbye, no last write.
    a.child.kill().unwrap();
    let killed = Instant::now();
    let _ = a.child.wait();
    // Declared dead within dead_after (2 s) + one heartbeat period (0.67 s) after its last
    // heartbeat, which was at most one period before the kill: from 1.3 s to 2.7 s, plus
    // scheduling and polling slack.
    for id in &ids {
        wait_seen(b.http, id, "offline", "a", Duration::from_secs(6)).await;
    }
    let took = killed.elapsed();
    for n in [&b, &c] {
        for id in &ids {
            let (st, node, reason) = seen(n.http, id).await.unwrap();
            assert_eq!(
                (st.as_str(), node.as_str(), reason.as_str()),
                ("offline", "a", "node-lost")
            );
        }
    }
    assert!(
        took >= Duration::from_millis(1000) && took <= Duration::from_millis(4500),
        "node-lost after {took:?}, expected within 1.3–2.7 s (loose: 1–4.5 s)"
    );
    println!("node-lost after the kill: {took:?}");
    assert!(b.wait_logged("node-lost") || c.wait_logged("node-lost"));
    // The clients reconnect to b: online there, and nowhere twice.
    drop(clients);
    let mut moved = Vec::new();
    for id in &ids {
        let mut cl = client(b.listen, id);
        connected(&mut cl).await;
        moved.push(cl);
    }
    for id in &ids {
        wait_seen(c.http, id, "online", "b", WITHIN).await;
    }
    for n in [&b, &c] {
        let l = listed(n.http).await;
        let online: Vec<_> = l
            .iter()
            .filter(|(_, s, _)| s == "online" || s == "suspect")
            .collect();
        let mut seen_ids: Vec<&String> = online.iter().map(|(id, _, _)| id).collect();
        seen_ids.sort();
        seen_ids.dedup();
        assert_eq!(seen_ids.len(), online.len(), "a client online twice: {l:?}");
        assert!(online.iter().all(|(_, _, node)| node == "b"), "{l:?}");
        assert_eq!(online.len(), ids.len() + 1, "{l:?}");
    }
    drop(on_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_connects_on_b_while_online_on_a_is_online_on_b_only() {
    let redis = redis_or_skip!("a_client_that_connects_on_b_while_online_on_a_is_online_on_b_only");
    let (a, b) = (node(&redis, "a", "3s"), node(&redis, "b", "3s"));
    let mut old = client(a.listen, "phone");
    connected(&mut old).await;
    wait_seen(b.http, "phone", "online", "a", WITHIN).await;
    // The same id on b: the newest connection wins, a closes its old one with REPLACED.
    let mut new = client(b.listen, "phone");
    connected(&mut new).await;
    let t = Instant::now();
    loop {
        match tokio::time::timeout(WITHIN, old.next_event())
            .await
            .expect("old connection closed in time")
        {
            Some(ClientEvent::GaveUp { reason, .. }) => {
                assert!(reason.to_string().contains("replaced"), "{reason}");
                break;
            }
            Some(_) => {}
            None => break,
        }
        assert!(t.elapsed() < WITHIN);
    }
    for n in [&a, &b] {
        wait_seen(n.http, "phone", "online", "b", WITHIN).await;
    }
    // And it stays so: a's late writes for its old connection are fenced off.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for n in [&a, &b] {
        let l = listed(n.http).await;
        let phones: Vec<_> = l.iter().filter(|(id, _, _)| id == "phone").collect();
        assert_eq!(phones.len(), 1, "{l:?}");
        assert_eq!(
            (phones[0].1.as_str(), phones[0].2.as_str()),
            ("online", "b"),
            "{l:?}"
        );
    }
    assert!(
        a.wait_logged("cluster-replaced"),
        "a says why it closed the old connection"
    );
    // A message sent on a reaches the new connection on b.
    let (st, v) = post_to_phone(a.http, "hi").await;
    assert_eq!((st, v["node"].as_str()), (202, Some("b")), "{v}");
    assert_eq!(
        next_message(&mut new, WITHIN).await.unwrap(),
        Bytes::from("hi")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_keeps_local_clients_and_the_cluster_recovers_by_itself() {
    let redis = redis_or_skip!("redis_down_keeps_local_clients_and_the_cluster_recovers_by_itself");
    let port = redis.port;
    let (a, b) = (node(&redis, "a", "1500ms"), node(&redis, "b", "1500ms"));
    let mut pa = client(a.listen, "phone-a");
    connected(&mut pa).await;
    wait_seen(b.http, "phone-a", "online", "a", WITHIN).await;
    drop(redis); // SIGKILL: every key is gone with it (no persistence)
    let t = Instant::now();
    // The gauge, and the log line (read from the node's stderr a moment later).
    while !get_text(a.http, "/metrics")
        .await
        .contains("tether_cluster_redis_up 0")
        || !a.logged("cluster-degraded")
    {
        assert!(t.elapsed() < WITHIN, "a never said Redis is down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        get_text(a.http, "/")
            .await
            .contains("DEGRADED: Redis does not answer"),
        "the status page says the cluster is degraded"
    );
    // a still serves its own client.
    let (st, v) = call(
        a.http,
        "POST",
        "/api/clients/phone-a/messages",
        r#"{"text":"local"}"#,
    )
    .await;
    assert_eq!(st, 202, "{v}");
    assert_eq!(
        next_message(&mut pa, WITHIN).await.unwrap(),
        Bytes::from("local")
    );
    assert_eq!(seen(a.http, "phone-a").await.unwrap().0, "online");
    // Redis comes back empty: a re-claims what it holds, b sees it again.
    let _redis = Redis::on(port).expect("redis-server restarts");
    for n in [&a, &b] {
        let t = Instant::now();
        while n.count("cluster-up") < 2
            || !get_text(n.http, "/metrics")
                .await
                .contains("tether_cluster_redis_up 1")
        {
            assert!(t.elapsed() < WITHIN, "{} never said Redis is back", n.http);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The record is in the new Redis again (written by a's re-claim, not left from before).
    let t = Instant::now();
    loop {
        let out = Command::new("redis-cli")
            .args([
                "-p",
                &port.to_string(),
                "HGET",
                "tether:{tether}:clients",
                "phone-a",
            ])
            .output()
            .expect("redis-cli runs (it comes with redis-server)");
        let rec = String::from_utf8_lossy(&out.stdout).into_owned();
        if rec.contains("\"node\":\"a\"") && rec.contains("\"state\":\"online\"") {
            break;
        }
        assert!(t.elapsed() < WITHIN, "phone-a never re-claimed: {rec:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(a.wait_logged("cluster-reclaim"));
    wait_seen(b.http, "phone-a", "online", "a", WITHIN).await;
    let (st, v) = call(
        b.http,
        "POST",
        "/api/clients/phone-a/messages",
        r#"{"text":"again"}"#,
    )
    .await;
    assert_eq!((st, v["node"].as_str()), (202, Some("a")), "{v}");
    assert_eq!(
        next_message(&mut pa, WITHIN).await.unwrap(),
        Bytes::from("again")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_with_sigterm_releases_its_clients_at_once() {
    let redis = redis_or_skip!("a_node_stopped_with_sigterm_releases_its_clients_at_once");
    // A dead bound far longer than the test: only the orderly leave can explain what b sees.
    let (a, b) = (node(&redis, "a", "60s"), node(&redis, "b", "60s"));
    let mut pa = client(a.listen, "phone-a");
    connected(&mut pa).await;
    wait_seen(b.http, "phone-a", "online", "a", WITHIN).await;
    let pid = i32::try_from(a.child.id()).unwrap();
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let t = Instant::now();
    wait_seen(b.http, "phone-a", "offline", "a", Duration::from_secs(5)).await;
    let (_, _, reason) = seen(b.http, "phone-a").await.unwrap();
    assert_ne!(reason, "node-lost", "an orderly stop is not a lost node");
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(a.wait_logged("cluster-left"));
    drop(pa);
}

/// A load balancer in front of the nodes: forwards each new connection to the current
/// upstream; `switch` changes the upstream and drops the open connections (the node sees them
/// end without a goodbye, as when a node's link dies).
struct Lb {
    addr: SocketAddr,
    upstream: Arc<Mutex<SocketAddr>>,
    pipes: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Lb {
    fn drop(&mut self) {
        self.task.abort();
        for p in self.pipes.lock().unwrap().drain(..) {
            p.abort();
        }
    }
}

impl Lb {
    async fn start(upstream: SocketAddr) -> Lb {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let upstream = Arc::new(Mutex::new(upstream));
        let pipes: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (u, p) = (upstream.clone(), pipes.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut down, _)) = l.accept().await {
                let to = *u.lock().unwrap();
                p.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                }));
            }
        });
        Lb {
            addr,
            upstream,
            pipes,
            task,
        }
    }

    fn switch(&self, to: SocketAddr) {
        *self.upstream.lock().unwrap() = to;
        for p in self.pipes.lock().unwrap().drain(..) {
            p.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_moved_from_a_to_b_by_its_reconnect_resumes_exactly_once_both_ways() {
    let redis = redis_or_skip!(
        "a_client_moved_from_a_to_b_by_its_reconnect_resumes_exactly_once_both_ways"
    );
    const N: usize = 300;
    let (a, b) = (
        node_with(&redis.url(), "a", "3s", &["--echo"]),
        node_with(&redis.url(), "b", "3s", &["--echo"]),
    );
    let lb = Lb::start(a.listen).await;
    let mut phone = client(lb.addr, "phone");
    connected(&mut phone).await;
    wait_seen(b.http, "phone", "online", "a", WITHIN).await;

    // Client → server: numbered messages, echoed by whichever node holds the session.
    let ups = send_numbered(&phone, N);
    // Server → client: numbered API sends, always on node a (local before the move, routed
    // to b after it). A send in the hand-over window is refused explicitly (409/404);
    // every accepted one must arrive.
    let http_a = a.http;
    let downs = tokio::spawn(async move {
        let mut accepted = Vec::new();
        let mut refused = 0;
        for i in 0..N {
            let (st, v) = post_to_phone(http_a, &format!("s{i}")).await;
            match st {
                202 => accepted.push(i),
                404 | 409 | 503 => refused += 1,
                _ => panic!("s{i}: {st} {v}"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (accepted, refused)
    });

    let (mut echoes, mut downs_got) = (Vec::new(), Vec::new());
    let mut switched: Option<Instant> = None;
    let mut resumed_after = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while echoes.len() < N || !downs.is_finished() {
        if switched.is_none() && echoes.len() >= N / 3 {
            // The link to a dies; the balancer sends the reconnect to b.
            lb.switch(b.listen);
            switched = Some(Instant::now());
        }
        assert!(
            Instant::now() < deadline,
            "stuck: {} echoes, {} api messages",
            echoes.len(),
            downs_got.len()
        );
        match tokio::time::timeout(Duration::from_millis(200), phone.next_event()).await {
            Ok(Some(ClientEvent::Message(m))) => {
                let t = String::from_utf8(m.to_vec()).unwrap();
                let n: usize = t[1..].parse().unwrap();
                match &t[..1] {
                    "c" => echoes.push(n),
                    _ => downs_got.push(n),
                }
            }
            Ok(Some(ClientEvent::Resumed { .. })) => resumed_after = switched.map(|t| t.elapsed()),
            Ok(Some(ClientEvent::SessionLost { unacked })) => {
                panic!("session lost ({unacked:?})")
            }
            Ok(Some(ClientEvent::GaveUp { reason, .. })) => panic!("gave up: {reason}"),
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => panic!("client stopped"),
        }
    }
    ups.await.unwrap();
    let (accepted, refused) = downs.await.unwrap();
    // What is still on its way after the last API answer.
    while downs_got.len() < accepted.len() {
        match next_message(&mut phone, WITHIN).await {
            Some(m) => downs_got.push(String::from_utf8_lossy(&m)[1..].parse().unwrap()),
            None => break,
        }
    }
    assert_eq!(
        echoes,
        (0..N).collect::<Vec<_>>(),
        "client → server → client: no gap, no duplicate, in order"
    );
    assert_eq!(
        downs_got, accepted,
        "API → client: every accepted message once, in order"
    );
    assert!(
        refused <= N / 10,
        "{refused} API sends refused around the move"
    );
    let took = resumed_after.expect("the client resumed on b");
    println!(
        "resumed on b {took:?} after the cut; {} API sends accepted, {refused} refused in the window",
        accepted.len()
    );
    assert!(
        took >= Duration::from_millis(1) && took <= Duration::from_secs(3),
        "resume took {took:?}"
    );
    assert!(a.wait_logged("session-handed-over"), "a handed it over");
    assert!(b.wait_logged("session-taken-over"), "b took it over");
    assert!(!a.logged("session-lost") && !b.logged("session-lost"));
    for n in [&a, &b] {
        wait_seen(n.http, "phone", "online", "b", WITHIN).await;
    }
    // A send another node routed to a before it learnt of the move reaches a's inbox after
    // the hand-over: a forwards it to b.
    let mut con = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg("tether:{tether}:node:a:inbox")
        .arg("*")
        .arg("k")
        .arg("send")
        .arg("id")
        .arg("phone")
        .arg("p")
        .arg("late")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut phone, WITHIN).await,
        Some(Bytes::from("late")),
        "forwarded by a to b"
    );
    assert!(a.wait_logged("routed-send-forwarded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_of_a_session_nobody_holds_is_an_explicit_session_lost() {
    let redis = redis_or_skip!("a_resume_of_a_session_nobody_holds_is_an_explicit_session_lost");
    let (a, b) = (node(&redis, "a", "3s"), node(&redis, "b", "3s"));
    let lb = Lb::start(a.listen).await;
    let mut phone = client(lb.addr, "phone");
    connected(&mut phone).await;
    wait_seen(b.http, "phone", "online", "a", WITHIN).await;
    // Something the server has not acknowledged yet when a dies.
    phone.send(Bytes::from("up")).await.unwrap();
    // a is killed: b finds the holder gone (its take is never answered) and the client is
    // told so: session-lost, then a new session on b.
    drop(a);
    lb.switch(b.listen);
    let t = Instant::now();
    let mut lost = false;
    loop {
        match tokio::time::timeout(WITHIN, phone.next_event())
            .await
            .expect("events in time")
        {
            Some(ClientEvent::SessionLost { .. }) => lost = true,
            Some(ClientEvent::Connected { .. }) if lost => break,
            Some(ClientEvent::GaveUp { reason, .. }) => panic!("gave up: {reason}"),
            Some(_) => {}
            None => panic!("client stopped"),
        }
        assert!(
            t.elapsed() < WITHIN,
            "no session-lost and reconnect within {WITHIN:?}"
        );
    }
    let took = t.elapsed();
    // At most the fetch wait (a third of dead-after: 1 s) plus reconnects.
    assert!(
        took <= Duration::from_secs(4),
        "session-lost after {took:?}"
    );
    assert!(b.wait_logged("session-takeover-failed"));
    wait_seen(b.http, "phone", "online", "b", WITHIN).await;
    let (st, v) = post_to_phone(b.http, "two").await;
    assert_eq!(st, 202, "{v}");
    assert_eq!(
        next_message(&mut phone, WITHIN).await.unwrap(),
        Bytes::from("two")
    );
}

/// One metric's value from a node's `/metrics`.
async fn metric(n: &Node, name: &str) -> f64 {
    let text = get_text(n.http, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_cost_no_redis_writes_only_the_nodes_heartbeat() {
    let redis = redis_or_skip!("idle_clients_cost_no_redis_writes_only_the_nodes_heartbeat");
    let (a, b) = (node(&redis, "a", "1500ms"), node(&redis, "b", "1500ms"));
    let mut clients = Vec::new();
    for i in 0..40 {
        let mut c = client(a.listen, &format!("idle-{i}"));
        connected(&mut c).await;
        clients.push(c);
    }
    for i in 0..40 {
        wait_seen(b.http, &format!("idle-{i}"), "online", "a", WITHIN).await;
    }
    let writes = metric(&a, "tether_cluster_presence_writes_total").await;
    assert!(writes >= 40.0, "one claim per client at least: {writes}");
    let beats = metric(&a, "tether_cluster_heartbeats_total").await;
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = t.elapsed();
    // Nothing changed for the clients: no record written. The node heartbeats every 500 ms.
    assert_eq!(
        metric(&a, "tether_cluster_presence_writes_total").await,
        writes
    );
    let beats = metric(&a, "tether_cluster_heartbeats_total").await - beats;
    let expected = idle.as_secs_f64() / 0.5;
    assert!(
        beats >= expected - 2.0 && beats <= expected + 2.0,
        "{beats} heartbeats in {idle:?}, expected about {expected}"
    );
    drop(clients);
}

/// A private `redis-server` that speaks only TLS (`--port 0 --tls-port P`), with a
/// certificate from a CA made here and a password; `None` when redis-server is missing or
/// built without TLS. Files in `dir`: `ca.pem`, `password`.
fn redis_tls(dir: &std::path::Path) -> Option<Redis> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "cluster test ca");
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = p.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let srv = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("redis.crt"), srv.pem()).unwrap();
    std::fs::write(dir.join("redis.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("password"), "correct horse battery\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let f = |n: &str| dir.join(n).to_str().unwrap().to_owned();
    let mut child = Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args([
            "--tls-cert-file",
            &f("redis.crt"),
            "--tls-key-file",
            &f("redis.key"),
        ])
        .args([
            "--tls-ca-cert-file",
            &f("ca.pem"),
            "--tls-auth-clients",
            "no",
        ])
        .args(["--requirepass", "correct horse battery"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(_)) = child.try_wait() {
            return None; // built without TLS: it refuses --tls-port
        }
        assert!(t.elapsed() < WITHIN, "redis-server did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(Redis { child, port })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_and_a_password_file_forms_a_cluster() {
    let dir = std::env::temp_dir().join(format!("tether-cluster-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("SKIP: rediss_with_a_private_ca_and_a_password_file_forms_a_cluster: redis-server not installed");
        return;
    }
    let Some(redis) = redis_tls(&dir) else {
        println!("SKIP: rediss_with_a_private_ca_and_a_password_file_forms_a_cluster: redis-server has no TLS (--tls-port refused)");
        return;
    };
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let (ca, pw) = (
        dir.join("ca.pem").to_str().unwrap().to_owned(),
        dir.join("password").to_str().unwrap().to_owned(),
    );
    let secure = ["--cluster-ca", &ca, "--cluster-password-file", &pw];
    let a = node_with(&url, "a", "3s", &secure);
    let b = node_with(&url, "b", "3s", &secure);
    // The control: the right password but the system's roots, which do not know this CA.
    let untrusting = node_with(&url, "c", "3s", &["--cluster-password-file", &pw]);
    // And the right CA with no password.
    let no_password = node_with(&url, "d", "3s", &["--cluster-ca", &ca]);
    let mut phone = client(a.listen, "phone-tls");
    connected(&mut phone).await;
    let took = wait_seen(b.http, "phone-tls", "online", "a", WITHIN).await;
    assert!(took < WITHIN, "{took:?}");
    assert!(
        a.wait_logged("cluster-up"),
        "a never reached Redis over TLS"
    );
    assert!(
        untrusting.wait_logged("cluster-degraded"),
        "a node that does not trust Redis's certificate must not use it"
    );
    assert!(
        no_password.wait_logged("cluster-degraded"),
        "a node without the password must not use Redis"
    );
    for n in [&untrusting, &no_password] {
        assert!(!n.logged("cluster-up"), "{:?}", n.log.lock().unwrap());
        assert!(seen(n.http, "phone-tls").await.is_none());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_redis_beyond_loopback_needs_tls_and_a_password_or_insecure() {
    let run = |extra: &[&str]| {
        Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--http", "off"])
            .args(["--node-id", "a"])
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let plain = run(&["--cluster", "redis://192.0.2.7:6379"]);
    let err = String::from_utf8_lossy(&plain.stderr);
    assert_eq!(plain.status.code(), Some(2), "{err}");
    assert!(
        err.contains("rediss://")
            && err.contains("--cluster-password-file")
            && err.contains("--insecure"),
        "the refusal names what to add: {err}"
    );
    let dir = std::env::temp_dir().join(format!("tether-cluster-pw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pw"), "s3cret\n").unwrap();
    let pw = dir.join("pw").to_str().unwrap().to_owned();
    let tls_no_pw = run(&["--cluster", "rediss://192.0.2.7:6379"]);
    let err = String::from_utf8_lossy(&tls_no_pw.stderr);
    assert_eq!(tls_no_pw.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--cluster-password-file") && !err.contains("rediss://192"),
        "only the password is missing: {err}"
    );
    let ca_plain = run(&["--cluster", "redis://127.0.0.1:6379", "--cluster-ca", &pw]);
    let err = String::from_utf8_lossy(&ca_plain.stderr);
    assert_eq!(ca_plain.status.code(), Some(2), "{err}");
    assert!(err.contains("--cluster-ca"), "{err}");
    // With both, or with --insecure, it starts (and says Redis does not answer): it is killed
    // as soon as it listens.
    for extra in [
        vec![
            "--cluster",
            "rediss://192.0.2.7:6379",
            "--cluster-password-file",
            &pw,
        ],
        vec!["--cluster", "redis://192.0.2.7:6379", "--insecure"],
    ] {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--http", "off"])
            .args(["--node-id", "a"])
            .args(&extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = child.stderr.take().unwrap();
        let mut listening = false;
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if line.contains("listening") {
                listening = true;
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(listening, "{extra:?} must start");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// What a backend reads from one node's `GET /api/events` (NDJSON), until aborted:
/// `(node, event)` per line.
fn read_events(
    node: usize,
    http: SocketAddr,
    out: Arc<Mutex<Vec<(usize, Value)>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let mut last: Option<u64> = None;
        loop {
            let path = match last {
                Some(id) => format!("/api/events?format=ndjson&last_event_id={id}"),
                None => "/api/events?format=ndjson".to_owned(),
            };
            let req = hyper::Request::builder()
                .uri(format!("http://{http}{path}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let Ok(resp) = client.request(req).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let mut body = resp.into_body();
            let mut buf = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                buf.extend_from_slice(&data);
                while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    if let Ok(ev) = serde_json::from_slice::<Value>(&line) {
                        last = ev["id"].as_u64().or(last);
                        out.lock().unwrap().push((node, ev));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// The client messages a backend reading every node's events saw, de-duplicated only where
/// the documented key allows it: an event marked `replayed` (republished from a durable copy
/// by the node that restored the session) whose `(client, session, seq)` arrived before
/// with the same text is dropped; any other repeat of a key is a true duplicate (returned
/// apart).
fn client_messages(events: &[(usize, Value)], id: &str) -> (Vec<String>, Vec<String>) {
    let mut seen: std::collections::HashMap<(u64, u64), String> = Default::default();
    let (mut texts, mut dups) = (Vec::new(), Vec::new());
    for (node, ev) in events {
        if ev["type"] != "message" || ev["client_id"] != id {
            continue;
        }
        let key = (ev["session"].as_u64().unwrap(), ev["seq"].as_u64().unwrap());
        let text = ev["text"].as_str().unwrap_or("").to_owned();
        match seen.get(&key) {
            Some(t) if *t == text && ev["replayed"] == true => {}
            Some(t) => dups.push(format!("{key:?} {t} then {text} on node {node}")),
            None => {
                seen.insert(key, text.clone());
                texts.push(text);
            }
        }
    }
    (texts, dups)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_holder_mid_stream_resumes_from_the_durable_copy_exactly_once_both_ways() {
    let redis = redis_or_skip!(
        "kill_9_of_the_holder_mid_stream_resumes_from_the_durable_copy_exactly_once_both_ways"
    );
    const N: usize = 300;
    let a = node_with(&redis.url(), "a", "3s", &["--durable-sessions"]);
    let b = node_with(&redis.url(), "b", "3s", &["--durable-sessions"]);
    let events = Arc::new(Mutex::new(Vec::new()));
    let readers = [
        read_events(0, a.http, events.clone()),
        read_events(1, b.http, events.clone()),
    ];
    let lb = Lb::start(a.listen).await;
    let mut phone = client(lb.addr, "phone");
    connected(&mut phone).await;
    wait_seen(b.http, "phone", "online", "a", WITHIN).await;

    // Client → server: c0..c299 every 10 ms.
    let ups = send_numbered(&phone, N);
    // Server → client: s0..s299 through b's API (routed to a while a holds the client,
    // local after the resume), each retried until accepted: a 202 is the promise.
    let http_b = b.http;
    let downs = tokio::spawn(async move {
        let mut refused = std::collections::BTreeMap::<u16, usize>::new();
        let mut i = 0;
        while i < N {
            let (st, v) = post_to_phone(http_b, &format!("s{i}")).await;
            match st {
                202 => {
                    assert_eq!(v["durable"], true, "s{i}: {v}");
                    i += 1;
                }
                404 | 409 | 503 => *refused.entry(st).or_default() += 1,
                _ => panic!("s{i}: {st} {v}"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        refused
    });

    let (mut downs_got, mut killed, mut resumed_after) = (Vec::new(), None, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut a = Some(a);
    while downs_got.len() < N {
        if killed.is_none() && downs_got.len() >= N / 3 {
            // a dies mid-stream (SIGKILL); the balancer sends the reconnect to b.
            drop(a.take());
            lb.switch(b.listen);
            killed = Some(Instant::now());
        }
        assert!(
            Instant::now() < deadline,
            "stuck at {} messages",
            downs_got.len()
        );
        match tokio::time::timeout(Duration::from_millis(200), phone.next_event()).await {
            Ok(Some(ClientEvent::Message(m))) => {
                downs_got.push(String::from_utf8_lossy(&m)[1..].parse::<usize>().unwrap())
            }
            Ok(Some(ClientEvent::Resumed { .. })) => {
                resumed_after = resumed_after.or(killed.map(|t| t.elapsed()))
            }
            Ok(Some(ClientEvent::SessionLost { unacked })) => panic!("session lost ({unacked:?})"),
            Ok(Some(ClientEvent::GaveUp { reason, .. })) => panic!("gave up: {reason}"),
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => panic!("client stopped"),
        }
    }
    ups.await.unwrap();
    let refused = downs.await.unwrap();
    assert_eq!(
        downs_got,
        (0..N).collect::<Vec<_>>(),
        "API → client: every accepted number once, in order"
    );
    // Client → server: every number reaches a backend reading both nodes, once.
    let want: Vec<String> = (0..N).map(|i| format!("c{i}")).collect();
    let t = Instant::now();
    loop {
        let (texts, dups) = client_messages(&events.lock().unwrap(), "phone");
        assert!(dups.is_empty(), "true duplicates: {dups:?}");
        if texts == want {
            break;
        }
        assert!(
            t.elapsed() < WITHIN,
            "client → backend: {} of {N}, first differences: {:?}",
            texts.len(),
            texts
                .iter()
                .zip(&want)
                .filter(|(a, b)| a != b)
                .take(3)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let replayed = events
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, e)| e["replayed"] == true)
        .count();
    for r in readers {
        r.abort();
    }
    // A retry with the same Idempotency-Key is answered as the first, not sent again.
    let mut seqs = Vec::new();
    for _ in 0..2 {
        let client = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let req = hyper::Request::builder()
            .method("POST")
            .uri(format!("http://{}/api/clients/phone/messages", b.http))
            .header("idempotency-key", "once-1")
            .body(Full::new(Bytes::from("once")))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), 202);
        let v: Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        seqs.push(v["seq"].as_u64().unwrap());
    }
    assert_eq!(seqs[0], seqs[1], "the retry got the first answer");
    assert_eq!(
        next_message(&mut phone, WITHIN).await,
        Some(Bytes::from("once"))
    );
    assert_eq!(
        next_message(&mut phone, Duration::from_millis(300)).await,
        None,
        "delivered once"
    );
    let took = resumed_after.expect("the client resumed on b");
    println!(
        "durable: resumed on b {} ms after a's kill -9; {} client messages republished (replayed) by b; API sends refused while the client moved: {refused:?}",
        took.as_millis(),
        replayed
    );
    // b waits for a's answer to its take (a third of dead-after, 1 s), then restores:
    // measured 1.05-1.2 s.
    assert!(
        took >= Duration::from_millis(200) && took <= Duration::from_secs(4),
        "resume took {took:?}"
    );
    assert!(b.wait_logged("session-restored-durable"));
    assert!(!b.logged("session-lost"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_copy_over_its_bound_is_refused_with_an_explicit_session_lost() {
    let redis =
        redis_or_skip!("a_durable_copy_over_its_bound_is_refused_with_an_explicit_session_lost");
    let extra = ["--durable-sessions", "--durable-max-bytes", "1KiB"];
    let a = node_with(&redis.url(), "a", "3s", &extra);
    let b = node_with(&redis.url(), "b", "3s", &extra);
    let events = Arc::new(Mutex::new(Vec::new()));
    let reader = read_events(1, b.http, events.clone());
    let lb = Lb::start(a.listen).await;
    let mut phone = client(lb.addr, "phone");
    connected(&mut phone).await;
    wait_seen(b.http, "phone", "online", "a", WITHIN).await;
    let (st, v) = post_to_phone(a.http, "small").await;
    assert_eq!((st, &v["durable"]), (202, &Value::Bool(true)), "{v}");
    let big = "x".repeat(2000);
    let (st, v) = post_to_phone(a.http, &big).await;
    assert_eq!(st, 202, "{v}");
    assert_eq!(
        v["durable"], false,
        "past the bound the copy is incomplete: {v}"
    );
    assert_eq!(
        next_message(&mut phone, WITHIN).await,
        Some(Bytes::from("small"))
    );
    assert_eq!(
        next_message(&mut phone, WITHIN).await,
        Some(Bytes::from(big))
    );
    drop(a);
    lb.switch(b.listen);
    let t = Instant::now();
    let mut lost = None;
    loop {
        match tokio::time::timeout(WITHIN, phone.next_event())
            .await
            .expect("events in time")
        {
            Some(ClientEvent::SessionLost { unacked }) => lost = Some(unacked),
            Some(ClientEvent::Connected { .. }) if lost.is_some() => break,
            Some(ClientEvent::Resumed { .. }) => panic!("resumed from an incomplete copy"),
            Some(ClientEvent::GaveUp { reason, .. }) => panic!("gave up: {reason}"),
            Some(_) => {}
            None => panic!("client stopped"),
        }
    }
    let took = t.elapsed();
    assert!(b.wait_logged("session-restore-refused"));
    assert!(
        b.log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("session-restore-refused")
                && l.contains("over-bound")
                && l.contains("missing=\"1..=2\"")),
        "b names the numbers the copy cannot prove"
    );
    // The backend reading b learns it too: a session-lost naming server messages 1..=2.
    let t2 = Instant::now();
    loop {
        let named = events.lock().unwrap().iter().any(|(_, e)| {
            e["type"] == "session-lost"
                && e["client_id"] == "phone"
                && e["unacked"]["first"] == 1
                && e["unacked"]["last"] == 2
        });
        if named {
            break;
        }
        assert!(t2.elapsed() < WITHIN, "no session-lost event on b");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reader.abort();
    println!(
        "over-bound copy: session-lost {} ms after the kill",
        took.as_millis()
    );
    assert!(
        took <= Duration::from_secs(4),
        "session-lost after {took:?}"
    );
}

#[test]
fn durable_sessions_without_a_cluster_names_what_to_add() {
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--durable-sessions"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--cluster redis://HOST:PORT --node-id NAME"),
        "{err}"
    );
}

/// A TCP pipe to Redis that can be cut: while cut nothing passes either way — the bytes wait,
/// as when a partition drops packets that TCP retransmits — and when healed all of it passes,
/// in order (a command the node gave up on runs late).
struct Cut {
    port: u16,
    cut: Arc<tokio::sync::watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Cut {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Cut {
    async fn start(upstream: SocketAddr) -> Cut {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let cut = Arc::new(tokio::sync::watch::channel(false).0);
        let c = cut.clone();
        let task = tokio::spawn(async move {
            let mut pipes = tokio::task::JoinSet::new();
            while let Ok((down, _)) = l.accept().await {
                let Ok(up) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                // Each connection gets through again after its own delay, as TCP retransmits
                // on each connection's backed-off timer after a partition heals: the node's
                // first (its writes) 2.7 s after the heal, the others 1 s (so its reads, and
                // `cluster-up`, come back first, like the lab's slow recoveries).
                let lag = Duration::from_millis(if pipes.is_empty() { 2700 } else { 1000 });
                pipes.spawn(Cut::pipe(dr, uw, c.subscribe(), lag));
                pipes.spawn(Cut::pipe(ur, dw, c.subscribe(), Duration::ZERO));
            }
        });
        Cut { port, cut, task }
    }

    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut cut: tokio::sync::watch::Receiver<bool>,
        lag: Duration,
    ) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if *cut.borrow_and_update() {
                if cut.wait_for(|c| !*c).await.is_err() {
                    return;
                }
                tokio::time::sleep(lag).await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    fn set(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

/// A keyed API send: `None` when no answer came within 5 s.
async fn post_keyed(http: SocketAddr, id: &str, text: &str, key: &str) -> Option<(u16, Value)> {
    let client = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = hyper::Request::builder()
        .method("POST")
        .uri(format!("http://{http}/api/clients/{id}/messages"))
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from(
            serde_json::json!({ "text": text }).to_string(),
        )))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.ok()?.to_bytes();
    Some((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

/// The lab's partition on loopback: node a (5 clients, each streaming both ways) is cut off
/// from Redis past the dead bound three times — b reaps it, a re-claims after the heal —
/// while a backend posts 1, 2, … to each client, retrying each number with one
/// `Idempotency-Key` until a `202`. Every accepted number arrives once, in order: no `202`
/// for a send the client never gets, across appends that time out and run late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_sends_retried_with_one_key_across_a_cut_from_redis_arrive_exactly_once() {
    let redis = redis_or_skip!(
        "durable_sends_retried_with_one_key_across_a_cut_from_redis_arrive_exactly_once"
    );
    const CLIENTS: usize = 5;
    const CUTS: usize = 3;
    let cut = Cut::start(([127, 0, 0, 1], redis.port).into()).await;
    let a = node_with(
        &format!("redis://127.0.0.1:{}", cut.port),
        "a",
        "3s",
        &["--durable-sessions"],
    );
    // b reaps a while a is cut off (a re-claims its clients after the heal).
    let b = node_with(&redis.url(), "b", "3s", &["--durable-sessions"]);
    let mut phones = Vec::new();
    for i in 0..CLIENTS {
        let mut c = client(a.listen, &format!("p{i}"));
        connected(&mut c).await;
        phones.push(c);
    }
    for i in 0..CLIENTS {
        wait_seen(b.http, &format!("p{i}"), "online", "a", WITHIN).await;
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, mut phone) in phones.into_iter().enumerate() {
        let id = format!("p{i}");
        let http = a.http;
        let (stop, done) = (stop.clone(), stop.clone());
        // Client → server: a number every 50 ms (its messages wait for the copy while a is
        // cut off).
        let up = phone.sender();
        let ups = tokio::spawn(async move {
            let mut n = 0u64;
            while let Ok(()) = up.send(Bytes::from(format!("c{n}"))).await {
                n += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        // The backend: 1, 2, … each retried with its key every 50 ms until a 202.
        let posts = tokio::spawn(async move {
            let mut accepted = Vec::new();
            let mut n = 1u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = post_keyed(http, &id, &n.to_string(), &format!("{id}-{n}")).await;
                if let Some((202, v)) = r {
                    accepted.push((n, v["session"].as_u64(), v["seq"].as_u64()));
                    n += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            accepted
        });
        let got = tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                match tokio::time::timeout(Duration::from_secs(1), phone.next_event()).await {
                    Ok(Some(ClientEvent::Message(m))) => {
                        got.push(String::from_utf8_lossy(&m).parse::<u64>().unwrap())
                    }
                    Ok(Some(ClientEvent::SessionLost { unacked })) => {
                        panic!("session lost ({unacked:?})")
                    }
                    Ok(Some(_)) => {}
                    Err(_) if !done.load(std::sync::atomic::Ordering::Relaxed) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            ups.abort();
            got
        });
        tasks.push((posts, got));
    }
    for _ in 0..CUTS {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        cut.set(true);
        // Past the dead bound: b reaps a; a re-claims after the heal.
        tokio::time::sleep(Duration::from_millis(4200)).await;
        cut.set(false);
        assert!(a.wait_logged("cluster-reclaim"));
    }
    tokio::time::sleep(Duration::from_millis(3000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut faults = Vec::new();
    for (i, (posts, got)) in tasks.into_iter().enumerate() {
        let accepted = posts.await.unwrap();
        let got = got.await.unwrap();
        let want: Vec<u64> = accepted.iter().map(|a| a.0).collect();
        if got != want {
            let missing: Vec<_> = accepted.iter().filter(|a| !got.contains(&a.0)).collect();
            faults.push(format!(
                "p{i}: accepted 1..={} but received {} (missing, with the 202's session/seq: {missing:?})",
                want.len(),
                got.len()
            ));
        }
    }
    let done: Vec<String> = a
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("durable-send-done"))
        .cloned()
        .collect();
    assert!(
        faults.is_empty(),
        "every accepted number once, in order: {faults:?}; answered from a record: {done:?}"
    );
    println!(
        "{CUTS} cuts of a from Redis past the dead bound: every accepted number arrived once, in order; {} sends answered from a record",
        done.len()
    );
}

/// `redis-cli -p PORT args…`: its output, trimmed.
fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("redis-cli runs (it comes with redis-server)");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// An append a node gave up on (Redis did not answer in time, the send was answered 503 and
/// not delivered) may run later and leave its `idem:` record, with the copy numbered past
/// it. A retry with the same key must not be answered `202` from that record: the number it
/// names was never given to a message, the client would never get it (the lab's gap inside
/// a session). The record is written here as such a late append leaves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_not_answered_from_the_record_of_a_send_that_was_not_delivered() {
    let redis =
        redis_or_skip!("a_retry_is_not_answered_from_the_record_of_a_send_that_was_not_delivered");
    let a = node_with(&redis.url(), "a", "3s", &["--durable-sessions"]);
    let mut phone = client(a.listen, "phone");
    connected(&mut phone).await;
    let (st, v) = call(
        a.http,
        "POST",
        "/api/clients/phone/messages",
        r#"{"text":"one"}"#,
    )
    .await;
    assert_eq!(st, 202, "{v}");
    let session = v["session"].as_u64().unwrap();
    let seq = v["seq"].as_u64().unwrap();
    assert_eq!(
        next_message(&mut phone, WITHIN).await,
        Some(Bytes::from("one"))
    );
    // What the late append of "two" (key k-2, number seq+1) left: its record, and the copy
    // numbered past it. The session never gave that number to any message.
    let next = seq + 1;
    redis_cli(
        redis.port,
        &[
            "SET",
            "tether:{tether}:idem:phone:k-2",
            &format!("{session}:{next}"),
        ],
    );
    redis_cli(
        redis.port,
        &[
            "HSET",
            "tether:{tether}:dur:phone",
            "next",
            &(next + 1).to_string(),
        ],
    );
    let mut seqs = Vec::new();
    for _ in 0..2 {
        let r = post_keyed(a.http, "phone", "two", "k-2").await;
        let (st, v) = r.expect("answered");
        assert_eq!(st, 202, "{v}");
        seqs.push((v["session"].as_u64(), v["seq"].as_u64()));
    }
    assert_eq!(
        next_message(&mut phone, WITHIN).await,
        Some(Bytes::from("two")),
        "a 202 is a promise: the retry was delivered, not answered from the stale record"
    );
    assert_eq!(seqs[0], (Some(session), Some(next)), "{seqs:?}");
    assert_eq!(
        seqs[0], seqs[1],
        "the second retry is answered as the first"
    );
    assert_eq!(
        next_message(&mut phone, Duration::from_millis(300)).await,
        None,
        "delivered once"
    );
    assert!(a.wait_logged("durable-send-stale-record"));
    // The copy is whole again: numbered up to what the session gave.
    assert_eq!(
        redis_cli(redis.port, &["HGET", "tether:{tether}:dur:phone", "next"]),
        (next + 1).to_string()
    );
}
