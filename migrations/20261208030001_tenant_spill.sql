-- The spill: a slow tenant's messages, set aside durably so that the other tenants on its
-- partitions pass it (engine/src/pipeline/spill.rs).
--
-- When a tenant's lane is full, its next messages are written here as they came from Kafka,
-- and only once this row has committed is the message's Kafka offset marked finished. While a
-- tenant has rows here, all its newer messages come here too (its order is kept); its lane
-- drains them in each partition's offset order and deletes them in the transaction that
-- commits their outcome, so a crash re-drains and the duplicate claim turns the re-drain into
-- a duplicate.
CREATE TABLE spilled_messages (
    id           BIGSERIAL PRIMARY KEY,
    tenant_id    TEXT NOT NULL,
    topic        TEXT NOT NULL,
    partition    INTEGER NOT NULL,
    kafka_offset BIGINT NOT NULL,
    msg_key      BYTEA,
    payload      BYTEA,
    -- Kafka headers, in order: [[name, value as base64 or null], ...].
    headers      JSONB NOT NULL DEFAULT '[]',
    -- Payload, key and headers: what the per-tenant bound counts.
    size         INTEGER NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Its Kafka timestamp: the time a CloudEvent without `time` takes, the same when drained.
    kafka_timestamp TIMESTAMPTZ,
    -- A message re-read after a crash (its offset not yet committed in Kafka) is spilled once.
    UNIQUE (topic, partition, kafka_offset)
);
CREATE INDEX spilled_messages_tenant ON spilled_messages (tenant_id, topic, partition, kafka_offset);

-- Who drains a tenant's spill: one instance at a time, for a while, renewed as it drains
-- (the email outbox's claims, per tenant). An instance that dies lets its lease run out.
CREATE TABLE spill_leases (
    tenant_id   TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL
);
