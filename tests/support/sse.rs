//! A minimal SSE client over a real HTTP connection, as a browser's `EventSource` sees the
//! stream: frames parsed into events, `Last-Event-ID` remembered, the end of a stream told
//! apart from a quiet one.

use std::time::Duration;

use futures::StreamExt;
use notify_engine::app::Running;
use serde_json::Value;

/// One parsed SSE event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: Value,
}

/// A minimal SSE client over a real HTTP connection.
pub struct SseClient {
    stream: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
    /// The last `id:` seen in any frame, as a browser's `lastEventId`.
    pub last_id: Option<String>,
}

/// Opens `GET /api/v1/sse`; returns the status and, on 200, the client.
pub async fn connect_sse(
    engine: &Running,
    token: Option<&str>,
    last_event_id: Option<&str>,
) -> (u16, Option<SseClient>, String) {
    let mut request = reqwest::Client::new().get(format!("http://{}/api/v1/sse", engine.http_addr));
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id);
    }
    open_sse(request).await
}

/// Sends an SSE request: the status and, on 200, the client; otherwise the body.
pub async fn open_sse(request: reqwest::RequestBuilder) -> (u16, Option<SseClient>, String) {
    let response = request.send().await.expect("SSE request");
    let status = response.status().as_u16();
    if status != 200 {
        let body = response.text().await.unwrap_or_default();
        return (status, None, body);
    }
    assert_eq!(
        response.headers()["content-type"],
        "text/event-stream",
        "SSE content type"
    );
    let client = SseClient {
        stream: Box::pin(response.bytes_stream()),
        buffer: String::new(),
        last_id: None,
    };
    (status, Some(client), String::new())
}

/// What [`SseClient::poll`] found.
#[derive(Debug)]
pub enum Polled {
    Event(SseEvent),
    Ended,
    Timeout,
}

impl SseClient {
    /// The next event with data (comments and keep-alives skipped), or `None` on timeout.
    pub async fn next(&mut self, timeout: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(event) = self.parse_one() {
                return Some(event);
            }
            let chunk = tokio::time::timeout_at(deadline, self.stream.next())
                .await
                .ok()??;
            let chunk = chunk.expect("SSE stream read");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    fn parse_one(&mut self) -> Option<SseEvent> {
        loop {
            let end = self.buffer.find("\n\n")?;
            let frame: String = self.buffer.drain(..end + 2).collect();
            let (mut id, mut name, mut data) = (None, "message".to_string(), Vec::new());
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().to_string());
                    self.last_id = id.clone();
                } else if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
                }
            }
            if data.is_empty() {
                continue;
            }
            let data = serde_json::from_str(&data.join("\n")).expect("SSE data is JSON");
            return Some(SseEvent {
                id,
                event: name,
                data,
            });
        }
    }

    /// The next event with data, or how the wait ended: the server closed the stream (or
    /// the connection broke), or `timeout` passed.
    pub async fn poll(&mut self, timeout: Duration) -> Polled {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(event) = self.parse_one() {
                return Polled::Event(event);
            }
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return Polled::Timeout,
                Ok(None | Some(Err(_))) => return Polled::Ended,
                Ok(Some(Ok(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
            }
        }
    }

    /// Does the server end the stream within `timeout`? (What arrives meanwhile stays
    /// buffered for [`SseClient::next`].)
    pub async fn ends_within(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return false,
                Ok(None | Some(Err(_))) => return true,
                Ok(Some(Ok(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
            }
        }
    }

    /// Asserts that nothing arrives within `quiet`.
    pub async fn expect_nothing(&mut self, quiet: Duration) {
        if let Some(e) = self.next(quiet).await {
            panic!("expected no event, got {e:?}");
        }
    }
}

/// Opens `GET /api/v1/sse?<query>` without a token (a ticket in the query).
pub async fn connect_sse_query(engine: &Running, query: &str) -> (u16, Option<SseClient>, String) {
    open_sse(reqwest::Client::new().get(format!("http://{}/api/v1/sse?{query}", engine.http_addr)))
        .await
}
