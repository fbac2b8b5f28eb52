//! The load's SSE clients: a plain HTTP/1.1 request on a socket bound to a loopback source
//! address, and a line reader that looks only for frames of the harness's own events
//! (ids `L<phase>-<n>-<produce time in µs>`). A few KiB per connection, so the harness does
//! not run out of memory before the server does. The same client reads the engine's
//! `/api/v1/sse` (the event's id is a frame's `event_id`) and Centrifugo's `uni_sse` (the
//! event itself is a publication's data, its id under `id`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::now_us;

/// The scenarios whose events carry a produce time, in the order of [`Sample::phase`]
/// (`warmup`'s are counted but not reported).
pub const PHASES: &[&str] = &["steady", "burst", "max", "fanout", "emails", "warmup"];

/// One frame of one of the harness's events, as received.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Index into [`PHASES`].
    pub phase: u8,
    pub sent_us: u64,
    pub received_us: u64,
}

/// One connection to open.
pub struct Spec {
    pub server: SocketAddr,
    pub source: IpAddr,
    /// The request's path and query.
    pub target: String,
    /// Sent as `Authorization: Bearer …` when present.
    pub bearer: Option<String>,
}

/// Opens every connection (at most 256 handshakes at a time) and returns (held, failed)
/// once each has its first frame or failed. The held ones keep reading in the background
/// for the rest of the process.
pub async fn open_all(
    specs: Vec<Spec>,
    samples: mpsc::UnboundedSender<Sample>,
    frames: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
    reconnects: Arc<AtomicU64>,
) -> (usize, usize) {
    let gate = Arc::new(Semaphore::new(256));
    let mut ready = Vec::with_capacity(specs.len());
    for spec in specs {
        let (tx, rx) = oneshot::channel();
        let permit = gate.clone().acquire_owned().await.expect("never closed");
        let (samples, frames, failures, reconnects) = (
            samples.clone(),
            frames.clone(),
            failures.clone(),
            reconnects.clone(),
        );
        tokio::spawn(async move {
            let mut ready = Some((tx, permit));
            if let Err(e) = run(spec, &samples, &frames, &mut ready, &reconnects).await {
                failures.fetch_add(1, Ordering::Relaxed);
                if let Some((tx, _)) = ready.take() {
                    let _ = tx.send(Err(e));
                }
            }
        });
        ready.push(rx);
    }
    let (mut held, mut failed) = (0, 0);
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    for rx in ready {
        match rx.await {
            Ok(Ok(())) => held += 1,
            Ok(Err(e)) => {
                failed += 1;
                *reasons.entry(e.to_string()).or_default() += 1;
            }
            Err(_) => failed += 1,
        }
    }
    for (reason, n) in reasons {
        eprintln!("[load] {n} connections failed: {reason}");
    }
    (held, failed)
}

type Ready = Option<(
    oneshot::Sender<anyhow::Result<()>>,
    tokio::sync::OwnedSemaphorePermit,
)>;

/// Holds a stream open like a browser's `EventSource`: when the engine ends it, reconnects
/// with `Last-Event-ID` (counted in `reconnects`); fails only if the first attempt fails.
async fn run(
    spec: Spec,
    samples: &mpsc::UnboundedSender<Sample>,
    frames: &AtomicU64,
    ready: &mut Ready,
    reconnects: &AtomicU64,
) -> anyhow::Result<()> {
    let mut last_id = None;
    let mut busy = 0;
    loop {
        let ended = stream(&spec, samples, frames, ready, &mut last_id).await;
        if ready.is_some() {
            // Refused before it opened: a busy engine (503, 429) is asked again after a
            // pause, like the TypeScript client does; anything else fails the connection.
            let retry = ended.as_ref().is_err_and(|e| {
                let e = e.to_string();
                e.contains(" 503 ") || e.contains(" 429 ")
            });
            if retry && busy < 30 {
                busy += 1;
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
            return ended;
        }
        reconnects.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn stream(
    spec: &Spec,
    samples: &mpsc::UnboundedSender<Sample>,
    frames: &AtomicU64,
    ready: &mut Ready,
    last_id: &mut Option<String>,
) -> anyhow::Result<()> {
    let socket = match spec.source {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(spec.source, 0))?;
    let mut stream = socket.connect(spec.server).await?;
    stream.set_nodelay(true)?;
    let resume = last_id
        .as_ref()
        .map(|id| format!("Last-Event-ID: {id}\r\n"))
        .unwrap_or_default();
    let auth = spec
        .bearer
        .as_ref()
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n{auth}Accept: text/event-stream\r\n{resume}\r\n",
        spec.target, spec.server
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = vec![0u8; 4096];
    let mut line = Vec::with_capacity(256);
    let mut status_checked = false;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            anyhow::bail!("the engine closed the stream");
        }
        let received_us = now_us();
        for &b in &buf[..n] {
            if b != b'\n' {
                if line.len() < 64 * 1024 {
                    line.push(b);
                }
                continue;
            }
            if !status_checked {
                status_checked = true;
                if !line.starts_with(b"HTTP/1.1 200") {
                    anyhow::bail!("{}", String::from_utf8_lossy(&line).trim());
                }
            } else if line.starts_with(b":") || line.starts_with(b"id:") {
                // The hello (`: connected` with the cursor as id): the stream is open.
                if let Some((tx, _permit)) = ready.take() {
                    let _ = tx.send(Ok(()));
                }
                if let Some(id) = line.strip_prefix(b"id:") {
                    *last_id = Some(String::from_utf8_lossy(id).trim().to_owned());
                }
            } else if line.starts_with(b"data:") {
                // Centrifugo's stream opens with a frame (its connect reply), not a comment.
                if let Some((tx, _permit)) = ready.take() {
                    let _ = tx.send(Ok(()));
                }
                if let Some(sample) = sample_of(&line, received_us) {
                    frames.fetch_add(1, Ordering::Relaxed);
                    let _ = samples.send(sample);
                }
            }
            line.clear();
        }
    }
}

/// The sample a `data:` line carries, if it is one of the harness's events: an engine's
/// notification names it in `event_id`, a Centrifugo publication carries the event itself.
fn sample_of(line: &[u8], received_us: u64) -> Option<Sample> {
    let find = |key: &[u8]| {
        line.windows(key.len())
            .position(|w| w == key)
            .map(|at| at + key.len())
    };
    let at = find(b"\"event_id\":\"L").or_else(|| find(b"\"id\":\"L"))?;
    let rest = &line[at..];
    let end = rest.iter().position(|&b| b == b'"')?;
    let id = std::str::from_utf8(&rest[..end]).ok()?;
    let (phase, rest) = id.split_once('-')?;
    let sent_us: u64 = rest.rsplit_once('-')?.1.parse().ok()?;
    let phase = PHASES.iter().position(|p| *p == phase)? as u8;
    Some(Sample {
        phase,
        sent_us,
        received_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_produce_time_from_a_notification_frame() {
        let line =
            br#"data: {"id":3,"event_id":"Lburst-17-1764230000123456","title":"Payment received"}"#;
        let s = sample_of(line, 1_764_230_000_223_456).unwrap();
        assert_eq!(PHASES[s.phase as usize], "burst");
        assert_eq!(s.received_us - s.sent_us, 100_000);
        assert!(sample_of(br#"data: {"event_id":"e1"}"#, 0).is_none());
        let centrifugo = br#"data: {"push":{"channel":"load1.u2","pub":{"data":{"id":"Lsteady-9-1764230000000000","tenant":"load1","data":{"order_id":"A-9"}},"offset":4}}}"#;
        let s = sample_of(centrifugo, 1_764_230_000_001_000).unwrap();
        assert_eq!(PHASES[s.phase as usize], "steady");
        assert_eq!(s.received_us - s.sent_us, 1_000);
        assert!(sample_of(br#"data: {"connect":{"client":"c1","version":"6.9.1"}}"#, 0).is_none());
        assert!(sample_of(br#"data: {"event_id":"Lother-1-2"}"#, 0).is_none());
    }
}
