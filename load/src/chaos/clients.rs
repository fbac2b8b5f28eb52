//! SSE clients for a sample of users, each writing down every `notification` frame it was
//! given (its `id:`, the user's sequence number, and the event it came from). They behave as
//! browsers do on a bad day: they reconnect with `Last-Event-ID` at random moments and
//! whenever an engine dies, and some stop reading for seconds at a time (with a small receive
//! buffer; the engine's send buffer of 64 KiB holds a user's few frames a second for most
//! of a stall, so its write deadline seldom fires, and the report counts when it does). At
//! the end each reads until it has its user's latest notification.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Frame {
    /// Which connection of the client's (1, 2, …) delivered it.
    pub conn: u32,
    /// The frame's `id:`: the user's sequence number.
    pub id: u64,
    pub event_id: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Transcript {
    pub tenant: String,
    pub user: String,
    /// The position the first stream started at (its hello's `id:`): the transcript must
    /// hold every notification after it.
    pub start: Option<u64>,
    pub frames: Vec<Frame>,
    pub connects: u32,
    /// Connections refused (429, 503) or failed before their hello, tried again.
    pub refused: u32,
    /// Times it stopped reading.
    pub stalls: u32,
    /// Stalled connections the server ended (its write timeout, or an engine that died).
    #[serde(default)]
    pub cut_off: u32,
    /// Whether it reached its user's latest notification at the end.
    pub caught_up: bool,
}

/// What every client is told: keep going, or catch up to these positions and stop.
pub type Targets = Option<Arc<HashMap<(String, String), u64>>>;

pub struct Client {
    pub tenant: String,
    pub user: String,
    pub token: String,
    pub ports: Arc<Vec<u16>>,
    pub seed: u64,
    pub staller: bool,
    /// Mean time between the client's own reconnects.
    pub reconnect_every: Duration,
}

impl Client {
    pub async fn run(self, mut targets: watch::Receiver<Targets>) -> Transcript {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut t = Transcript {
            tenant: self.tenant.clone(),
            user: self.user.clone(),
            ..Default::default()
        };
        let mut last: Option<u64> = None;
        let mut target: Option<u64> = None;
        let mut final_deadline = None;
        loop {
            if target.is_none()
                && let Some(all) = targets.borrow().clone()
            {
                let key = (self.tenant.clone(), self.user.clone());
                target = Some(all.get(&key).copied().unwrap_or(0));
                final_deadline = Some(Instant::now() + Duration::from_secs(90));
            }
            if let Some(target) = target {
                if last.is_some_and(|l| l >= target) {
                    t.caught_up = true;
                    return t;
                }
                if final_deadline.is_some_and(|d| Instant::now() > d) {
                    return t;
                }
            }
            let port = self.ports[rng.random_range(0..self.ports.len())];
            // Random reconnects and stalls only while the run goes on; catching up at the end,
            // the client reads until it has everything.
            let plan = if target.is_some() {
                Plan {
                    until: final_deadline.expect("set with the target"),
                    stall_at: None,
                    stall_for: Duration::ZERO,
                }
            } else {
                let life = rng.random_range(0.2..2.0) * self.reconnect_every.as_secs_f64();
                let stall_at = (self.staller && rng.random_bool(0.5))
                    .then(|| Duration::from_secs_f64(rng.random_range(0.0..life)));
                Plan {
                    until: Instant::now() + Duration::from_secs_f64(life),
                    stall_at: stall_at.map(|d| Instant::now() + d),
                    stall_for: Duration::from_millis(rng.random_range(4_000..12_000)),
                }
            };
            t.connects += 1;
            let conn = t.connects;
            match self
                .stream(port, conn, &mut last, &mut t, plan, &mut targets, target)
                .await
            {
                Ok(()) => {}
                Err(_) => {
                    if last.is_none() {
                        t.refused += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(rng.random_range(100..600))).await;
                }
            }
        }
    }

    /// One connection: reads frames until the plan's end, the server's close, or (while
    /// catching up) the target. `Ok` when the client ended it.
    #[allow(clippy::too_many_arguments)]
    async fn stream(
        &self,
        port: u16,
        conn: u32,
        last: &mut Option<u64>,
        t: &mut Transcript,
        plan: Plan,
        targets: &mut watch::Receiver<Targets>,
        target: Option<u64>,
    ) -> Result<()> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        if self.staller {
            // A small window: a client that stops reading backs the engine's writes up soon.
            socket.set_recv_buffer_size(4096)?;
        }
        let server = SocketAddr::from(([127, 0, 0, 1], port));
        let mut stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(server))
            .await
            .map_err(|_| anyhow::anyhow!("connect timed out"))??;
        let resume = last
            .map(|id| format!("Last-Event-ID: {id}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET /api/v1/sse HTTP/1.1\r\nHost: {server}\r\nAuthorization: Bearer {}\r\n\
             Accept: text/event-stream\r\n{resume}\r\n",
            self.token
        );
        stream.write_all(request.as_bytes()).await?;
        let mut parser = Parser::default();
        let mut buf = vec![0u8; 8192];
        let mut stall_at = plan.stall_at;
        let mut stalled = false;
        loop {
            let read = tokio::select! {
                r = stream.read(&mut buf) => match r {
                    Ok(n) => n,
                    Err(e) => {
                        t.cut_off += u32::from(stalled);
                        return Err(e.into());
                    }
                },
                _ = tokio::time::sleep_until(plan.until) => return Ok(()),
                _ = sleep_until_opt(stall_at) => {
                    stall_at = None;
                    stalled = true;
                    t.stalls += 1;
                    tokio::time::sleep(plan.stall_for).await;
                    continue;
                }
                _ = targets.changed(), if target.is_none() => return Ok(()),
            };
            if read == 0 {
                t.cut_off += u32::from(stalled);
                bail!("closed by the server");
            }
            for event in parser.feed(&buf[..read])? {
                match event {
                    Sse::Hello(id) => {
                        // Only a stream opened without `Last-Event-ID` starts "now".
                        if last.is_none() {
                            t.start = Some(id);
                            *last = Some(id);
                        }
                    }
                    Sse::Notification { id, event_id } => {
                        t.frames.push(Frame { conn, id, event_id });
                        *last = Some(id);
                    }
                }
            }
            if let Some(target) = target
                && last.is_some_and(|l| l >= target)
            {
                return Ok(());
            }
        }
    }
}

struct Plan {
    until: Instant,
    stall_at: Option<Instant>,
    stall_for: Duration,
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[derive(Debug, PartialEq)]
enum Sse {
    /// A frame with an `id:` and no data: the stream's opening position.
    Hello(u64),
    Notification {
        id: u64,
        event_id: String,
    },
}

/// The client's view of the wire: the status line, then SSE frames (chunked transfer
/// encoding's size lines never start with a field name, so they are skipped like any line
/// the client does not know).
#[derive(Default)]
struct Parser {
    line: Vec<u8>,
    status_seen: bool,
    id: Option<u64>,
    event: String,
    data: String,
}

impl Parser {
    fn feed(&mut self, bytes: &[u8]) -> Result<Vec<Sse>> {
        let mut out = Vec::new();
        for &b in bytes {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            let line = String::from_utf8_lossy(&self.line)
                .trim_end_matches('\r')
                .to_owned();
            self.line.clear();
            if !self.status_seen {
                self.status_seen = true;
                if !line.starts_with("HTTP/1.1 200") {
                    bail!("refused: {line}");
                }
                continue;
            }
            if line.is_empty() {
                self.dispatch(&mut out);
            } else if let Some(v) = line.strip_prefix("id:") {
                self.id = v.trim().parse().ok();
            } else if let Some(v) = line.strip_prefix("event:") {
                self.event = v.trim().to_owned();
            } else if let Some(v) = line.strip_prefix("data:") {
                self.data.push_str(v.trim_start());
            }
        }
        Ok(out)
    }

    fn dispatch(&mut self, out: &mut Vec<Sse>) {
        let (id, event, data) = (
            self.id.take(),
            std::mem::take(&mut self.event),
            std::mem::take(&mut self.data),
        );
        match (id, event.as_str()) {
            (Some(id), "notification") => {
                let event_id = serde_json::from_str::<serde_json::Value>(&data)
                    .ok()
                    .and_then(|v| v["event_id"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                out.push(Sse::Notification { id, event_id });
            }
            (Some(id), "") if data.is_empty() => out.push(Sse::Hello(id)),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_hello_and_notifications_across_chunk_boundaries() {
        let mut p = Parser::default();
        let wire = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n\
                    1a\r\nretry: 3000\nid: 7\n: connected\n\n\r\n\
                    event: notification\nid: 8\ndata: {\"id\":8,\"event_id\":\"s-1\"}\n\n\
                    event: order.updated\nid: 9\ndata: {\"event_id\":\"s-2\"}\n\n";
        let mut got = Vec::new();
        for chunk in wire.as_bytes().chunks(5) {
            got.extend(p.feed(chunk).unwrap());
        }
        assert_eq!(
            got,
            vec![
                Sse::Hello(7),
                Sse::Notification {
                    id: 8,
                    event_id: "s-1".into()
                }
            ]
        );
        let mut refused = Parser::default();
        assert!(refused.feed(b"HTTP/1.1 429 Too Many Requests\r\n").is_err());
    }
}
