-- Dead letters can be replayed (`notify-engine dead-letters replay`): the command republishes
-- the payload with a one-time token in the `notify-replay` header; the pipeline accepts the
-- token once, re-routes the event even though its id was claimed, and marks the row replayed.
ALTER TABLE dead_letters ADD COLUMN replay_token UUID;
ALTER TABLE dead_letters ADD COLUMN replayed_at TIMESTAMPTZ;
CREATE UNIQUE INDEX dead_letters_replay_token ON dead_letters (replay_token)
    WHERE replay_token IS NOT NULL;
