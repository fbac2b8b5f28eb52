-- The engine's whole persistent state. PostgreSQL is the only state shared between instances.

-- One row per (tenant, event) ever seen: the duplicate filter. Inserted in the same
-- transaction as the event's outcome, so "seen" and "handled" can never disagree.
CREATE TABLE processed_events (
    tenant_id      TEXT        NOT NULL,
    event_id       TEXT        NOT NULL,
    event_type     TEXT        NOT NULL,
    outcome        TEXT        NOT NULL CHECK (outcome IN ('routed', 'dead_lettered')),
    -- Which plugin (and which build of it) decided; NULL when the event never reached one.
    plugin         TEXT,
    plugin_digest  TEXT,
    kafka_topic    TEXT        NOT NULL,
    kafka_partition INTEGER    NOT NULL,
    kafka_offset   BIGINT      NOT NULL,
    processed_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, event_id)
);

-- Per-user cursor: SSE ids are per (tenant, user) sequence numbers, so an id reveals nothing
-- about other users' or tenants' volume. The row lock also orders concurrent writers.
CREATE TABLE user_streams (
    tenant_id TEXT   NOT NULL,
    user_id   TEXT   NOT NULL,
    last_seq  BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, user_id)
);

-- Inbox items and live updates: also the SSE replay log (Last-Event-ID = seq).
CREATE TABLE notifications (
    id         BIGSERIAL   PRIMARY KEY,
    tenant_id  TEXT        NOT NULL,
    user_id    TEXT        NOT NULL,
    seq        BIGINT      NOT NULL,
    event_id   TEXT        NOT NULL,
    -- SSE event name: 'notification' for inbox items, e.g. 'order.updated' for live updates.
    kind       TEXT        NOT NULL,
    title      TEXT,
    body       TEXT,
    category   TEXT,
    data       JSONB       NOT NULL DEFAULT '{}'::jsonb,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    read_at    TIMESTAMPTZ,
    UNIQUE (tenant_id, user_id, seq)
);
CREATE INDEX notifications_event ON notifications (tenant_id, event_id);

-- Email outbox: written with the event's outcome, drained by the email worker.
CREATE TABLE email_outbox (
    id              BIGSERIAL   PRIMARY KEY,
    tenant_id       TEXT        NOT NULL,
    event_id        TEXT        NOT NULL,
    user_id         TEXT,
    recipient       TEXT        NOT NULL,
    template        TEXT        NOT NULL,
    data            JSONB       NOT NULL,
    -- Stable per row, so a resend after a crash is recognisable as the same message.
    message_id      TEXT        NOT NULL UNIQUE,
    status          TEXT        NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'sending', 'sent', 'failed')),
    attempts        INTEGER     NOT NULL DEFAULT 0,
    last_error      TEXT,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- A claim expires, so a worker that died mid-send does not strand the row.
    locked_until    TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at         TIMESTAMPTZ
);
CREATE INDEX email_outbox_due ON email_outbox (next_attempt_at) WHERE status IN ('pending', 'sending');

-- Everything that could not be turned into notifications, with enough to replay it by hand.
CREATE TABLE dead_letters (
    id              BIGSERIAL   PRIMARY KEY,
    tenant_id       TEXT,
    event_id        TEXT,
    kafka_topic     TEXT        NOT NULL,
    kafka_partition INTEGER     NOT NULL,
    kafka_offset    BIGINT      NOT NULL,
    kafka_key       BYTEA,
    payload         BYTEA       NOT NULL,
    -- Machine-readable class ('decode', 'validation', 'oversize', 'plugin', 'plugin_output')
    -- and the human-readable reason.
    error_kind      TEXT        NOT NULL,
    reason          TEXT        NOT NULL,
    plugin          TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- A message redelivered after a crash dead-letters once, not once per delivery.
    UNIQUE (kafka_topic, kafka_partition, kafka_offset)
);
CREATE INDEX dead_letters_tenant ON dead_letters (tenant_id, created_at);
