-- The inbox API: archive state and the indexes of its queries, single-use stream tickets,
-- the indexes retention deletes by, and row-level security as a second wall around what the
-- public API may read and write.

ALTER TABLE notifications ADD COLUMN archived_at TIMESTAMPTZ;
-- The list, newest first, over inbox items only (live updates and read/archive events share
-- the table: it is also the SSE replay log).
CREATE INDEX notifications_inbox ON notifications (tenant_id, user_id, seq DESC)
    WHERE kind = 'notification';
-- The unread count: inbox items neither read nor archived.
CREATE INDEX notifications_unread ON notifications (tenant_id, user_id)
    WHERE kind = 'notification' AND read_at IS NULL AND archived_at IS NULL;
-- Retention deletes the oldest rows in bounded batches.
CREATE INDEX notifications_created ON notifications (created_at);
CREATE INDEX processed_events_processed ON processed_events (processed_at);

-- A ticket lets a browser's EventSource (which cannot send headers) open one stream: only
-- its SHA-256 is stored, it is deleted on first use, and it is worthless after expires_at.
-- The stream it opens ends when the token that bought it expires.
CREATE TABLE sse_tickets (
    ticket_sha256    BYTEA       PRIMARY KEY,
    tenant_id        TEXT        NOT NULL,
    user_id          TEXT        NOT NULL,
    token_expires_at TIMESTAMPTZ NOT NULL,
    expires_at       TIMESTAMPTZ NOT NULL
);
CREATE INDEX sse_tickets_expires ON sse_tickets (expires_at);

-- The public API's connections act as notify_api (SET ROLE after connecting), and every
-- statement they run sees only the rows of the (tenant, user) its transaction names in the
-- settings notify.tenant and notify.user. A query that forgot its WHERE clause, or a
-- transaction that forgot to name its user, reads nothing. The engine's own role owns the
-- tables and is not subject to these policies (the pipeline writes for every user).
-- Creating the role needs CREATEROLE (or a DBA creating notify_api beforehand).
-- Roles are shared by every database of the server, so engines migrating side by side (the
-- test suite) may race to create it: losing that race is fine.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'notify_api') THEN
        BEGIN
            CREATE ROLE notify_api NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
        END;
    END IF;
    IF NOT pg_has_role(current_user, 'notify_api', 'MEMBER') THEN
        BEGIN
            EXECUTE format('GRANT notify_api TO %I', current_user);
        EXCEPTION WHEN OTHERS THEN
            IF NOT pg_has_role(current_user, 'notify_api', 'MEMBER') THEN RAISE; END IF;
        END;
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO notify_api', current_schema());
END
$$;
GRANT SELECT, INSERT, UPDATE ON notifications, user_streams TO notify_api;
GRANT USAGE ON SEQUENCE notifications_id_seq TO notify_api;
GRANT SELECT, INSERT, DELETE ON sse_tickets TO notify_api;

ALTER TABLE notifications ENABLE ROW LEVEL SECURITY;
ALTER TABLE user_streams ENABLE ROW LEVEL SECURITY;
CREATE POLICY api_own_rows ON notifications TO notify_api
    USING (tenant_id = current_setting('notify.tenant', true)
           AND user_id = current_setting('notify.user', true))
    WITH CHECK (tenant_id = current_setting('notify.tenant', true)
                AND user_id = current_setting('notify.user', true));
CREATE POLICY api_own_stream ON user_streams TO notify_api
    USING (tenant_id = current_setting('notify.tenant', true)
           AND user_id = current_setting('notify.user', true))
    WITH CHECK (tenant_id = current_setting('notify.tenant', true)
                AND user_id = current_setting('notify.user', true));
