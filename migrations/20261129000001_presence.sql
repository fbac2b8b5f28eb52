-- Cluster-wide presence: which users have a live stream on which instance.
--
-- Each running instance has a row here and refreshes `heartbeat_at` every
-- `presence.heartbeat_secs`; any instance deletes the rows of instances whose heartbeat is
-- older than `presence.ttl_secs` (a crashed instance), and their presence rows go with them.
CREATE TABLE engine_instances (
    id           TEXT PRIMARY KEY,
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per (user, instance) while the user has at least one stream open on that
-- instance. Written by the instance itself, in batches, with a NOTIFY on
-- notify_engine_presence so every other instance updates its in-memory view at commit.
CREATE TABLE presence (
    tenant_id   TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    instance_id TEXT NOT NULL REFERENCES engine_instances (id) ON DELETE CASCADE,
    since       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, tenant_id, user_id)
);
