//! echo: round trips and pipelined throughput through a tether `Connection` and through plain
//! tokio + `LengthDelimitedCodec`, over loopback, in one process.
//!
//! Both servers echo each message back; both clients write from one task and read in another.
//! Latency: one message in flight. Throughput: `messages` sent back to back, timed until the
//! last echo arrives.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use futures::{FutureExt as _, SinkExt as _, StreamExt as _};
use serde::Serialize;
use tether::{Connection, Policy};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// One transport at one message size.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct EchoResult {
    pub(crate) transport: &'static str,
    pub(crate) size: usize,
    pub(crate) rtt_p50_us: f64,
    pub(crate) rtt_p99_us: f64,
    pub(crate) msgs_per_s: f64,
    pub(crate) mib_per_s: f64,
}

pub(crate) struct EchoOpts {
    pub(crate) rtt_samples: usize,
    pub(crate) messages: usize,
    pub(crate) rounds: usize,
    /// Also run tether over TLS (`tether+tls`).
    pub(crate) tls: bool,
}

/// The TLS pair for `tether+tls`: the test certificate of `tether_lab::test_tls`.
type Tls = Arc<(tether::tls::TlsServer, tether::tls::TlsClient)>;

fn tls_pair() -> anyhow::Result<Tls> {
    let dir = std::env::temp_dir().join(format!("tether-echo-tls-{}", std::process::id()));
    let f = tether_lab::test_tls::write(&dir)?;
    let server =
        tether::tls::TlsServer::from_files(tether::tls::ServerTlsFiles::new(f.cert, f.key))?;
    let client = tether::tls::TlsClient::new(&tether::tls::ClientTlsOptions {
        ca: Some(f.ca),
        server_name: Some(tether_lab::test_tls::SERVER_NAME.into()),
        ..Default::default()
    })?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Arc::new((server, client)))
}

fn policy() -> Policy {
    // Heartbeats are irrelevant while data flows; keep them out of the way.
    Policy::derive(Duration::from_secs(30), None).unwrap_or_default()
}

pub(crate) async fn run(opts: &EchoOpts) -> anyhow::Result<Vec<EchoResult>> {
    let mut out = Vec::new();
    for size in [64usize, 4096] {
        let msgs = if size >= 4096 {
            opts.messages / 8
        } else {
            opts.messages
        };
        let t = best_of(opts.rounds, || {
            tether_once(size, opts.rtt_samples, msgs, None)
        })
        .await?;
        let p = best_of(opts.rounds, || plain_once(size, opts.rtt_samples, msgs)).await?;
        out.push(t);
        out.push(p);
        if opts.tls {
            let tls = tls_pair()?;
            let s = best_of(opts.rounds, || {
                tether_once(size, opts.rtt_samples, msgs, Some(tls.clone()))
            })
            .await?;
            out.push(s);
        }
    }
    Ok(out)
}

/// Runs `f` `rounds` times and keeps the best throughput and the best p50 (noise on a shared
/// machine only ever makes a run slower).
async fn best_of<F, Fut>(rounds: usize, mut f: F) -> anyhow::Result<EchoResult>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<EchoResult>>,
{
    let mut best: Option<EchoResult> = None;
    for _ in 0..rounds.max(1) {
        let r = f().await?;
        best = Some(match best {
            None => r,
            Some(b) => {
                let mut m = if r.msgs_per_s > b.msgs_per_s {
                    r.clone()
                } else {
                    b.clone()
                };
                if r.rtt_p50_us < b.rtt_p50_us {
                    m.rtt_p50_us = r.rtt_p50_us;
                    m.rtt_p99_us = r.rtt_p99_us;
                } else {
                    m.rtt_p50_us = b.rtt_p50_us;
                    m.rtt_p99_us = b.rtt_p99_us;
                }
                m
            }
        });
    }
    best.context("no rounds")
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn result(
    transport: &'static str,
    size: usize,
    mut rtts: Vec<f64>,
    msgs: usize,
    took: Duration,
) -> EchoResult {
    rtts.sort_by(|a, b| a.total_cmp(b));
    let s = took.as_secs_f64();
    EchoResult {
        transport,
        size,
        rtt_p50_us: pct(&rtts, 0.5),
        rtt_p99_us: pct(&rtts, 0.99),
        msgs_per_s: msgs as f64 / s,
        mib_per_s: (msgs * size) as f64 / s / (1024.0 * 1024.0),
    }
}

async fn tether_once(
    size: usize,
    samples: usize,
    msgs: usize,
    tls: Option<Tls>,
) -> anyhow::Result<EchoResult> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server_tls = tls.clone();
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await?;
        let (mut conn, _) = match &server_tls {
            None => Connection::accept(s, &policy()).await?,
            Some(t) => {
                tether::sockopt::apply(&s, &policy())?;
                let s = t.0.accept(s).await?;
                Connection::accept_over(s, &policy(), &Default::default()).await?
            }
        };
        while let Ok(m) = conn.recv().await {
            if conn.send(m).await.is_err() {
                break;
            }
        }
        anyhow::Ok(())
    });
    let mut opts = tether::ConnectOptions::new("echo").policy(policy());
    if let Some(t) = &tls {
        opts = opts.tls(t.1.clone());
    }
    let mut conn = Connection::connect_with(addr, &opts).await?;
    let msg = Bytes::from(vec![0xa5; size]);
    let mut rtts = Vec::with_capacity(samples);
    for i in 0..samples + samples / 10 {
        let t = Instant::now();
        conn.send(msg.clone())
            .await
            .map_err(|d| anyhow::anyhow!("{}", d.reason))?;
        conn.recv()
            .await
            .map_err(|d| anyhow::anyhow!("{}", d.reason))?;
        if i >= samples / 10 {
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let tx = conn.sender();
    let t = Instant::now();
    let writer = tokio::spawn({
        let msg = msg.clone();
        async move {
            for _ in 0..msgs {
                if tx.send(msg.clone()).await.is_err() {
                    break;
                }
            }
        }
    });
    for _ in 0..msgs {
        conn.recv()
            .await
            .map_err(|d| anyhow::anyhow!("{}", d.reason))?;
    }
    let took = t.elapsed();
    writer.await?;
    drop(conn);
    let _ = server.await;
    let name = if tls.is_some() {
        "tether+tls"
    } else {
        "tether"
    };
    Ok(result(name, size, rtts, msgs, took))
}

async fn plain_once(size: usize, samples: usize, msgs: usize) -> anyhow::Result<EchoResult> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        let mut f = Framed::new(s, LengthDelimitedCodec::new());
        // Echo everything already received, then flush once (what a careful hand-written server
        // does; tether's driver batches writes the same way).
        while let Some(m) = f.next().await {
            f.feed(m?.freeze()).await?;
            while let Some(Some(m)) = f.next().now_or_never() {
                f.feed(m?.freeze()).await?;
            }
            futures::SinkExt::<Bytes>::flush(&mut f).await?;
        }
        anyhow::Ok(())
    });
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (mut tx, mut rx) = Framed::new(s, LengthDelimitedCodec::new()).split();
    let msg = Bytes::from(vec![0xa5; size]);
    let mut rtts = Vec::with_capacity(samples);
    for i in 0..samples + samples / 10 {
        let t = Instant::now();
        tx.send(msg.clone()).await?;
        rx.next().await.context("echo server went away")??;
        if i >= samples / 10 {
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let t = Instant::now();
    let writer = tokio::spawn({
        let msg = msg.clone();
        async move {
            for i in 0..msgs {
                tx.feed(msg.clone()).await?;
                if i % 64 == 63 {
                    tx.flush().await?;
                }
            }
            tx.flush().await?;
            anyhow::Ok(tx)
        }
    });
    for _ in 0..msgs {
        rx.next().await.context("echo server went away")??;
    }
    let took = t.elapsed();
    let tx = writer.await??;
    drop(tx.reunite(rx));
    let _ = server.await;
    Ok(result("tokio+LengthDelimited", size, rtts, msgs, took))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_transports_echo_every_message() {
        let opts = EchoOpts {
            rtt_samples: 50,
            messages: 2000,
            rounds: 1,
            tls: true,
        };
        let r = run(&opts).await.unwrap();
        assert_eq!(r.len(), 6);
        assert_eq!(r.iter().filter(|e| e.transport == "tether+tls").count(), 2);
        for e in &r {
            assert!(e.msgs_per_s > 0.0 && e.rtt_p50_us > 0.0, "{e:?}");
            assert!(e.rtt_p50_us <= e.rtt_p99_us, "{e:?}");
        }
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(pct(&v, 0.5), 51.0);
        assert_eq!(pct(&v, 0.99), 99.0);
        assert!(pct(&[], 0.5).is_nan());
    }
}
