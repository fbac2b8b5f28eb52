//! What a routing call costs, per guest language (run through `scripts/bench.sh`, which
//! builds the plugins; `BENCH=plugins`):
//!
//! - the default rules in Rust (`plugins/dist/default.wasm`), Python
//!   (`plugins/dist/guests/python-router.wasm`, componentize-py) and JavaScript
//!   (`plugins/dist/guests/js-router.wasm`, componentize-js);
//! - each on a fresh instance per call (`plugins.instance_max_calls = 1`, how the engine
//!   called plugins before warm instances) and on warm instances (the defaults);
//! - per call: p50, p99 and mean wall time of `PluginHost::route` on one core (a
//!   current-thread runtime, calls one after another), hence calls/s/core;
//! - per plugin version: the engine's resident memory added by loading it from the
//!   precompiled cache (its compiled code), and per warm instance its linear memory and the
//!   resident memory its first call added.
//!
//! Prints one line per figure; `docs/benchmarks.md` records them with machine and date.
//! `BENCH_GUESTS` picks guests (default `floor rust python javascript`; `floor` is the
//! chaos fixture answering one in-app item: what the host itself costs per call).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use notify_engine::config::PluginConfig;
use notify_engine::ingest::envelope;
use notify_engine::model::Event;
use notify_engine::plugin::PluginHost;
use serde_json::json;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The process's resident memory, from `/proc/self/statm`.
fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("reading /proc/self/statm");
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// The events a tenant's order service sends, alternating payments and status changes.
fn events(n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            let raw = if i % 2 == 0 {
                json!({
                    "id": format!("e{i}"), "tenant": "bench", "type": "order_paid",
                    "time": "2026-11-27T10:00:00Z",
                    "data": {"user_id": format!("u{}", i % 100), "order_id": format!("A-{i}"),
                             "amount": 129.9, "currency": "EUR", "email": "buyer@example.com"}
                })
            } else {
                json!({
                    "id": format!("e{i}"), "tenant": "bench", "type": "order_status_updated",
                    "time": "2026-11-27T10:00:00Z",
                    "data": {"user_id": format!("u{}", i % 100), "order_id": format!("A-{i}"),
                             "status": "shipped", "previous_status": "paid",
                             "tracking_url": "https://track.example.com/A"}
                })
            }
            .to_string();
            envelope::decode(Some(raw.as_bytes()), &[], 1 << 20).unwrap()
        })
        .collect()
}

struct Figures {
    p50: Duration,
    p99: Duration,
    mean: Duration,
    fuel: u64,
    memory: usize,
}

impl Figures {
    fn print(&self, what: &str) {
        println!(
            "plugins: {what}: p50 {:.1} µs, p99 {:.1} µs, mean {:.1} µs, {:.0} calls/s/core; fuel {}, linear memory {:.1} MiB",
            us(self.p50),
            us(self.p99),
            us(self.mean),
            1.0 / self.mean.as_secs_f64(),
            self.fuel,
            self.memory as f64 / 1048576.0,
        );
    }
}

async fn measure(host: &PluginHost, events: &[Event], warm_up: usize) -> Figures {
    for e in events.iter().take(warm_up) {
        host.route(e).await.unwrap();
    }
    let mut samples = Vec::with_capacity(events.len());
    let (mut fuel, mut memory) = (0, 0);
    for e in events {
        let t = Instant::now();
        let decision = host.route(e).await.unwrap();
        samples.push(t.elapsed());
        fuel = decision.cost.fuel;
        memory = decision.cost.memory_bytes;
    }
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    samples.sort();
    Figures {
        p50: percentile(&samples, 0.5),
        p99: percentile(&samples, 0.99),
        mean,
        fuel,
        memory,
    }
}

/// A host with `file` loaded, and the resident memory loading it added. The first host of a
/// file compiles it into `cache` (the precompiled cache); the next loads it from there, as a
/// restarted engine does, so its figure is the compiled code, not the compiler's garbage.
async fn host(file: &Path, instance_max_calls: u32, cache: &Path) -> (PluginHost, usize) {
    let config = PluginConfig {
        instance_max_calls,
        cache_dir: cache.to_owned(),
        ..Default::default()
    };
    let host = PluginHost::new(config, Default::default()).unwrap();
    let before = rss_bytes();
    host.load_single(file).await.unwrap();
    (host, rss_bytes().saturating_sub(before))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/dist");
    let guests: Vec<(String, PathBuf, usize, usize)> = std::env::var("BENCH_GUESTS")
        .unwrap_or_else(|_| "floor rust python javascript".into())
        .split_whitespace()
        .map(|g| {
            let (file, warm_calls, fresh_calls) = match g {
                "rust" => (dist.join("default.wasm"), 200_000, 5_000),
                // The host's own share: a Rust plugin that parses the payload and returns
                // one in-app item, whatever the event (the chaos fixture without `chaos`).
                "floor" => (dist.join("fixtures/chaos.wasm"), 200_000, 5_000),
                "python" => (dist.join("guests/python-router.wasm"), 20_000, 300),
                "javascript" => (dist.join("guests/js-router.wasm"), 20_000, 300),
                other => panic!("unknown guest {other} (floor, rust, python, javascript)"),
            };
            assert!(
                file.exists(),
                "{} is missing: run scripts/build-plugins.sh",
                file.display()
            );
            (g.to_owned(), file, warm_calls, fresh_calls)
        })
        .collect();

    for (guest, file, warm_calls, fresh_calls) in guests {
        let size = std::fs::metadata(&file).unwrap().len();
        let cache = tempfile::tempdir().unwrap();
        let (fresh, _) = host(&file, 1, cache.path()).await;
        let f = measure(&fresh, &events(fresh_calls), 20).await;
        f.print(&format!(
            "{guest} fresh instance per call ({fresh_calls} calls)"
        ));
        drop(fresh);

        let (warm, code_rss) = host(
            &file,
            PluginConfig::default().instance_max_calls,
            cache.path(),
        )
        .await;
        let before_first = rss_bytes();
        warm.route(&events(1)[0]).await.unwrap();
        let instance_rss = rss_bytes().saturating_sub(before_first);
        let w = measure(&warm, &events(warm_calls), 1_000).await;
        w.print(&format!("{guest} warm instances ({warm_calls} calls)"));
        println!(
            "plugins: {guest} memory: component {:.1} MiB on disk; loading it (precompiled) added {:.1} MiB resident; a warm instance's first call added {:.1} MiB resident",
            size as f64 / 1048576.0,
            code_rss as f64 / 1048576.0,
            instance_rss as f64 / 1048576.0,
        );
    }
}
