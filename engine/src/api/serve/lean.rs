//! SSE connections without hyper: the request head is read (bounded, within the header
//! timeout), the same axum router answers it, and the stream's frames are written as HTTP/1.1
//! chunks straight to the socket. An idle stream then holds its task, its stream state and
//! its socket, not hyper's two 8 KiB buffers per connection (a read buffer kept to notice the
//! client leaving, a write buffer for heads): about half of what a stream cost with hyper.
//!
//! Every other request (and an SSE request that is not a plain HTTP/1.1 `GET`) goes to
//! hyper with the bytes already read put back in front of the socket ([`Head::Other`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, header};
use futures::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tower::ServiceExt;

/// The stream route served here.
const SSE_PATH: &str = "/api/v1/sse";
/// Longest request head read before deciding; a longer one goes to hyper, which refuses it.
const MAX_HEAD: usize = 16 * 1024;
/// Headers parsed.
const MAX_HEADERS: usize = 64;
/// Longest non-stream response collected (errors: 401, 429, ...).
const MAX_ANSWER: usize = 64 * 1024;

/// What the start of a connection is.
pub enum Head {
    /// A complete `GET /api/v1/sse` HTTP/1.1 request head (and nothing after it).
    Sse(Vec<u8>),
    /// Anything else: the bytes read so far, for hyper to read first.
    Other(Vec<u8>),
}

/// Reads the request head, after the bytes already `read` (past a PROXY header); `None`
/// when the client sent nothing complete in `timeout` or closed the connection first
/// (slowloris and probes hold nothing).
pub async fn read_head<IO: AsyncRead + Unpin>(
    io: &mut IO,
    timeout: Duration,
    read: Vec<u8>,
) -> Option<Head> {
    let mut buf = read;
    buf.reserve(1024);
    let read = async {
        loop {
            if !buf.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut request = httparse::Request::new(&mut headers);
                match request.parse(&buf) {
                    Ok(httparse::Status::Complete(len)) => {
                        let path = request.path.unwrap_or_default();
                        let sse = request.method == Some("GET")
                            && request.version == Some(1)
                            && (path == SSE_PATH || path.starts_with("/api/v1/sse?"))
                            && len == buf.len();
                        return Some(if sse {
                            Head::Sse(buf)
                        } else {
                            Head::Other(buf)
                        });
                    }
                    Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                    // Too long or not HTTP: hyper answers it as it answers such requests.
                    _ => return Some(Head::Other(buf)),
                }
            }
            let mut chunk = [0u8; 1024];
            let n = io.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(timeout, read).await.ok().flatten()
}

/// Answers the SSE request `head` through `app` and writes the response to `io`: a stream
/// as chunks until it ends or the client leaves, anything else whole; then closes.
pub async fn serve<IO: AsyncRead + AsyncWrite + Unpin>(
    io: IO,
    app: Router,
    head: Vec<u8>,
) -> io::Result<()> {
    let request = request(&head)?;
    let response = match app.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (parts, body) = response.into_parts();
    let streaming = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let mut out = response_head(&parts);
    let (mut reader, mut writer) = tokio::io::split(io);
    if !streaming {
        let bytes = axum::body::to_bytes(body, MAX_ANSWER)
            .await
            .map_err(io::Error::other)?;
        out.extend_from_slice(format!("content-length: {}\r\n\r\n", bytes.len()).as_bytes());
        out.extend_from_slice(&bytes);
        writer.write_all(&out).await?;
        return writer.shutdown().await;
    }
    out.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
    writer.write_all(&out).await?;
    drop(out);
    match write_frames(body, &mut reader, &mut writer).await? {
        // A client sends nothing after its request: anything it does (closing, above all)
        // ends the stream, with nothing more to write.
        Ended::ClientLeft => Ok(()),
        // The stream ended (shutdown, expiry, a failed read): the client reconnects and
        // replays.
        Ended::Stream => {
            writer.write_all(b"0\r\n\r\n").await?;
            writer.shutdown().await
        }
    }
}

/// The request `head` holds, as the router takes it.
fn request(head: &[u8]) -> io::Result<Request<Body>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    parsed
        .parse(head)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut request = Request::builder()
        .method("GET")
        .uri(parsed.path.unwrap_or(SSE_PATH))
        .version(axum::http::Version::HTTP_11);
    for h in parsed.headers.iter() {
        request = request.header(h.name, h.value);
    }
    request
        .body(Body::empty())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The status line and headers of the response, without the framing ones (set by the
/// caller) and closing the connection after it.
fn response_head(parts: &axum::http::response::Parts) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"connection: close\r\n");
    out
}

/// Why a stream's frames stopped.
enum Ended {
    /// The body ended (or failed).
    Stream,
    /// The client closed its side or sent something.
    ClientLeft,
}

/// Writes the stream's frames as chunks until the body ends or the client leaves.
async fn write_frames<R, W>(body: Body, reader: &mut R, writer: &mut W) -> io::Result<Ended>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut frames = body.into_data_stream();
    loop {
        tokio::select! {
            frame = frames.next() => match frame {
                Some(Ok(data)) if data.is_empty() => {}
                Some(Ok(data)) => {
                    let (chunks, ended) = coalesce(&mut frames, &data);
                    writer.write_all(&chunks).await?;
                    if ended {
                        return Ok(Ended::Stream);
                    }
                }
                Some(Err(_)) | None => return Ok(Ended::Stream),
            },
            _ = left(reader) => return Ok(Ended::ClientLeft),
        }
    }
}

/// One write (one send) for the frame `first` and the frames already waiting behind it: a
/// stream's rows of one commit, a fan-out's, go out together. `true` when the body ended
/// behind them.
fn coalesce(frames: &mut axum::body::BodyDataStream, first: &[u8]) -> (Vec<u8>, bool) {
    let mut chunks = Vec::with_capacity(first.len() + 16);
    chunk(&mut chunks, first);
    while chunks.len() < MAX_COALESCED {
        match frames.next().now_or_never() {
            Some(Some(Ok(more))) => chunk(&mut chunks, &more),
            Some(Some(Err(_)) | None) => return (chunks, true),
            None => break,
        }
    }
    (chunks, false)
}

/// Frames already waiting are written together up to about this many bytes.
const MAX_COALESCED: usize = 64 * 1024;

/// Appends `data` to `out` as one HTTP/1.1 chunk (nothing for empty data: that chunk would
/// end the body).
fn chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    use std::io::Write as _;
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Resolves when the client closed its side or sent something (cancel-safe: a read of
/// one byte into a buffer of the future's own).
async fn left<R: AsyncRead + Unpin>(reader: &mut R) {
    let mut byte = [0u8; 1];
    let _ = reader.read(&mut byte).await;
}

/// A connection whose first bytes were already read: hyper reads them again first.
pub struct Prefixed<IO> {
    prefix: Vec<u8>,
    at: usize,
    io: IO,
}

impl<IO> Prefixed<IO> {
    pub fn new(prefix: Vec<u8>, io: IO) -> Self {
        Self { prefix, at: 0, io }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            if self.at == self.prefix.len() {
                self.prefix = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn head_of(bytes: &[u8]) -> Option<Head> {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(bytes).await.unwrap();
        drop(client);
        read_head(&mut server, Duration::from_secs(1), Vec::new()).await
    }

    #[tokio::test]
    async fn only_a_plain_stream_request_takes_the_lean_path() {
        let sse = b"GET /api/v1/sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\r\n";
        assert!(matches!(head_of(sse).await, Some(Head::Sse(h)) if h == sse));
        let query = b"GET /api/v1/sse?ticket=abc HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(matches!(head_of(query).await, Some(Head::Sse(_))));
        for other in [
            &b"GET /api/v1/notifications HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"POST /api/v1/sse HTTP/1.1\r\nHost: x\r\ncontent-length: 0\r\n\r\n",
            b"GET /api/v1/sse HTTP/1.0\r\n\r\n",
            b"GET /api/v1/sse/tickets HTTP/1.1\r\nHost: x\r\n\r\n",
            // A second request pipelined behind it: hyper's to handle.
            b"GET /api/v1/sse HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01 not http at all\r\n\r\n",
        ] {
            match head_of(other).await {
                Some(Head::Other(bytes)) => assert_eq!(bytes, other),
                _ => panic!("{:?} must go to hyper", String::from_utf8_lossy(other)),
            }
        }
        // Half a head, then the client leaves: nothing to answer.
        assert!(head_of(b"GET /api/v1/sse HTTP/1.1\r\nHost").await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_never_completes_times_out() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client
            .write_all(b"GET /api/v1/sse HTTP/1.1\r\n")
            .await
            .unwrap();
        assert!(
            read_head(&mut server, Duration::from_secs(10), Vec::new())
                .await
                .is_none()
        );
        drop(client);
    }

    #[tokio::test]
    async fn hyper_reads_the_prefix_first() {
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(b" world").await.unwrap();
        drop(client);
        let mut io = Prefixed::new(b"hello".to_vec(), server);
        let mut all = String::new();
        io.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "hello world");
    }

    #[tokio::test]
    async fn a_head_already_read_behind_a_proxy_header_is_not_read_again() {
        // The client stays connected: reading once more would wait for the timeout.
        let (_client, mut server) = tokio::io::duplex(64);
        let head = b"GET /api/v1/sse HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let read = read_head(&mut server, Duration::from_secs(5), head.clone()).await;
        assert!(matches!(read, Some(Head::Sse(h)) if h == head));
    }
}
