-- Signed-out users (POST /api/v1/admin/revocations on the admin listener): a token of
-- (tenant_id, user_id) issued before not_before is refused, and streams opened with one end.
-- Every instance reads this table every auth.jwks_reload_ms. A row is needed only while a
-- token issued before it can still be alive (auth.max_token_lifetime_secs), and is deleted
-- after that when the next revocation is written. Only the engine's own role reads it.
CREATE TABLE token_revocations (
    tenant_id  TEXT        NOT NULL,
    user_id    TEXT        NOT NULL,
    not_before TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, user_id)
);
CREATE INDEX token_revocations_not_before ON token_revocations (not_before);

-- What a ticket's stream needs to end when its credentials are withdrawn: when the token
-- that bought it was issued (a sign-out refuses tokens issued before it) and the stamp of
-- the key that verified it (removing that key ends the stream). NULL in a ticket issued
-- before this migration (at most 30 seconds old): the engine refuses it, and its client
-- buys a new one.
ALTER TABLE sse_tickets
    ADD COLUMN token_issued_at TIMESTAMPTZ,
    ADD COLUMN key_stamp       TEXT;
