//! The routing world's adapter: plugin selection, the call with its limits (fuel, the
//! epoch deadline, an outer tokio bound), the retry of a timed-out call, the breaker's
//! fail mode, and the checks of the decision.

use std::sync::Arc;
use std::time::Instant;

use super::bindings::wit;
use super::instances::Bindings;
use super::registry::Loaded;
use super::sandbox::{CallLimits, plugin_text};
use super::{Cost, Decision, PluginError, PluginHost, classify_trap, outer_bound, output};
use crate::config::BreakerFailMode;
use crate::model::Event;

/// Whether a call may run on a warm instance of its tenant.
#[derive(Clone, Copy)]
enum Fresh {
    Any,
    /// The retry of a timed-out call: on an instance of its own, in case the warm one is
    /// what is slow.
    Required,
}

impl PluginHost {
    /// Routes one event through its tenant's plugin (or the default plugin). A call that
    /// runs out of wall-clock time is tried once more on a fresh instance before the
    /// timeout counts: on a busy host the first may have lost its time to other work. A
    /// plugin version quarantined by its breaker is not called: the tenant's events follow
    /// `plugins.breaker_fail_mode`.
    pub async fn route(&self, event: &Event) -> Result<Decision, PluginError> {
        // One plugin for the whole call: a reload swapping the set meanwhile does not
        // affect this call, which finishes on the version it started with.
        let mut loaded = self.select(&event.tenant)?;
        if let Some(failures) = self.breaker.quarantined(&loaded.name, &loaded.digest) {
            match self.limits.breaker_fail_mode {
                // Nothing to fall back to (the default plugin is missing, or quarantined
                // itself): the event is set aside like in fail mode `dead_letter`.
                BreakerFailMode::Default
                    if let Some(default) = self.select_default()
                        && self
                            .breaker
                            .quarantined(&default.name, &default.digest)
                            .is_none() =>
                {
                    loaded = default;
                }
                BreakerFailMode::Default | BreakerFailMode::DeadLetter => {
                    return Err(PluginError::Quarantined {
                        plugin: loaded.name.clone(),
                        failures,
                    });
                }
            }
        }
        let result = match self.route_once(&loaded, event, Fresh::Any).await {
            Err(PluginError::Timeout { plugin, .. }) => {
                tracing::warn!(tenant = %event.tenant, event_id = %event.id, plugin = %plugin, "routing call timed out; retrying once on a fresh instance");
                self.route_once(&loaded, event, Fresh::Required)
                    .await
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
            other => other,
        };
        self.record_outcome(&loaded, &event.tenant, &result);
        result
    }

    fn routing_limits(&self) -> CallLimits {
        CallLimits {
            fuel: self.limits.fuel,
            timeout: self.limits.timeout(),
            memory_bytes: self.limits.memory_bytes,
            hostcall_bytes: self.limits.max_output_bytes.saturating_mul(4),
        }
    }

    async fn route_once(
        &self,
        loaded: &Arc<Loaded>,
        event: &Event,
        fresh: Fresh,
    ) -> Result<Decision, PluginError> {
        let input = wit::Event {
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
        if size > self.limits.max_input_bytes {
            return Err(PluginError::InputTooLarge {
                size,
                limit: self.limits.max_input_bytes,
            });
        }

        let limits = self.routing_limits();
        let mut warm = self.instance_for(&event.tenant, loaded, matches!(fresh, Fresh::Any));
        warm.arm(limits, &event.id);

        let started = Instant::now();
        let plugin = loaded.name.clone();
        let call = async {
            let (store, bindings) = warm.bindings().await?;
            match bindings {
                Bindings::Routing03(b) => b.notify_plugin_router().call_route(store, &input).await,
                Bindings::Routing02(b) => b.notify_plugin_router().call_route(store, &input).await,
                Bindings::Routing01(b) => {
                    let answer = b
                        .notify_plugin_router()
                        .call_route(store, &(&input).into())
                        .await?;
                    Ok(answer
                        .map(|deliveries| deliveries.into_iter().map(Into::into).collect())
                        .map_err(Into::into))
                }
                Bindings::Templating03(_) | Bindings::Templating02(_) => {
                    unreachable!("select() returns routing plugins only")
                }
            }
        };
        let result = tokio::time::timeout(outer_bound(limits.timeout), call).await;
        let cost = Cost {
            fuel: limits.fuel.saturating_sub(warm.fuel_left()),
            elapsed: started.elapsed(),
            memory_bytes: warm.memory_bytes(),
        };
        // From here on, returning early drops the instance: only a clean call gives it back.
        let answer = match result {
            Err(_) => {
                return Err(PluginError::Timeout {
                    plugin,
                    limit_ms: self.limits.timeout_ms,
                    retried: false,
                });
            }
            Ok(Err(e)) => {
                return Err(classify_trap(
                    plugin,
                    e,
                    &warm.call_stderr(),
                    limits.fuel,
                    self.limits.timeout_ms,
                ));
            }
            Ok(Ok(answer)) => answer,
        };
        let logs = warm.store.data_mut().take_logs();
        let deliveries = match answer {
            Ok(d) => d,
            // A refusal is the plugin's judgement of the event, not a malfunction: its
            // instance serves on.
            Err(wit::RouteError::InvalidEvent(message)) => {
                self.instances.give_back(&event.tenant, warm);
                return Err(PluginError::InvalidEvent {
                    plugin,
                    message: plugin_text(&message),
                });
            }
            Err(wit::RouteError::Other(message)) => {
                self.instances.give_back(&event.tenant, warm);
                return Err(PluginError::Failed {
                    plugin,
                    message: plugin_text(&message),
                });
            }
        };
        let deliveries = output::validate(deliveries, &self.limits).map_err(|message| {
            PluginError::InvalidOutput {
                plugin: plugin.clone(),
                message,
            }
        })?;
        self.instances.give_back(&event.tenant, warm);
        Ok(Decision {
            plugin,
            digest: loaded.digest.clone(),
            deliveries,
            cost,
            logs,
        })
    }
}
