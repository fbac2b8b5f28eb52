-- Retention of the outbox and the dead letters (issue 21): both hold personal data
-- (recipients and the data an email was rendered from; raw event payloads). The purge finds
-- what is old through these indexes, a bounded batch per statement. Only finished outbox rows
-- are purged: a row still pending or sending is mail not yet delivered.
CREATE INDEX email_outbox_done ON email_outbox (queued_at)
    WHERE status IN ('sent', 'failed', 'skipped');
CREATE INDEX dead_letters_created ON dead_letters (created_at);
