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
    let printed = format!("{c:?}");
    for secret in [
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
    let cases: [(Breaks, &str); 9] = [
        (
            |c| c.auth.ticket_ttl_secs = 31,
            "auth.ticket_ttl_secs must be between 1 and 30",
        ),
        (
            |c| c.http.cors_origins = vec!["*".into()],
            "http.cors_origins: \"*\" must be an origin like \"https://app.example.com\" (no path, no wildcard)",
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
