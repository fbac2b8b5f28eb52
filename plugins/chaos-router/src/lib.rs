//! TEST FIXTURE — never deploy for a real tenant.
//!
//! A routing plugin that misbehaves on request, to test the engine's sandboxing: traps, fuel
//! and epoch limits, the memory limit, output validation and output size limits. The
//! behaviour is chosen by the string `data.chaos`:
//!
//! | `chaos`       | behaviour                                                                  |
//! |---------------|----------------------------------------------------------------------------|
//! | (absent)      | one in-app delivery `{title "chaos ok", body <event id>}` to `data.user_id` |
//! | `trap`        | panics: the component traps (`unreachable`)                                |
//! | `loop`        | busy-loops forever (only fuel or an epoch deadline stops it)               |
//! | `oom`         | allocates and touches 1 MiB chunks until allocation fails (\*)        |
//! | `error`       | returns `Err(other("chaos: refused"))`                                     |
//! | `bad_output`  | an in-app delivery with an empty user id and `data` that is not JSON       |
//! | `huge_output` | 2000 in-app deliveries with 1 KiB bodies (~2 MiB, way over 64 KiB)         |
//! | `slow`        | busy-waits `data.spin_ms` (default 90) ms of wall clock, then as if absent  |
//! | `recurse`     | recurses without end: the guest stack overflows (a trap)                   |
//! | `remember`    | `{title "chaos remembered", body <what it remembered, or "nothing">}`, then remembers `<tenant>/<event id>` in a global |
//! | `remember_then_trap` | remembers `<tenant>/<event id>`, then panics                        |
//!
//! (\*) A host whose memory limiter traps on a refused `memory.grow` sees a trap; one that lets
//! the grow fail gets `Err(other("chaos: allocation failed after N MiB"))`.
//!
//! Any other `chaos` value is an invalid event. There is no `sleep` mode yet (WASI clocks are linked,
//! so a sleeping plugin is stopped by the engine's outer wall-clock bound, not by fuel or epochs).
//! `slow` stands for a tenant whose routing is expensive: the noisy neighbour.

#[path = "misbehave.rs"]
mod misbehave;

use misbehave::{exhaust_memory, recurse, spin_for, spin_forever};
use notify_plugin_sdk::{Data, Delivery, Event, InApp, RouteError, Router, json, warn};

struct ChaosRouter;

impl Router for ChaosRouter {
    fn route(event: Event) -> Result<Vec<Delivery>, RouteError> {
        route_event(&event)
    }
}

notify_plugin_sdk::export_router!(ChaosRouter);

const HUGE_COUNT: usize = 2000;

/// What `remember` saw last: state kept in the instance between calls, for the engine's
/// isolation tests (another tenant, or the call after a trap, must never see it).
static REMEMBERED: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn remember(event: &Event) -> Option<String> {
    let mut remembered = REMEMBERED.lock().unwrap_or_else(|e| e.into_inner());
    remembered.replace(format!("{}/{}", event.tenant, event.id))
}

fn chaos_item(user_id: &str, title: &str, event: &Event) -> Delivery {
    InApp::new(user_id, title)
        .body(&event.id)
        .category("chaos")
        .data(json!({}))
        .into()
}

/// The misbehaviour for `data.chaos`. `trap`, `loop` and `oom` are not unit-tested natively.
pub fn route_event(event: &Event) -> Result<Vec<Delivery>, RouteError> {
    let data = Data::parse(event)?;
    let mode = data.opt_str("chaos")?;
    if let Some(mode) = mode {
        warn!("chaos: {mode}");
    }
    match mode {
        Some("slow") => {
            let ms = data.opt_f64("spin_ms")?.unwrap_or(90.0);
            spin_for(std::time::Duration::from_secs_f64(
                ms.clamp(0.0, 10_000.0) / 1000.0,
            ));
            Ok(vec![chaos_item(data.str("user_id")?, "chaos slow", event)])
        }
        None => Ok(vec![chaos_item(data.str("user_id")?, "chaos ok", event)]),
        Some("trap") => panic!("chaos: trap requested by event {}", event.id),
        Some("loop") => spin_forever(),
        Some("oom") => Err(RouteError::other(format!(
            "chaos: allocation failed after {} MiB",
            exhaust_memory()
        ))),
        Some("error") => Err(RouteError::other("chaos: refused")),
        Some("remember") => {
            let before = remember(event).unwrap_or_else(|| "nothing".into());
            Ok(vec![
                InApp::new(data.str("user_id")?, "chaos remembered")
                    .body(before)
                    .category("chaos")
                    .data(json!({}))
                    .into(),
            ])
        }
        Some("remember_then_trap") => {
            remember(event);
            panic!("chaos: trap after remembering {}", event.id)
        }
        Some("recurse") => Ok(vec![chaos_item(
            data.str("user_id")?,
            &format!("chaos recursed {}", recurse(0)),
            event,
        )]),
        Some("bad_output") => Ok(vec![
            InApp::new("", "chaos bad output")
                .body(&event.id)
                .category("chaos")
                .data(json!(["not", "an", "object"]))
                .into(),
        ]),
        Some("huge_output") => {
            let user_id = data.opt_str("user_id")?.unwrap_or("chaos-user");
            // Clones of one delivery: cheap in fuel (~1M of the 20M budget), so that the output
            // size limit, not the fuel limit, is what this mode runs into.
            let one: Delivery = InApp::new(user_id, "chaos huge")
                .body("x".repeat(1024))
                .category("chaos")
                .into();
            Ok(vec![one; HUGE_COUNT])
        }
        Some(other) => Err(RouteError::invalid_event(format!(
            "data.chaos must be one of trap, loop, oom, recurse, error, bad_output, huge_output, slow, remember, remember_then_trap (got {other:?})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn event(data: Value) -> Event {
        Event {
            id: "evt-chaos".into(),
            tenant: "chaos".into(),
            event_type: "anything".into(),
            time: "2026-01-01T00:00:00Z".into(),
            source: None,
            data: data.to_string(),
        }
    }

    #[test]
    fn slow_spins_then_delivers() {
        let started = std::time::Instant::now();
        let out = route_event(&event(
            json!({"user_id": "u-1", "chaos": "slow", "spin_ms": 5}),
        ))
        .unwrap();
        assert!(started.elapsed() >= std::time::Duration::from_millis(5));
        match &out[..] {
            [Delivery::InApp(item)] => assert_eq!(item.title, "chaos slow"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ok_without_chaos() {
        let out = route_event(&event(json!({"user_id": "u-1"}))).unwrap();
        match &out[..] {
            [Delivery::InApp(item)] => {
                assert_eq!(item.user_id, "u-1");
                assert_eq!(item.title, "chaos ok");
                assert_eq!(item.body, "evt-chaos");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn error_mode() {
        assert!(matches!(
            route_event(&event(json!({"chaos": "error"}))),
            Err(RouteError::Other(m)) if m == "chaos: refused"
        ));
    }

    #[test]
    fn bad_output_mode() {
        let out = route_event(&event(json!({"chaos": "bad_output"}))).unwrap();
        match &out[..] {
            [Delivery::InApp(item)] => {
                assert!(item.user_id.is_empty());
                assert!(!item.data.is_object());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn huge_output_mode() {
        let out = route_event(&event(json!({"chaos": "huge_output", "user_id": "u-1"}))).unwrap();
        assert_eq!(out.len(), HUGE_COUNT);
        let bytes: usize = out
            .iter()
            .map(|d| match d {
                Delivery::InApp(item) => item.body.len(),
                _ => 0,
            })
            .sum();
        assert!(bytes > 1_000_000);
    }

    #[test]
    fn unknown_mode_is_invalid() {
        assert!(matches!(
            route_event(&event(json!({"chaos": "sleep"}))),
            Err(RouteError::InvalidEvent(m)) if m.contains("data.chaos")
        ));
    }

    #[test]
    #[should_panic(expected = "chaos: trap")]
    fn trap_mode_panics() {
        let _ = route_event(&event(json!({"chaos": "trap"})));
    }
}
