-- Archive and unarchive events are coalesced: a change of an item's archive state replaces
-- the item's earlier `notification.archived` event in the user's log (deleted in the same
-- transaction that writes the new one), so archiving and unarchiving in a loop cannot grow
-- the log; a stream replaying from before sees the item's latest state once.

-- Finds an item's earlier archive event without reading the user's whole log.
CREATE INDEX notifications_archive_events
    ON notifications (tenant_id, user_id, ((data->>'id')::bigint))
    WHERE kind = 'notification.archived';

-- The API role may delete, and only archive events: a restrictive policy narrows what the
-- permissive api_own_rows (the caller's own rows) allows for DELETE.
DO $$
DECLARE
    api_role TEXT := 'notify_api_' || (SELECT oid FROM pg_database WHERE datname = current_database());
BEGIN
    EXECUTE format('GRANT DELETE ON notifications TO %I', api_role);
    EXECUTE format('CREATE POLICY api_deletes_only_archive_events ON notifications AS RESTRICTIVE '
                   'FOR DELETE TO %I USING (kind = %L)', api_role, 'notification.archived');
END
$$;
