//! The state of one open stream and how it finds its next frame: rows this instance just
//! committed from the hub's memory, anything else from PostgreSQL page by page, a sleep on
//! the hub in between, and the end when the credentials expire or are withdrawn (their key
//! removed, their user signed out), the engine shuts down or the database stays away.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntGauge;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::frame::Frame;
use crate::api::AppState;
use crate::api::auth::{Auth, Identity};
use crate::hub::Subscription;
use crate::model::StoredNotification;
use crate::store::notifications;

/// Counts an open stream for as long as it lives.
struct OpenStream(IntGauge);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// When a stream's credentials run out.
struct Expiry {
    at: tokio::time::Instant,
    wall: chrono::DateTime<chrono::Utc>,
}

impl Expiry {
    fn of(identity: &Identity) -> Self {
        let wall =
            chrono::DateTime::from_timestamp(identity.expires_at.min(i64::MAX as u64) as i64, 0)
                .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC);
        let left = (wall - chrono::Utc::now()).to_std().unwrap_or_default();
        // A far-future exp must not overflow the timer.
        let left = left.min(Duration::from_secs(365 * 24 * 3600));
        Self {
            at: tokio::time::Instant::now() + left,
            wall,
        }
    }

    /// The frame that ends the stream.
    fn frame(&self, cursor: i64) -> Frame {
        Frame::AuthExpired {
            cursor,
            expired_at: self.wall,
            revoked: false,
        }
    }

    /// The frame that ends the stream of withdrawn credentials: the same close, dated now.
    fn revoked(cursor: i64) -> Frame {
        Frame::AuthExpired {
            cursor,
            expired_at: chrono::Utc::now(),
            revoked: true,
        }
    }
}

/// One open stream: where it stands, and what it has left to send.
pub(super) struct Reader {
    pool: PgPool,
    /// The tenant's share of `pool` (`api::limits`): each read takes a slot of it, so one
    /// tenant's streams never hold every connection.
    share: Arc<tokio::sync::Semaphore>,
    tenant: String,
    user_id: String,
    /// `None` once the `auth.expired` frame went out: the stream then ends.
    expiry: Option<Expiry>,
    /// Who the stream is for, to ask [`Auth::still_valid`] when credentials change.
    identity: Identity,
    auth: Arc<Auth>,
    /// Changes when a key is removed or a user signed out.
    withdrawals: tokio::sync::watch::Receiver<u64>,
    /// A change was seen while waiting: check the credentials before anything else.
    recheck: bool,
    /// Highest sequence number sent (or skipped, for a stream without Last-Event-ID).
    cursor: i64,
    page_size: i64,
    page_bytes: i64,
    pending: VecDeque<Arc<StoredNotification>>,
    subscription: Subscription,
    _open: OpenStream,
    /// The first frame: a `retry:` hint for the browser.
    hello: Option<Duration>,
    shutdown: CancellationToken,
    /// `notify_stage_seconds{stage="stream_read"}`.
    read_time: prometheus::Histogram,
    /// Reads that failed in a row.
    failed_reads: u32,
    /// The hub's latest when the stream last took rows up to it from memory: until the hub
    /// moves, there is nothing to read.
    sent_from_memory: Option<i64>,
}

/// What a read from PostgreSQL leaves the stream to do.
enum Read {
    /// Send what it read, or read again after a failure.
    Again,
    /// Wait for the hub: nothing new.
    Wait,
    /// End the stream.
    End,
}

/// The first pause after a failed read; doubled after each further failure, up to 16×.
const READ_RETRY: Duration = Duration::from_millis(100);
/// Failed reads in a row (about 15 s of retrying) after which the stream ends.
const MAX_FAILED_READS: u32 = 12;

impl Reader {
    /// The stream of `identity` from `cursor`, counted as open (the gauge) until dropped.
    pub(super) fn open(
        state: &AppState,
        identity: Identity,
        cursor: i64,
        subscription: Subscription,
    ) -> Self {
        let gauge = state.metrics.sse_connections.clone();
        gauge.inc();
        let expiry = Expiry::of(&identity);
        subscription.took(cursor);
        Reader {
            pool: state.pool.clone(),
            share: state.limits.share_of(Some(&identity.tenant)),
            tenant: identity.tenant.clone(),
            user_id: identity.user_id.clone(),
            expiry: Some(expiry),
            withdrawals: state.auth.changes(),
            recheck: false,
            auth: state.auth.clone(),
            identity,
            cursor,
            page_size: state.sse.page_size,
            page_bytes: state.sse.page_bytes,
            pending: VecDeque::new(),
            subscription,
            _open: OpenStream(gauge),
            hello: Some(Duration::from_millis(state.sse.retry_ms)),
            shutdown: state.shutdown.clone(),
            read_time: state.metrics.stage("stream_read"),
            failed_reads: 0,
            sent_from_memory: None,
        }
    }

    /// The next frame, or `None` to end the stream (the client reconnects and replays).
    pub(super) async fn next(&mut self) -> Option<Frame> {
        if let Some(retry) = self.hello.take() {
            return Some(Frame::Hello {
                cursor: self.cursor,
                retry,
            });
        }
        let expires = self.expiry.as_ref()?.at;
        loop {
            if tokio::time::Instant::now() >= expires {
                return Some(self.expiry.take()?.frame(self.cursor));
            }
            if let Some(end) = self.withdrawn() {
                return Some(end);
            }
            if let Some(n) = self.pending.pop_front() {
                self.cursor = n.seq;
                return Some(Frame::row(n));
            }
            // Mark the current hub value seen *before* reading, so a commit racing with
            // this read still wakes us afterwards.
            let changed = self.subscription.updates.has_changed().unwrap_or(true);
            let latest = *self.subscription.updates.borrow_and_update();
            // What this instance just committed comes from memory, when the hub holds every
            // row up to the latest; anything else (another instance's rows, an inbox change,
            // a gap) is read from PostgreSQL.
            if latest > self.cursor
                && let Some(rows) = self.subscription.recent_after(self.cursor, latest)
            {
                self.pending.extend(rows);
                self.sent_from_memory = Some(latest);
                continue;
            }
            // Everything up to the hub's latest came from memory and nothing happened since:
            // there is nothing to read (a wake-up of every stream, `Hub::wake_all`, counts as
            // something and reads).
            let idle = !changed && self.sent_from_memory == Some(latest) && self.cursor >= latest;
            self.sent_from_memory = None;
            if !idle {
                match self.read().await {
                    Read::Again => continue,
                    Read::Wait => {}
                    Read::End => return None,
                }
            }
            tokio::select! {
                // Clients reconnect (to another instance) and replay from their last id.
                _ = self.shutdown.cancelled() => return None,
                _ = tokio::time::sleep_until(expires) => {}
                changed = self.subscription.updates.changed() => changed.ok()?,
                // Checked at the top of the loop.
                _ = self.withdrawals.changed() => self.recheck = true,
            }
        }
    }

    /// The closing frame if the stream's credentials were withdrawn since it last looked
    /// (a busy stream looks before each frame, an idle one when told).
    fn withdrawn(&mut self) -> Option<Frame> {
        if !std::mem::take(&mut self.recheck) && !self.withdrawals.has_changed().unwrap_or(false) {
            return None;
        }
        self.withdrawals.borrow_and_update();
        let why = self.auth.still_valid(&self.identity).err()?;
        tracing::debug!(tenant = %self.tenant, user = %self.user_id, why, "sse stream ends: credentials withdrawn");
        self.expiry = None;
        Some(Expiry::revoked(self.cursor))
    }

    /// Reads the next page after the cursor from PostgreSQL into `pending`.
    async fn read(&mut self) -> Read {
        let slot = tokio::select! {
            _ = self.shutdown.cancelled() => return Read::End,
            slot = self.share.acquire() => slot.expect("a share's semaphore is never closed"),
        };
        let reading = std::time::Instant::now();
        // Boxed: the query's state lives on the heap while it runs, not in every idle
        // stream's future for the stream's whole life.
        let read = Box::pin(notifications::notifications_after(
            &self.pool,
            &self.tenant,
            &self.user_id,
            self.cursor,
            self.page_size,
            self.page_bytes,
        ))
        .await;
        drop(slot);
        self.read_time.observe(reading.elapsed().as_secs_f64());
        match read {
            Ok(rows) if !rows.is_empty() => {
                self.failed_reads = 0;
                if let Some(last) = rows.last() {
                    self.subscription.took(last.seq);
                }
                self.pending.extend(rows.into_iter().map(Arc::new));
                Read::Again
            }
            Ok(_) => {
                self.failed_reads = 0;
                Read::Wait
            }
            // A busy or briefly unreachable database: the stream waits and reads again
            // (its client keeps its connection); only a database that stays away ends it
            // (the client then reconnects and replays, maybe to another instance).
            Err(e) if self.failed_reads < MAX_FAILED_READS => {
                let wait = READ_RETRY * 2u32.pow(self.failed_reads.min(4));
                self.failed_reads += 1;
                tracing::debug!(error = %e.with_cause(), retry_in_ms = wait.as_millis() as u64, "sse read failed; retrying");
                tokio::select! {
                    _ = self.shutdown.cancelled() => Read::End,
                    _ = tokio::time::sleep(wait) => Read::Again,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e.with_cause(), "sse reads keep failing; closing the stream");
                Read::End
            }
        }
    }
}
