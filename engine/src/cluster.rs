//! What the instances of one deployment tell each other, through the PostgreSQL they share
//! (no service of its own):
//!
//! - **wake-ups**: every transaction that writes stream rows NOTIFYs `[[tenant, user, seq]]`,
//!   sealed (`store::wake::announce`); [`listen`] publishes them to this instance's hub, so a
//!   stream on any instance hears of rows committed on any other.
//! - **presence**: which users have a stream open on which instance. Each instance writes
//!   its users' first stream opening and last closing ([`Presence::run`], batched, with a
//!   NOTIFY in the same transaction) and keeps a heartbeat; [`listen`] keeps an in-memory
//!   view of everyone else's, which routing plugins ask (`presence.is-online`) without a
//!   query. Staleness: a change is seen elsewhere within [`FLUSH_DELAY`] plus a commit and
//!   a NOTIFY; an instance that dies unannounced keeps its users online until its heartbeat
//!   is older than `presence.ttl_secs`, when any live instance expires it.
//!
//! The listening connection may be lost: wake-ups and presence changes sent meanwhile are
//! gone, so after every (re)connection every local stream is woken to read for itself, and
//! the presence view is read whole again.
//!
//! Any role that can connect to the database can LISTEN and NOTIFY on the same channels, so
//! nothing heard is trusted for being heard: every payload is sealed with `cluster.secret`
//! and every field checked (`store::wake`), and presence news counts only from an instance
//! the `engine_instances` table (which only the engine's role writes) holds alive. What is
//! refused is counted (`notify_cluster_messages_refused_total`) and logged, at most once per
//! [`REFUSAL_LOG_EVERY`] per reason.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::PresenceConfig;
use crate::hub::{Hub, Key};
use crate::store::presence::{self as store, News};
use crate::store::wake::{ClusterListener, Heard, Opener, Refusal};
use crate::telemetry::Metrics;

/// How long presence changes gather before they are written: one statement for a burst of
/// connections (a restarted instance's clients all reconnecting) instead of one each.
pub const FLUSH_DELAY: Duration = Duration::from_millis(50);
/// The pause before retrying after PostgreSQL failed.
const RETRY: Duration = Duration::from_secs(1);
/// Refused messages are logged at most once per this, per reason (each is counted).
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// This instance's identity and its view of who is online where.
pub struct Presence {
    instance: String,
    hub: Arc<Hub>,
    /// The users with a stream on each other instance, as last heard.
    others: RwLock<HashMap<String, HashSet<Key>>>,
    /// Other instances the `engine_instances` table showed alive, whose news is believed
    /// (forgotten when they are gone, or when the view is read anew).
    known: Mutex<HashSet<String>>,
    config: PresenceConfig,
}

/// What the admin listing shows of this instance's view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Streams open on this instance.
    pub local_streams: usize,
    /// Distinct users with a stream open on this instance.
    pub local_users: usize,
    /// Distinct users with a stream open on any instance, as this instance last heard.
    pub cluster_users: usize,
}

impl Presence {
    pub fn new(hub: Arc<Hub>, config: PresenceConfig) -> Arc<Self> {
        Arc::new(Self {
            instance: hub.instance().to_owned(),
            hub,
            others: RwLock::new(HashMap::new()),
            known: Mutex::new(HashSet::new()),
            config,
        })
    }

    /// This instance's id (a UUID per start).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Does (tenant, user) have a stream open here, or on another instance as last heard?
    pub fn is_online(&self, tenant: &str, user_id: &str) -> bool {
        self.hub.is_connected(tenant, user_id) || self.is_online_elsewhere(tenant, user_id)
    }

    /// Does (tenant, user) have a stream open on another instance, as last heard?
    pub fn is_online_elsewhere(&self, tenant: &str, user_id: &str) -> bool {
        let others = self.others.read().expect("presence lock poisoned");
        // Asked for every notification a batch writes: alone, an instance makes no key.
        if others.is_empty() {
            return false;
        }
        let key = (tenant.to_owned(), user_id.to_owned());
        others.values().any(|users| users.contains(&key))
    }

    pub fn counts(&self) -> Counts {
        let (local_streams, local_users) = self.hub.counts();
        let mut everyone: HashSet<Key> = self.hub.connected_users().into_iter().collect();
        for users in self.others.read().expect("presence lock poisoned").values() {
            everyone.extend(users.iter().cloned());
        }
        Counts {
            local_streams,
            local_users,
            cluster_users: everyone.len(),
        }
    }

    /// Applies what another instance announced (this instance's own news is ignored: the
    /// hub is the truth about local streams).
    fn apply(&self, news: News) {
        let mut others = self.others.write().expect("presence lock poisoned");
        let mut known = self.known.lock().expect("presence lock poisoned");
        for gone in &news.gone {
            others.remove(gone);
            known.remove(gone);
        }
        drop(known);
        if news.instance.is_empty() || news.instance == self.instance {
            return;
        }
        let users = others.entry(news.instance).or_default();
        for user in news.offline {
            users.remove(&user);
        }
        users.extend(news.online);
        others.retain(|_, users| !users.is_empty());
    }

    /// Replaces the whole view with what the table holds.
    async fn reload(&self, pool: &PgPool) -> crate::store::Result<()> {
        let everyone = store::everyone(pool, &self.instance).await?;
        let mut others = self.others.write().expect("presence lock poisoned");
        *others = everyone.into_iter().collect();
        *self.known.lock().expect("presence lock poisoned") = others.keys().cloned().collect();
        Ok(())
    }

    /// Is news that `signer` sealed about its own users to be believed? Only if it is this
    /// instance, or an instance the table holds alive (asked once, then remembered until it
    /// is gone). A forged or replayed "online" of an instance that never was, or is no more,
    /// must not suppress anyone's email.
    async fn believes(&self, pool: &PgPool, signer: &str) -> crate::store::Result<bool> {
        if signer == self.instance
            || self
                .known
                .lock()
                .expect("presence lock poisoned")
                .contains(signer)
        {
            return Ok(true);
        }
        let alive = store::alive(pool, signer, self.config.ttl_secs).await?;
        if alive {
            self.known
                .lock()
                .expect("presence lock poisoned")
                .insert(signer.to_owned());
        }
        Ok(alive)
    }

    /// Writes this instance's presence until `shutdown`: registers the instance, writes
    /// each batch of users whose first stream opened or last closed, refreshes the
    /// heartbeat and expires dead instances every `presence.heartbeat_secs`; at shutdown,
    /// removes the instance (its users go offline everywhere at once). While PostgreSQL
    /// fails, changes wait (merged, one entry per user) and are retried every second.
    pub async fn run(self: Arc<Self>, pool: PgPool, shutdown: CancellationToken) {
        let mut pending: HashMap<Key, bool> = HashMap::new();
        let mut registered = false;
        let mut heartbeat = tokio::time::interval(Duration::from_secs(self.config.heartbeat_secs));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.hub.presence_changed() => {
                    tokio::time::sleep(FLUSH_DELAY).await;
                }
                _ = retry => {}
                _ = heartbeat.tick() => self.beat(&pool, &mut registered).await,
            }
            pending.extend(self.hub.take_presence_changes());
            if !registered {
                match store::register(&pool, &self.instance).await {
                    Ok(()) => {
                        registered = true;
                        for user in self.hub.connected_users() {
                            pending.entry(user).or_insert(true);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e.with_cause(), "cannot register this instance's presence; retrying");
                        retry_at = Some(tokio::time::Instant::now() + RETRY);
                        continue;
                    }
                }
            }
            if pending.is_empty() {
                retry_at = None;
                continue;
            }
            let (online, offline): (Vec<_>, Vec<_>) =
                pending.iter().partition(|(_, online)| **online);
            let online: Vec<Key> = online.into_iter().map(|(k, _)| k.clone()).collect();
            let offline: Vec<Key> = offline.into_iter().map(|(k, _)| k.clone()).collect();
            let seal = self.hub.seal();
            match store::write(&pool, seal, &self.instance, &online, &offline).await {
                Ok(()) => {
                    pending.clear();
                    retry_at = None;
                }
                Err(e) => {
                    tracing::warn!(error = %e.with_cause(), changes = pending.len(), "writing presence failed; retrying");
                    // The instance row may be what is missing (expired meanwhile).
                    registered = false;
                    retry_at = Some(tokio::time::Instant::now() + RETRY);
                }
            }
        }
        if let Err(e) = store::unregister(&pool, self.hub.seal(), &self.instance).await {
            tracing::warn!(error = %e.with_cause(), "could not remove this instance's presence; it expires in presence.ttl_secs");
        }
    }

    /// One heartbeat: refreshes this instance's (if it is registered; if it had expired
    /// meanwhile, `registered` turns false so it registers again) and expires the
    /// instances whose heartbeat stopped.
    async fn beat(&self, pool: &PgPool, registered: &mut bool) {
        if *registered {
            match store::heartbeat(pool, &self.instance).await {
                // Expired while away (and its rows with it): register again
                // and write every local user anew.
                Ok(false) => *registered = false,
                Ok(true) => {}
                Err(e) => tracing::warn!(error = %e.with_cause(), "presence heartbeat failed"),
            }
        }
        match store::expire(pool, self.hub.seal(), self.config.ttl_secs).await {
            Ok(gone) if !gone.is_empty() => {
                tracing::warn!(instances = ?gone, "expired instances whose presence heartbeat stopped");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e.with_cause(), "expiring dead instances failed"),
        }
    }
}

impl crate::plugin::Presence for Presence {
    fn is_online(&self, tenant: &str, user_id: &str) -> bool {
        Presence::is_online(self, tenant, user_id)
    }
}

/// Hears what the other instances announce until `shutdown`: wake-ups for the hub,
/// presence changes for the view, refusals for the metrics and the log. After every
/// (re)connection, every local stream is woken and the view is read whole; while
/// PostgreSQL is unreachable, it retries every second.
pub async fn listen(
    hub: Arc<Hub>,
    presence: Arc<Presence>,
    pool: PgPool,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    // What was heard lately, across reconnections: a replay is refused even then.
    let mut opener = Opener::new(hub.seal().clone());
    let mut refusals = Refusals::default();
    loop {
        let Some(mut listener) = connect(&hub, &presence, &pool, &shutdown).await else {
            return;
        };
        loop {
            let heard = tokio::select! {
                _ = shutdown.cancelled() => return,
                heard = listener.next(&mut opener) => heard,
            };
            match heard {
                Ok(Heard::Wakes(wakes)) => {
                    for wake in wakes {
                        match wake.row {
                            // Another instance's row, carried because this instance's user
                            // listens: its streams take it from memory too.
                            Some(row) => {
                                let size = row.approximate_size();
                                hub.publish_row(&wake.tenant, &wake.user, Arc::new(row), size)
                            }
                            None => hub.publish(&wake.tenant, &wake.user, wake.seq),
                        }
                    }
                }
                Ok(Heard::Presence { signer, news }) => {
                    let speaks_for_users = !news.online.is_empty() || !news.offline.is_empty();
                    match presence.believes(&pool, &signer).await {
                        Ok(false) if speaks_for_users => refusals.refused(
                            &metrics,
                            store::PRESENCE_CHANNEL,
                            Refusal::UnknownInstance,
                        ),
                        Ok(_) => presence.apply(news),
                        Err(e) => {
                            // The news cannot be checked: read the whole view anew instead.
                            tracing::warn!(error = %e.with_cause(), "cannot check an instance's presence news; listening again");
                            break;
                        }
                    }
                }
                Ok(Heard::Refused { channel, refusal }) => {
                    refusals.refused(&metrics, channel, refusal)
                }
                Ok(Heard::Reconnected) => {
                    hub.wake_all();
                    if let Err(e) = presence.reload(&pool).await {
                        tracing::warn!(error = %e.with_cause(), "cannot read the cluster's presence after reconnecting; listening again");
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e.with_cause(), "lost the cluster listener; reconnecting");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(RETRY) => {}
                    }
                    break;
                }
            }
        }
    }
}

/// Listens anew, then reads the presence view whole (in that order: no change falls
/// between the two) and wakes every local stream (whatever was committed before it
/// listened). Retries every second; `None` at `shutdown`.
async fn connect(
    hub: &Hub,
    presence: &Presence,
    pool: &PgPool,
    shutdown: &CancellationToken,
) -> Option<ClusterListener> {
    loop {
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return None,
            connected = ClusterListener::connect(pool) => connected,
        };
        match connected {
            Ok(listener) => match presence.reload(pool).await {
                Ok(()) => {
                    hub.wake_all();
                    return Some(listener);
                }
                Err(e) => {
                    tracing::warn!(error = %e.with_cause(), "cannot read the cluster's presence; retrying")
                }
            },
            Err(e) => {
                tracing::warn!(error = %e.with_cause(), "cannot listen for other instances' news; retrying")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// Refused messages: each counted, and logged at most once per [`REFUSAL_LOG_EVERY`] per
/// reason, with how many went unlogged (a flood of forgeries must not flood the log).
#[derive(Default)]
struct Refusals {
    /// Per reason: when it was last logged, and how many since.
    logged: HashMap<&'static str, (Instant, u64)>,
}

impl Refusals {
    fn refused(&mut self, metrics: &Metrics, channel: &'static str, refusal: Refusal) {
        let reason = refusal.reason();
        metrics
            .cluster_messages_refused
            .with_label_values(&[channel, reason])
            .inc();
        let now = Instant::now();
        if let Some((at, unlogged)) = self.logged.get_mut(reason)
            && now.duration_since(*at) < REFUSAL_LOG_EVERY
        {
            *unlogged += 1;
            return;
        }
        let unlogged = self.logged.insert(reason, (now, 0)).map_or(0, |(_, n)| n);
        tracing::warn!(
            channel, reason, refused_unlogged = unlogged, why = %refusal,
            "a message on the engine's NOTIFY channels was refused; if it came from an \
             engine, give every instance the same cluster.secret (NOTIFY_CLUSTER__SECRET) \
             and synchronised clocks; otherwise another database role is speaking on \
             them (REVOKE CONNECT ON DATABASE ... FROM PUBLIC, docs/security.md)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(t: &str, u: &str) -> Key {
        (t.to_owned(), u.to_owned())
    }

    #[test]
    fn the_view_follows_news_of_other_instances_and_forgets_the_gone() {
        let hub = Hub::new();
        let presence = Presence::new(hub.clone(), PresenceConfig::default());
        assert!(!presence.is_online("t", "u"));
        presence.apply(News {
            instance: "other".into(),
            online: vec![key("t", "u"), key("t", "v")],
            ..News::default()
        });
        assert!(presence.is_online("t", "u"));
        assert!(!presence.is_online("t2", "u"), "scoped by tenant");
        presence.apply(News {
            instance: "third".into(),
            online: vec![key("t", "u")],
            ..News::default()
        });
        presence.apply(News {
            instance: "other".into(),
            offline: vec![key("t", "u")],
            ..News::default()
        });
        assert!(presence.is_online("t", "u"), "still on the third instance");
        presence.apply(News {
            gone: vec!["third".into()],
            ..News::default()
        });
        assert!(!presence.is_online("t", "u"));
        assert!(presence.is_online("t", "v"));
        assert_eq!(presence.counts().cluster_users, 1);
        // News about this very instance is ignored: its hub is the truth.
        presence.apply(News {
            instance: presence.instance().to_owned(),
            online: vec![key("t", "w")],
            ..News::default()
        });
        assert!(!presence.is_online("t", "w"));
    }

    #[test]
    fn a_local_stream_is_online_at_once() {
        let hub = Hub::new();
        let presence = Presence::new(hub.clone(), PresenceConfig::default());
        let caps = crate::hub::Caps {
            per_user: 2,
            per_tenant: 10,
            global: 10,
            tenant_share: 1.0,
        };
        let stream = hub.subscribe("t", "u", caps).unwrap();
        assert!(presence.is_online("t", "u"));
        assert_eq!(
            presence.counts(),
            Counts {
                local_streams: 1,
                local_users: 1,
                cluster_users: 1
            }
        );
        assert_eq!(
            hub.take_presence_changes(),
            HashMap::from([(key("t", "u"), true)])
        );
        let second = hub.subscribe("t", "u", caps).unwrap();
        drop(stream);
        assert!(
            hub.take_presence_changes().is_empty(),
            "only a user's first opening and last closing are changes"
        );
        drop(second);
        assert!(!presence.is_online("t", "u"));
        assert_eq!(
            hub.take_presence_changes(),
            HashMap::from([(key("t", "u"), false)])
        );
    }
}
