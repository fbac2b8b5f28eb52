//! Recording the frames' latencies (HDR histograms, per scenario and per second) and
//! writing the report: `report.json`, `report.md`, `latency.png`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use std::path::Path;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::sse::{PHASES, Sample};
use crate::{Args, Connected};

/// One scenario's run: when (Unix seconds), what it produced, its stage breakdown and its
/// own figures.
pub struct Phase {
    pub name: String,
    pub start: f64,
    pub end: f64,
    pub produced: u64,
    pub stages: Value,
    pub extra: Value,
    /// Streams that ended and were opened again (with `Last-Event-ID`) during the scenario.
    pub reconnects: u64,
    /// Events (and connections) that failed: deliveries the producer never had confirmed.
    pub failed: u64,
}

impl Phase {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            start: unix_now(),
            end: 0.0,
            produced: 0,
            stages: json!({}),
            extra: json!({}),
            reconnects: 0,
            failed: 0,
        }
    }

    pub fn summary(&self) -> String {
        format!(
            "{}: {} events, {} reconnects, {} failed, {}",
            self.name, self.produced, self.reconnects, self.failed, self.extra
        )
    }
}

/// Now, in seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    crate::now_us() as f64 / 1e6
}

/// Every frame's latency, by scenario, and by second for the plot.
pub struct Recorded {
    per_phase: Vec<Histogram<u64>>,
    /// Unix second of receipt → latencies received in it.
    per_second: BTreeMap<u64, Histogram<u64>>,
}

fn histogram() -> Histogram<u64> {
    // µs, 1 µs to 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("static bounds")
}

pub struct Recorder;

impl Recorder {
    /// Collects samples until `stop` (the held connections never end, so their senders
    /// never go), then what is already queued.
    pub async fn collect(
        mut samples: mpsc::UnboundedReceiver<Sample>,
        mut stop: tokio::sync::oneshot::Receiver<()>,
    ) -> Recorded {
        let mut recorded = Recorded {
            per_phase: PHASES.iter().map(|_| histogram()).collect(),
            per_second: BTreeMap::new(),
        };
        let mut stopped = false;
        loop {
            let s = if stopped {
                match samples.try_recv() {
                    Ok(s) => s,
                    Err(_) => break,
                }
            } else {
                tokio::select! {
                    s = samples.recv() => match s {
                        Some(s) => s,
                        None => break,
                    },
                    _ = &mut stop => {
                        stopped = true;
                        continue;
                    }
                }
            };
            let latency = s
                .received_us
                .saturating_sub(s.sent_us)
                .clamp(1, 600_000_000);
            recorded.per_phase[s.phase as usize].saturating_record(latency);
            recorded
                .per_second
                .entry(s.received_us / 1_000_000)
                .or_insert_with(|| {
                    Histogram::new_with_bounds(1, 600_000_000, 2).expect("static bounds")
                })
                .saturating_record(latency);
        }
        recorded
    }
}

/// p50, p90, p95, p99, p99.9 and max of a histogram of µs, in ms.
pub fn percentiles_ms(h: &Histogram<u64>) -> Value {
    let ms = |v: u64| (v as f64 / 1e3 * 1e3).round() / 1e3;
    json!({
        "count": h.len(),
        "p50": ms(h.value_at_quantile(0.5)),
        "p90": ms(h.value_at_quantile(0.9)),
        "p95": ms(h.value_at_quantile(0.95)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p99_9": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()),
    })
}

/// Writes the three files of the report to `args.out`.
pub fn write(
    args: &Args,
    phases: &[Phase],
    recorded: Recorded,
    connected: Connected,
) -> Result<()> {
    let mut scenarios = serde_json::Map::new();
    for phase in phases {
        let latency = PHASES
            .iter()
            .position(|p| *p == phase.name)
            .map(|i| percentiles_ms(&recorded.per_phase[i]));
        scenarios.insert(
            phase.name.clone(),
            json!({
                "start": phase.start,
                "end": phase.end,
                "produced": phase.produced,
                "sse_latency_ms": latency,
                "stages_mean_ms": phase.stages,
                "figures": phase.extra,
                "reconnects": phase.reconnects,
                "failed": phase.failed,
            }),
        );
    }
    let report = json!({
        "date": chrono::Utc::now().to_rfc3339(),
        "label": args.label,
        "target": args.target.name(),
        "machine": machine(),
        "instances": args.engines.len(),
        "connections": {
            "requested": args.connections + args.held_elsewhere,
            // This process's and the holders' (`--held-elsewhere`, as they reported them).
            "held": connected.held + args.held_elsewhere,
            "held_by_other_processes": args.held_elsewhere,
            "failed": connected.failed,
            "open_seconds": connected.seconds,
            "source_addresses": args.sources,
        },
        "scenarios": scenarios,
        "criteria": criteria(
            phases,
            &recorded,
            Connected {
                held: connected.held + args.held_elsewhere,
                ..connected
            },
        ),
    });
    std::fs::write(
        args.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("report.md"), markdown(&report))?;
    if let Err(e) = plot(args, phases, &recorded) {
        eprintln!("[load] no latency plot: {e:#}");
    }
    Ok(())
}

fn machine() -> Value {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    json!({ "cores": cores, "memory_gib": mem_kib / 1024 / 1024, "cpu": cpu })
}

/// The plan's pass criteria and this product's targets, each with the measured value.
fn criteria(phases: &[Phase], recorded: &Recorded, connected: Connected) -> Value {
    let latency = |name: &str, q: f64| {
        PHASES
            .iter()
            .position(|p| *p == name)
            .map(|i| &recorded.per_phase[i])
            .filter(|h| !h.is_empty())
            .map(|h| h.value_at_quantile(q) as f64 / 1e3)
    };
    let figure = |name: &str, path: &[&str]| {
        let phase = phases.iter().find(|p| p.name == name)?;
        let mut v = &phase.extra;
        for key in path {
            v = v.get(key)?;
        }
        v.as_f64()
    };
    let bytes_per_connection = phases
        .iter()
        .find(|p| p.name == "idle")
        .and_then(|p| p.extra["bytes_per_connection"].as_array().cloned())
        .map(|v| v.iter().filter_map(Value::as_f64).fold(0.0f64, f64::max));
    let check = |what: &str, value: Option<f64>, ok: fn(f64) -> bool, target: &str| {
        json!({
            "criterion": what,
            "target": target,
            "measured": value,
            "pass": value.map(ok),
        })
    };
    json!([
        check(
            "plan: steady (100/s) produce → SSE p95, ms",
            latency("steady", 0.95),
            |v| v <= 5_000.0,
            "≤ 5000"
        ),
        check(
            "plan: burst (1000/s) produce → SSE p95, ms",
            latency("burst", 0.95),
            |v| v <= 5_000.0,
            "≤ 5000"
        ),
        check(
            "plan: email enqueue p95 (burst), ms",
            figure("burst", &["email_enqueue_ms", "p95"]),
            |v| v <= 30_000.0,
            "≤ 30000"
        ),
        check(
            "plan: SSE connections held",
            Some(connected.held as f64),
            |v| v >= 5_000.0,
            "≥ 5000"
        ),
        check(
            "events/s, produce → commit (max)",
            figure("max", &["events_per_second"]),
            |v| v >= 10_000.0,
            "≥ 10000"
        ),
        check(
            "produce → SSE p50 at 1000/s, ms",
            latency("burst", 0.5),
            |v| v <= 10.0,
            "≤ 10"
        ),
        check(
            "produce → SSE p99 at 1000/s, ms",
            latency("burst", 0.99),
            |v| v <= 50.0,
            "≤ 50"
        ),
        check(
            "email enqueue p99 (burst), ms",
            figure("burst", &["email_enqueue_ms", "p99"]),
            |v| v <= 100.0,
            "≤ 100"
        ),
        check(
            "emails sent/s to the SMTP sink",
            figure("emails", &["emails_per_second"]),
            |v| v >= 500.0,
            "≥ 500"
        ),
        check(
            "resident bytes per idle connection",
            bytes_per_connection,
            |v| v <= 8_192.0,
            "≤ 8192"
        ),
    ])
}

/// "2 cores, 23 GiB (the CPU)", from a report's `machine`.
fn machine_line(report: &Value) -> String {
    let m = &report["machine"];
    format!(
        "{} cores, {} GiB ({})",
        m["cores"],
        m["memory_gib"],
        m["cpu"].as_str().unwrap_or_default()
    )
}

fn markdown(report: &Value) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Load run {}\n\n{} · {} · {} instance(s) of {} · {} of {} connections held ({} failed, opened in {:.1} s across {} source addresses)\n",
        report["date"].as_str().unwrap_or_default(),
        report["label"].as_str().unwrap_or_default(),
        machine_line(report),
        report["instances"],
        report["target"].as_str().unwrap_or_default(),
        report["connections"]["held"],
        report["connections"]["requested"],
        report["connections"]["failed"],
        report["connections"]["open_seconds"]
            .as_f64()
            .unwrap_or(0.0),
        report["connections"]["source_addresses"],
    );
    md.push_str("## Produce → SSE frame (ms, HDR histogram)\n\n| scenario | events | frames | reconnects | p50 | p90 | p95 | p99 | p99.9 | max |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    let scenarios = report["scenarios"].as_object().cloned().unwrap_or_default();
    for (name, s) in &scenarios {
        let l = &s["sse_latency_ms"];
        if l.is_null() {
            continue;
        }
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s["produced"],
            l["count"],
            s["reconnects"],
            l["p50"],
            l["p90"],
            l["p95"],
            l["p99"],
            l["p99_9"],
            l["max"]
        );
    }
    md.push_str("\n## Where the time goes (mean ms per event, `notify_stage_seconds`)\n\n| scenario | kafka | queue | route | commit | stream_read |\n| --- | ---: | ---: | ---: | ---: | ---: |\n");
    for (name, s) in &scenarios {
        let st = &s["stages_mean_ms"];
        if st.as_object().is_none_or(|o| o.is_empty()) {
            continue;
        }
        let f = |k: &str| st[k].as_f64().map_or("–".into(), |v| format!("{v:.2}"));
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} | {} |",
            f("kafka"),
            f("queue"),
            f("route"),
            f("commit"),
            f("stream_read")
        );
    }
    md.push_str("\n## Figures\n\n");
    for (name, s) in &scenarios {
        let _ = writeln!(md, "- **{name}**: `{}`", s["figures"]);
    }
    md.push_str(
        "\n## Criteria\n\n| criterion | target | measured | |\n| --- | --- | ---: | --- |\n",
    );
    for c in report["criteria"].as_array().into_iter().flatten() {
        let measured = c["measured"]
            .as_f64()
            .map_or("not measured".into(), |v| format!("{v:.1}"));
        let verdict = match c["pass"].as_bool() {
            Some(true) => "pass",
            Some(false) => "**fail**",
            None => "–",
        };
        let _ = writeln!(
            md,
            "| {} | {} | {measured} | {verdict} |",
            c["criterion"].as_str().unwrap_or_default(),
            c["target"].as_str().unwrap_or_default()
        );
    }
    md.push_str("\n![latency over time](latency.png)\n");
    md
}

/// The measures both servers share, from an engine run's `report.json` and a Centrifugo
/// run's, side by side with their ratio, to `comparison.json` and `comparison.md` in `at`.
pub fn compare(engine: &Path, centrifugo: &Path, at: &Path) -> Result<()> {
    let read = |dir: &Path| -> Result<Value> {
        let path = dir.join("report.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(serde_json::from_str(&text)?)
    };
    let (e, c) = (read(engine)?, read(centrifugo)?);
    let rows = comparison_rows(&e, &c);
    let md = comparison_markdown(&e, &c, &rows);
    std::fs::write(
        at.join("comparison.json"),
        serde_json::to_string_pretty(
            &json!({ "engine": e["label"], "centrifugo": c["label"], "rows": rows }),
        )?,
    )?;
    std::fs::write(at.join("comparison.md"), md)?;
    Ok(())
}

/// (measure, engine, Centrifugo, engine ÷ Centrifugo) for every measure both reports have.
fn comparison_rows(e: &Value, c: &Value) -> Vec<Value> {
    let mut measures = vec![
        (
            "SSE connections held".to_owned(),
            "/connections/held".to_owned(),
        ),
        (
            "resident bytes per idle connection".into(),
            "/scenarios/idle/figures/bytes_per_connection".into(),
        ),
    ];
    for scenario in ["steady", "burst", "fanout"] {
        for q in ["p50", "p99"] {
            measures.push((
                format!("{scenario}: produce → SSE {q}, ms"),
                format!("/scenarios/{scenario}/sse_latency_ms/{q}"),
            ));
        }
        measures.push((
            format!("{scenario}: frames received"),
            format!("/scenarios/{scenario}/sse_latency_ms/count"),
        ));
    }
    measures.push((
        "max: events/s, produce → every frame received".into(),
        "/scenarios/max/figures/delivered_per_second".into(),
    ));
    // A figure per instance counts as its largest: the worst instance is the one that matters.
    let get = |r: &Value, pointer: &str| match r.pointer(pointer)? {
        Value::Array(v) => v.iter().filter_map(Value::as_f64).reduce(f64::max),
        v => v.as_f64(),
    };
    measures
        .into_iter()
        .filter_map(|(name, pointer)| {
            let (a, b) = (get(e, &pointer), get(c, &pointer));
            (a.is_some() || b.is_some()).then(|| {
                let ratio = a.zip(b).filter(|(_, b)| *b > 0.0).map(|(a, b)| a / b);
                json!({ "measure": name, "engine": a, "centrifugo": b, "ratio": ratio })
            })
        })
        .collect()
}

fn comparison_markdown(e: &Value, c: &Value, rows: &[Value]) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# notify-engine and Centrifugo, the same clients and events\n\n{} · {}\n\n- engine: {}\n- Centrifugo: {}\n\nEach is fed from a Kafka topic of its own (6 partitions) with the same event JSON; its clients hold the same connections. Ratio: engine ÷ Centrifugo (below 1, the engine uses less or is faster; for counts and events/s, above 1 is better).\n",
        e["date"].as_str().unwrap_or_default(),
        machine_line(e),
        e["label"].as_str().unwrap_or_default(),
        c["label"].as_str().unwrap_or_default(),
    );
    md.push_str("| measure | notify-engine | Centrifugo | ratio |\n| --- | ---: | ---: | ---: |\n");
    let num = |v: &Value| {
        v.as_f64().map_or("–".into(), |v| {
            if v >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        })
    };
    for row in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            row["measure"].as_str().unwrap_or_default(),
            num(&row["engine"]),
            num(&row["centrifugo"]),
            row["ratio"]
                .as_f64()
                .map_or("–".into(), |r| format!("{r:.2}×")),
        );
    }
    md
}

/// p50 and p99 of each second's frames over the run, log scale, with the scenarios marked.
fn plot(args: &Args, phases: &[Phase], recorded: &Recorded) -> Result<()> {
    use plotters::prelude::*;
    let font = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"]
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .ok_or_else(|| anyhow::anyhow!("no DejaVuSans.ttf (apt-get install fonts-dejavu-core)"))?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow::anyhow!("the font does not load"))?;
    let Some(origin) = phases.first().map(|p| p.start) else {
        return Ok(());
    };
    let series = |q: f64| -> Vec<(f64, f64)> {
        recorded
            .per_second
            .iter()
            .filter(|(sec, h)| !h.is_empty() && **sec as f64 >= origin)
            .map(|(sec, h)| {
                (
                    *sec as f64 - origin,
                    (h.value_at_quantile(q) as f64 / 1e3).max(0.01),
                )
            })
            .collect()
    };
    let (p50, p99) = (series(0.5), series(0.99));
    let end = phases.iter().map(|p| p.end - origin).fold(1.0, f64::max);
    let top = p99.iter().map(|p| p.1).fold(10.0, f64::max) * 2.0;
    let path = args.out.join("latency.png");
    let root = BitMapBackend::new(&path, (1200, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("produce → SSE frame, per second", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..end, (0.1f64..top).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("seconds into the run")
        .y_desc("latency, ms (log)")
        .draw()?;
    for phase in phases {
        let x = phase.start - origin;
        chart.draw_series(LineSeries::new([(x, 0.1), (x, top)], BLACK.mix(0.2)))?;
        chart.draw_series([Text::new(
            phase.name.clone(),
            (x + 0.5, top / 1.6),
            ("sans-serif", 14),
        )])?;
    }
    chart
        .draw_series(LineSeries::new(p50, BLUE.stroke_width(2)))?
        .label("p50")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(p99, RED.stroke_width(2)))?
        .label("p99")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(held: u64, per_connection: &[f64], burst_p50: f64, max: Option<f64>) -> Value {
        json!({
            "connections": { "held": held },
            "scenarios": {
                "idle": { "figures": { "bytes_per_connection": per_connection } },
                "burst": { "sse_latency_ms": { "p50": burst_p50, "p99": burst_p50 * 4.0, "count": 100 } },
                "max": { "figures": { "delivered_per_second": max } },
            },
        })
    }

    #[test]
    fn the_comparison_takes_the_worst_instance_and_divides_engine_by_centrifugo() {
        let engine = report(5_000, &[6_000.0, 7_000.0], 20.0, Some(7_000.0));
        let centrifugo = report(5_000, &[70_000.0], 4.0, None);
        let rows = comparison_rows(&engine, &centrifugo);
        let row = |name: &str| {
            rows.iter()
                .find(|r| r["measure"] == name)
                .unwrap_or_else(|| panic!("no row {name:?} in {rows:?}"))
                .clone()
        };
        assert_eq!(row("SSE connections held")["ratio"], 1.0);
        assert_eq!(row("resident bytes per idle connection")["engine"], 7_000.0);
        assert_eq!(row("resident bytes per idle connection")["ratio"], 0.1);
        assert_eq!(row("burst: produce → SSE p99, ms")["ratio"], 5.0);
        // Measured on one side only: shown, with no ratio.
        let max = row("max: events/s, produce → every frame received");
        assert_eq!(max["centrifugo"], Value::Null);
        assert_eq!(max["ratio"], Value::Null);
        // Measured on neither side (no steady scenario): no row at all.
        assert!(
            rows.iter()
                .all(|r| !r["measure"].as_str().unwrap().starts_with("steady"))
        );
        let md = comparison_markdown(&engine, &centrifugo, &rows);
        assert!(
            md.contains("| resident bytes per idle connection | 7000 | 70000 | 0.10× |"),
            "{md}"
        );
    }
}
