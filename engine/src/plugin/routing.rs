//! The routing world's adapter: plugin selection, the call with its limits (fuel, the
//! epoch deadline, an outer tokio bound), the retry of a timed-out call, the breaker's
//! fail mode, and the checks of the decision.

use std::time::Instant;

use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

use super::bindings::wit;
use super::registry::{Loaded, Pre};
use super::sandbox::{self, CallLimits, CallState, STDERR_CAPTURE, plugin_text};
use super::{Cost, Decision, PluginError, PluginHost, classify_trap, outer_bound, output};
use crate::config::BreakerFailMode;
use crate::ingest::envelope::Event;

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
        let result = match self.route_once(&loaded, event).await {
            Err(PluginError::Timeout { plugin, .. }) => {
                tracing::warn!(tenant = %event.tenant, event_id = %event.id, plugin = %plugin, "routing call timed out; retrying once on a fresh instance");
                self.route_once(&loaded, event).await.map_err(|e| match e {
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

    async fn route_once(&self, loaded: &Loaded, event: &Event) -> Result<Decision, PluginError> {
        let input = wit::Event {
            id: event.id.clone(),
            tenant: event.tenant.clone(),
            event_type: event.event_type.clone(),
            time: event.time.to_rfc3339(),
            source: event.source.clone(),
            data: serde_json::Value::Object(event.data.clone()).to_string(),
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

        let stderr = MemoryOutputPipe::new(STDERR_CAPTURE);
        let state = CallState::new(
            &event.tenant,
            &loaded.name,
            &event.id,
            self.tenant_config(&event.tenant),
            stderr.clone(),
        );
        let limits = self.routing_limits();
        let mut store = sandbox::store(&self.engine, state, limits);

        let started = Instant::now();
        let plugin = loaded.name.clone();
        let call = async {
            match &loaded.pre {
                Pre::Routing02(pre) => {
                    let instance = pre.instantiate_async(&mut store).await?;
                    instance
                        .notify_plugin_router()
                        .call_route(&mut store, &input)
                        .await
                }
                Pre::Routing01(pre) => {
                    let instance = pre.instantiate_async(&mut store).await?;
                    let answer = instance
                        .notify_plugin_router()
                        .call_route(&mut store, &(&input).into())
                        .await?;
                    Ok(answer
                        .map(|deliveries| deliveries.into_iter().map(Into::into).collect())
                        .map_err(Into::into))
                }
                Pre::Templating02(_) => unreachable!("select() returns routing plugins only"),
            }
        };
        let result = tokio::time::timeout(outer_bound(limits.timeout), call).await;
        let cost = Cost {
            fuel: limits.fuel.saturating_sub(store.get_fuel().unwrap_or(0)),
            elapsed: started.elapsed(),
            memory_bytes: store.data().limits.peak,
        };
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
                    &stderr.contents(),
                    limits.fuel,
                    self.limits.timeout_ms,
                ));
            }
            Ok(Ok(answer)) => answer,
        };
        let deliveries = match answer {
            Ok(d) => d,
            Err(wit::RouteError::InvalidEvent(message)) => {
                return Err(PluginError::InvalidEvent {
                    plugin,
                    message: plugin_text(&message),
                });
            }
            Err(wit::RouteError::Other(message)) => {
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
        Ok(Decision {
            plugin,
            digest: loaded.digest.clone(),
            deliveries,
            cost,
            logs: store.data_mut().take_logs(),
        })
    }
}
