//! Tenants and users never see each other, on the real services: not on a stream, not by
//! replaying someone else's ids, not over REST.

use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_isolated() {
    let world = World::new().await;
    let engine = world.start(world.config()).await;
    let tenant = unique("shop");
    let other_tenant = unique("shop");

    let (_, mine, _) = connect_sse(&engine, Some(&world.token(&tenant, "u1")), None).await;
    let (_, other_user, _) = connect_sse(&engine, Some(&world.token(&tenant, "u2")), None).await;
    let (_, other_tenant_same_user, _) =
        connect_sse(&engine, Some(&world.token(&other_tenant, "u1")), None).await;
    let (mut mine, mut other_user, mut other_tenant_same_user) = (
        mine.unwrap(),
        other_user.unwrap(),
        other_tenant_same_user.unwrap(),
    );
    world
        .produce(&order_paid("i1", &tenant, "u1", None, 5.0))
        .await;
    let got = mine.next(WAIT).await.expect("own notification");
    assert_eq!(got.data["event_id"], "i1");
    other_user.expect_nothing(Duration::from_secs(2)).await;
    other_tenant_same_user
        .expect_nothing(Duration::from_millis(200))
        .await;
    // Replay cannot cross the wall either.
    let (_, replay, _) =
        connect_sse(&engine, Some(&world.token(&other_tenant, "u1")), Some("0")).await;
    replay.unwrap().expect_nothing(Duration::from_secs(1)).await;

    engine.shutdown().await;
}

/// Many tenants and users connecting, reconnecting with their own, foreign and forged
/// `Last-Event-ID`s, and reading each other's ids over REST: no stream and no read ever
/// shows another user's notification. Seeded, so a failure reproduces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_and_users_never_see_each_other() {
    let seed: u64 = std::env::var("ISOLATION_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("isolation seed {seed} (ISOLATION_SEED={seed} reproduces)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let world = World::new().await;
    let mut config = world.config();
    // A user reads up to 21 items in a row, perhaps twice a round: isolation is tested here,
    // not the request rate (`inbox.rs`).
    config.limits.user_burst = 1_000;
    let engine = world.start(config).await;
    let tenants: Vec<String> = (0..3).map(|_| unique("iso")).collect();
    let users = ["u1", "u2", "u3"];
    // The same user ids in every tenant: only the pair identifies a user.
    let mut pairs = Vec::new();
    for t in &tenants {
        for u in users {
            pairs.push((t.clone(), u.to_owned()));
        }
    }
    let mut produced = 0;
    for round in 0..4 {
        // Events for random users; their ids name the owner.
        for _ in 0..12 {
            let (t, u) = &pairs[rng.random_range(0..pairs.len())];
            produced += 1;
            world
                .produce(&order_paid(
                    &format!("{t}.{u}.{round}.{produced}"),
                    t,
                    u,
                    None,
                    1.0,
                ))
                .await;
        }
        world
            .wait_count("SELECT count(*) FROM notifications", produced, WAIT)
            .await;
        // Random users connect with a random Last-Event-ID: none, 0, their own, a huge
        // one, garbage or negative (refused), or one of another user's.
        for _ in 0..6 {
            let (t, u) = &pairs[rng.random_range(0..pairs.len())];
            let last_id = match rng.random_range(0..6) {
                0 => None,
                1 => Some("0".to_owned()),
                2 => Some(rng.random_range(1..20).to_string()),
                3 => Some(i64::MAX.to_string()),
                4 => Some(["-1", "abc", "1e3", " "][rng.random_range(0..4)].to_owned()),
                _ => Some(rng.random_range(1..produced).to_string()),
            };
            let (status, stream, _) =
                connect_sse(&engine, Some(&world.token(t, u)), last_id.as_deref()).await;
            let Some(mut stream) = stream else {
                assert!(matches!(status, 400 | 429), "{status} for {last_id:?}");
                continue;
            };
            while let Some(e) = stream.next(Duration::from_millis(300)).await {
                let event_id = e.data["event_id"].as_str().unwrap_or_default();
                assert!(
                    event_id.starts_with(&format!("{t}.{u}.")),
                    "{t}/{u} (Last-Event-ID {last_id:?}) received {event_id}"
                );
            }
        }
        // REST: every id a user does not own answers 404; every list is their own.
        for _ in 0..4 {
            let (t, u) = &pairs[rng.random_range(0..pairs.len())];
            let api = Api::new(&engine, &world.token(t, u));
            let (_, page) = api.get("/api/v1/notifications?limit=100").await;
            for item in page["items"].as_array().unwrap() {
                assert!(
                    item["event_id"]
                        .as_str()
                        .unwrap()
                        .starts_with(&format!("{t}.{u}."))
                );
            }
            let own: Vec<i64> = ids(&page);
            for id in 1..=20 {
                let (status, body) = api.get(&format!("/api/v1/notifications/{id}")).await;
                if own.contains(&id) {
                    assert_eq!(status, 200);
                    assert!(
                        body["event_id"]
                            .as_str()
                            .unwrap()
                            .starts_with(&format!("{t}.{u}."))
                    );
                } else {
                    assert_eq!(status, 404, "{t}/{u} read id {id}: {body}");
                }
            }
        }
    }
    engine.shutdown().await;
}
