//! What an operator's probes and scrapers see, on the real services: health, readiness, the
//! status report and the metrics page on the admin listener; the `healthcheck` subcommand a
//! container runs; and the start-up refusal of a config file that holds a Kafka credential.

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
    // Readiness (PostgreSQL) is green from the start; the status report turns `ok` once
    // the Kafka probe has answered.
    let (code, body) = readyz(engine.admin_addr).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "ready");
    assert_eq!(body["checks"]["postgres"], "ok");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let body = status(engine.admin_addr).await;
        if body["status"] == "ok" {
            assert_eq!(body["ready"], true);
            assert_eq!(body["consuming"], true);
            assert_eq!(body["checks"]["postgres"], "ok");
            assert_eq!(body["checks"]["kafka"], "ok");
            assert_eq!(body["checks"]["pipeline"], "ok");
            assert_eq!(body["checks"]["stalls"], serde_json::json!({}));
            assert_eq!(body["checks"]["plugins"]["default"], "ok");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ok: {body}");
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
        "notify_api_rate_limited_total{limit=\"user\"} 0".to_string(),
        "notify_api_rate_limited_total{limit=\"tenant_pool\"} 0".to_string(),
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

/// The engine refuses to start with a Kafka credential in its config file, whatever
/// librdkafka property carries it (a private key in `ssl.key.pem`, an OAUTHBEARER
/// configuration), naming the environment variable to use instead, and without printing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_credentials_in_the_config_file_stop_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    for (property, variable) in [
        ("ssl.key.pem", "NOTIFY_KAFKA_PROPERTY_SSL_KEY_PEM"),
        (
            "sasl.oauthbearer.config",
            "NOTIFY_KAFKA_PROPERTY_SASL_OAUTHBEARER_CONFIG",
        ),
    ] {
        let file = dir.path().join("engine.toml");
        std::fs::write(
            &file,
            format!("[kafka.properties]\n\"{property}\" = \"credential-value-0123\"\n"),
        )
        .unwrap();
        let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_notify-engine"))
            .arg("run")
            .env("NOTIFY_CONFIG", &file)
            .env(
                "NOTIFY_AUTH__JWT_SECRET",
                "0123456789abcdef0123456789abcdef",
            )
            .env("NOTIFY_LOG__FILTER", "warn")
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .unwrap_or_else(|_| panic!("the engine started with {property} in its config file"))
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{property}: {stderr}");
        assert!(
            stderr.contains(&format!("kafka.properties.{property} is a credential"))
                && stderr.contains(variable),
            "{property}: {stderr}"
        );
        assert!(!stderr.contains("credential-value-0123"), "{stderr}");
    }
}

/// A broker nobody answers: the engine still serves its routes (`/readyz` 200, an inbox
/// read works), and the status report says Kafka is down. On Kubernetes a 503 here would
/// take every replica out of the Service and every browser's stream with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_unreachable_leaves_the_engine_ready_and_shows_on_the_status_report() {
    let world = World::new().await;
    let mut config = world.config();
    // Nothing listens on port 1.
    config.kafka.brokers = "127.0.0.1:1".into();
    let engine = world.start(config).await;
    eventually("the status report shows Kafka down", async || {
        let body = status(engine.admin_addr).await;
        body["checks"]["kafka"] == "unreachable"
            && body["checks"]["postgres"] == "ok"
            && body["status"] == "degraded"
    })
    .await;
    let (code, body) = readyz(engine.admin_addr).await;
    assert_eq!(code, 200, "Kafka trouble must not fail readiness: {body}");
    assert_eq!(body["status"], "ready", "{body}");
    assert_eq!(status(engine.admin_addr).await["ready"], true);
    // And the routes really serve: a stream opens.
    let tenant = unique("shop");
    let (code, _sse, _) = connect_sse(&engine, Some(&world.token(&tenant, "u1")), None).await;
    assert_eq!(code, 200);
    engine.shutdown().await;
}

/// `notify-engine healthcheck`, as a container's `HEALTHCHECK` runs it: exit 0 against a
/// ready engine (the address from the config's `http.admin_listen`, or `--addr`), exit 1
/// with a one-line reason against a port nothing listens on. No JWT secret needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_healthcheck_subcommand_exits_0_on_a_ready_engine_and_1_on_a_dead_port() {
    let world = World::new().await;
    let engine = world.start(world.config()).await;
    let healthcheck = |envs: Vec<(&'static str, String)>, args: Vec<String>| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_notify-engine"));
        command
            .arg("healthcheck")
            .args(args)
            .env_remove("NOTIFY_AUTH__JWT_SECRET")
            .env_remove("NOTIFY_CONFIG")
            .kill_on_drop(true);
        for (k, v) in envs {
            command.env(k, v);
        }
        async move {
            tokio::time::timeout(Duration::from_secs(30), command.output())
                .await
                .expect("the healthcheck gave up within its timeout")
                .unwrap()
        }
    };
    let admin = engine.admin_addr.to_string();
    let out = healthcheck(vec![("NOTIFY_HTTP__ADMIN_LISTEN", admin.clone())], vec![]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = healthcheck(vec![], vec!["--addr".into(), admin.clone()]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    engine.shutdown().await;

    // The engine is gone: nothing listens on its admin port any more.
    let dead = healthcheck(
        vec![("NOTIFY_HTTP__ADMIN_LISTEN", admin)],
        vec!["--timeout-ms".into(), "2000".into()],
    )
    .await;
    let stderr = String::from_utf8_lossy(&dead.stderr);
    assert_eq!(dead.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("not ready: cannot connect"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}
