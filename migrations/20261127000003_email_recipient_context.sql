-- What a templating plugin is told about an email beyond its template and data: the event
-- it is about (type and time; the id is already here) and the recipient's locale and time
-- zone as the routing plugin gave them (WIT notify:plugin@0.2.0). NULL on rows written
-- before, and when the routing plugin did not say.
ALTER TABLE email_outbox
    ADD COLUMN event_type TEXT,
    ADD COLUMN event_time TIMESTAMPTZ,
    ADD COLUMN locale     TEXT,
    ADD COLUMN time_zone  TEXT;
