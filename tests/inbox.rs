//! The REST inbox, on the real services: pages, unread counts, read, read-all, archive and
//! unarchive, each change told to the user's other tabs over SSE; bad parameters and other
//! users' ids refused.

use serde_json::{Value, json};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_api_pages_counts_reads_and_archives_and_tells_other_tabs() {
    let world = World::new().await;
    let engine = world.start(world.config()).await;
    let contracts = Contracts::load();
    let tenant = unique("shop");
    let api = Api::new(&engine, &world.token(&tenant, "u1"));
    for i in 1..=5 {
        world
            .produce(&order_paid(&format!("p{i}"), &tenant, "u1", None, 10.0))
            .await;
    }
    world
        .wait_count(
            &format!("SELECT count(*) FROM notifications WHERE tenant_id = '{tenant}'"),
            5,
            WAIT,
        )
        .await;
    // Two tabs of the same user.
    let token = api.token.clone();
    let (_, tab_a, _) = connect_sse(&engine, Some(&token), None).await;
    let (_, tab_b, _) = connect_sse(&engine, Some(&token), None).await;
    let (mut tab_a, mut tab_b) = (tab_a.unwrap(), tab_b.unwrap());

    // Pages, newest first; an insert between pages does not shift them.
    let (status, first) = api.get("/api/v1/notifications?limit=2").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(ids(&first), [5, 4]);
    assert_eq!(first["items"][0]["title"], "Payment received");
    assert_eq!(first["items"][0]["category"], "billing");
    assert_eq!(first["items"][0]["read_at"], Value::Null);
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    world
        .produce(&order_paid("p6", &tenant, "u1", None, 10.0))
        .await;
    let n = tab_a.next(WAIT).await.expect("the new notification");
    contracts.check_sse(&n);
    assert_eq!(n.id.as_deref(), Some("6"));
    assert_eq!(tab_b.next(WAIT).await.unwrap().id.as_deref(), Some("6"));
    let (_, second) = api
        .get(&format!("/api/v1/notifications?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(ids(&second), [3, 2]);
    let cursor = second["next_cursor"].as_str().unwrap();
    let (_, last) = api
        .get(&format!("/api/v1/notifications?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(ids(&last), [1]);
    assert_eq!(last["next_cursor"], Value::Null);
    assert_eq!(
        api.get("/api/v1/notifications/unread-count").await.1["unread_count"],
        6
    );

    // Marking read in one tab reaches the other, with the count the API agrees on.
    let (status, changed) = api.post("/api/v1/notifications/5/read", None).await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["unread_count"], 5);
    assert!(changed["notification"]["read_at"].is_string());
    for tab in [&mut tab_a, &mut tab_b] {
        let e = tab
            .next(WAIT)
            .await
            .expect("notification.read on every tab");
        contracts.check_sse(&e);
        assert_eq!(e.event, "notification.read");
        assert_eq!(
            e.data,
            json!({ "ids": [5], "up_to": null, "unread_count": 5 })
        );
    }
    let (_, unread) = api.get("/api/v1/notifications?unread=true&limit=100").await;
    assert_eq!(ids(&unread), [6, 4, 3, 2, 1]);
    // Idempotent: a second click changes nothing and tells nobody.
    let (status, again) = api.post("/api/v1/notifications/5/read", None).await;
    assert_eq!((status, again["unread_count"].as_i64()), (200, Some(5)));

    // Read all up to what the user saw (3): 6 and 4 stay unread.
    let (status, all) = api
        .post(
            "/api/v1/notifications/read-all",
            Some(json!({ "up_to": 3 })),
        )
        .await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(
        (all["marked"].as_i64(), all["unread_count"].as_i64()),
        (Some(3), Some(2))
    );
    let e = tab_b.next(WAIT).await.unwrap();
    assert_eq!(
        e.event, "notification.read",
        "the repeated click sent nothing"
    );
    assert_eq!(e.data, json!({ "ids": [], "up_to": 3, "unread_count": 2 }));
    contracts.check_sse(&e);
    let (_, unread) = api.get("/api/v1/notifications?unread=true").await;
    assert_eq!(ids(&unread), [6, 4]);

    // Archive leaves the inbox and the count; unarchive brings it back.
    let (status, archived) = api.post("/api/v1/notifications/4/archive", None).await;
    assert_eq!((status, archived["unread_count"].as_i64()), (200, Some(1)));
    let e = tab_b.next(WAIT).await.unwrap();
    contracts.check_sse(&e);
    assert_eq!(e.event, "notification.archived");
    assert_eq!(
        e.data,
        json!({ "id": 4, "archived": true, "unread_count": 1 })
    );
    assert_eq!(
        ids(&api.get("/api/v1/notifications").await.1),
        [6, 5, 3, 2, 1]
    );
    assert_eq!(
        ids(&api.get("/api/v1/notifications?archived=true").await.1),
        [4]
    );
    assert_eq!(
        ids(&api
            .get("/api/v1/notifications?archived=any&limit=3")
            .await
            .1),
        [6, 5, 4]
    );
    assert_eq!(
        ids(&api.get("/api/v1/notifications?category=shipping").await.1),
        Vec::<i64>::new()
    );
    // Tab A also saw every change, in order: read-all, archived, ...
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(tab_a.next(WAIT).await.unwrap());
    }
    let (status, back) = api.post("/api/v1/notifications/4/unarchive", None).await;
    assert_eq!((status, back["unread_count"].as_i64()), (200, Some(2)));
    assert_eq!(back["notification"]["archived_at"], Value::Null);
    // ... and unarchived.
    seen.push(tab_a.next(WAIT).await.unwrap());
    assert_eq!(seen[0].data["up_to"], 3);
    assert_eq!(seen[1].data["archived"], true);
    assert_eq!(
        seen[2].data,
        json!({ "id": 4, "archived": false, "unread_count": 2 })
    );

    // A replay from before the changes shows every item as it is now, and the change
    // events in order; the unarchive superseded the archive of the same item.
    let (_, replay, _) = connect_sse(&engine, Some(&token), Some("0")).await;
    let mut replay = replay.unwrap();
    let mut names = Vec::new();
    for _ in 0..9 {
        let e = replay.next(WAIT).await.unwrap();
        contracts.check_sse(&e);
        if e.data["event_id"] == "p5" {
            assert_eq!(e.data["read"], true);
        }
        names.push(e.event);
    }
    assert_eq!(
        names,
        [
            "notification",
            "notification",
            "notification",
            "notification",
            "notification",
            "notification",
            "notification.read",
            "notification.read",
            "notification.archived",
        ]
    );

    // Ids not the caller's are 404.
    let other_user = Api::new(&engine, &world.token(&tenant, "u2"));
    let other_tenant = Api::new(&engine, &world.token(&unique("shop"), "u1"));
    for client in [&other_user, &other_tenant, &api] {
        for path in [
            "/api/v1/notifications/5",
            "/api/v1/notifications/999",
            "/api/v1/notifications/x",
            "/api/v1/notifications/-1",
        ] {
            if std::ptr::eq(client, &api) && path.ends_with("/5") {
                continue;
            }
            let (status, body) = client.get(path).await;
            assert_eq!(status, 404, "{path}: {body}");
            assert_eq!(
                body,
                json!({"error": {"code": "not_found", "message": "no such notification"}})
            );
            let (status, _) = client.post(&format!("{path}/read"), None).await;
            assert_eq!(status, 404, "{path}/read");
            let (status, _) = client.post(&format!("{path}/archive"), None).await;
            assert_eq!(status, 404, "{path}/archive");
        }
    }
    // The other user's mark-all cannot touch u1's items.
    let (_, none) = other_user
        .post(
            "/api/v1/notifications/read-all",
            Some(json!({ "up_to": 100 })),
        )
        .await;
    assert_eq!(none["marked"], 0);
    assert_eq!(
        api.get("/api/v1/notifications/unread-count").await.1["unread_count"],
        2
    );
    engine.shutdown().await;
}

/// Bad parameters of the inbox API are refused with a 400 and the uniform error body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_api_refuses_bad_parameters_with_the_uniform_body() {
    let world = World::new().await;
    let engine = world.start(world.config()).await;
    let api = Api::new(&engine, &world.token(&unique("shop"), "u1"));
    // Bad parameters are 400 with the uniform body.
    for bad in [
        "/api/v1/notifications?limit=0",
        "/api/v1/notifications?limit=101",
        "/api/v1/notifications?cursor=abc",
        "/api/v1/notifications?archived=maybe",
        "/api/v1/notifications?unread=yes",
        "/api/v1/notifications?colour=red",
    ] {
        let (status, body) = api.get(bad).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("bad_request")),
            "{bad}: {body}"
        );
    }
    let (status, body) = api
        .post("/api/v1/notifications/read-all", Some(json!({ "upto": 3 })))
        .await;
    assert_eq!(status, 400, "{body}");
    engine.shutdown().await;
}

/// Archiving and unarchiving in a loop does not grow the user's log: each change of an item's
/// archive state supersedes the item's earlier archive event. A tab open all along, and one
/// replaying from before the loop, end on the item's latest state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_loops_do_not_grow_the_log_and_tabs_end_on_the_latest_state() {
    let world = World::new().await;
    let mut config = world.config();
    // The loop is what is tested here, not the request rate.
    config.limits.user_burst = 1_000;
    let engine = world.start(config).await;
    let tenant = unique("shop");
    let api = Api::new(&engine, &world.token(&tenant, "u1"));
    world
        .produce(&order_paid("p1", &tenant, "u1", None, 10.0))
        .await;
    let rows = format!("SELECT count(*) FROM notifications WHERE tenant_id = '{tenant}'");
    world.wait_count(&rows, 1, WAIT).await;
    let (_, tab, _) = connect_sse(&engine, Some(&api.token), None).await;
    let mut tab = tab.unwrap();

    for round in 0..20 {
        for action in ["archive", "unarchive"] {
            let (status, body) = api
                .post(&format!("/api/v1/notifications/1/{action}"), None)
                .await;
            assert_eq!(status, 200, "round {round} {action}: {body}");
        }
        // A repeat of the same state changes nothing and writes nothing.
        let (status, _) = api.post("/api/v1/notifications/1/unarchive", None).await;
        assert_eq!(status, 200);
    }
    assert_eq!(
        world.count(&rows).await,
        2,
        "the item and one archive event, after 40 changes"
    );
    let latest = world
        .count(&format!(
            "SELECT max(seq) FROM notifications WHERE tenant_id = '{tenant}'"
        ))
        .await;
    let last = json!({ "id": 1, "archived": false, "unread_count": 1 });
    // The open tab ends on the latest state (it may have seen some of the changes before).
    loop {
        let e = tab.next(WAIT).await.expect("the tab hears the changes");
        assert_eq!(e.event, "notification.archived");
        if e.id.as_deref() == Some(latest.to_string().as_str()) {
            assert_eq!(e.data, last);
            break;
        }
    }
    // A tab replaying from the item sees one event: the latest state.
    let (_, replay, _) = connect_sse(&engine, Some(&api.token), Some("1")).await;
    let e = replay.unwrap().next(WAIT).await.unwrap();
    assert_eq!(
        (e.id, e.event, e.data),
        (
            Some(latest.to_string()),
            "notification.archived".to_owned(),
            last
        )
    );
    engine.shutdown().await;
}

/// A burst over a user's bucket, and then over the tenant's, is refused with `429` and
/// `Retry-After` in the uniform error body; another tenant is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_the_user_or_tenant_bucket_gets_429_with_retry_after() {
    let world = World::new().await;
    let mut config = world.config();
    config.limits.user_per_second = 1;
    config.limits.user_burst = 5;
    config.limits.tenant_per_second = 1;
    config.limits.tenant_burst = 7;
    let engine = world.start(config).await;
    let tenant = unique("shop");
    let count = "/api/v1/notifications/unread-count";
    // Until the bucket of `api` refuses: how many were answered, and the refusal.
    async fn until_refused(api: &Api, path: &str) -> (usize, reqwest::header::HeaderMap, Value) {
        for answered in 0..20 {
            let (status, headers, body) = api.call_with_headers("GET", path, None).await;
            if status == 429 {
                return (answered, headers, body);
            }
            assert_eq!(status, 200, "{body}");
        }
        panic!("20 requests in a burst and none refused");
    }
    let u1 = Api::new(&engine, &world.token(&tenant, "u1"));
    let (answered, headers, body) = until_refused(&u1, count).await;
    // The burst, and perhaps a token that came back while they were sent.
    assert!((5..=7).contains(&answered), "{answered}");
    assert!((1..=2).contains(&retry_after(&headers)), "{headers:?}");
    assert_eq!(body["error"]["code"], "too_many_requests");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("this user"),
        "{body}"
    );
    // Another user of the tenant has a full bucket of their own, but the tenant has little
    // left: the tenant's bucket refuses.
    let u2 = Api::new(&engine, &world.token(&tenant, "u2"));
    let (answered, headers, body) = until_refused(&u2, count).await;
    assert!(answered < 5, "{answered}");
    assert!(retry_after(&headers) >= 1);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("this tenant"),
        "{body}"
    );
    // Another tenant is answered.
    let other = Api::new(&engine, &world.token(&unique("shop"), "u1"));
    let (status, body) = other.get(count).await;
    assert_eq!(status, 200, "{body}");
    // The refusals are counted.
    for limit in ["user", "tenant"] {
        let series = format!("notify_api_rate_limited_total{{limit=\"{limit}\"}}");
        assert_eq!(metric(&engine, &series).await, Some(1.0), "{series}");
    }
    engine.shutdown().await;
}

/// Every inbox route (and the ticket route) parses its query and body by one rule: an
/// unknown query parameter, a body over 16 KiB or a body field the route does not take is
/// a 400 with the uniform body, and changes nothing; an absent body or `{}` (what the
/// TypeScript client sends) is fine where the route takes no body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_inbox_route_refuses_unknown_parameters_and_oversized_bodies() {
    let world = World::new().await;
    let engine = world.start(world.config()).await;
    let tenant = unique("shop");
    let pool = world.pool().await;
    // One unread item, written as the pipeline would.
    sqlx::query(
        "INSERT INTO notifications (tenant_id, user_id, seq, event_id, kind, title, body, data)
         VALUES ($1, 'u1', 1, 'e1', 'notification', 't', 'b', '{}')",
    )
    .bind(&tenant)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO user_streams VALUES ($1, 'u1', 1)")
        .bind(&tenant)
        .execute(&pool)
        .await
        .unwrap();
    let api = Api::new(&engine, &world.token(&tenant, "u1"));
    let routes = [
        ("GET", "/api/v1/notifications"),
        ("GET", "/api/v1/notifications/unread-count"),
        ("GET", "/api/v1/notifications/1"),
        ("POST", "/api/v1/notifications/1/read"),
        ("POST", "/api/v1/notifications/read-all"),
        ("POST", "/api/v1/notifications/1/archive"),
        ("POST", "/api/v1/notifications/1/unarchive"),
        ("POST", "/api/v1/sse/tickets"),
    ];
    let big = json!({ "up_to": 1, "pad": "x".repeat(17 * 1024) });
    for (method, path) in routes {
        let bad = [
            (format!("{path}?tenant=x"), None),
            (path.to_owned(), Some(big.clone())),
            (path.to_owned(), Some(json!({ "tenant": "x" }))),
        ];
        for (uri, body) in bad {
            let (status, answer) = api.call(method, &uri, body.clone()).await;
            assert_eq!(
                (status, answer["error"]["code"].as_str()),
                (400, Some("bad_request")),
                "{method} {uri} with a body of {} bytes: {answer}",
                body.map_or(0, |b| b.to_string().len())
            );
        }
    }
    // Nothing changed: the item is unread and in the inbox, and no ticket was made.
    let unchanged = world
        .count(&format!(
            "SELECT count(*) FROM notifications WHERE tenant_id = '{tenant}' AND read_at IS NULL AND archived_at IS NULL"
        ))
        .await;
    assert_eq!(unchanged, 1);
    let tickets = world
        .count(&format!(
            "SELECT count(*) FROM sse_tickets WHERE tenant_id = '{tenant}'"
        ))
        .await;
    assert_eq!(tickets, 0);
    // The same routes with no body, or `{}`, answer as before.
    for (method, path, body) in [
        ("GET", "/api/v1/notifications/unread-count", None),
        ("GET", "/api/v1/notifications/1", Some(json!({}))),
        ("POST", "/api/v1/notifications/1/read", Some(json!({}))),
        ("POST", "/api/v1/notifications/1/archive", None),
        ("POST", "/api/v1/notifications/1/unarchive", Some(json!({}))),
        (
            "POST",
            "/api/v1/notifications/read-all",
            Some(json!({ "up_to": 1 })),
        ),
        ("POST", "/api/v1/sse/tickets", Some(json!({}))),
        ("GET", "/api/v1/notifications?limit=5&unread=false", None),
    ] {
        let (status, answer) = api.call(method, path, body).await;
        assert!(status == 200 || status == 201, "{method} {path}: {answer}");
    }
    engine.shutdown().await;
}
