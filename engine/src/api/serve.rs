//! The HTTP listener, hardened for the open internet.
//!
//! `axum::serve` has no knobs for abuse, so connections are served here with hyper
//! directly:
//!
//! - a client must send its request headers within `http.header_timeout_ms` (hyper's header
//!   read timeout, which also closes idle keep-alive connections): slowloris holds nothing;
//! - every write must make progress within `http.write_timeout_ms` ([`WriteDeadline`]): a
//!   client that stops reading its SSE stream is disconnected (it reconnects and replays
//!   with `Last-Event-ID`), instead of pinning a connection and its task forever;
//! - at most `http.max_connections` connections are open (the rest wait in the kernel's
//!   accept queue) and at most `http.max_connections_per_ip` from one address (the rest are
//!   closed at once);
//! - a stream request (`GET /api/v1/sse`) is answered by the same router but written
//!   without hyper ([`lean`]), so an idle stream costs a few KiB, not hyper's buffers.

mod lean;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::limits::ClientAddr;
use crate::config::HttpConfig;

/// Serves `app` on `listener` until `shutdown` fires, then lets open connections finish
/// (SSE streams end on the same token).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &HttpConfig,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let per_ip = Arc::new(PerIp {
        limit: limits.max_connections_per_ip,
        open: Mutex::new(HashMap::new()),
    });
    let write_timeout = Duration::from_millis(limits.write_timeout_ms);
    let header_timeout = Duration::from_millis(limits.header_timeout_ms);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let graceful = GracefulShutdown::new();
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, typically: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(slot) = per_ip.open(peer.ip()) else {
            tracing::debug!(peer = %peer, "connection refused: too many from this address");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut io = WriteDeadline::new(stream, write_timeout);
        // The address the request limits count requests without credentials by.
        let client = ClientAddr(peer.ip());
        let (app, builder, watcher) = (app.clone(), builder.clone(), graceful.watcher());
        let stopping = shutdown.clone();
        connections.spawn(async move {
            let head = tokio::select! {
                _ = stopping.cancelled() => None,
                head = lean::read_head(&mut io, header_timeout) => head,
            };
            let outcome = match head {
                None => Ok(()),
                Some(lean::Head::Sse(head)) => {
                    // One request, answered once: the layered router is dropped with it.
                    let app = app.layer(axum::Extension(client));
                    lean::serve(io, app, head).await.map_err(|e| e.to_string())
                }
                Some(lean::Head::Other(read)) => {
                    let io = TokioIo::new(lean::Prefixed::new(read, io));
                    // Every request of the connection, without a router of its own.
                    let app = app.map_request(move |mut r: axum::http::Request<Incoming>| {
                        r.extensions_mut().insert(client);
                        r
                    });
                    watcher
                        .watch(builder.serve_connection(io, TowerToHyperService::new(app)))
                        .await
                        .map_err(|e| e.to_string())
                }
            };
            if let Err(e) = outcome {
                tracing::debug!(peer = %peer, error = %e, "connection closed with an error");
            }
            drop((permit, slot));
        });
    }
    drop(listener);
    // Streams end on the same token (the router's); other connections finish their request.
    connections.close();
    tokio::join!(graceful.shutdown(), connections.wait());
}

/// Open connections per client address.
struct PerIp {
    limit: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerIp {
    fn open(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut open = self.open.lock().expect("per-ip lock poisoned");
        let count = open.entry(ip).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(IpSlot {
            per_ip: self.clone(),
            ip,
        })
    }
}

/// One open connection of an address; dropping it frees the slot.
struct IpSlot {
    per_ip: Arc<PerIp>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.per_ip.open.lock().expect("per-ip lock poisoned");
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// A connection whose writes must make progress: a write (or flush) that stays pending
/// for longer than the deadline fails with `TimedOut`, which ends the connection.
pub struct WriteDeadline<IO> {
    io: IO,
    timeout: Duration,
    pending_since: Option<Pin<Box<Sleep>>>,
}

impl<IO> WriteDeadline<IO> {
    pub fn new(io: IO, timeout: Duration) -> Self {
        Self {
            io,
            timeout,
            pending_since: None,
        }
    }

    /// Turns a pending write into an error once the deadline has passed.
    fn check<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.pending_since = None;
            return poll;
        }
        let timeout = self.timeout;
        let deadline = self
            .pending_since
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if deadline.as_mut().poll(cx).is_ready() {
            self.pending_since = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading (write deadline passed)",
            )));
        }
        Poll::Pending
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for WriteDeadline<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(cx, poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        self.check(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn a_write_that_makes_no_progress_fails_after_the_deadline() {
        // A pipe with a tiny buffer whose reader never reads.
        let (ours, _theirs) = tokio::io::duplex(16);
        let mut io = WriteDeadline::new(ours, Duration::from_secs(30));
        let err = io.write_all(&[0u8; 1024]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_but_moving_reader_is_fine() {
        let (ours, mut theirs) = tokio::io::duplex(16);
        let mut io = WriteDeadline::new(ours, Duration::from_secs(30));
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let mut total = 0;
            while total < 64 {
                tokio::time::sleep(Duration::from_secs(10)).await;
                total += tokio::io::AsyncReadExt::read(&mut theirs, &mut buf)
                    .await
                    .unwrap();
            }
        });
        io.write_all(&[0u8; 64]).await.unwrap();
        reader.await.unwrap();
    }

    #[test]
    fn limits_connections_per_address() {
        let per_ip = Arc::new(PerIp {
            limit: 2,
            open: Mutex::new(HashMap::new()),
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = per_ip.open(a).unwrap();
        let _second = per_ip.open(a).unwrap();
        assert!(per_ip.open(a).is_none());
        assert!(per_ip.open(b).is_some());
        drop(first);
        assert!(per_ip.open(a).is_some());
    }
}
