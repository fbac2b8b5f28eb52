//! Cluster-wide wake-ups over PostgreSQL's LISTEN/NOTIFY: a batch [`announce`]s the users
//! whose streams got rows (delivered at commit), and each instance's [`ClusterListener`]
//! hears them, and presence news, from the others. Also how a payload is packed under
//! NOTIFY's size limit ([`json_arrays`], shared with [`super::presence`]).

use sqlx::{PgConnection, PgPool};

use super::{Result, presence};
use crate::model::StoredNotification;

/// The channel on which every instance of a deployment (one database) hears of committed
/// stream rows: the hub's cluster-wide wake-ups (`cluster::listen`).
pub const WAKE_CHANNEL: &str = "notify_engine_wake";
/// PostgreSQL takes NOTIFY payloads below 8000 bytes; what is announced is split to stay
/// under it.
const NOTIFY_PAYLOAD_BYTES: usize = 7_000;

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

/// One user's wake-up as announced: `[tenant, user, seq]`, or with the row itself.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum WakeOut<'a> {
    Bare(&'a str, &'a str, i64),
    Row(&'a str, &'a str, i64, Box<serde_json::value::RawValue>),
}

/// Tells every instance, when `tx` commits, that these users' streams have rows up to these
/// sequence numbers: `{"from": instance, "wakes": [[tenant, user, seq], …]}` on
/// [`WAKE_CHANNEL`] (just the array without `from`), in as few NOTIFYs as fit. A wake-up
/// with a row (`[tenant, user, seq, row]`) carries it to instances where the user listens, so
/// their streams need not read it back. NOTIFY is transactional: delivered at commit and
/// only then, so no listener looks for a row it cannot see yet, and a rolled-back batch wakes
/// nobody.
pub async fn announce<'a>(
    tx: &mut PgConnection,
    from: Option<&str>,
    wakes: impl IntoIterator<Item = (&'a str, &'a str, i64, Option<&'a StoredNotification>)>,
) -> Result<()> {
    for payload in wake_payloads(from, wakes) {
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
    /// Users that came online or went offline on another instance, or instances gone.
    Presence(presence::News),
    /// The connection was lost and made again: what was sent meanwhile is gone.
    Reconnected,
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
/// [`presence::PRESENCE_CHANNEL`], for the instance `own`.
pub struct ClusterListener {
    listener: sqlx::postgres::PgListener,
    /// How this instance's own wake-ups start: the echo of its batches, skipped unread.
    own: String,
}

impl ClusterListener {
    pub async fn connect(pool: &PgPool, own: &str) -> Result<Self> {
        let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
        listener
            .listen_all([WAKE_CHANNEL, presence::PRESENCE_CHANNEL])
            .await?;
        Ok(Self {
            listener,
            own: own_prefix(own),
        })
    }

    /// The next news. A payload that is not ours (another program notifying on the
    /// channel) is skipped with a warning.
    pub async fn next(&mut self) -> Result<Heard> {
        loop {
            let Some(notification) = self.listener.try_recv().await? else {
                return Ok(Heard::Reconnected);
            };
            let payload = notification.payload();
            let heard = if notification.channel() == WAKE_CHANNEL {
                // This instance's streams took those rows from memory after the commit; the
                // echo (often first) would have sent them to PostgreSQL for them.
                if payload.starts_with(&self.own) {
                    continue;
                }
                parse_wakes(payload).map(Heard::Wakes)
            } else {
                serde_json::from_str(payload).map(Heard::Presence)
            };
            match heard {
                Ok(heard) => return Ok(heard),
                Err(e) => {
                    tracing::warn!(error = %e, channel = notification.channel(), "a NOTIFY that is not the engine's; ignored")
                }
            }
        }
    }
}

/// The NOTIFY payloads of [`announce`].
fn wake_payloads<'a>(
    from: Option<&str>,
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
        .map(|array| match from {
            // Under PostgreSQL's 8000 bytes: the array is at most NOTIFY_PAYLOAD_BYTES.
            Some(from) => format!(r#"{},"wakes":{array}}}"#, own_prefix(from)),
            None => array,
        })
        .collect()
}

/// How the wake-ups of instance `id` start ([`announce`] writes `from` first).
fn own_prefix(id: &str) -> String {
    format!(r#"{{"from":{}"#, serde_json::Value::from(id))
}

/// A [`WAKE_CHANNEL`] payload: `{"from", "wakes"}`, or just the array; each wake-up is
/// `[tenant, user, seq]` or `[tenant, user, seq, row]`.
fn parse_wakes(payload: &str) -> serde_json::Result<Vec<Wake>> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum WakeIn {
        Bare(String, String, i64),
        Row(String, String, i64, Box<StoredNotification>),
    }
    // `from` is not read: the listener skipped its own instance's before parsing.
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Payload {
        Bare(Vec<WakeIn>),
        Object { wakes: Vec<WakeIn> },
    }
    let (Payload::Bare(wakes) | Payload::Object { wakes }) = serde_json::from_str(payload)?;
    Ok(wakes
        .into_iter()
        .map(|w| match w {
            WakeIn::Bare(tenant, user, seq) => Wake {
                tenant,
                user,
                seq,
                row: None,
            },
            WakeIn::Row(tenant, user, seq, row) => Wake {
                tenant,
                user,
                seq,
                // A row that is not the one announced is not trusted: its streams read.
                row: (row.seq == seq).then_some(*row),
            },
        })
        .collect())
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

    #[test]
    fn wake_payloads_name_their_instance_and_carry_small_rows() {
        let (small, big) = (row(7, "thanks"), row(8, &"x".repeat(ROW_IN_NOTIFY_BYTES)));
        let payloads = wake_payloads(
            Some("i-1"),
            [
                ("t", "u", 7, Some(&small)),
                ("t", "u", 8, Some(&big)),
                ("t", "v", 3, None),
            ],
        );
        assert!(payloads.iter().all(|p| p.starts_with(&own_prefix("i-1"))));
        assert!(!payloads[0].starts_with(&own_prefix("i-2")));
        assert!(
            payloads.iter().all(|p| p.len() < 8_000),
            "under NOTIFY's limit"
        );
        let heard: Vec<Wake> = payloads
            .iter()
            .flat_map(|p| parse_wakes(p).unwrap())
            .collect();
        let expect = |tenant: &str, user: &str, seq, row: Option<&StoredNotification>| Wake {
            tenant: tenant.into(),
            user: user.into(),
            seq,
            row: row.cloned(),
        };
        assert_eq!(
            heard,
            [
                expect("t", "u", 7, Some(&small)),
                expect("t", "u", 8, None), // too large to carry: its streams read it
                expect("t", "v", 3, None),
            ]
        );
        // An inbox change's bare array, and an older instance's.
        assert_eq!(
            parse_wakes(r#"[["t","u",7]]"#).unwrap(),
            [expect("t", "u", 7, None)]
        );
        assert!(parse_wakes(r#"[["t","u","7"]]"#).is_err());
        // A carried row that is not the announced one is dropped.
        let mismatched = wake_payloads(None, [("t", "u", 9, Some(&small))]);
        assert_eq!(
            parse_wakes(&mismatched[0]).unwrap(),
            [expect("t", "u", 9, None)]
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
                prop_oneof![3 => "[a-z0-9]{1,12}", 1 => "[^\\p{Cc}]{1,200}"],
                1i64..i64::MAX,
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
            /// 8 000 bytes each), name their instance, and are heard exactly as announced, in
            /// order: each with its row when the row is small enough to carry, else without.
            #[test]
            fn wake_ups_fit_a_notify_and_are_heard_as_announced(
                wakes in prop::collection::vec(wake(), 1..40),
                from in prop::option::of("[a-z0-9-]{1,40}"),
            ) {
                let payloads = wake_payloads(
                    from.as_deref(),
                    wakes.iter().map(|(t, u, seq, row)| (t.as_str(), u.as_str(), *seq, row.as_ref())),
                );
                for payload in &payloads {
                    prop_assert!(payload.len() < 8_000, "{} bytes", payload.len());
                    if let Some(from) = &from {
                        prop_assert!(payload.starts_with(&own_prefix(from)));
                    }
                }
                let heard: Vec<Wake> = payloads
                    .iter()
                    .map(|p| parse_wakes(p))
                    .collect::<serde_json::Result<Vec<_>>>()
                    .map_err(|e| TestCaseError::fail(e.to_string()))?
                    .into_iter()
                    .flatten()
                    .collect();
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
