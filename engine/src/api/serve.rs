//! The HTTP listener, hardened for the open internet.
//!
//! `axum::serve` has no knobs for abuse, so connections are served here with hyper
//! directly:
//!
//! - a client must send its request headers within `http.header_timeout_ms` (hyper's header
//!   read timeout, which also closes idle keep-alive connections): slowloris holds nothing;
//! - a write must go through within `http.write_timeout_ms` ([`WriteDeadline`]): the
//!   deadline bounds the whole write, not each partial write, so a client that stopped
//!   reading its SSE stream, or reads a trickle of it, is disconnected (it reconnects and
//!   replays with `Last-Event-ID`) instead of pinning a connection, its task and a replay
//!   page;
//! - at most `http.max_connections` connections are open (the rest wait in the kernel's
//!   accept queue) and at most `http.max_connections_per_ip` from one client address (the
//!   rest are closed at once, or answered 429 behind a trusted proxy); who the client is,
//!   behind a proxy listed in `http.trusted_proxies`, is [`client`]'s question;
//! - a stream request (`GET /api/v1/sse`) is answered by the same router but written
//!   without hyper ([`lean`]), so an idle stream costs a few KiB, not hyper's buffers.

pub(super) mod client;
mod lean;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::limits::ClientAddr;
use crate::config::HttpConfig;
use client::{Proxies, ProxyHeader};

/// The kernel's send buffer of every connection (Linux doubles it for its bookkeeping).
/// Left to autotuning, a connection on a fast path (loopback, a LAN) grows it to 4 MiB
/// (`net.ipv4.tcp_wmem`), so a stream whose client reads a trickle parked megabytes in the
/// kernel, out of reach of the write deadline. 64 KiB holds the largest write the stream
/// makes (frames coalesced up to 64 KiB) and a REST page; at 100 ms of round trip it still
/// carries about 1 MB/s.
const SEND_BUFFER: u32 = 64 * 1024;
/// Connections waiting to be accepted (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: u32 = 1024;

/// Binds `addr` for [`serve`]: its connections get a send buffer of [`SEND_BUFFER`]
/// (accepted connections inherit it from the listening socket).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_send_buffer_size(SEND_BUFFER)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

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
    let header_timeout = Duration::from_millis(limits.header_timeout_ms);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let shared = Arc::new(Shared {
        app,
        builder,
        per_ip,
        proxies: Proxies::new(limits.trusted_proxies()),
        header_timeout,
        write_timeout: Duration::from_millis(limits.write_timeout_ms),
    });
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
        // A direct client counts at once; a trusted proxy's client once it is named.
        let slot = if shared.proxies.trusts(peer.ip()) {
            None
        } else {
            match shared.per_ip.open(peer.ip()) {
                Some(slot) => Some(slot),
                None => {
                    tracing::debug!(peer = %peer, "connection refused: too many from this address");
                    continue;
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let accepted = Accepted {
            stream,
            peer,
            slot,
            permit,
        };
        let (shared, watcher, stopping) = (shared.clone(), graceful.watcher(), shutdown.clone());
        connections.spawn(connection(shared, accepted, watcher, stopping));
    }
    drop(listener);
    // Streams end on the same token (the router's); other connections finish their request.
    connections.close();
    tokio::join!(graceful.shutdown(), connections.wait());
}

/// What every connection task shares.
struct Shared {
    app: Router,
    builder: http1::Builder,
    per_ip: Arc<PerIp>,
    proxies: Proxies,
    header_timeout: Duration,
    write_timeout: Duration,
}

/// A connection as accepted: its peer, and its slot when the peer is the client.
struct Accepted {
    stream: TcpStream,
    peer: SocketAddr,
    slot: Option<IpSlot>,
    permit: OwnedSemaphorePermit,
}

/// One connection: who its client is, then its request head decides who answers it (the
/// lean stream writer or hyper).
async fn connection(
    shared: Arc<Shared>,
    accepted: Accepted,
    watcher: Watcher,
    stopping: CancellationToken,
) {
    let Accepted {
        stream,
        peer,
        mut slot,
        permit,
    } = accepted;
    let mut io = WriteDeadline::new(stream, shared.write_timeout);
    let trusted = shared.proxies.trusts(peer.ip());
    let start = async {
        let (named, read) = if trusted {
            read_proxy_header(&mut io, shared.header_timeout).await?
        } else {
            (None, Vec::new())
        };
        let head = lean::read_head(&mut io, shared.header_timeout, read).await?;
        Some((named, head))
    };
    let started = tokio::select! {
        _ = stopping.cancelled() => None,
        started = start => started,
    };
    let Some((named, head)) = started else {
        return;
    };
    let client = if trusted {
        let hop = named.unwrap_or(peer.ip());
        let (lean::Head::Sse(bytes) | lean::Head::Other(bytes)) = &head;
        shared.proxies.forwarded_for(hop, bytes).unwrap_or(hop)
    } else {
        peer.ip()
    };
    if slot.is_none() {
        slot = shared.per_ip.open(client);
        if slot.is_none() {
            tracing::debug!(peer = %peer, client = %client, "request refused: too many connections from this client");
            let _ = io.write_all(&too_many()).await;
            let _ = io.shutdown().await;
            return;
        }
    }
    // The address the request limits count requests without credentials by.
    let client_addr = ClientAddr(client);
    let outcome = match head {
        lean::Head::Sse(head) => {
            // One request, answered once: the layered router is dropped with it.
            let app = shared.app.clone().layer(axum::Extension(client_addr));
            lean::serve(io, app, head).await.map_err(|e| e.to_string())
        }
        lean::Head::Other(read) => {
            let io = TokioIo::new(lean::Prefixed::new(read, io));
            // Every request of the connection, without a router of its own.
            let app =
                shared
                    .app
                    .clone()
                    .map_request(move |mut r: axum::http::Request<Incoming>| {
                        r.extensions_mut().insert(client_addr);
                        r
                    });
            let service = TowerToHyperService::new(app);
            watcher
                .watch(shared.builder.serve_connection(io, service))
                .await
                .map_err(|e| e.to_string())
        }
    };
    if let Err(e) = outcome {
        tracing::debug!(peer = %peer, client = %client, error = %e, "connection closed with an error");
    }
    drop((permit, slot));
}

/// The answer to a proxied client over its per-address cap (the proxy passes it on, where
/// a closed connection would be its 502).
fn too_many() -> Vec<u8> {
    let body = r#"{"error":{"code":"too_many_requests","message":"too many connections from this client address"}}"#;
    format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads a PROXY protocol header, if the connection starts with one, within `timeout`:
/// the client it names and the bytes read past it. `None`: nothing complete came in time,
/// or the header does not parse (the connection is closed).
async fn read_proxy_header<IO: AsyncRead + Unpin>(
    io: &mut IO,
    timeout: Duration,
) -> Option<(Option<IpAddr>, Vec<u8>)> {
    let read = async {
        let mut buf = Vec::with_capacity(256);
        loop {
            match client::proxy_header(&buf) {
                ProxyHeader::Complete { len, client } => return Some((client, buf.split_off(len))),
                ProxyHeader::Absent => return Some((None, buf)),
                ProxyHeader::Invalid => return None,
                ProxyHeader::Partial => {}
            }
            let mut chunk = [0u8; 256];
            let n = io.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(timeout, read).await.ok().flatten()
}

/// Open connections per client address (IPv6 per /64: [`client::key`]).
struct PerIp {
    limit: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerIp {
    fn open(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let ip = client::key(ip);
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

/// A connection whose writes must go through: once a write finds the socket full (it is
/// pending, or takes only part of what it was given), the client has `timeout` to catch up,
/// that is until a write is taken whole at once; until then every write or flush fails with
/// `TimedOut` once the deadline has passed, which ends the connection.
///
/// Partial progress does not move the deadline: a reader taking 1.5 KB every 25 s made each
/// partial write "progress" and so held its stream, and a replay page in memory, forever.
pub struct WriteDeadline<IO> {
    io: IO,
    timeout: Duration,
    /// Set when the client fell behind; cleared when it has caught up.
    behind_since: Option<Pin<Box<Sleep>>>,
    /// The last write was pending: the next one that is ready only follows the client's
    /// reading, it does not show the client has caught up.
    pended: bool,
}

impl<IO> WriteDeadline<IO> {
    pub fn new(io: IO, timeout: Duration) -> Self {
        Self {
            io,
            timeout,
            behind_since: None,
            pended: false,
        }
    }

    /// A write or flush polled as `poll`: the deadline cleared when the client has
    /// `caught_up`, else started (or kept), and the poll turned into an error once the
    /// deadline has passed.
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
        caught_up: bool,
    ) -> Poll<io::Result<T>> {
        if matches!(poll, Poll::Ready(Err(_))) {
            return poll;
        }
        if caught_up {
            self.behind_since = None;
            return poll;
        }
        let timeout = self.timeout;
        let deadline = self
            .behind_since
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not keep up with its stream (write deadline passed)",
            )));
        }
        poll
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
        // Taken whole, and not just after a pending write (whose readiness only follows the
        // client's reading): the socket had room for all of it, so the client keeps up.
        let caught_up = !self.pended && matches!(poll, Poll::Ready(Ok(n)) if n == buf.len());
        self.pended = poll.is_pending();
        self.check(cx, poll, caught_up)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        if poll.is_ready() {
            return poll;
        }
        self.check(cx, poll, false)
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

    /// A reader of `theirs` taking up to 16 bytes every `every` until it has `total`.
    fn trickle(
        mut theirs: tokio::io::DuplexStream,
        every: Duration,
        total: usize,
    ) -> tokio::task::JoinHandle<tokio::io::DuplexStream> {
        tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let mut read = 0;
            while read < total {
                tokio::time::sleep(every).await;
                match tokio::io::AsyncReadExt::read(&mut theirs, &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => read += n,
                }
            }
            theirs
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_takes_the_whole_write_in_time_is_fine() {
        let (ours, theirs) = tokio::io::duplex(16);
        let mut io = WriteDeadline::new(ours, Duration::from_secs(30));
        let reader = trickle(theirs, Duration::from_secs(5), 64);
        io.write_all(&[0u8; 64]).await.unwrap();
        reader.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickling_reader_is_cut_at_the_deadline_though_each_write_progressed() {
        let (ours, theirs) = tokio::io::duplex(16);
        let mut io = WriteDeadline::new(ours, Duration::from_secs(30));
        let _reader = trickle(theirs, Duration::from_secs(5), usize::MAX);
        let started = tokio::time::Instant::now();
        let err = io.write_all(&[0u8; 64 * 1024]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed().as_secs(), 30);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_catches_up_starts_afresh() {
        use tokio::io::AsyncReadExt;
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut io = WriteDeadline::new(ours, Duration::from_secs(30));
        // Behind for 20 s each time, 60 s in all, but caught up in between.
        for _ in 0..3 {
            let reader = async {
                tokio::time::sleep(Duration::from_secs(20)).await;
                theirs.read_exact(&mut [0u8; 96]).await
            };
            let (written, read) = tokio::join!(io.write_all(&[0u8; 96]), reader);
            written.unwrap();
            read.unwrap();
            // The pipe is empty: this write is taken whole at once.
            io.write_all(&[0u8; 8]).await.unwrap();
            theirs.read_exact(&mut [0u8; 8]).await.unwrap();
        }
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
        // IPv6 counts per /64.
        let _x = per_ip.open("2001:db8::1".parse().unwrap()).unwrap();
        let _y = per_ip.open("2001:db8::2:1".parse().unwrap()).unwrap();
        assert!(per_ip.open("2001:db8::ffff".parse().unwrap()).is_none());
        assert!(per_ip.open("2001:db8:0:1::1".parse().unwrap()).is_some());
    }
}
