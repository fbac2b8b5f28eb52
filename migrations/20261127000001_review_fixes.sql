-- Fixes from the review of the spine.

-- A recreated topic starts its offsets at 0 again, so (topic, partition, offset) alone would
-- make a new dead letter collide with an old one and lose its payload. A redelivery of the
-- same message still collides (same bytes, same digest) and is stored once.
ALTER TABLE dead_letters
    ADD COLUMN payload_sha256 BYTEA GENERATED ALWAYS AS (sha256(payload)) STORED;
ALTER TABLE dead_letters
    DROP CONSTRAINT dead_letters_kafka_topic_kafka_partition_kafka_offset_key;
ALTER TABLE dead_letters
    ADD CONSTRAINT dead_letters_origin
    UNIQUE (kafka_topic, kafka_partition, kafka_offset, payload_sha256);
CREATE INDEX dead_letters_kind ON dead_letters (error_kind, created_at);

-- The outbox is claimed in two index-backed steps: expired claims (status 'sending') are
-- swept back to 'pending', then due 'pending' rows are claimed, fairly across tenants.
DROP INDEX email_outbox_due;
CREATE INDEX email_outbox_pending ON email_outbox (tenant_id, next_attempt_at, id)
    WHERE status = 'pending';
CREATE INDEX email_outbox_due ON email_outbox (next_attempt_at) WHERE status = 'pending';
CREATE INDEX email_outbox_claims ON email_outbox (locked_until) WHERE status = 'sending';
CREATE INDEX email_outbox_failed ON email_outbox (tenant_id, created_at) WHERE status = 'failed';
-- Why a row was not sent although it was due: 'skipped' rows were written for an event older
-- than email.max_event_age_secs (a new consumer group replaying an old topic).
ALTER TABLE email_outbox DROP CONSTRAINT email_outbox_status_check;
ALTER TABLE email_outbox ADD CONSTRAINT email_outbox_status_check
    CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'skipped'));
-- Transient failures are retried until a row has been queued for email.max_age_secs; an
-- operator's requeue starts that clock again (created_at keeps the original time).
ALTER TABLE email_outbox ADD COLUMN queued_at TIMESTAMPTZ NOT NULL DEFAULT now();
UPDATE email_outbox SET queued_at = created_at;
