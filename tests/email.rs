//! Email, on the real services (Mailpit as the relay): the outbox through SMTP outages short
//! and long (and mail flowing again within seconds of the relay's return), broken templates,
//! the operator's requeue, events too old to mail, the tenant's link and recipient policy (on
//! a templating plugin's HTML too), and fair claiming between tenants' backlogs.

use std::time::Duration;

use notify_engine::config::TenantConfig;
use notify_engine::store::outbox::RequeueFilter;

use crate::support::*;

/// An SMTP outage delays email without stalling anything else; a broken template fails its
/// email for good with the file and line; both are recorded on the outbox row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_outage_is_retried_and_broken_templates_fail_cleanly() {
    let world = World::new().await;
    let templates = tempfile::tempdir().unwrap();
    copy_dir(&world.services.templates, templates.path());
    let broken_tenant = unique("broken");
    let subject = templates
        .path()
        .join(&broken_tenant)
        .join("order_paid/subject.hbs");
    std::fs::create_dir_all(subject.parent().unwrap()).unwrap();
    std::fs::write(&subject, "Paid {{#if order_id}}unclosed").unwrap();

    let mut config = world.config();
    config.email.templates_dir = templates.path().to_owned();
    // Nothing listens on port 1 (privileged, outside the ephemeral range other tests'
    // listeners use): every attempt fails with "connection refused".
    config.smtp.port = 1;
    let engine = world.start(config.clone()).await;

    let tenant = unique("shop");
    let address = format!("{}@example.test", unique("outage"));
    let (_, sse, _) = connect_sse(&engine, Some(&world.token(&tenant, "u1")), None).await;
    let mut sse = sse.unwrap();
    world
        .produce(&order_paid("o1", &tenant, "u1", Some(&address), 3.0))
        .await;
    world
        .produce(&order_paid("b1", &broken_tenant, "u1", Some(&address), 4.0))
        .await;
    // In-app delivery does not wait for SMTP.
    assert_eq!(sse.next(WAIT).await.unwrap().data["event_id"], "o1");
    world
        .wait_until(
            "SELECT coalesce(max(attempts), 0)::bigint FROM email_outbox WHERE event_id = 'o1' AND status = 'pending'",
            |n| n >= 2,
            WAIT,
        )
        .await;
    let pool = world.pool().await;
    let (last_error,): (String,) =
        sqlx::query_as("SELECT last_error FROM email_outbox WHERE event_id = 'o1'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(last_error.contains("smtp"), "{last_error}");
    world
        .wait_count(
            "SELECT count(*) FROM email_outbox WHERE event_id = 'b1' AND status = 'failed'",
            1,
            WAIT,
        )
        .await;
    let (attempts, reason): (i32, String) =
        sqlx::query_as("SELECT attempts, last_error FROM email_outbox WHERE event_id = 'b1'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(attempts, 1, "a broken template is not retried");
    assert!(
        reason.contains("subject.hbs: line 1"),
        "the reason names file and line: {reason}"
    );
    assert!(engine.metrics.emails_retried.get() >= 1);
    engine.shutdown().await;

    // SMTP is back: the pending email goes out, exactly once.
    config.smtp.port = world.services.smtp_port;
    let engine = world.start(config).await;
    let mails = Mailpit::new(&world.services)
        .wait_for(&address, 1, WAIT)
        .await;
    assert_eq!(mails[0].subject, "Payment received for order A-o1");
    world
        .wait_count(
            "SELECT count(*) FROM email_outbox WHERE event_id = 'o1' AND status = 'sent'",
            1,
            WAIT,
        )
        .await;
    engine.shutdown().await;
}

/// After an SMTP outage, email waiting in backoff (here a minute or more) goes out within
/// seconds of the relay's return, not when each row's backoff ends: when a send succeeds
/// again, and when a probe of the relay does (so also after a restart, with nothing new to
/// send).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_waiting_for_the_relay_goes_out_within_seconds_of_its_return() {
    let world = World::new().await;
    let mailpit =
        tokio::net::lookup_host((world.services.smtp_host.as_str(), world.services.smtp_port))
            .await
            .unwrap()
            .next()
            .unwrap();
    let relay = Relay::start(mailpit, false).await;
    let mut config = world.config();
    config.smtp.port = relay.port;
    // A retry after 30 to 60 s, then longer: far beyond what this test waits.
    config.email.backoff_base_ms = 60_000;
    config.email.backoff_max_ms = 300_000;
    config.email.tenant_rate_per_sec = 0;
    let engine = world.start(config.clone()).await;
    let tenant = unique("shop");
    let address = format!("{}@example.test", unique("outage"));
    let waiting = |id: &str| {
        format!(
            "SELECT count(*) FROM email_outbox WHERE event_id = '{id}' AND status = 'pending'
               AND attempts >= 1 AND next_attempt_at > now() + interval '20 seconds'"
        )
    };
    let mailpit = Mailpit::new(&world.services);

    // Down: the email waits in backoff.
    world
        .produce(&order_paid("o1", &tenant, "u1", Some(&address), 1.0))
        .await;
    world.wait_count(&waiting("o1"), 1, WAIT).await;
    // The relay's outage is on the status report; the engine still serves and consumes.
    let report = status(engine.admin_addr).await;
    assert_eq!(report["checks"]["smtp"], "unreachable", "{report}");
    assert_eq!(report["status"], "degraded", "{report}");
    assert_eq!(report["consuming"], true, "{report}");
    assert_eq!(readyz(engine.admin_addr).await.0, 200);
    // Back, and a new email is sent at once: the waiting one follows within seconds.
    relay.set_up(true);
    world
        .produce(&order_paid("o2", &tenant, "u1", Some(&address), 2.0))
        .await;
    let mails = mailpit.wait_for(&address, 2, Duration::from_secs(10)).await;
    eventually("the status report sees the relay back", async || {
        status(engine.admin_addr).await["checks"]["smtp"] == "ok"
    })
    .await;
    let mut subjects: Vec<_> = mails.iter().map(|m| m.subject.clone()).collect();
    subjects.sort();
    assert_eq!(
        subjects,
        [
            "Payment received for order A-o1",
            "Payment received for order A-o2"
        ]
    );

    // Down again; the engine restarts while an email waits; the relay is back before it
    // starts: with nothing new to send, the email still goes out within seconds.
    relay.set_up(false);
    world
        .produce(&order_paid("o3", &tenant, "u1", Some(&address), 3.0))
        .await;
    world.wait_count(&waiting("o3"), 1, WAIT).await;
    engine.shutdown().await;
    relay.set_up(true);
    let engine = world.start(config).await;
    let mails = mailpit.wait_for(&address, 3, Duration::from_secs(10)).await;
    assert!(
        mails
            .iter()
            .any(|m| m.subject == "Payment received for order A-o3"),
        "{mails:#?}"
    );
    world
        .wait_count(
            "SELECT count(*) FROM email_outbox WHERE status = 'sent'",
            3,
            WAIT,
        )
        .await;
    engine.shutdown().await;
}

/// The relay is down far longer than the old 8-attempt window: the email waits in the
/// outbox and goes out once, when the relay is back. An operator's requeue brings back
/// failed rows (here, rows an older release had given up on), filtered by tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_survives_a_long_outage_and_failed_rows_can_be_requeued() {
    let world = World::new().await;
    let mut config = world.config();
    config.smtp.port = 1; // nothing listens: connection refused
    config.email.backoff_base_ms = 10;
    config.email.backoff_max_ms = 50;
    config.email.tenant_rate_per_sec = 0;
    let engine = world.start(config.clone()).await;
    let tenant = unique("shop");
    let other = unique("other");
    let address = format!("{}@example.test", unique("outage"));
    let other_address = format!("{}@example.test", unique("other"));
    world
        .produce(&order_paid("o1", &tenant, "u1", Some(&address), 3.0))
        .await;
    world
        .wait_until(
            "SELECT coalesce(max(attempts), 0)::bigint FROM email_outbox WHERE event_id = 'o1'",
            |n| n >= 20,
            WAIT,
        )
        .await;
    assert_eq!(
        world
            .count("SELECT count(*) FROM email_outbox WHERE status = 'failed'")
            .await,
        0,
        "a transient failure is retried for days, not 8 attempts"
    );
    engine.shutdown().await;

    // Rows an older release gave up on, for two tenants.
    world
        .produce(&order_paid("r1", &tenant, "u2", Some(&address), 4.0))
        .await;
    world
        .produce(&order_paid("r2", &other, "u1", Some(&other_address), 5.0))
        .await;
    let engine = world.start(config.clone()).await;
    world
        .wait_count(
            "SELECT count(*) FROM email_outbox WHERE event_id IN ('r1', 'r2') AND attempts > 0",
            2,
            WAIT,
        )
        .await;
    engine.shutdown().await;
    let pool = world.pool().await;
    sqlx::query(
        "UPDATE email_outbox SET status = 'failed', last_error = 'smtp: 421 too many attempts'
         WHERE event_id IN ('r1', 'r2')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut database = config.database.clone();
    database.url = world.db_url.clone();
    let filter = |tenant: &str, error: &str| RequeueFilter {
        tenant: Some(tenant.to_owned()),
        error: Some(error.to_owned()),
        since: Some(chrono::Utc::now() - chrono::Duration::hours(1)),
        until: None,
    };
    let none = notify_engine::tools::requeue_emails(&database, &filter(&tenant, "550"))
        .await
        .unwrap();
    assert_eq!(none, 0, "the error filter matches nothing");
    let requeued = notify_engine::tools::requeue_emails(&database, &filter(&tenant, "421 TOO"))
        .await
        .unwrap();
    assert_eq!(requeued, 1, "only the filtered tenant's failed row");

    // The relay is back: o1 and the requeued r1 go out once each; r2 stays failed.
    config.smtp.port = world.services.smtp_port;
    let engine = world.start(config).await;
    let mails = Mailpit::new(&world.services)
        .wait_for(&address, 2, WAIT)
        .await;
    let mut subjects: Vec<_> = mails.iter().map(|m| m.subject.clone()).collect();
    subjects.sort();
    assert_eq!(
        subjects,
        [
            "Payment received for order A-o1",
            "Payment received for order A-r1"
        ]
    );
    world
        .wait_count(
            "SELECT count(*) FROM email_outbox WHERE status = 'sent'",
            2,
            WAIT,
        )
        .await;
    let (status,): (String,) =
        sqlx::query_as("SELECT status FROM email_outbox WHERE event_id = 'r2'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(status, "failed");
    assert!(
        Mailpit::new(&world.services)
            .messages_to(&other_address)
            .await
            .is_empty()
    );
    engine.shutdown().await;
}

/// A new consumer group on an old topic: old events are recorded (in-app included) but
/// send no email.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_events_are_recorded_but_send_no_email() {
    let world = World::new().await;
    let engine = world.start(world.config()).await;
    let tenant = unique("shop");
    let address = format!("{}@example.test", unique("old"));
    let mut old = order_paid("old1", &tenant, "u1", Some(&address), 1.0);
    old["time"] = (chrono::Utc::now() - chrono::Duration::days(3))
        .to_rfc3339()
        .into();
    world.produce(&old).await;
    world
        .produce(&order_paid("new1", &tenant, "u1", Some(&address), 2.0))
        .await;
    let mails = Mailpit::new(&world.services)
        .wait_for(&address, 1, WAIT)
        .await;
    assert_eq!(mails[0].subject, "Payment received for order A-new1");
    let (status, reason): (String, String) =
        sqlx::query_as("SELECT status, last_error FROM email_outbox WHERE event_id = 'old1'")
            .fetch_one(&world.pool().await)
            .await
            .unwrap();
    assert_eq!(status, "skipped");
    assert!(reason.contains("max_event_age_secs"), "{reason}");
    assert_eq!(
        world
            .count("SELECT count(*) FROM notifications WHERE event_id = 'old1'")
            .await,
        1
    );
    assert_eq!(engine.metrics.emails_skipped.get(), 1);
    engine.shutdown().await;
}

/// Email cannot be turned into a phishing relay: a link from event data must be https:
/// (and, for a tenant with link_domains, go to its domains), and a tenant with
/// recipient_domains can mail only those. Refused emails fail unsent, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_links_and_recipients_follow_the_tenant_policy() {
    let world = World::new().await;
    let tenant = unique("shop");
    let mut config = world.config();
    config.tenants.insert(
        tenant.clone(),
        TenantConfig {
            link_domains: vec!["track.example".into()],
            recipient_domains: vec!["shop.example".into()],
            ..TenantConfig::default()
        },
    );
    let engine = world.start(config).await;
    let customer = format!("{}@shop.example", unique("c"));
    let outsider = format!("{}@bank.example", unique("victim"));
    let shipped = |id: &str, to: &str, url: &str| {
        event(
            id,
            &tenant,
            "order_status_updated",
            serde_json::json!({"user_id": "u1", "order_id": format!("A-{id}"), "status": "shipped",
                    "email": to, "tracking_url": url}),
        )
    };
    world
        .produce(&shipped("good", &customer, "https://eu.track.example/p/1"))
        .await;
    world
        .produce(&shipped(
            "phish",
            &customer,
            "http://track.example.evil.example/login",
        ))
        .await;
    world
        .produce(&shipped(
            "elsewhere",
            &customer,
            "https://evil.example/login",
        ))
        .await;
    world
        .produce(&shipped(
            "outsider",
            &outsider,
            "https://eu.track.example/p/2",
        ))
        .await;
    let mails = Mailpit::new(&world.services)
        .wait_for(&customer, 1, WAIT)
        .await;
    assert!(
        mails[0].html.contains("https://eu.track.example/p/1"),
        "{}",
        mails[0].html
    );
    world
        .wait_count(
            "SELECT count(*) FROM email_outbox WHERE status = 'failed'",
            3,
            WAIT,
        )
        .await;
    let failed: Vec<(String, String)> = sqlx::query_as(
        "SELECT event_id, last_error FROM email_outbox WHERE status = 'failed' ORDER BY event_id",
    )
    .fetch_all(&world.pool().await)
    .await
    .unwrap();
    // elsewhere, outsider, phish
    assert!(failed[0].1.contains("link_domains"), "{failed:?}");
    assert!(failed[1].1.contains("recipient_domains"), "{failed:?}");
    assert!(failed[2].1.contains("is not https"), "{failed:?}");
    assert!(
        Mailpit::new(&world.services)
            .messages_to(&outsider)
            .await
            .is_empty()
    );
    engine.shutdown().await;
}

/// A tenant's templating plugin is held to the same link policy as its Handlebars files:
/// the HTML it returns is parsed, and an email whose HTML has a `javascript:` link (plainly
/// or hidden behind character references or CSS escapes), a link or image off the tenant's
/// `link_domains`, or a script handler fails unsent with the reason; clean HTML goes out
/// as the plugin wrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn html_from_a_templating_plugin_follows_the_tenant_link_policy() {
    let world = World::new().await;
    world.install_plugin("fixtures/chaos-templater.wasm", "chaos-templater.wasm");
    let tenant = unique("shop");
    let mut config = world.config();
    config.tenants.insert(
        tenant.clone(),
        TenantConfig {
            templating_plugin: Some("chaos-templater".into()),
            link_domains: vec!["shop.example".into()],
            ..TenantConfig::default()
        },
    );
    let engine = world.start(config).await;
    let address = format!("{}@example.test", unique("html"));
    let good = "<p>Order <a href=\"https://shop.example/o/1\">A-1</a> \
                <img src=\"https://cdn.shop.example/logo.png\" alt=\"\"> \
                <a href=\"#top\">top</a></p>";
    let cases = [
        ("good", good),
        (
            "javascript",
            "<a href=\"javascript:alert(document.cookie)\">pay</a>",
        ),
        (
            "encoded",
            "<a href=\"&#106;ava&#x73;cript&colon;alert(1)\">pay</a>",
        ),
        (
            "offsite",
            "<p><a href=\"https://evil.example/login\">pay</a></p>",
        ),
        ("pixel", "<img src=\"https://evil.example/t.png\">"),
        (
            "css",
            "<td style=\"background-image: u\\72 l(https://evil.example/t.png)\">x</td>",
        ),
        (
            "handler",
            "<img src=\"https://shop.example/a.png\" onerror=\"location='https://evil.example'\">",
        ),
    ];
    for (id, html) in cases {
        let mut event = order_paid(id, &tenant, "u1", Some(&address), 1.0);
        event["data"]["chaos"] = serde_json::json!("html");
        event["data"]["html"] = serde_json::json!(html);
        world.produce(&event).await;
    }
    world
        .wait_count(
            "SELECT count(*) FROM email_outbox WHERE status IN ('sent', 'failed')",
            cases.len() as i64,
            WAIT,
        )
        .await;
    let rows: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT event_id, status, last_error FROM email_outbox ORDER BY event_id")
            .fetch_all(&world.pool().await)
            .await
            .unwrap();
    let outcome = |id: &str| {
        rows.iter()
            .find(|(event, _, _)| event == id)
            .map(|(_, status, error)| (status.as_str(), error.clone().unwrap_or_default()))
            .unwrap()
    };
    assert_eq!(outcome("good").0, "sent", "{rows:?}");
    for (id, reason) in [
        ("javascript", "is not https"),
        ("encoded", "is not https"),
        ("offsite", "link_domains"),
        ("pixel", "link_domains"),
        ("css", "link_domains"),
        ("handler", "onerror"),
    ] {
        let (status, error) = outcome(id);
        assert_eq!(status, "failed", "{id}: {rows:?}");
        assert!(error.contains(reason), "{id}: {error}");
        assert!(error.contains("templating"), "{id}: {error}");
    }
    let mails = Mailpit::new(&world.services)
        .wait_for(&address, 1, WAIT)
        .await;
    assert!(
        mails[0].html.contains("https://shop.example/o/1") && mails[0].html.contains("logo.png"),
        "{}",
        mails[0].html
    );
    engine.shutdown().await;
}

/// Fair claiming: a tenant's backlog of emails does not hold back another tenant's email,
/// which goes out within the first rounds, not after the backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_email_backlog_does_not_delay_another() {
    let world = World::new().await;
    let config = world.config();
    // Migrate and fill the outbox before the worker starts: the backlog is older.
    let pool = notify_engine::store::connect(&config.database, 2).unwrap();
    notify_engine::store::migrate(&pool).await.unwrap();
    let bulk = unique("bulk");
    let small = unique("small");
    let insert = |tenant: String, n: i64, age_secs: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO email_outbox
                     (tenant_id, event_id, recipient, template, data, message_id, next_attempt_at)
                 SELECT $1, $1 || '-' || i, $1 || '@example.test', 'order_paid',
                        jsonb_build_object('order_id', 'A-' || i, 'amount', 1, 'currency', 'EUR',
                                           'customer_name', 'C', 'event_id', 'e' || i),
                        '<' || $1 || '-' || i || '@example.test>',
                        now() - make_interval(secs => $3)
                 FROM generate_series(1, $2) AS i",
            )
            .bind(tenant)
            .bind(n)
            .bind(age_secs as f64)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    insert(bulk.clone(), 120, 60).await;
    insert(small.clone(), 1, 0).await;
    let engine = world.start(config).await;
    world
        .wait_count(
            "SELECT count(*) FROM email_outbox WHERE status = 'sent'",
            121,
            WAIT,
        )
        .await;
    let (rank,): (i64,) = sqlx::query_as(
        "SELECT rank FROM (
             SELECT tenant_id, rank() OVER (ORDER BY sent_at) AS rank FROM email_outbox
         ) r WHERE tenant_id = $1",
    )
    .bind(&small)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        rank <= 8,
        "the small tenant's email went out as number {rank} of 121, behind the other tenant's backlog"
    );
    engine.shutdown().await;
}
