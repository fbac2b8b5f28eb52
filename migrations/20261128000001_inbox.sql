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

-- The public API's connections act as a role of this database's own, notify_api_<database
-- oid> (set when they connect), and every statement they run sees only the rows of the
-- (tenant, user) its transaction names in the settings notify.tenant and notify.user. A
-- query that forgot its WHERE clause, or a transaction that forgot to name its user, reads
-- nothing. The engine's own role owns the tables and is not subject to these policies (the
-- pipeline writes for every user); it must be the tables' owner.
-- One role per database: roles belong to the whole server, and a role shared by several
-- deployments would let one deployment's user act as the API role in another's database.
-- Creating it needs CREATEROLE (or a superuser).
DO $$
DECLARE
    api_role TEXT := 'notify_api_' || (SELECT oid FROM pg_database WHERE datname = current_database());
    rls TEXT := 'tenant_id = current_setting(''notify.tenant'', true) '
             || 'AND user_id = current_setting(''notify.user'', true)';
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = api_role) THEN
        EXECUTE format('CREATE ROLE %I NOLOGIN', api_role);
    END IF;
    -- PostgreSQL 16 separates the right to SET ROLE from membership: ask for it explicitly.
    IF current_setting('server_version_num')::int >= 160000 THEN
        IF NOT pg_has_role(current_user, api_role, 'SET') THEN
            EXECUTE format('GRANT %I TO %I WITH SET TRUE', api_role, current_user);
        END IF;
    ELSIF NOT pg_has_role(current_user, api_role, 'MEMBER') THEN
        EXECUTE format('GRANT %I TO %I', api_role, current_user);
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', current_schema(), api_role);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON notifications, user_streams TO %I', api_role);
    EXECUTE format('GRANT USAGE ON SEQUENCE notifications_id_seq TO %I', api_role);
    EXECUTE format('GRANT SELECT, INSERT, DELETE ON sse_tickets TO %I', api_role);
    EXECUTE format('CREATE POLICY api_own_rows ON notifications TO %I USING (%s) WITH CHECK (%s)',
                   api_role, rls, rls);
    EXECUTE format('CREATE POLICY api_own_stream ON user_streams TO %I USING (%s) WITH CHECK (%s)',
                   api_role, rls, rls);
END
$$;
ALTER TABLE notifications ENABLE ROW LEVEL SECURITY;
ALTER TABLE user_streams ENABLE ROW LEVEL SECURITY;
