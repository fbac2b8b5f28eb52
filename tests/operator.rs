//! What an operator's probes and scrapers see, on the real services: health, readiness and
//! the metrics page on the admin listener.

use std::time::Duration;

use crate::support::*;

/// Health, readiness and metrics, as an operator's probes see them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    let world = World::new().await;
    let engine = world.start(world.config()).await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", engine.admin_addr);
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    // Readiness turns green once the Kafka probe has answered.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
        let status = ready.status();
        let body: serde_json::Value = ready.json().await.unwrap();
        if status == 200 {
            assert_eq!(body["checks"]["postgres"], "ok");
            assert_eq!(body["checks"]["kafka"], "ok");
            assert_eq!(body["checks"]["pipeline"], "ok");
            assert_eq!(body["checks"]["plugins"]["default"], "ok");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let tenant = unique("shop");
    world
        .produce(&order_paid("m1", &tenant, "u1", None, 1.0))
        .await;
    world
        .wait_count("SELECT count(*) FROM notifications", 1, WAIT)
        .await;
    let (_, _sse, _) = connect_sse(&engine, Some(&world.token(&tenant, "u1")), None).await;
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        format!(
            "notify_events_consumed_total{{topic=\"{}\"}} 1",
            world.topic_paid
        ),
        "notify_notifications_written_total 1".to_string(),
        "notify_sse_connections 1".to_string(),
        "notify_plugin_calls_total{outcome=\"ok\",tenant=\"_other\",world=\"routing\"} 1"
            .to_string(),
        "notify_emails_skipped_total 0".to_string(),
        "notify_emails_rate_limited_total 0".to_string(),
        "notify_tenant_budget_pauses_total 0".to_string(),
        "notify_partition_pauses_total 0".to_string(),
        "notify_pipeline_lanes 1".to_string(),
        "notify_lanes_reaped_total 0".to_string(),
        "notify_events_spilled_total 0".to_string(),
        // The one event went through every stage of the pipeline once.
        "notify_stage_seconds_count{stage=\"kafka\"} 1".to_string(),
        "notify_stage_seconds_count{stage=\"queue\"} 1".to_string(),
        "notify_stage_seconds_count{stage=\"route\"} 1".to_string(),
        "notify_stage_seconds_count{stage=\"commit\"} 1".to_string(),
        "notify_stage_seconds_count{stage=\"stream_read\"}".to_string(),
    ] {
        assert!(metrics.contains(&line), "missing {line:?} in\n{metrics}");
    }
    engine.shutdown().await;
    // Shut down: nothing listens any more.
    assert!(http.get(format!("{base}/healthz")).send().await.is_err());
}
