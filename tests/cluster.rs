//! Several instances of the engine on one database: what a stream on one instance hears of
//! rows committed on another.

use std::time::Duration;

use crate::support::*;
use notify_engine::app::Running;

/// Two instances: one consumes the topics, the other consumes nothing (another topic, its
/// own group). A stream on the second hears of the notification the first wrote, and of an
/// inbox change made through the first's API, by PostgreSQL NOTIFY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_any_instance_hears_of_rows_committed_on_another() {
    let world = World::new().await;
    let consumer = world.start(world.config()).await;
    let other = world.start_idle(world.config()).await;

    let tenant = unique("shop");
    let token = world.token(&tenant, "u1");
    let (status, sse, _) = connect_sse(&other, Some(&token), None).await;
    assert_eq!(status, 200);
    let mut sse = sse.unwrap();
    world
        .produce(&order_paid("c1", &tenant, "u1", None, 10.0))
        .await;
    let n = sse
        .next(WAIT)
        .await
        .expect("the notification the other instance consumed");
    assert_eq!(n.event, "notification");
    assert_eq!(n.id.as_deref(), Some("1"));
    assert_eq!(n.data["title"], "Payment received");

    let api = Api::new(&consumer, &token);
    let (status, _) = api.post("/api/v1/notifications/1/read", None).await;
    assert_eq!(status, 200);
    let read = sse
        .next(Duration::from_secs(10))
        .await
        .expect("the read, made through the other instance");
    assert_eq!(read.event, "notification.read");
    assert_eq!(read.data["unread_count"], 0);
    other.shutdown().await;
    consumer.shutdown().await;
}

/// What one client saw of its user's stream: (SSE id, order id) of every notification.
type Transcript = Vec<(i64, String)>;

/// Reads `user`'s stream until it holds `want` notifications, reconnecting (to `fallback`,
/// with `Last-Event-ID`) whenever the stream ends, as a browser's `EventSource` would.
async fn follow(
    mut sse: SseClient,
    fallback: std::net::SocketAddr,
    token: String,
    want: usize,
) -> (Transcript, usize) {
    let mut seen: Transcript = Vec::new();
    let mut reconnects = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.len() < want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {want} notifications: {seen:?}",
            seen.len()
        );
        match sse.poll(Duration::from_secs(5)).await {
            Polled::Event(e) if e.event == "notification" => {
                let id: i64 = e.id.as_deref().unwrap().parse().unwrap();
                seen.push((id, e.data["data"]["order_id"].as_str().unwrap().to_owned()));
            }
            Polled::Event(_) | Polled::Timeout => {}
            Polled::Ended => {
                reconnects += 1;
                let last = seen.last().map(|(id, _)| id.to_string());
                let response = reqwest::Client::new()
                    .get(format!("http://{fallback}/api/v1/sse"))
                    .bearer_auth(&token);
                let response = match &last {
                    Some(id) => response.header("Last-Event-ID", id),
                    None => response,
                };
                let (status, client, body) = open_sse(response).await;
                assert_eq!(status, 200, "{body}");
                sse = client.unwrap();
            }
        }
    }
    (seen, reconnects)
}

/// Every notification exactly once, in order, without gaps: ids 1..=n and the orders
/// produced for the user, in production order.
fn assert_exactly_once(user: &str, seen: &Transcript, produced: &[String]) {
    let ids: Vec<i64> = seen.iter().map(|(id, _)| *id).collect();
    let expected: Vec<i64> = (1..=produced.len() as i64).collect();
    assert_eq!(ids, expected, "{user}: ids in order, no gap, no duplicate");
    let orders: Vec<&String> = seen.iter().map(|(_, order)| order).collect();
    let produced: Vec<&String> = produced.iter().collect();
    assert_eq!(orders, produced, "{user}: every order once, in order");
}

/// Two instances in one consumer group share the partitions. Each user's client sits on one
/// instance and receives every notification of that user exactly once, whichever instance
/// consumed it. Then the first instance stops mid-stream: the group rebalances, the second
/// takes over its partitions from their committed offsets, and the first's clients
/// reconnect to the second and replay from `Last-Event-ID` without gap or duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_in_one_group_deliver_every_event_once_and_survive_one_leaving() {
    let world = World::new().await;
    let first = world.start(world.config()).await;
    let second = std::sync::Arc::new(world.start(world.config()).await);
    let tenant = unique("shop");
    let users: Vec<String> = (0..6).map(|i| format!("u{i}")).collect();

    // Clients of u0, u2, u4 on the first instance; of u1, u3, u5 on the second.
    let mut clients = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let token = world.token(&tenant, user);
        let on = if i % 2 == 0 { &first } else { &*second };
        let (status, sse, body) = connect_sse(on, Some(&token), None).await;
        assert_eq!(status, 200, "{body}");
        clients.push((sse.unwrap(), token));
    }

    // User i's events go to partition i % 3 (in order, as a keyed producer would): once
    // the group has given each instance some partitions, both consume.
    let mut produced: Vec<Vec<String>> = vec![Vec::new(); users.len()];
    let mut round = 0;
    let mut produce_round = async |produced: &mut Vec<Vec<String>>| {
        for (i, user) in users.iter().enumerate() {
            let id = format!("{user}-{round}");
            world
                .produce_to_partition(&order_paid(&id, &tenant, user, None, 10.0), (i % 3) as i32)
                .await;
            produced[i].push(format!("A-{id}"));
        }
        round += 1;
    };
    let consumed = |engine: &Running| -> u64 {
        engine
            .metrics
            .events_consumed
            .with_label_values(&[&world.topic_paid])
            .get()
    };
    // The first phase: until both instances consumed (the second joined the group after
    // the first, and the rebalance takes a few seconds), at least 8 rounds.
    let deadline = tokio::time::Instant::now() + WAIT;
    while produced[0].len() < 8 || consumed(&first) == 0 || consumed(&second) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the group never gave both instances partitions: consumed {} and {}",
            consumed(&first),
            consumed(&second)
        );
        produce_round(&mut produced).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first_phase = produced[0].len();
    world
        .wait_count(
            "SELECT count(*) FROM notifications",
            (first_phase * users.len()) as i64,
            WAIT,
        )
        .await;

    let total = first_phase + 8;
    let readers: Vec<_> = clients
        .into_iter()
        .map(|(sse, token)| tokio::spawn(follow(sse, second.http_addr, token, total)))
        .collect();

    // The second phase: two more rounds, the first instance stops (streams end, offsets of
    // what it stored are committed), six more rounds, which the second consumes alone.
    produce_round(&mut produced).await;
    produce_round(&mut produced).await;
    first.shutdown().await;
    for _ in 0..6 {
        produce_round(&mut produced).await;
    }
    assert_eq!(produced[0].len(), total);

    for (i, reader) in readers.into_iter().enumerate() {
        let (seen, reconnects) = reader.await.unwrap();
        assert_exactly_once(&users[i], &seen, &produced[i]);
        if i % 2 == 0 {
            assert!(reconnects >= 1, "{}: its instance stopped", users[i]);
        }
    }
    // Nothing was stored twice either (the duplicate filter across the rebalance).
    assert_eq!(
        world.count("SELECT count(*) FROM notifications").await,
        (total * users.len()) as i64
    );
    std::sync::Arc::into_inner(second)
        .expect("the readers are done")
        .shutdown()
        .await;
}

/// Two instances, and a tenant on acme's plugin with `skip_email_when_online`: one instance
/// consumes, the other consumes nothing and holds u1's open stream, which the consumer has
/// seen within the documented bound.
async fn u1_online_on_the_idle_instance() -> (World, String, Running, Running, SseClient) {
    let world = World::new().await;
    let tenant = unique("acme");
    let mut config = world.config();
    config.tenants.insert(
        tenant.clone(),
        notify_engine::config::TenantConfig {
            plugin: Some("acme".into()),
            config: [("skip_email_when_online".to_owned(), "true".to_owned())].into(),
            ..Default::default()
        },
    );
    let consumer = world.start(config.clone()).await;
    let other = world.start_idle(config).await;

    let token = world.token(&tenant, "u1");
    let (status, sse, _) = connect_sse(&other, Some(&token), None).await;
    assert_eq!(status, 200);
    let sse = sse.unwrap();
    // Seen by the consumer within the documented bound (a flush, a commit, a NOTIFY).
    let since = std::time::Instant::now();
    while !consumer.presence.is_online(&tenant, "u1") {
        assert!(
            since.elapsed() < Duration::from_secs(2),
            "the consumer never saw u1 online"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!consumer.presence.is_online(&tenant, "u2"));
    (world, tenant, consumer, other, sse)
}

/// Presence across instances: a user with a stream open on one instance is online for the
/// routing plugin running on another (acme's `skip_email_when_online`: no email while the
/// app is open, an email once it is closed), and a graceful stop takes an instance out of
/// everyone's view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routing_plugin_sees_presence_on_another_instance() {
    let (world, tenant, consumer, other, mut sse) = u1_online_on_the_idle_instance().await;
    world
        .produce(&order_paid(
            "watching",
            &tenant,
            "u1",
            Some("u1@example.com"),
            20.0,
        ))
        .await;
    let n = sse.next(WAIT).await.expect("the in-app item");
    assert_eq!(n.event, "notification");
    // The decision and its in-app item commit together: no email was enqueued.
    assert_eq!(
        world
            .count("SELECT count(*) FROM email_outbox WHERE event_id = 'watching'")
            .await,
        0
    );

    drop(sse);
    let since = std::time::Instant::now();
    while consumer.presence.is_online(&tenant, "u1") {
        assert!(
            since.elapsed() < Duration::from_secs(2),
            "the consumer never saw u1 go offline"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    world
        .produce(&order_paid(
            "away",
            &tenant,
            "u1",
            Some("u1@example.com"),
            20.0,
        ))
        .await;
    world
        .wait_count(
            "SELECT count(*) FROM email_outbox WHERE event_id = 'away'",
            1,
            WAIT,
        )
        .await;

    // A graceful stop takes the instance and its users out of everyone's view at once.
    let other_id = other.presence.instance().to_owned();
    other.shutdown().await;
    let rows = world
        .count(&format!(
            "SELECT count(*) FROM engine_instances WHERE id = '{other_id}'"
        ))
        .await;
    assert_eq!(rows, 0);
    consumer.shutdown().await;
}

/// The admin presence listing, on either instance, counts the users online on each; it is
/// for the admin role only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_presence_listing_counts_every_instances_users() {
    let (world, tenant, consumer, other, _sse) = u1_online_on_the_idle_instance().await;
    // The admin listing, on either instance.
    let auth = &world.config().auth;
    let admin = notify_engine::api::auth::mint_with_roles(auth, "ops", "root", &["admin"], 60);
    let listing = |engine: &Running| {
        let url = format!("http://{}/api/v1/admin/presence", engine.admin_addr);
        let admin = admin.clone();
        async move {
            let response = reqwest::Client::new()
                .get(url)
                .bearer_auth(admin)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.json::<serde_json::Value>().await.unwrap()
        }
    };
    let seen_by_consumer = listing(&consumer).await;
    assert_eq!(seen_by_consumer["instance"], consumer.presence.instance());
    assert_eq!(seen_by_consumer["counts"]["local_users"], 0);
    assert_eq!(seen_by_consumer["counts"]["cluster_users"], 1);
    let instances = seen_by_consumer["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 2, "{seen_by_consumer:#}");
    let other_row = instances
        .iter()
        .find(|i| i["id"] == other.presence.instance())
        .unwrap();
    assert_eq!(other_row["users_online"], 1);
    let seen_by_other = listing(&other).await;
    assert_eq!(seen_by_other["counts"]["local_streams"], 1);
    let user_token = world.token(&tenant, "u1");
    let refused = reqwest::Client::new()
        .get(format!("http://{}/api/v1/admin/presence", other.admin_addr))
        .bearer_auth(user_token)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403, "the admin role is required");

    other.shutdown().await;
    consumer.shutdown().await;
}

/// An instance killed with SIGKILL leaves the group without a word. Its partitions must go
/// to the others after `kafka.session_timeout_ms` (10 s), not after librdkafka's 45 s
/// default, which stalled them that long after every crash (found by the chaos suite,
/// `scripts/chaos.sh`). The killed instance is a process of the engine's binary; the one that
/// takes over runs in the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instances_partitions_go_to_the_others_within_the_session_timeout() {
    let world = World::new().await;
    let config = world.config();
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let admin = free();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("engine.toml");
    std::fs::write(
        &file,
        format!(
            "[http]\nlisten = \"{}\"\nadmin_listen = \"{admin}\"\n\
             [kafka]\nbrokers = \"{}\"\ngroup_id = \"{}\"\ntopics = [\"{}\", \"{}\"]\n\
             [database]\nurl = \"{}\"\nmax_connections = 4\n\
             [plugins]\ndir = \"{}\"\n\
             [email]\ntemplates_dir = \"{}\"\n\
             [smtp]\ntls = \"none\"\nhost = \"{}\"\nport = {}\n",
            free(),
            config.kafka.brokers,
            config.kafka.group_id,
            world.topic_paid,
            world.topic_status,
            world.db_url,
            world.plugin_dir.path().display(),
            world.services.templates.display(),
            world.services.smtp_host,
            world.services.smtp_port,
        ),
    )
    .unwrap();
    let mut doomed = tokio::process::Command::new(env!("CARGO_BIN_EXE_notify-engine"))
        .arg("run")
        .env("NOTIFY_CONFIG", &file)
        .env("DATABASE_URL", &world.db_url)
        .env("NOTIFY_AUTH__JWT_SECRET", SECRET)
        .env("NOTIFY_CLUSTER__SECRET", CLUSTER_SECRET)
        .env("NOTIFY_LOG__FILTER", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("the engine's binary runs");
    // It holds every partition: one event on each is handled.
    let tenant = unique("shop");
    for p in 0..3 {
        world
            .produce_to_partition(&order_paid(&format!("a{p}"), &tenant, "u1", None, 1.0), p)
            .await;
    }
    let handled = "SELECT count(*) FROM processed_events";
    world.wait_count(handled, 3, WAIT).await;

    doomed.start_kill().unwrap();
    doomed.wait().await.unwrap();
    let killed = tokio::time::Instant::now();
    let survivor = world.start(world.config()).await;
    for p in 0..3 {
        world
            .produce_to_partition(&order_paid(&format!("b{p}"), &tenant, "u1", None, 1.0), p)
            .await;
    }
    // 10 s for the group to give up on the killed instance, and as much again for the
    // rebalance and the events: well short of the 45 s the old default took.
    world.wait_count(handled, 6, Duration::from_secs(30)).await;
    assert!(
        killed.elapsed() > Duration::from_secs(3),
        "the group cannot have known before the session timeout: {:?}",
        killed.elapsed()
    );
    survivor.shutdown().await;
}

/// A user's presence on `engine`'s other instance, as `engine` sees it, polled until it is
/// `online` (within a few seconds: a flush, a commit, a NOTIFY).
async fn seen(engine: &Running, tenant: &str, user: &str, online: bool) {
    let since = std::time::Instant::now();
    while engine.presence.is_online(tenant, user) != online {
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "{user} never seen {}",
            if online { "online" } else { "offline" }
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// PostgreSQL has no privilege on LISTEN/NOTIFY: any role that may connect can speak on the
/// engine's channels. Another role (CONNECT only, as PUBLIC has by default) sends what the
/// engine's instances once believed: a forged row for a user's stream (and the same in the
/// sealed form, under a made-up seal), a row whose kind carries CR/LF, a sequence number
/// past any real one, a user online on an instance that does not exist, and a real presence
/// change it overheard, sent again after the user left. None of it reaches a stream or the
/// presence view: the stream shows the user's real next notification with its real id, the
/// emails of users falsely "online" are sent, and the refusals are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_database_role_cannot_speak_for_the_engine_on_its_channels() {
    use sqlx::{Connection, PgConnection};
    let world = World::new().await;
    let tenant = unique("acme");
    let mut config = world.config();
    config.tenants.insert(
        tenant.clone(),
        notify_engine::config::TenantConfig {
            plugin: Some("acme".into()),
            config: [("skip_email_when_online".to_owned(), "true".to_owned())].into(),
            ..Default::default()
        },
    );
    let consumer = world.start(config.clone()).await;
    let other = world.start_idle(config).await;

    // The other role: it may connect (PUBLIC's default), nothing more.
    let forger = unique("forger").replace('-', "_");
    let mut admin = PgConnection::connect(&world.services.database_url)
        .await
        .unwrap();
    sqlx::query(&format!("CREATE ROLE {forger} LOGIN PASSWORD 'pw'"))
        .execute(&mut admin)
        .await
        .unwrap();
    let (scheme, rest) = world.db_url.split_once("://").unwrap();
    let host_and_db = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let forger_url = format!("{scheme}://{forger}:pw@{host_and_db}");
    let mut forged = PgConnection::connect(&forger_url).await.unwrap();
    let mut overheard = sqlx::postgres::PgListener::connect(&forger_url)
        .await
        .unwrap();
    overheard.listen("notify_engine_presence").await.unwrap();

    // u1 watches on the idle instance and has its first notification.
    let token = world.token(&tenant, "u1");
    let (status, sse, _) = connect_sse(&other, Some(&token), None).await;
    assert_eq!(status, 200);
    let mut sse = sse.unwrap();
    world
        .produce(&order_paid("real-1", &tenant, "u1", None, 1.0))
        .await;
    let first = sse.next(WAIT).await.expect("the first notification");
    assert_eq!(first.id.as_deref(), Some("1"));

    // u3 opens a stream and closes it; the other role overhears its presence going online.
    let (_, u3, _) = connect_sse(&other, Some(&world.token(&tenant, "u3")), None).await;
    let u3_online = loop {
        let heard = tokio::time::timeout(Duration::from_secs(5), overheard.recv())
            .await
            .expect("u3's presence news, overheard")
            .unwrap();
        if heard.payload().contains("online") && heard.payload().contains("\"u3\"") {
            break heard.payload().to_owned();
        }
    };
    seen(&consumer, &tenant, "u3", true).await;
    drop(u3);
    seen(&consumer, &tenant, "u3", false).await;

    let row = |seq: i64, kind: &str| {
        serde_json::json!({
            "seq": seq, "event_id": "forged", "kind": kind, "title": "Forged",
            "body": "Your account is locked: https://evil.example", "category": null,
            "data": {}, "created_at": chrono::Utc::now(), "read_at": null, "archived_at": null,
        })
    };
    let wake = |wakes: serde_json::Value| wakes.to_string();
    let at = chrono::Utc::now().timestamp_millis();
    let fake_instance = uuid::Uuid::new_v4().to_string();
    let forgeries = [
        (
            "notify_engine_wake",
            wake(serde_json::json!([[
                &tenant,
                "u1",
                2,
                row(2, "notification")
            ]])),
        ),
        (
            "notify_engine_wake",
            format!(
                "v1.{}.{}",
                "A".repeat(43),
                serde_json::json!({"by": other.presence.instance(), "n": 1, "at": at,
                                   "wakes": [[&tenant, "u1", 2, row(2, "notification")]]})
            ),
        ),
        (
            "notify_engine_wake",
            wake(serde_json::json!([[
                &tenant,
                "u1",
                3,
                row(3, "order.updated\r\nevent: notification")
            ]])),
        ),
        (
            "notify_engine_wake",
            wake(serde_json::json!([[&tenant, "u1", i64::MAX]])),
        ),
        (
            "notify_engine_presence",
            serde_json::json!({"instance": fake_instance, "online": [[&tenant, "u2"]]}).to_string(),
        ),
        ("notify_engine_presence", u3_online),
    ];
    for (channel, payload) in &forgeries {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(payload)
            .execute(&mut forged)
            .await
            .unwrap();
    }
    // A real presence change after them: once the consumer has it, it has heard them all.
    let (_, _u4, _) = connect_sse(&other, Some(&world.token(&tenant, "u4")), None).await;
    seen(&consumer, &tenant, "u4", true).await;
    assert!(
        !consumer.presence.is_online(&tenant, "u2"),
        "online on an instance that does not exist"
    );
    assert!(
        !consumer.presence.is_online(&tenant, "u3"),
        "online again by an overheard, replayed change"
    );

    // u1's real next notification reaches the stream, with its real id; nothing forged does.
    world
        .produce(&order_paid("real-2", &tenant, "u1", None, 2.0))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let event = match sse.poll(left).await {
            Polled::Event(event) => event,
            ended => panic!("the stream ended or stayed silent ({ended:?}) before real-2"),
        };
        assert_ne!(event.data["title"], "Forged", "a forged frame: {event:?}");
        assert_eq!(event.event, "notification", "{event:?}");
        if event.data["event_id"] == "real-2" {
            assert_eq!(event.id.as_deref(), Some("2"), "the real next notification");
            break;
        }
    }
    // Users falsely "online" get their email.
    for user in ["u2", "u3"] {
        let id = format!("mail-{user}");
        let to = format!("{user}@example.com");
        world
            .produce(&order_paid(&id, &tenant, user, Some(&to), 3.0))
            .await;
        world
            .wait_count(
                &format!("SELECT count(*) FROM email_outbox WHERE event_id = '{id}'"),
                1,
                Duration::from_secs(20),
            )
            .await;
    }
    // Counted, as operators scrape it (docs/operating.md).
    let refused = async |engine: &Running, channel: &str, reason: &str| {
        let series = format!(
            "notify_cluster_messages_refused_total{{channel=\"{channel}\",reason=\"{reason}\"}}"
        );
        metric(engine, &series).await.unwrap_or(0.0)
    };
    assert_eq!(
        refused(&other, "notify_engine_wake", "malformed").await,
        3.0
    );
    assert_eq!(
        refused(&other, "notify_engine_wake", "signature").await,
        1.0
    );
    assert_eq!(
        refused(&consumer, "notify_engine_presence", "malformed").await,
        1.0
    );
    assert_eq!(
        refused(&consumer, "notify_engine_presence", "replayed").await,
        1.0
    );

    drop((sse, forged, overheard));
    other.shutdown().await;
    consumer.shutdown().await;
    sqlx::query(&format!("DROP ROLE {forger}"))
        .execute(&mut admin)
        .await
        .unwrap();
}
