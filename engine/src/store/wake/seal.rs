//! The seal on what instances tell each other through NOTIFY.
//!
//! PostgreSQL has no privilege on LISTEN and NOTIFY: any role that can connect to the
//! database hears every payload and may send its own on the engine's channels. So every
//! payload an engine sends is sealed with HMAC-SHA256 under a key only engines hold
//! (`cluster.secret`), over the channel's name and the payload's JSON, and a listener acts
//! on nothing whose seal does not verify. The JSON names its signer, a counter and the
//! signer's clock, so a payload heard (by anyone) cannot be sent again later: one older than
//! [`FRESH`] is refused, and so is one already heard within it.
//!
//! The sealed form is `v1.<mac>.<json>`, the MAC in unpadded URL-safe base64 (43 bytes), the
//! JSON an object that starts with the signer: `{"from":id,...}` for news its own instance
//! has already acted on (a batch's wake-ups: [`Seal::is_own_echo`] skips them unread), or
//! `{"by":id,...}` for news every instance acts on, the signer too.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How long a sealed payload counts as fresh, either side of the listener's clock: the
/// instances' clocks must agree within it (NTP keeps them within milliseconds). A payload
/// is heard within milliseconds of its commit; the bound also sizes the memory of payloads
/// heard (what arrived within it, a few per batch).
pub const FRESH: Duration = Duration::from_secs(60);
/// The sealed form's version prefix.
const VERSION: &str = "v1.";
/// The length of an HMAC-SHA256 in unpadded base64.
const MAC_LEN: usize = 43;
/// What a seal adds to the JSON at most: the version, the MAC, a dot, and the head
/// (`{"from":<36-byte UUID>,"n":<u64>,"at":<i64>,`).
pub const SEAL_BYTES: usize = 160;

/// Whether the signer's own instance acts on a payload (see the module's doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lead {
    /// Its own instance already acted on it: it skips its echo.
    From,
    /// Every instance acts on it, the signer too.
    By,
}

/// This instance's seal: its id, the key, and the counter that makes each payload unique.
pub struct Seal {
    instance: String,
    key: Vec<u8>,
    /// Was the key configured (`cluster.secret`), so that other instances may share it?
    shared: bool,
    counter: AtomicU64,
    /// `{"from":<instance>,`: how this instance's own echoes start.
    own_echo: String,
}

impl Seal {
    /// The seal of `instance` under `secret`; without one, under a random key of this
    /// instance's own, so it hears its own news and nobody else's.
    pub fn new(instance: &str, secret: Option<&str>) -> Self {
        let (key, shared) = match secret {
            Some(secret) => (secret.as_bytes().to_vec(), true),
            None => (rand::random::<[u8; 32]>().to_vec(), false),
        };
        Self {
            instance: instance.to_owned(),
            key,
            shared,
            counter: AtomicU64::new(0),
            own_echo: format!(r#"{{"from":{},"#, serde_json::Value::from(instance)),
        }
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Was the key configured, rather than made up for this instance alone?
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// `{"from"|"by":<instance>,"n":<counter>,"at":<unix ms>,<fields>}` sealed for
    /// `channel`. `fields` is the rest of a JSON object's members (`"wakes":[...]`).
    pub fn seal(&self, channel: &str, lead: Lead, fields: &str) -> String {
        self.seal_at(channel, lead, fields, now_ms())
    }

    fn seal_at(&self, channel: &str, lead: Lead, fields: &str, at: i64) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let lead = match lead {
            Lead::From => "from",
            Lead::By => "by",
        };
        let comma = if fields.is_empty() { "" } else { "," };
        let json = format!(
            r#"{{"{lead}":{},"n":{n},"at":{at}{comma}{fields}}}"#,
            serde_json::Value::from(self.instance.as_str())
        );
        let mac = URL_SAFE_NO_PAD.encode(self.mac(channel, &json).finalize().into_bytes());
        format!("{VERSION}{mac}.{json}")
    }

    /// Is `payload` this instance's own echo (`"from"` itself)? Checked unverified: a forged
    /// one is only skipped.
    pub fn is_own_echo(&self, payload: &str) -> bool {
        payload
            .strip_prefix(VERSION)
            .and_then(|rest| rest.get(MAC_LEN + 1..))
            .is_some_and(|json| json.starts_with(&self.own_echo))
    }

    fn mac(&self, channel: &str, json: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        // The channel is sealed too: a wake-up cannot be replayed as presence news.
        mac.update(channel.as_bytes());
        mac.update(&[0]);
        mac.update(json.as_bytes());
        mac
    }
}

/// Why a payload was refused (the `reason` label of
/// `notify_cluster_messages_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not in the sealed form, or not the JSON it should be.
    Malformed,
    /// The seal does not verify: not sent by an engine holding this key.
    Signature,
    /// Sealed longer ago than [`FRESH`] (or that far ahead).
    Stale,
    /// Heard before: the same signer and counter.
    Replayed,
    /// Sealed, but a field is not valid (named).
    Invalid(&'static str),
    /// Presence news of an instance that is not alive.
    UnknownInstance,
}

impl Refusal {
    /// The metric's label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::Signature => "signature",
            Refusal::Stale => "stale",
            Refusal::Replayed => "replayed",
            Refusal::Invalid(_) => "invalid",
            Refusal::UnknownInstance => "unknown_instance",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Malformed => f.write_str("not a sealed engine message"),
            Refusal::Signature => f.write_str(
                "its seal does not verify (another database user, or an instance with another cluster.secret)",
            ),
            Refusal::Stale => write!(
                f,
                "sealed more than {} s away from this instance's clock (a replay, or clocks apart)",
                FRESH.as_secs()
            ),
            Refusal::Replayed => f.write_str("heard before (a replay)"),
            Refusal::Invalid(field) => write!(f, "its {field} is not valid"),
            Refusal::UnknownInstance => f.write_str("it speaks for an instance that is not alive"),
        }
    }
}

/// A verified payload.
#[derive(Debug, PartialEq)]
pub struct Opened<'a> {
    /// The instance that sealed it.
    pub signer: String,
    /// The JSON object.
    pub json: &'a str,
}

/// The listener's side: verifies seals and remembers what it heard within [`FRESH`].
pub struct Opener {
    seal: std::sync::Arc<Seal>,
    /// (signer, counter) of every payload heard within [`FRESH`], and the same in the order
    /// heard, with their times, to forget them.
    seen: HashSet<(String, u64)>,
    order: VecDeque<(i64, String, u64)>,
}

impl Opener {
    pub fn new(seal: std::sync::Arc<Seal>) -> Self {
        Self {
            seal,
            seen: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    pub fn seal(&self) -> &Seal {
        &self.seal
    }

    /// Verifies `payload` heard on `channel` now.
    pub fn open<'a>(&mut self, channel: &str, payload: &'a str) -> Result<Opened<'a>, Refusal> {
        self.open_at(channel, payload, now_ms())
    }

    fn open_at<'a>(
        &mut self,
        channel: &str,
        payload: &'a str,
        now: i64,
    ) -> Result<Opened<'a>, Refusal> {
        #[derive(serde::Deserialize)]
        struct Head {
            from: Option<String>,
            by: Option<String>,
            n: u64,
            at: i64,
        }
        let (mac, json) = payload
            .strip_prefix(VERSION)
            .and_then(|rest| rest.split_once('.'))
            .ok_or(Refusal::Malformed)?;
        let mac = URL_SAFE_NO_PAD
            .decode(mac)
            .map_err(|_| Refusal::Malformed)?;
        self.seal
            .mac(channel, json)
            .verify_slice(&mac)
            .map_err(|_| Refusal::Signature)?;
        let head: Head = serde_json::from_str(json).map_err(|_| Refusal::Malformed)?;
        let signer = match (head.from, head.by) {
            (Some(signer), None) | (None, Some(signer)) => signer,
            _ => return Err(Refusal::Malformed),
        };
        let fresh = FRESH.as_millis() as i64;
        if head.at.abs_diff(now) > fresh as u64 {
            return Err(Refusal::Stale);
        }
        while self
            .order
            .front()
            .is_some_and(|(at, _, _)| *at < now - fresh)
        {
            if let Some((_, signer, n)) = self.order.pop_front() {
                self.seen.remove(&(signer, n));
            }
        }
        if !self.seen.insert((signer.clone(), head.n)) {
            return Err(Refusal::Replayed);
        }
        self.order.push_back((head.at, signer.clone(), head.n));
        Ok(Opened { signer, json })
    }
}

/// The wall clock in Unix milliseconds.
fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const SECRET: &str = "a-cluster-secret-of-at-least-32-bytes";

    #[test]
    fn a_sealed_payload_opens_once_for_its_channel_under_its_key_while_fresh() {
        let sender = Seal::new("i-1", Some(SECRET));
        let mut opener = Opener::new(Arc::new(Seal::new("i-2", Some(SECRET))));
        let now = 1_000_000_000;
        let sealed = sender.seal_at("wake", Lead::By, r#""wakes":[]"#, now);
        assert!(sealed.len() <= r#""wakes":[]"#.len() + SEAL_BYTES);
        let opened = opener.open_at("wake", &sealed, now + 10).unwrap();
        assert_eq!(opened.signer, "i-1");
        assert!(opened.json.ends_with(r#""wakes":[]}"#));
        assert_eq!(
            opener.open_at("wake", &sealed, now + 20),
            Err(Refusal::Replayed)
        );
        // Another channel, another key, a changed byte, an old or a future payload.
        let again = sender.seal_at("wake", Lead::By, r#""wakes":[]"#, now);
        assert_eq!(
            opener.open_at("presence", &again, now),
            Err(Refusal::Signature)
        );
        let stranger = Seal::new("i-1", Some("another-secret-of-at-least-32-bytes!"));
        let forged = stranger.seal_at("wake", Lead::By, r#""wakes":[]"#, now);
        assert_eq!(
            opener.open_at("wake", &forged, now),
            Err(Refusal::Signature)
        );
        let tampered = again.replace(r#""wakes":[]"#, r#""wakes":[1]"#);
        assert_eq!(
            opener.open_at("wake", &tampered, now),
            Err(Refusal::Signature)
        );
        let fresh = FRESH.as_millis() as i64;
        for at in [now - fresh - 1, now + fresh + 1] {
            let sealed = sender.seal_at("wake", Lead::By, r#""wakes":[]"#, at);
            assert_eq!(opener.open_at("wake", &sealed, now), Err(Refusal::Stale));
        }
        for junk in ["", "v1.", "v1.x.{}", r#"[["t","u",1]]"#, "v2.abc.{}"] {
            assert_eq!(
                opener.open_at("wake", junk, now),
                Err(Refusal::Malformed),
                "{junk}"
            );
        }
        // Without a configured secret, an instance hears only itself.
        let alone = Arc::new(Seal::new("i-3", None));
        assert!(!alone.is_shared());
        let own = alone.seal_at("wake", Lead::By, r#""wakes":[]"#, now);
        let mut own_opener = Opener::new(alone.clone());
        assert!(own_opener.open_at("wake", &own, now).is_ok());
        let other = Seal::new("i-4", None).seal_at("wake", Lead::By, r#""wakes":[]"#, now);
        assert_eq!(
            own_opener.open_at("wake", &other, now),
            Err(Refusal::Signature)
        );
    }

    #[test]
    fn the_memory_of_payloads_heard_forgets_what_is_no_longer_fresh() {
        let sender = Seal::new("i-1", Some(SECRET));
        let mut opener = Opener::new(Arc::new(Seal::new("i-2", Some(SECRET))));
        let fresh = FRESH.as_millis() as i64;
        for i in 0..100 {
            let sealed = sender.seal_at("wake", Lead::By, r#""wakes":[]"#, i * 1_000);
            opener.open_at("wake", &sealed, i * 1_000).unwrap();
        }
        assert!(opener.seen.len() as i64 <= fresh / 1_000 + 1);
        assert_eq!(opener.seen.len(), opener.order.len());
    }

    #[test]
    fn only_the_own_instances_from_echo_is_skipped() {
        let seal = Seal::new("i-1", Some(SECRET));
        assert!(seal.is_own_echo(&seal.seal("wake", Lead::From, r#""wakes":[]"#)));
        assert!(!seal.is_own_echo(&seal.seal("wake", Lead::By, r#""wakes":[]"#)));
        let other = Seal::new("i-12", Some(SECRET));
        assert!(!seal.is_own_echo(&other.seal("wake", Lead::From, r#""wakes":[]"#)));
        assert!(!seal.is_own_echo(r#"{"from":"i-1","wakes":[]}"#));
    }
}
