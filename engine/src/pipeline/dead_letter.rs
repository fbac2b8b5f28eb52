//! Dead letters: a message the engine will not deliver, kept with its reason, and a
//! replayed dead letter's token: checked before the message is routed (a token counts only
//! for the payload, topic and event it was issued for, and only while fresh), accepted once
//! in the transaction that handles it again.
//!
//! A message is dead-lettered for its own data only: refused by ingest ([`Rejection`]),
//! judged or set aside by its plugin, or refused by the database (then alone, in a
//! transaction of its own, see [`Pipeline::dead_letter_alone`]).

use std::borrow::Cow;
use std::time::Duration;

use super::dispatch::Work;
use super::effects::Effects;
use super::{Pipeline, Prepared, Step, rows};
use crate::ingest::Incoming;
use crate::ingest::envelope::{Rejection, RejectionKind};
use crate::model::Event;
use crate::plugin::PluginError;
use crate::store::StoreError;
use crate::store::dead_letters::{self, NewDeadLetter, ReplayCheck, ReplayClaim};

/// A dead letter about to be written.
pub(super) struct DeadLetter<'a> {
    message: &'a Incoming,
    tenant: Option<&'a str>,
    event_id: Option<&'a str>,
    kind: Cow<'a, str>,
    reason: Cow<'a, str>,
    plugin: Option<&'a str>,
}

impl<'a> DeadLetter<'a> {
    /// A message ingest refused, with whatever of its tenant and id could be read.
    pub fn rejected(message: &'a Incoming, rejection: &'a Rejection) -> Self {
        Self {
            message,
            tenant: rejection.tenant.as_deref(),
            event_id: rejection.event_id.as_deref(),
            kind: rejection.kind.as_str().into(),
            reason: rejection.reason.as_str().into(),
            plugin: None,
        }
    }

    /// An event its plugin judged, or could not route.
    pub fn plugin(message: &'a Incoming, event: &'a Event, error: &'a PluginError) -> Self {
        Self {
            message,
            tenant: Some(&event.tenant),
            event_id: Some(&event.id),
            kind: format!("plugin_{}", error.kind()).into(),
            reason: error.to_string().into(),
            plugin: error.plugin(),
        }
    }

    /// A message whose data the database refused, with its event's tenant and id when it
    /// decoded.
    fn refused(message: &'a Incoming, event: Option<&'a Event>, error: &StoreError) -> Self {
        Self {
            message,
            tenant: event.map(|e| e.tenant.as_str()),
            event_id: event.map(|e| e.id.as_str()),
            kind: "store".into(),
            reason: format!(
                "the database refused this message's data: {}",
                error.with_cause()
            )
            .into(),
            plugin: None,
        }
    }

    /// Its `dead_letters` row.
    fn row(&self) -> NewDeadLetter<'_> {
        NewDeadLetter {
            tenant: self.tenant,
            event_id: self.event_id,
            origin: rows::origin(self.message),
            key: self.message.key.as_deref(),
            payload: self.message.payload.as_deref().unwrap_or_default(),
            headers: &self.message.headers,
            error_kind: &self.kind,
            reason: &self.reason,
            plugin: self.plugin,
        }
    }
}

impl Pipeline {
    /// Writes `d`; counted in `effects` when stored (a redelivered message's dead letter
    /// is stored once).
    pub(super) async fn dead_letter(
        &self,
        tx: &mut sqlx::PgConnection,
        d: DeadLetter<'_>,
        effects: &mut Effects,
    ) -> Result<(), StoreError> {
        let stored = dead_letters::insert_dead_letter(tx, &d.row()).await?;
        if stored {
            effects.dead_lettered.push(d.kind.into_owned());
        }
        Ok(())
    }

    /// Dead-letters a single message whose data the database refused, in a transaction of
    /// its own, with its tenant and event id when it decoded. The event is not claimed: a
    /// corrected event republished under the same id is handled.
    pub(super) async fn dead_letter_alone(
        &self,
        one: &Prepared,
        error: &StoreError,
    ) -> Result<(), StoreError> {
        let event = one.step.event();
        tracing::warn!(
            tenant = event.map_or("-", |e| e.tenant.as_str()),
            event_id = event.map_or("-", |e| e.id.as_str()),
            error = %error.with_cause(), "the database refused this message's data; dead-lettered"
        );
        let mut tx = self.pool.begin().await?;
        let mut effects = Effects::consumed(std::slice::from_ref(one));
        let dead = DeadLetter::refused(&one.message, event, error);
        self.dead_letter(&mut tx, dead, &mut effects).await?;
        self.unspill(&mut tx, std::slice::from_ref(one)).await?;
        tx.commit().await?;
        self.acknowledge(std::slice::from_ref(one), effects);
        Ok(())
    }
}

/// What a message's replay token means for its handling (see [`Pipeline::check_replay`]).
pub(super) enum Replay {
    /// No token: an ordinary message (so is a redelivery of a replay already accepted, and
    /// a message whose token the engine does not know: it grants nothing).
    None,
    /// A token issued for this message, unused and fresh: routed again although claimed.
    Valid(uuid::Uuid),
    /// A token issued for another message, expired, or a malformed header: a dead letter
    /// saying why.
    /// The dead letter the token was issued for is untouched, so it can be replayed again.
    Refused(Rejection),
}

impl Pipeline {
    /// Checks `work`'s replay token, if it has one, before it is routed.
    pub(super) async fn check_replay(&self, work: &Work) -> Result<Replay, StoreError> {
        let Some(token) = work.message.replay_token() else {
            return Ok(Replay::None);
        };
        let (tenant, event_id) = match &work.decoded {
            Ok(event) => (Some(event.tenant.as_str()), Some(event.id.as_str())),
            Err(rejection) => (rejection.tenant.as_deref(), rejection.event_id.as_deref()),
        };
        // Logged with the reason when its dead letter is committed, as any rejection.
        let refuse = |why: String| {
            Replay::Refused(Rejection {
                kind: RejectionKind::Validation,
                reason: format!("replay refused: {why}"),
                tenant: tenant.map(str::to_owned),
                event_id: event_id.map(str::to_owned),
            })
        };
        let token = match token {
            Ok(token) => token,
            Err(why) => return Ok(refuse(why)),
        };
        let claim = replay_claim(&work.message, token, tenant, event_id);
        Ok(
            match dead_letters::check_replay(&self.pool, &claim, self.replay_ttl()).await? {
                ReplayCheck::Valid => Replay::Valid(token),
                ReplayCheck::Used => Replay::None,
                ReplayCheck::Unknown => {
                    tracing::info!(topic = %work.message.topic, partition = work.message.partition, offset = work.message.offset, "replay token unknown (never issued, or replaced by a later replay): handled as an ordinary message");
                    Replay::None
                }
                ReplayCheck::Refused(why) => refuse(why),
            },
        )
    }

    /// How long a replay token counts (`kafka.replay_token_ttl_secs`).
    pub(super) fn replay_ttl(&self) -> Duration {
        Duration::from_secs(self.kafka.replay_token_ttl_secs)
    }
}

/// What binds a token to `message` (see [`dead_letters::judge_replay`]).
fn replay_claim<'a>(
    message: &'a Incoming,
    token: uuid::Uuid,
    tenant: Option<&'a str>,
    event_id: Option<&'a str>,
) -> ReplayClaim<'a> {
    ReplayClaim {
        token,
        topic: &message.topic,
        tenant,
        event_id,
        payload: message.payload.as_deref().unwrap_or_default(),
    }
}

/// A replayed dead letter whose token was valid before routing: the transaction accepts the
/// token once (then the event's dead-lettered claim is released, so it is routed again).
pub(super) async fn replay(
    tx: &mut sqlx::PgConnection,
    one: &Prepared,
    token: uuid::Uuid,
    ttl: Duration,
) -> Result<(), StoreError> {
    match &one.step {
        Step::Routed(event, _) | Step::Failed(event, _) | Step::Parked(event, _) => {
            let claim = replay_claim(&one.message, token, Some(&event.tenant), Some(&event.id));
            if dead_letters::accept_replay(tx, &claim, ttl).await? {
                tracing::info!(tenant = %event.tenant, event_id = %event.id, "dead letter replayed");
            }
        }
        Step::Rejected(rejection) => {
            let claim = replay_claim(
                &one.message,
                token,
                rejection.tenant.as_deref(),
                rejection.event_id.as_deref(),
            );
            dead_letters::mark_replayed(tx, &claim, ttl).await?;
        }
        Step::Duplicate => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests;
