//! `Config`'s unit tests: the defaults, the file rules (secrets, unknown keys, the example
//! file), the `Debug` redaction, and the rules of `Config::validate`.

use super::*;

fn valid() -> Config {
    let mut c = Config::default();
    c.auth.jwt_secret = "x".repeat(32);
    c
}

#[test]
fn defaults_need_only_a_secret() {
    assert!(Config::default().validate().is_err());
    valid().validate().unwrap();
}

#[test]
fn rejects_engine_managed_kafka_properties() {
    let mut c = valid();
    c.kafka.properties.insert("group.id".into(), "x".into());
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("group.id"), "{err}");
}

/// The error `Config::load` gives for a file with `toml` in it.
fn load_error(toml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("engine.toml");
    std::fs::write(&path, toml).unwrap();
    Config::load(Some(&path)).unwrap_err().to_string()
}

#[test]
fn rejects_secret_in_file() {
    let err = load_error("[auth]\njwt_secret = \"0123456789abcdef0123456789abcdef\"\n");
    assert!(err.contains("environment"), "{err}");
}

#[test]
fn example_file_lists_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/engine.example.toml");
    let from_file: Config = Figment::from(Toml::file_exact(&path)).extract().unwrap();
    assert_eq!(
        serde_json::to_value(from_file).unwrap(),
        serde_json::to_value(Config::default()).unwrap(),
        "config/engine.example.toml differs from Config::default()"
    );
}

#[test]
fn rejects_kafka_credentials_in_file() {
    let err = load_error("[kafka.properties]\n\"sasl.password\" = \"hunter2\"\n");
    assert!(err.contains("NOTIFY_KAFKA_PROPERTY_SASL_PASSWORD"), "{err}");
}

/// Every librdkafka property that carries a secret (CONFIGURATION.md of librdkafka 2.12,
/// the version rdkafka-sys bundles) is refused in a file and redacted in prints; the
/// settings next to them that are no secret (paths, public certificates, names) are not.
#[test]
fn every_kafka_credential_property_is_a_secret() {
    for name in [
        "sasl.password",
        "sasl.oauthbearer.config",
        "sasl.oauthbearer.client.secret",
        "sasl.oauthbearer.client.credentials.client.secret",
        "sasl.oauthbearer.assertion.private.key.pem",
        "sasl.oauthbearer.assertion.private.key.passphrase",
        "ssl.key.password",
        "ssl.key.pem",
        "ssl.keystore.password",
        "ssl_key",
        "ssl_engine_callback_data",
        "SSL.KEY.PEM",
    ] {
        assert!(kafka::is_secret_property(name), "{name} is a credential");
    }
    for name in [
        "security.protocol",
        "sasl.mechanism",
        "sasl.username",
        "sasl.oauthbearer.client.id",
        "sasl.oauthbearer.token.endpoint.url",
        "ssl.key.location",
        "ssl.keystore.location",
        "ssl.certificate.pem",
        "ssl.ca.pem",
        "ssl.ca.location",
    ] {
        assert!(!kafka::is_secret_property(name), "{name} is no credential");
    }
    let err = load_error("[kafka.properties]\n\"ssl.key.pem\" = \"-----BEGIN PRIVATE KEY-----\"\n");
    assert!(err.contains("NOTIFY_KAFKA_PROPERTY_SSL_KEY_PEM"), "{err}");
    let err = load_error("[kafka.properties]\n\"sasl.oauthbearer.config\" = \"principal=admin\"\n");
    assert!(
        err.contains("NOTIFY_KAFKA_PROPERTY_SASL_OAUTHBEARER_CONFIG"),
        "{err}"
    );
    let mut c = valid();
    for name in ["ssl.key.pem", "sasl.oauthbearer.config"] {
        c.kafka
            .properties
            .insert(name.into(), format!("value-of-{name}"));
    }
    let printed = format!("{c:?}");
    assert!(!printed.contains("value-of-"), "{printed}");
}

#[test]
fn debug_prints_no_secret() {
    let mut c = valid();
    c.auth.jwt_secret = "jwt-secret-value-0123456789abcdefgh".into();
    c.smtp.password = Some("smtp-password-value".into());
    c.database.url = "postgres://notify:db-password-value@db.internal:5432/notify".into();
    c.kafka
        .properties
        .insert("sasl.password".into(), "kafka-password-value".into());
    c.kafka
        .properties
        .insert("sasl.username".into(), "notify-engine".into());
    c.cluster.secret = Some("cluster-secret-value-0123456789abcdef".into());
    let printed = format!("{c:?}");
    for secret in [
        "cluster-secret-value",
        "jwt-secret-value",
        "smtp-password-value",
        "db-password-value",
        "kafka-password-value",
    ] {
        assert!(!printed.contains(secret), "{secret} in {printed}");
    }
    assert!(printed.contains("notify-engine"), "{printed}");
    assert!(printed.contains("db.internal:5432"), "{printed}");
}

#[test]
fn a_cluster_secret_is_long_enough_and_never_read_from_a_file() {
    let mut c = valid();
    c.validate().unwrap();
    for short in ["", "too-short", " padded-secret-0123456789abcdefghij "] {
        c.cluster.secret = Some(short.into());
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("cluster.secret"), "{err}");
    }
    c.cluster.secret = Some("a-cluster-secret-of-at-least-32-bytes".into());
    c.validate().unwrap();
    let err = load_error("[cluster]\nsecret = \"a-cluster-secret-of-at-least-32-bytes\"\n");
    assert!(
        err.contains("cluster.secret must come from the environment"),
        "{err}"
    );
}

#[test]
fn refuses_the_demo_secret_outside_dev_mode() {
    let mut c = valid();
    c.auth.jwt_secret = DEMO_JWT_SECRET.into();
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("demo secret"), "{err}");
    c.dev.mode = true;
    c.validate().unwrap();
}

#[test]
fn refuses_smtp_credentials_in_clear_text_off_loopback() {
    let mut c = valid();
    c.smtp.username = Some("notify".into());
    c.smtp.tls = SmtpTls::None;
    c.smtp.host = "smtp.example.com".into();
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("clear text"), "{err}");
    for host in ["127.0.0.1", "localhost", "::1"] {
        c.smtp.host = host.into();
        c.validate().unwrap();
    }
    c.smtp.host = "smtp.example.com".into();
    c.smtp.tls = SmtpTls::Starttls;
    c.validate().unwrap();
    assert_eq!(Config::default().smtp.tls, SmtpTls::Starttls);
}

#[test]
fn rejects_unknown_keys() {
    let err = load_error("[kafka]\nbrokerz = \"x\"\n");
    assert!(err.contains("brokerz"), "{err}");
}

/// Each section's rules and the cross-section ones answer with their messages, whole.
#[test]
fn each_section_answers_with_its_own_message() {
    type Breaks = fn(&mut Config);
    let cases: [(Breaks, &str); 11] = [
        (
            |c| c.auth.ticket_ttl_secs = 31,
            "auth.ticket_ttl_secs must be between 1 and 30",
        ),
        (
            |c| c.http.cors_origins = vec!["*".into()],
            "http.cors_origins: \"*\" must be an origin like \"https://app.example.com\" (no path, no wildcard)",
        ),
        (
            |c| c.http.trusted_proxies = vec!["10.0.0.0/33".into()],
            "http.trusted_proxies: \"10.0.0.0/33\": the prefix length must be 0..=32",
        ),
        (
            |c| c.sse.tenant_share = 0.0,
            "sse.tenant_share must be more than 0 and at most 1",
        ),
        (
            |c| c.retention.batch = 0,
            "retention.batch and retention.interval_secs must be positive",
        ),
        (
            |c| {
                c.kafka.tenant_from = TenantFrom::Header;
                c.kafka.tenant_header.clear();
            },
            "kafka.tenant_from = \"header\" needs kafka.tenant_header",
        ),
        (
            |c| c.plugins.fuel = 0,
            "plugins.fuel and plugins.timeout_ms must be positive",
        ),
        (
            |c| {
                let plugin = Some("same".to_owned());
                c.tenants.insert(
                    "acme".into(),
                    TenantConfig {
                        plugin: plugin.clone(),
                        templating_plugin: plugin,
                        ..TenantConfig::default()
                    },
                );
            },
            "tenants.acme: plugin and templating_plugin name the same file; a component implements one world",
        ),
        (
            |c| c.sse.keepalive_secs = 16,
            "sse.keepalive_secs must be between 1 and 15",
        ),
        (
            |c| c.smtp.from = "not a mailbox".into(),
            "smtp.from \"not a mailbox\" is not a valid mailbox",
        ),
        (
            |c| c.email.claim_timeout_ms = 1,
            "email.claim_timeout_ms (1) must be at least 3 × smtp.timeout_ms (10000)",
        ),
    ];
    for (breaks, message) in cases {
        let mut c = valid();
        breaks(&mut c);
        let err = c.validate().expect_err(message).to_string();
        assert_eq!(err, format!("configuration: {message}"));
    }
}

/// The engine service's `environment:` in `docker-compose.yml`, resolved as compose does
/// with `shell` as the shell's environment (`${X}`, `${X:-default}`, `${X:?message}`);
/// `Err`: compose refuses to start, with its message.
fn compose_engine_env(
    shell: &[(&str, &str)],
) -> Result<std::collections::HashMap<String, String>, String> {
    let text = include_str!("../../../docker-compose.yml");
    let lines: Vec<&str> = text.lines().collect();
    let engine = lines.iter().position(|l| *l == "  engine:").unwrap();
    let env = engine
        + lines[engine..]
            .iter()
            .position(|l| *l == "    environment:")
            .unwrap();
    let lookup = |name: &str| {
        shell
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
            .filter(|v| !v.is_empty())
    };
    let mut out = std::collections::HashMap::new();
    for line in &lines[env + 1..] {
        if line.trim_start().starts_with('#') {
            continue;
        }
        let Some(entry) = line.strip_prefix("      ") else {
            break;
        };
        let (key, raw) = entry.split_once(": ").unwrap();
        let raw = raw.trim().trim_matches('"');
        let value = match raw.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
            None => raw.to_owned(),
            Some(expr) => match (expr.split_once(":?"), expr.split_once(":-")) {
                (Some((name, message)), _) => lookup(name).ok_or(message.to_owned())?,
                (None, Some((name, default))) => lookup(name).unwrap_or(default.to_owned()),
                (None, None) => lookup(expr).unwrap_or_default(),
            },
        };
        out.insert(key.to_owned(), value);
    }
    Ok(out)
}

/// The configuration the compose file gives the engine (its auth and dev keys).
fn compose_config(shell: &[(&str, &str)]) -> Result<Config, String> {
    let env = compose_engine_env(shell)?;
    let mut c = Config::default();
    c.auth.jwt_secret = env["NOTIFY_AUTH__JWT_SECRET"].clone();
    c.dev.mode = env["NOTIFY_DEV__MODE"] == "true";
    Ok(c)
}

#[test]
fn compose_refuses_to_start_without_a_secret_and_never_turns_dev_mode_on() {
    let refused = compose_config(&[]).unwrap_err();
    assert!(refused.contains("NOTIFY_AUTH__JWT_SECRET"), "{refused}");
    // The published demo secret: the engine refuses it, since compose leaves dev mode off.
    let demo = compose_config(&[("NOTIFY_AUTH__JWT_SECRET", DEMO_JWT_SECRET)]).unwrap();
    assert!(!demo.dev.mode);
    let err = demo.validate().unwrap_err().to_string();
    assert!(err.contains("demo secret"), "{err}");
    // Only an explicit request turns it on (a development machine).
    let dev = compose_config(&[
        ("NOTIFY_AUTH__JWT_SECRET", DEMO_JWT_SECRET),
        ("NOTIFY_DEV__MODE", "true"),
    ])
    .unwrap();
    dev.validate().unwrap();
    let own = compose_config(&[("NOTIFY_AUTH__JWT_SECRET", &"k".repeat(40))]).unwrap();
    own.validate().unwrap();
}

#[test]
fn the_image_keeps_the_admin_listener_on_loopback() {
    let dockerfile = include_str!("../../../Dockerfile");
    let compose = include_str!("../../../docker-compose.yml");
    let settings = |text: &'static str| {
        text.lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter(|l| l.contains("ADMIN_LISTEN") || l.contains(":9090"))
            .collect::<Vec<_>>()
    };
    let image = settings(dockerfile);
    assert!(
        image
            .iter()
            .any(|l| l.contains("NOTIFY_HTTP__ADMIN_LISTEN=127.0.0.1:9090")),
        "{image:?}"
    );
    for line in image.iter().chain(&settings(compose)) {
        assert!(
            !line.contains("0.0.0.0:9090") && !line.contains("\"127.0.0.1:9090:9090\""),
            "the admin listener is exposed: {line}"
        );
    }
    assert!(Config::default().http.admin_listen.ip().is_loopback());
}

/// The image's and the compose stack's health checks run the engine's own probe
/// (`notify-engine healthcheck`: `/readyz` on the admin listener), not a shell trick that
/// needs bash or curl in the image; and the build context leaves node folders out.
#[test]
fn the_image_and_the_stack_probe_with_the_healthcheck_subcommand() {
    let dockerfile = include_str!("../../../Dockerfile");
    let compose = include_str!("../../../docker-compose.yml");
    let probe = r#"["/usr/local/bin/notify-engine", "healthcheck"]"#;
    let image = dockerfile
        .lines()
        .find(|l| {
            l.trim_start()
                .starts_with("CMD [\"/usr/local/bin/notify-engine\", \"health")
        })
        .expect("a HEALTHCHECK CMD line");
    assert!(image.contains(probe), "{image}");
    assert!(
        dockerfile.contains("HEALTHCHECK "),
        "the image has a HEALTHCHECK"
    );
    let stack = compose
        .lines()
        .find(|l| l.contains("notify-engine\", \"healthcheck"))
        .expect("the engine's compose healthcheck");
    assert_eq!(
        stack.trim(),
        format!("test: [\"CMD\", {}", &probe[1..]),
        "{stack}"
    );
    for text in [dockerfile, compose] {
        assert!(!text.contains("/dev/tcp/"), "a bash probe is left");
    }
    let ignored: Vec<&str> = include_str!("../../../.dockerignore").lines().collect();
    for folder in ["node_modules", "**/node_modules", ".next", "target"] {
        assert!(
            ignored.contains(&folder),
            "{folder} is not in .dockerignore"
        );
    }
}

#[test]
fn the_outbox_is_kept_longer_than_an_email_is_retried() {
    let mut c = Config::default();
    c.auth.jwt_secret = "x".repeat(32);
    c.retention.email_outbox_days = 2;
    c.email.max_age_secs = 2 * 24 * 3600;
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("retention.email_outbox_days (2 days)"), "{e}");
    c.retention.email_outbox_days = 0;
    assert!(c.validate().is_ok(), "0 keeps rows forever");
    c.retention.email_outbox_days = 3;
    assert!(c.validate().is_ok());
}
