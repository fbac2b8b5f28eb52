//! The routing world's adapter, a type borrowing the host: plugin selection with the
//! breaker's fail mode, the call with its limits (fuel, the epoch deadline, an outer tokio
//! bound), the retry of a timed-out call and of a trap on a warm instance, and the checks
//! of the decision.

use std::sync::Arc;
use std::time::Instant;

use super::instances::Warm;
use super::output::{EventText, Refusal};
use super::registry::Loaded;
use super::sandbox::{CallLimits, outer_bound, plugin_text};
use super::wit::types;
use super::{Cost, Decision, PluginError, PluginHost, output};
use crate::config::BreakerFailMode;
use crate::model::Event;

/// Whether a call may run on a warm instance of its tenant.
#[derive(Clone, Copy)]
enum Fresh {
    Any,
    /// The retry of a call that timed out, or trapped on a warm instance: on an instance of
    /// its own, in case the warm one is what is slow or what the trap came from.
    Required,
}

/// Whether a call ran on an instance that had served earlier calls.
#[derive(Clone, Copy)]
enum Reused {
    Yes,
    No,
}

/// Routes events through the host's routing plugins.
pub(super) struct Routing<'a> {
    host: &'a PluginHost,
}

impl<'a> Routing<'a> {
    pub(super) fn new(host: &'a PluginHost) -> Self {
        Routing { host }
    }

    /// Routes one event through its tenant's plugin (or the default plugin). A call that
    /// runs out of wall-clock time is tried once more on a fresh instance before the
    /// timeout counts: on a busy host the first may have lost its time to other work. So is
    /// a call that traps on a warm instance (one that served earlier calls): what the
    /// earlier calls left behind (memory grown near the cap, a global they broke) may be
    /// the cause, not this event. A plugin version quarantined by its breaker for this
    /// tenant is not called: the tenant's events follow `plugins.breaker_fail_mode`.
    pub(super) async fn route(&self, event: &Event) -> Result<Decision, PluginError> {
        // One plugin for the whole call: a reload swapping the set meanwhile does not
        // affect this call, which finishes on the version it started with.
        let loaded = self.choose(&event.tenant)?;
        let result = match self.route_once(&loaded, event, Fresh::Any).await {
            (Err(PluginError::Timeout { plugin, .. }), _) => {
                tracing::warn!(tenant = %event.tenant, event_id = %event.id, plugin = %plugin, "routing call timed out; retrying once on a fresh instance");
                self.route_once(&loaded, event, Fresh::Required)
                    .await
                    .0
                    .map_err(|e| match e {
                        PluginError::Timeout {
                            plugin, limit_ms, ..
                        } => PluginError::Timeout {
                            plugin,
                            limit_ms,
                            retried: true,
                        },
                        other => other,
                    })
            }
            (Err(PluginError::Trap { plugin, message }), Reused::Yes) => {
                tracing::warn!(tenant = %event.tenant, event_id = %event.id, plugin = %plugin, error = %message, "routing call trapped on a warm instance; retrying once on a fresh instance");
                self.route_once(&loaded, event, Fresh::Required).await.0
            }
            (other, _) => other,
        };
        self.host.record_outcome(&loaded, &event.tenant, &result);
        result
    }

    /// The plugin to call for `tenant`: its own, or under fail mode `default` the default
    /// plugin while its own is quarantined for this tenant.
    fn choose(&self, tenant: &str) -> Result<Arc<Loaded>, PluginError> {
        let host = self.host;
        let loaded = host.registry.select(tenant)?;
        let Some(failures) = host
            .breaker
            .quarantined(&loaded.name, &loaded.digest, tenant)
        else {
            return Ok(loaded);
        };
        match host.limits.breaker_fail_mode {
            // Nothing to fall back to (the default plugin is missing, or quarantined
            // itself): the event is set aside like in fail mode `dead_letter`.
            BreakerFailMode::Default
                if let Some(default) = host.registry.select_default()
                    && host
                        .breaker
                        .quarantined(&default.name, &default.digest, tenant)
                        .is_none() =>
            {
                Ok(default)
            }
            BreakerFailMode::Default | BreakerFailMode::DeadLetter => {
                Err(PluginError::Quarantined {
                    plugin: loaded.name.clone(),
                    failures,
                })
            }
        }
    }

    fn limits(&self) -> CallLimits {
        let limits = &self.host.limits;
        CallLimits {
            fuel: limits.fuel,
            timeout: limits.timeout(),
            memory_bytes: limits.memory_bytes,
            hostcall_bytes: limits.max_output_bytes.saturating_mul(4),
        }
    }

    /// One call: the event in the WIT's terms, an instance armed with the call's budgets,
    /// the call under its outer bound, then the answer judged. Only a clean call gives the
    /// instance back for reuse. Also says whether the call ran on a warm instance.
    async fn route_once(
        &self,
        loaded: &Arc<Loaded>,
        event: &Event,
        fresh: Fresh,
    ) -> (Result<Decision, PluginError>, Reused) {
        let input = match self.input(event) {
            Ok(input) => input,
            Err(e) => return (Err(e), Reused::No),
        };
        let limits = self.limits();
        let mut warm = self
            .host
            .instance_for(&event.tenant, loaded, matches!(fresh, Fresh::Any));
        let reused = if warm.is_warm() {
            Reused::Yes
        } else {
            Reused::No
        };
        warm.arm(limits, &event.id);
        (self.call(loaded, event, input, limits, warm).await, reused)
    }

    /// The call on an armed instance, and its answer judged.
    async fn call(
        &self,
        loaded: &Arc<Loaded>,
        event: &Event,
        input: types::Event,
        limits: CallLimits,
        mut warm: Warm,
    ) -> Result<Decision, PluginError> {
        let started = Instant::now();
        let call = async {
            let (store, instance) = warm.bindings().await?;
            instance.route(store, &input).await
        };
        let outcome = tokio::time::timeout(outer_bound(limits.timeout), call).await;
        let cost = Cost {
            fuel: limits.fuel.saturating_sub(warm.fuel_left()),
            elapsed: started.elapsed(),
            memory_bytes: warm.memory_bytes(),
        };
        // From here on, returning early drops the instance: only a clean call gives it back.
        let answer = warm.answer(outcome, limits, self.host.limits.timeout_ms)?;
        let logs = warm.store.data_mut().take_logs();
        let deliveries = self.judge(answer, event, warm)?;
        Ok(Decision {
            plugin: loaded.name.clone(),
            digest: loaded.digest.clone(),
            deliveries,
            cost,
            logs,
        })
    }

    /// The event as the plugin sees it, refused if it is over the input limit.
    fn input(&self, event: &Event) -> Result<types::Event, PluginError> {
        let input = types::Event {
            id: event.id.clone(),
            tenant: event.tenant.clone(),
            event_type: event.event_type.clone(),
            time: event.time.to_rfc3339(),
            source: event.source.clone(),
            data: serde_json::to_string(&event.data).expect("a JSON map serializes"),
        };
        let size = input.id.len()
            + input.tenant.len()
            + input.event_type.len()
            + input.time.len()
            + input.source.as_ref().map_or(0, String::len)
            + input.data.len();
        let limit = self.host.limits.max_input_bytes;
        if size > limit {
            return Err(PluginError::InputTooLarge { size, limit });
        }
        Ok(input)
    }

    /// The plugin's answer judged: its refusal (the plugin's judgement of the event, not a
    /// malfunction: its instance serves on), or its deliveries, checked; the instance goes
    /// back to the tenant's idle set unless the output was invalid by the plugin's fault.
    /// Output made invalid by the event's data is the event's problem
    /// ([`PluginError::InvalidEventData`]), and the instance serves on.
    fn judge(
        &self,
        answer: Result<Vec<types::Delivery>, types::RouteError>,
        event: &Event,
        warm: Warm,
    ) -> Result<Vec<output::Delivery>, PluginError> {
        let tenant = event.tenant.as_str();
        let plugin = warm.loaded.name.clone();
        let deliveries = match answer {
            Ok(d) => d,
            Err(types::RouteError::InvalidEvent(message)) => {
                self.host.instances.give_back(tenant, warm);
                return Err(PluginError::InvalidEvent {
                    plugin,
                    message: plugin_text(&message),
                });
            }
            Err(types::RouteError::Other(message)) => {
                self.host.instances.give_back(tenant, warm);
                return Err(PluginError::Failed {
                    plugin,
                    message: plugin_text(&message),
                });
            }
        };
        match output::validate(deliveries, &self.host.limits, &EventText::of(event)) {
            Ok(deliveries) => {
                self.host.instances.give_back(tenant, warm);
                Ok(deliveries)
            }
            Err(Refusal::Event(message)) => {
                self.host.instances.give_back(tenant, warm);
                Err(PluginError::InvalidEventData { plugin, message })
            }
            Err(Refusal::Plugin(message)) => Err(PluginError::InvalidOutput { plugin, message }),
        }
    }
}
