-- A replay token expires (kafka.replay_token_ttl_secs after it was issued) and is bound to
-- its dead letter's payload, topic, tenant and event id, checked before the replayed message
-- is routed. Tokens issued before this column existed have no issue time and are refused as
-- expired: replay those dead letters again (`notify-engine dead-letters replay`).
ALTER TABLE dead_letters ADD COLUMN replay_token_at TIMESTAMPTZ;
