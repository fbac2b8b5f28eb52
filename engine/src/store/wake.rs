//! Cluster-wide wake-ups over PostgreSQL's LISTEN/NOTIFY: a batch [`announce`]s the users
//! whose streams got rows (delivered at commit), and each instance's [`ClusterListener`]
//! hears them, and presence news, from the others. Also how a payload is packed under
//! NOTIFY's size limit ([`json_arrays`], shared with [`super::presence`]).
//!
//! Any role that can connect to the database may LISTEN and NOTIFY on these channels, so
//! every payload is sealed ([`seal`]: HMAC-SHA256 under `cluster.secret`) and every field of
//! what is heard is checked before anything acts on it; what fails is [`Heard::Refused`].

mod seal;

use sqlx::{PgConnection, PgPool};

use super::{Result, presence};
use crate::model::StoredNotification;
pub use seal::{Lead, Opened, Opener, Refusal, Seal};

/// The channel on which every instance of a deployment (one database) hears of committed
/// stream rows: the hub's cluster-wide wake-ups (`cluster::listen`).
pub const WAKE_CHANNEL: &str = "notify_engine_wake";
/// PostgreSQL takes NOTIFY payloads below 8000 bytes; what is announced is split to stay
/// under it.
const NOTIFY_PAYLOAD_BYTES: usize = 7_000;
// A sealed wake-up (`"wakes":` and the array, sealed) stays under PostgreSQL's limit.
const _: () = assert!(NOTIFY_PAYLOAD_BYTES + 16 + seal::SEAL_BYTES < 8_000);

/// `items` as JSON arrays of at most [`NOTIFY_PAYLOAD_BYTES`] each (one item too large for
/// that is an array of its own), in order.
pub(super) fn json_arrays<T: serde::Serialize>(items: impl IntoIterator<Item = T>) -> Vec<String> {
    let mut arrays = Vec::new();
    let mut array = String::new();
    for item in items {
        let item = serde_json::to_string(&item).expect("strings and numbers serialize");
        if !array.is_empty() && array.len() + item.len() + 2 > NOTIFY_PAYLOAD_BYTES {
            array.push(']');
            arrays.push(std::mem::take(&mut array));
        }
        array.push(if array.is_empty() { '[' } else { ',' });
        array.push_str(&item);
    }
    if !array.is_empty() {
        array.push(']');
        arrays.push(array);
    }
    arrays
}

/// A row carried in a wake-up at most this long as JSON; a longer one is only announced (its
/// streams read it), so a NOTIFY never passes PostgreSQL's limit.
const ROW_IN_NOTIFY_BYTES: usize = 6_000;
/// The highest sequence number a wake-up may name: JavaScript's `Number.MAX_SAFE_INTEGER`,
/// past which a browser cannot even count its `Last-Event-ID`. Far beyond any user's log;
/// a wake-up above it is refused, so it can never hold a stream's watermark out of reach.
pub const MAX_SEQ: i64 = (1 << 53) - 1;

/// One user's wake-up as announced: `[tenant, user, seq]`, or with the row itself.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum WakeOut<'a> {
    Bare(&'a str, &'a str, i64),
    Row(&'a str, &'a str, i64, Box<serde_json::value::RawValue>),
}

/// Tells every instance, when `tx` commits, that these users' streams have rows up to these
/// sequence numbers: `"wakes": [[tenant, user, seq], …]` on [`WAKE_CHANNEL`], sealed by
/// `seal` ([`seal`]; with [`Lead::From`] the sender's own instance skips the echo, with
/// [`Lead::By`] it hears it too), in as few NOTIFYs as fit. A wake-up with a row
/// (`[tenant, user, seq, row]`) carries it to instances where the user listens, so their
/// streams need not read it back. NOTIFY is transactional: delivered at commit and only
/// then, so no listener looks for a row it cannot see yet, and a rolled-back batch wakes
/// nobody.
pub async fn announce<'a>(
    tx: &mut PgConnection,
    seal: &Seal,
    lead: Lead,
    wakes: impl IntoIterator<Item = (&'a str, &'a str, i64, Option<&'a StoredNotification>)>,
) -> Result<()> {
    for payload in wake_payloads(seal, lead, wakes) {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(WAKE_CHANNEL)
            .bind(payload)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// What the cluster listener heard.
pub enum Heard {
    /// Users' streams with rows up to these sequence numbers, committed by another
    /// instance, or by any for an inbox change (its own batches' echo is not news).
    Wakes(Vec<Wake>),
    /// Users that came online or went offline on the instance `signer`, or instances gone.
    Presence {
        signer: String,
        news: presence::News,
    },
    /// The connection was lost and made again: what was sent meanwhile is gone.
    Reconnected,
    /// A payload on one of the channels that is not a sealed, valid engine message: acted
    /// on in no way.
    Refused {
        channel: &'static str,
        refusal: Refusal,
    },
}

/// A wake-up heard: (tenant, user) has rows up to `seq`, and maybe the row itself.
#[derive(Debug, PartialEq)]
pub struct Wake {
    pub tenant: String,
    pub user: String,
    pub seq: i64,
    pub row: Option<StoredNotification>,
}

/// A connection of its own listening on [`WAKE_CHANNEL`] and
/// [`presence::PRESENCE_CHANNEL`].
pub struct ClusterListener {
    listener: sqlx::postgres::PgListener,
}

impl ClusterListener {
    pub async fn connect(pool: &PgPool) -> Result<Self> {
        let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
        listener
            .listen_all([WAKE_CHANNEL, presence::PRESENCE_CHANNEL])
            .await?;
        Ok(Self { listener })
    }

    /// The next news, opened by `opener` (whose memory of what was heard outlives a
    /// connection). A payload that is not a sealed, valid engine message is
    /// [`Heard::Refused`].
    pub async fn next(&mut self, opener: &mut Opener) -> Result<Heard> {
        loop {
            let Some(notification) = self.listener.try_recv().await? else {
                return Ok(Heard::Reconnected);
            };
            let payload = notification.payload();
            let channel = if notification.channel() == WAKE_CHANNEL {
                // This instance's streams took those rows from memory after the commit; the
                // echo (often first) would have sent them to PostgreSQL for them.
                if opener.seal().is_own_echo(payload) {
                    continue;
                }
                WAKE_CHANNEL
            } else {
                presence::PRESENCE_CHANNEL
            };
            let heard = opener.open(channel, payload).and_then(|opened| {
                if channel == WAKE_CHANNEL {
                    parse_wakes(opened.json).map(Heard::Wakes)
                } else {
                    let news = presence::parse_news(&opened)?;
                    Ok(Heard::Presence {
                        signer: opened.signer,
                        news,
                    })
                }
            });
            return Ok(heard.unwrap_or_else(|refusal| Heard::Refused { channel, refusal }));
        }
    }
}

/// The NOTIFY payloads of [`announce`].
fn wake_payloads<'a>(
    seal: &Seal,
    lead: Lead,
    wakes: impl IntoIterator<Item = (&'a str, &'a str, i64, Option<&'a StoredNotification>)>,
) -> Vec<String> {
    let wakes = wakes.into_iter().map(|(tenant, user, seq, row)| {
        row.and_then(|row| serde_json::value::to_raw_value(row).ok())
            .filter(|raw| raw.get().len() <= ROW_IN_NOTIFY_BYTES)
            .map_or(WakeOut::Bare(tenant, user, seq), |raw| {
                WakeOut::Row(tenant, user, seq, raw)
            })
    });
    json_arrays(wakes)
        .into_iter()
        // Under PostgreSQL's 8000 bytes: the array is at most NOTIFY_PAYLOAD_BYTES, and the
        // seal adds at most SEAL_BYTES.
        .map(|array| seal.seal(WAKE_CHANNEL, lead, &format!(r#""wakes":{array}"#)))
        .collect()
}

/// The wake-ups of a verified [`WAKE_CHANNEL`] payload, `{…, "wakes": [...]}`, each
/// `[tenant, user, seq]` or `[tenant, user, seq, row]`. Every field is checked, sealed or
/// not: a tenant id, a user id, a sequence number in `1..=MAX_SEQ`, a carried row that is
/// the one announced and whose kind is an SSE event name (no line break can reach a frame).
/// One invalid wake-up refuses the payload.
fn parse_wakes(json: &str) -> Result<Vec<Wake>, Refusal> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum WakeIn {
        Bare(String, String, i64),
        Row(String, String, i64, Box<StoredNotification>),
    }
    #[derive(serde::Deserialize)]
    struct Payload {
        wakes: Vec<WakeIn>,
    }
    let Payload { wakes } = serde_json::from_str(json).map_err(|_| Refusal::Malformed)?;
    wakes
        .into_iter()
        .map(|w| {
            let (tenant, user, seq, row) = match w {
                WakeIn::Bare(tenant, user, seq) => (tenant, user, seq, None),
                WakeIn::Row(tenant, user, seq, row) => (tenant, user, seq, Some(*row)),
            };
            check_user(&tenant, &user)?;
            if !(1..=MAX_SEQ).contains(&seq) {
                return Err(Refusal::Invalid("sequence number"));
            }
            if let Some(row) = &row {
                if row.seq != seq {
                    return Err(Refusal::Invalid("row's sequence number"));
                }
                if !valid_kind(&row.kind) {
                    return Err(Refusal::Invalid("row's kind"));
                }
                if !(row.event_id.is_empty() || crate::model::valid_id(&row.event_id)) {
                    return Err(Refusal::Invalid("row's event id"));
                }
            }
            Ok(Wake {
                tenant,
                user,
                seq,
                row,
            })
        })
        .collect()
}

/// A (tenant, user) as the engine accepts them: a tenant id, and a user id of 1 to 200
/// bytes (a token's `sub`).
pub(super) fn check_user(tenant: &str, user: &str) -> Result<(), Refusal> {
    if !crate::model::valid_tenant(tenant) {
        return Err(Refusal::Invalid("tenant"));
    }
    if user.is_empty() || user.len() > crate::model::MAX_ID_LEN {
        return Err(Refusal::Invalid("user"));
    }
    Ok(())
}

/// A stored row's kind as it becomes an SSE `event:` name: `notification`, the inbox's
/// change events, or a live update's name, all of `[a-z0-9._-]`.
fn valid_kind(kind: &str) -> bool {
    !kind.is_empty()
        && kind.len() <= 64
        && kind.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stored row of seq `seq` whose body is `body`.
    fn row(seq: i64, body: &str) -> StoredNotification {
        StoredNotification {
            seq,
            event_id: format!("e{seq}"),
            kind: "notification".into(),
            title: Some("Paid".into()),
            body: Some(body.into()),
            category: None,
            data: sqlx::types::Json(serde_json::json!({"order_id": "A-1"})),
            created_at: chrono::Utc::now(),
            read_at: None,
            archived_at: None,
            frame_data: Default::default(),
        }
    }

    const SECRET: &str = "a-cluster-secret-of-at-least-32-bytes";

    /// The wake-ups `payloads` carry, as another instance holding the key hears them.
    fn heard(payloads: &[String]) -> Result<Vec<Wake>, Refusal> {
        let mut opener = Opener::new(std::sync::Arc::new(Seal::new("listener", Some(SECRET))));
        let mut all = Vec::new();
        for payload in payloads {
            all.extend(parse_wakes(opener.open(WAKE_CHANNEL, payload)?.json)?);
        }
        Ok(all)
    }

    fn expect(tenant: &str, user: &str, seq: i64, row: Option<&StoredNotification>) -> Wake {
        Wake {
            tenant: tenant.into(),
            user: user.into(),
            seq,
            row: row.cloned(),
        }
    }

    #[test]
    fn wake_payloads_are_sealed_by_their_instance_and_carry_small_rows() {
        let (small, big) = (row(7, "thanks"), row(8, &"x".repeat(ROW_IN_NOTIFY_BYTES)));
        let seal = Seal::new("i-1", Some(SECRET));
        let payloads = wake_payloads(
            &seal,
            Lead::From,
            [
                ("t", "u", 7, Some(&small)),
                ("t", "u", 8, Some(&big)),
                ("t", "v", 3, None),
            ],
        );
        assert!(payloads.iter().all(|p| seal.is_own_echo(p)));
        assert!(!Seal::new("i-2", Some(SECRET)).is_own_echo(&payloads[0]));
        assert!(
            payloads.iter().all(|p| p.len() < 8_000),
            "under NOTIFY's limit"
        );
        assert_eq!(
            heard(&payloads).unwrap(),
            [
                expect("t", "u", 7, Some(&small)),
                expect("t", "u", 8, None), // too large to carry: its streams read it
                expect("t", "v", 3, None),
            ]
        );
        // Unsealed, or sealed under another key: refused.
        assert_eq!(
            heard(&[r#"[["t","u",7]]"#.to_owned()]).unwrap_err(),
            Refusal::Malformed
        );
        let stranger = Seal::new("i-1", Some("not-the-cluster-secret-but-32-bytes"));
        let forged = wake_payloads(&stranger, Lead::By, [("t", "u", 7, None)]);
        assert_eq!(heard(&forged).unwrap_err(), Refusal::Signature);
    }

    #[test]
    fn every_field_of_a_wake_up_is_checked_even_under_a_valid_seal() {
        let seal = Seal::new("i-1", Some(SECRET));
        let sealed =
            |wakes: &str| vec![seal.seal(WAKE_CHANNEL, Lead::By, &format!(r#""wakes":{wakes}"#))];
        let mut newline = row(4, "x");
        newline.kind = "order.updated\r\nevent: notification".into();
        let newline = serde_json::to_string(&newline).unwrap();
        let mismatched = serde_json::to_string(&row(3, "x")).unwrap();
        for (wakes, refusal) in [
            (r#"[["t","u","7"]]"#.to_owned(), Refusal::Malformed),
            (
                r#"[["t","u",0]]"#.to_owned(),
                Refusal::Invalid("sequence number"),
            ),
            (
                format!(r#"[["t","u",{}]]"#, MAX_SEQ + 1),
                Refusal::Invalid("sequence number"),
            ),
            (r#"[["t/..","u",1]]"#.to_owned(), Refusal::Invalid("tenant")),
            (r#"[["t","",1]]"#.to_owned(), Refusal::Invalid("user")),
            (
                format!(r#"[["t","u",4,{newline}]]"#),
                Refusal::Invalid("row's kind"),
            ),
            (
                format!(r#"[["t","u",9,{mismatched}]]"#),
                Refusal::Invalid("row's sequence number"),
            ),
        ] {
            assert_eq!(heard(&sealed(&wakes)).unwrap_err(), refusal, "{wakes}");
        }
        assert_eq!(
            heard(&sealed(&format!(r#"[["t","u",{MAX_SEQ}]]"#))).unwrap(),
            [expect("t", "u", MAX_SEQ, None)]
        );
    }

    #[test]
    fn json_arrays_split_under_the_notify_limit_and_keep_every_item_in_order() {
        assert!(json_arrays(Vec::<i64>::new()).is_empty());
        let users: Vec<(String, String, i64)> = (0..2_000)
            .map(|i| ("tenant".to_owned(), format!("user-{i}"), i))
            .collect();
        let arrays = json_arrays(&users);
        assert!(arrays.len() > 1);
        let mut back = Vec::new();
        for array in &arrays {
            assert!(array.len() <= NOTIFY_PAYLOAD_BYTES, "{}", array.len());
            let items: Vec<(String, String, i64)> = serde_json::from_str(array).unwrap();
            back.extend(items);
        }
        assert_eq!(back, users);
        // An item too large for the limit goes alone (PostgreSQL then refuses it, loudly).
        let huge = "x".repeat(NOTIFY_PAYLOAD_BYTES);
        assert_eq!(json_arrays(["a", huge.as_str(), "b"]).len(), 3);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A wake-up to announce: tenant, user (any printable text, quotes and all), seq,
        /// and maybe its row, small or too large to carry.
        fn wake() -> impl Strategy<Value = (String, String, i64, Option<StoredNotification>)> {
            (
                "[A-Za-z0-9_-]{1,64}",
                prop_oneof![3 => "[a-z0-9]{1,12}", 1 => "[^\\p{Cc}]{1,50}"],
                1i64..=MAX_SEQ,
                prop::option::of(prop_oneof![
                    3 => "\\PC{0,60}",
                    1 => (5_500usize..6_200).prop_map(|n| "\"".repeat(n / 2)),
                ]),
            )
                .prop_map(|(tenant, user, seq, body)| {
                    let row = body.map(|body| row(seq, &body));
                    (tenant, user, seq, row)
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(200))]

            /// Whatever the users and rows, the wake-ups fit PostgreSQL's NOTIFY (under
            /// 8 000 bytes each), are sealed by their instance (its own echo only with
            /// `Lead::From`), and are heard exactly as announced, in order: each with its row
            /// when the row is small enough to carry, else without.
            #[test]
            fn wake_ups_fit_a_notify_and_are_heard_as_announced(
                wakes in prop::collection::vec(wake(), 1..40),
                from in "[a-f0-9-]{36}",
                echo in any::<bool>(),
            ) {
                let seal = Seal::new(&from, Some(SECRET));
                let lead = if echo { Lead::From } else { Lead::By };
                let payloads = wake_payloads(
                    &seal,
                    lead,
                    wakes.iter().map(|(t, u, seq, row)| (t.as_str(), u.as_str(), *seq, row.as_ref())),
                );
                for payload in &payloads {
                    prop_assert!(payload.len() < 8_000, "{} bytes", payload.len());
                    prop_assert_eq!(seal.is_own_echo(payload), echo);
                }
                let heard: Vec<Wake> = heard(&payloads)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let expected: Vec<Wake> = wakes
                    .into_iter()
                    .map(|(tenant, user, seq, row)| Wake {
                        tenant,
                        user,
                        seq,
                        row: row.filter(|r| {
                            serde_json::to_string(r).unwrap().len() <= ROW_IN_NOTIFY_BYTES
                        }),
                    })
                    .collect();
                prop_assert_eq!(heard, expected);
            }
        }
    }
}
