//! The checker: the ledger (what was produced) against what the engine recorded in
//! PostgreSQL, what each SSE client was given, and what reached Mailpit. [`check`] is pure, so
//! its rules are unit-tested on made-up runs; [`Store::load`] and [`load_mail`] read the real
//! services.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::clients::Transcript;
use crate::journal::Fault;
use crate::ledger::Entry;

#[derive(Debug, Clone)]
pub struct Notification {
    pub tenant: String,
    pub user: String,
    pub seq: u64,
    pub event_id: String,
}

#[derive(Debug, Clone)]
pub struct Outbox {
    pub tenant: String,
    pub event_id: String,
    pub recipient: String,
    pub message_id: String,
    pub status: String,
    pub attempts: i32,
}

#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub tenant: Option<String>,
    pub kind: String,
    pub replayed: bool,
}

#[derive(Debug, Default)]
pub struct Store {
    pub notifications: Vec<Notification>,
    pub outbox: Vec<Outbox>,
    pub dead_letters: Vec<DeadLetter>,
}

/// One message as Mailpit received it.
#[derive(Debug, Clone)]
pub struct Mail {
    pub message_id: String,
    pub to: Vec<String>,
    pub created_ms: u64,
}

/// At most this many example ids per finding, so a report stays readable.
const EXAMPLES: usize = 10;

/// A count and a few of its cases.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Finding {
    pub count: u64,
    pub examples: Vec<String>,
}

impl Finding {
    fn add(&mut self, example: impl FnOnce() -> String) {
        self.count += 1;
        if self.examples.len() < EXAMPLES {
            self.examples.push(example());
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Verdict {
    pub events: u64,
    /// Events produced more than once (a produce that failed may still have been written).
    pub events_resent: u64,
    pub notifications: u64,
    pub lost: Finding,
    pub duplicated: Finding,
    pub misdelivered: Finding,
    /// Rows for events the ledger does not know.
    pub unknown: Finding,
    pub emails_expected: u64,
    pub emails_received: u64,
    /// Emailing events without exactly one outbox row (none, or two).
    pub email_rows_lost: Finding,
    pub email_rows_duplicated: Finding,
    /// Rows not `sent` at the end, by status.
    pub emails_unsent: BTreeMap<String, u64>,
    /// Rows `sent` that never reached Mailpit.
    pub emails_lost: Finding,
    /// Extra copies of an email, each following a copy that came within 2 s of a crash: the
    /// one window the guarantees allow (SMTP accepted, the status write never happened).
    pub email_duplicates_explained: Finding,
    pub email_duplicates_unexplained: Finding,
    pub emails_misdelivered: Finding,
    pub emails_unknown: Finding,
    pub streams: u64,
    pub stream_frames: u64,
    pub stream_reconnects: u64,
    pub stream_stalls: u64,
    /// Stalled connections the server ended.
    pub stream_cut_off: u64,
    /// A frame whose id is not above the one before it: given twice, or out of order.
    pub stream_duplicated: Finding,
    /// A notification after the stream's start that the client was never given.
    pub stream_gaps: Finding,
    pub stream_misdelivered: Finding,
    pub stream_not_caught_up: Finding,
    /// Dead letters of the run by tenant and kind (the bad plugin's, and whatever else).
    pub dead_letters: BTreeMap<String, u64>,
    pub dead_letters_not_replayed: u64,
    pub crashes: u64,
}

impl Verdict {
    /// Events of `tenant` a failing plugin cost before its breaker opened: its dead letters
    /// other than those set aside by the quarantine itself.
    pub fn breaker_damage(&self, tenant: &str) -> u64 {
        let prefix = format!("{tenant}: plugin_");
        self.dead_letters
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix) && !k.ends_with("plugin_quarantined"))
            .map(|(_, n)| n)
            .sum()
    }
}

impl Verdict {
    /// The findings that must be 0 for the run to pass, with their report labels: one list
    /// for the rule and the report, so neither can forget one.
    pub fn must_be_zero(&self) -> [(&'static str, &Finding); 14] {
        [
            ("notifications lost", &self.lost),
            ("notifications duplicated", &self.duplicated),
            ("notifications misdelivered", &self.misdelivered),
            ("notifications for unknown events", &self.unknown),
            ("email rows lost", &self.email_rows_lost),
            ("email rows duplicated", &self.email_rows_duplicated),
            ("emails lost (sent, never received)", &self.emails_lost),
            (
                "duplicate emails, unexplained",
                &self.email_duplicates_unexplained,
            ),
            ("emails misdelivered", &self.emails_misdelivered),
            ("emails unknown", &self.emails_unknown),
            (
                "stream frames repeated or out of order",
                &self.stream_duplicated,
            ),
            ("stream gaps", &self.stream_gaps),
            ("stream frames misdelivered", &self.stream_misdelivered),
            ("streams not caught up", &self.stream_not_caught_up),
        ]
    }

    /// Every promise held: nothing lost, duplicated or misdelivered anywhere, every email
    /// sent, and only explained duplicate emails.
    pub fn passed(&self) -> bool {
        self.must_be_zero().iter().all(|(_, f)| f.count == 0) && self.emails_unsent.is_empty()
    }
}

pub fn check(
    ledger: &[Entry],
    faults: &[Fault],
    transcripts: &[Transcript],
    store: &Store,
    mail: &[Mail],
) -> Verdict {
    let mut v = Verdict {
        events: ledger.len() as u64,
        events_resent: ledger.iter().filter(|e| e.attempts > 1).count() as u64,
        notifications: store.notifications.len() as u64,
        streams: transcripts.len() as u64,
        crashes: faults.iter().filter(|f| f.is_crash()).count() as u64,
        ..Default::default()
    };
    let by_id: HashMap<&str, &Entry> = ledger.iter().map(|e| (e.id.as_str(), e)).collect();

    // Notifications: exactly one per event, for the event's own tenant and user.
    let mut rows: HashMap<&str, u32> = HashMap::new();
    for n in &store.notifications {
        match by_id.get(n.event_id.as_str()) {
            None => v
                .unknown
                .add(|| format!("{}/{} seq {} event {}", n.tenant, n.user, n.seq, n.event_id)),
            Some(e) => {
                *rows.entry(e.id.as_str()).or_default() += 1;
                if (e.tenant.as_str(), e.user.as_str()) != (n.tenant.as_str(), n.user.as_str()) {
                    v.misdelivered.add(|| {
                        format!(
                            "{} for {}/{} stored for {}/{}",
                            e.id, e.tenant, e.user, n.tenant, n.user
                        )
                    });
                }
            }
        }
    }
    for e in ledger {
        match rows.get(e.id.as_str()).copied().unwrap_or(0) {
            0 => v
                .lost
                .add(|| format!("{} ({}/{}, phase {})", e.id, e.tenant, e.user, e.phase)),
            1 => {}
            n => v.duplicated.add(|| format!("{} ×{n}", e.id)),
        }
    }

    check_emails(&mut v, &by_id, ledger, faults, store, mail);
    check_streams(&mut v, &by_id, transcripts, store);

    for d in &store.dead_letters {
        let tenant = d.tenant.as_deref().unwrap_or("-");
        *v.dead_letters
            .entry(format!("{tenant}: {}", d.kind))
            .or_default() += 1;
        if !d.replayed {
            v.dead_letters_not_replayed += 1;
        }
    }
    v
}

fn check_emails(
    v: &mut Verdict,
    by_id: &HashMap<&str, &Entry>,
    ledger: &[Entry],
    faults: &[Fault],
    store: &Store,
    mail: &[Mail],
) {
    v.emails_expected = ledger.iter().filter(|e| e.email.is_some()).count() as u64;
    v.emails_received = mail.len() as u64;
    let mut copies: HashMap<&str, Vec<&Mail>> = HashMap::new();
    for m in mail {
        copies.entry(bare(&m.message_id)).or_default().push(m);
    }
    let mut rows: HashMap<&str, u32> = HashMap::new();
    let mut known = HashSet::new();
    for o in &store.outbox {
        known.insert(bare(&o.message_id));
        let Some(e) = by_id.get(o.event_id.as_str()) else {
            v.emails_unknown
                .add(|| format!("outbox row for unknown event {}", o.event_id));
            continue;
        };
        *rows.entry(e.id.as_str()).or_default() += 1;
        if e.email.as_deref() != Some(o.recipient.as_str()) || e.tenant != o.tenant {
            v.emails_misdelivered
                .add(|| format!("{}: row for {} / {}", e.id, o.tenant, o.recipient));
        }
        if o.status != "sent" {
            *v.emails_unsent.entry(o.status.clone()).or_default() += 1;
            continue;
        }
        let got = copies
            .get(bare(&o.message_id))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        if got.is_empty() {
            v.emails_lost
                .add(|| format!("{} ({}), sent per the outbox", e.id, o.message_id));
        }
        for m in got {
            if m.to.iter().all(|to| !to.eq_ignore_ascii_case(&o.recipient)) {
                v.emails_misdelivered
                    .add(|| format!("{}: to {:?}, not {}", e.id, m.to, o.recipient));
            }
        }
        // Each copy after the first needs a crash of its own: one that cut the copy before
        // it short, between its `250` and its status write.
        let mut times: Vec<u64> = got.iter().map(|m| m.created_ms).collect();
        times.sort_unstable();
        for (k, pair) in times.windows(2).enumerate() {
            let example = || {
                format!(
                    "{}: copy {} of {} (attempts {})",
                    e.id,
                    k + 2,
                    times.len(),
                    o.attempts
                )
            };
            if faults
                .iter()
                .any(|f| f.is_crash() && in_window(f.at_ms, pair[0]))
            {
                v.email_duplicates_explained.add(example);
            } else {
                v.email_duplicates_unexplained.add(example);
            }
        }
    }
    for e in ledger.iter().filter(|e| e.email.is_some()) {
        match rows.get(e.id.as_str()).copied().unwrap_or(0) {
            0 => v
                .email_rows_lost
                .add(|| format!("{} ({}, phase {})", e.id, e.tenant, e.phase)),
            1 => {}
            n => v.email_rows_duplicated.add(|| format!("{} ×{n}", e.id)),
        }
    }
    for m in mail {
        if !known.contains(bare(&m.message_id)) {
            v.emails_unknown
                .add(|| format!("mail {} to {:?}", m.message_id, m.to));
        }
    }
}

fn check_streams(
    v: &mut Verdict,
    by_id: &HashMap<&str, &Entry>,
    transcripts: &[Transcript],
    store: &Store,
) {
    let mut seqs: HashMap<(&str, &str), BTreeMap<u64, &str>> = HashMap::new();
    for n in &store.notifications {
        seqs.entry((n.tenant.as_str(), n.user.as_str()))
            .or_default()
            .insert(n.seq, n.event_id.as_str());
    }
    let empty = BTreeMap::new();
    for t in transcripts {
        let who = format!("{}/{}", t.tenant, t.user);
        v.stream_frames += t.frames.len() as u64;
        v.stream_reconnects += u64::from(t.connects.saturating_sub(1));
        v.stream_stalls += u64::from(t.stalls);
        v.stream_cut_off += u64::from(t.cut_off);
        if !t.caught_up {
            v.stream_not_caught_up.add(|| who.clone());
        }
        let stored = seqs
            .get(&(t.tenant.as_str(), t.user.as_str()))
            .unwrap_or(&empty);
        let mut previous = t.start;
        let mut seen = HashSet::new();
        for f in &t.frames {
            if previous.is_some_and(|p| f.id <= p) {
                v.stream_duplicated.add(|| {
                    format!(
                        "{who}: id {} after {:?} (connection {})",
                        f.id, previous, f.conn
                    )
                });
            }
            previous = Some(previous.map_or(f.id, |p| p.max(f.id)));
            seen.insert(f.id);
            let owner = by_id.get(f.event_id.as_str());
            let right_user = owner.is_some_and(|e| e.tenant == t.tenant && e.user == t.user);
            if !right_user || stored.get(&f.id) != Some(&f.event_id.as_str()) {
                v.stream_misdelivered
                    .add(|| format!("{who}: id {} event {}", f.id, f.event_id));
            }
        }
        let Some(start) = t.start else { continue };
        let end = t.frames.iter().map(|f| f.id).max().unwrap_or(start);
        for (&seq, &event) in stored.range(start + 1..=end) {
            if !seen.contains(&seq) {
                v.stream_gaps
                    .add(|| format!("{who}: id {seq} (event {event})"));
            }
        }
    }
}

/// Whether a crash at `crash_ms` can explain a second copy of an email whose first copy
/// Mailpit received at `first_ms`: the crash fell between the server's `250` and the status
/// write, which follows it within milliseconds. Both clocks are this machine's; the slack
/// covers a crash announced just before the send it cut short returned (PostgreSQL stopping
/// while the SMTP exchange was on) and a write delayed by a busy machine.
fn in_window(crash_ms: u64, first_ms: u64) -> bool {
    crash_ms + WINDOW_MS >= first_ms && crash_ms <= first_ms + WINDOW_MS
}

const WINDOW_MS: u64 = 2_000;

fn bare(message_id: &str) -> &str {
    message_id
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
}

impl Store {
    pub async fn load(pool: &sqlx::PgPool) -> Result<Self> {
        use sqlx::Row;
        let notifications =
            sqlx::query("SELECT tenant_id, user_id, seq, event_id FROM notifications")
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(|r| Notification {
                    tenant: r.get(0),
                    user: r.get(1),
                    seq: r.get::<i64, _>(2) as u64,
                    event_id: r.get(3),
                })
                .collect();
        let outbox = sqlx::query(
            "SELECT tenant_id, event_id, recipient, message_id, status, attempts FROM email_outbox",
        )
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|r| Outbox {
            tenant: r.get(0),
            event_id: r.get(1),
            recipient: r.get(2),
            message_id: r.get(3),
            status: r.get(4),
            attempts: r.get(5),
        })
        .collect();
        let dead_letters =
            sqlx::query("SELECT tenant_id, error_kind, replayed_at IS NOT NULL FROM dead_letters")
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(|r| DeadLetter {
                    tenant: r.get(0),
                    kind: r.get(1),
                    replayed: r.get(2),
                })
                .collect();
        Ok(Self {
            notifications,
            outbox,
            dead_letters,
        })
    }
}

/// Every message in Mailpit, through its API, a page at a time.
pub async fn load_mail(mailpit: &str) -> Result<Vec<Mail>> {
    let http = reqwest::Client::new();
    let mut out = Vec::new();
    loop {
        let url = format!("{mailpit}/api/v1/messages?start={}&limit=1000", out.len());
        let body = http
            .get(&url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .with_context(|| format!("GET {url}"))?
            .bytes()
            .await?;
        let page: serde_json::Value = serde_json::from_slice(&body)?;
        let messages = page["messages"].as_array().cloned().unwrap_or_default();
        if messages.is_empty() {
            return Ok(out);
        }
        for m in messages {
            let created = m["Created"].as_str().unwrap_or_default();
            out.push(Mail {
                message_id: m["MessageID"].as_str().unwrap_or_default().to_owned(),
                to: m["To"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| a["Address"].as_str().map(str::to_owned))
                    .collect(),
                created_ms: chrono::DateTime::parse_from_rfc3339(created)
                    .map(|t| t.timestamp_millis() as u64)
                    .with_context(|| format!("Mailpit's Created {created:?}"))?,
            });
        }
    }
}

#[cfg(test)]
mod tests;
