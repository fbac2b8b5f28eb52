//! What readiness and the status report read: a snapshot kept current in the background
//! (the database and Kafka probes, the plugin set) and by the pipeline (stalled or flowing).
//! `/readyz` and `/status` only read it, so a flood of probe requests costs no database
//! connection.
//!
//! Two questions, two answers: *can this instance serve its HTTP routes* (`serving`:
//! PostgreSQL, all the inbox and SSE need) is what a load balancer asks; *is every part of
//! the engine well* (`healthy`: also Kafka, the pipeline's lanes) is what an operator asks.
//! A broker outage or one tenant's stalled lane must not take every replica out of the
//! load balancer and every browser's stream with it.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use serde::Serialize;

#[derive(Default)]
pub struct Health {
    postgres: AtomicBool,
    kafka: AtomicBool,
    /// The SMTP relay as the email worker last found it: 0 not known yet (no send or probe
    /// since the start), 1 answering, 2 unavailable.
    smtp: AtomicU8,
    /// Why a pipeline lane cannot commit its current batch, per lane; empty while all flow.
    stalls: Mutex<BTreeMap<String, String>>,
    plugins: Mutex<PluginsHealth>,
    /// Template edits the last reload refused (the previous version keeps serving), or why
    /// the reload failed as a whole.
    templates: Mutex<Vec<String>>,
}

/// The routing plugins as loaded.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PluginsHealth {
    /// `ok`, `missing` or `broken`.
    pub default: String,
    /// Plugins that failed to load, with the reason: their tenants' events wait in the
    /// dead-letter table (kind `plugin_unavailable`) until the file is fixed.
    pub broken: Vec<String>,
    /// Plugins whose newest file was refused (with the reason) while their previous
    /// version keeps serving.
    pub rejected: Vec<String>,
    /// Plugin versions stopped by their breaker for one tenant (consecutive failures of
    /// that tenant's events), until a new version: `plugin (digest) for tenant t: N
    /// consecutive failures`. Other tenants keep the plugin, so the engine stays ready.
    pub quarantined: Vec<String>,
}

/// One reading, as `/readyz` (`serving`) and `/status` (all of it) show it.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// The HTTP routes can answer: PostgreSQL answered its last probe.
    pub serving: bool,
    /// Every component is well: consuming, and the SMTP relay not known to be down.
    pub healthy: bool,
    pub postgres: bool,
    pub kafka: bool,
    /// The SMTP relay: `None` until the first send or probe. Emails wait in the outbox
    /// while it is down, so it leaves `consuming` alone.
    pub smtp: Option<bool>,
    /// The pipeline moves: serving, Kafka answers and no lane is stalled.
    pub consuming: bool,
    /// The first stall's reason (and how many more), for a one-line summary.
    pub stall: Option<String>,
    /// Every stalled lane with its reason.
    pub stalls: BTreeMap<String, String>,
    pub plugins: PluginsHealth,
    pub templates_rejected: Vec<String>,
}

impl Health {
    /// Returns whether the state changed.
    pub fn set_postgres(&self, ok: bool) -> bool {
        self.postgres.swap(ok, Ordering::Relaxed) != ok
    }

    /// Returns whether the state changed.
    pub fn set_kafka(&self, ok: bool) -> bool {
        self.kafka.swap(ok, Ordering::Relaxed) != ok
    }

    /// Records why `lane` is stalled, or (`None`) that it flows again.
    pub fn set_stall(&self, lane: &str, reason: Option<String>) {
        let mut stalls = self.stalls.lock().expect("health lock poisoned");
        match reason {
            Some(reason) => {
                stalls.insert(lane.to_owned(), reason);
            }
            None => {
                stalls.remove(lane);
            }
        }
    }

    /// The email worker's last finding about the relay: a send or probe that worked, or a
    /// failure that is the relay's. Returns whether the state changed.
    pub fn set_smtp(&self, ok: bool) -> bool {
        self.smtp.swap(if ok { 1 } else { 2 }, Ordering::Relaxed) != if ok { 1 } else { 2 }
    }

    /// What the last template reload refused; empty when it took every file.
    pub fn set_templates(&self, rejected: Vec<String>) {
        *self.templates.lock().expect("health lock poisoned") = rejected;
    }

    pub fn set_plugins(&self, plugins: PluginsHealth) {
        *self.plugins.lock().expect("health lock poisoned") = plugins;
    }

    /// Serving: PostgreSQL answers. Consuming: that, Kafka answers and no lane is stalled.
    /// Healthy: consuming, and the SMTP relay not known to be down.
    pub fn snapshot(&self) -> Snapshot {
        let postgres = self.postgres.load(Ordering::Relaxed);
        let kafka = self.kafka.load(Ordering::Relaxed);
        let stalls = self.stalls.lock().expect("health lock poisoned").clone();
        let stall = stalls.values().next().map(|reason| match stalls.len() {
            1 => reason.clone(),
            n => format!("{reason} (and {} more lanes)", n - 1),
        });
        let smtp = match self.smtp.load(Ordering::Relaxed) {
            0 => None,
            state => Some(state == 1),
        };
        let consuming = postgres && kafka && stall.is_none();
        Snapshot {
            serving: postgres,
            healthy: consuming && smtp != Some(false),
            postgres,
            kafka,
            smtp,
            consuming,
            stall,
            stalls,
            plugins: self.plugins.lock().expect("health lock poisoned").clone(),
            templates_rejected: self.templates.lock().expect("health lock poisoned").clone(),
        }
    }
}
