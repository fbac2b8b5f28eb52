-- A dead letter keeps its Kafka headers, so a replay republishes the message as it came
-- (a CloudEvents binary-mode message is its headers plus its value). JSON array of
-- {"name": ..., "value": <base64 or null>}, in order; the replay token header is not kept.
ALTER TABLE dead_letters ADD COLUMN kafka_headers JSONB;
