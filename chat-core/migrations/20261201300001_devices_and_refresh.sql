-- When each device was last seen (sign-in, token refresh, WebSocket connect): `GET /v1/devices`
-- shows it, and linking a device past the limit replaces the least recently seen one.
ALTER TABLE chat_devices ADD COLUMN last_seen BIGINT;
-- A signed-in user's phone, whose SMS code links another device. (On Citus chat_phones is
-- distributed by phone, so this look-up asks every shard; linking a device is rare.)
CREATE INDEX chat_phones_by_user ON chat_phones (user_id);
-- A refresh retried because its answer was lost: within a short grace, from the same client
-- address, the spent token is taken again in place of the unused token its lost answer carried
-- (`replaced_by`). Later, or from elsewhere, it is a copy and logs the device out.
ALTER TABLE chat_refresh_tokens ADD COLUMN spent_by TEXT;
ALTER TABLE chat_refresh_tokens ADD COLUMN replaced_by TEXT;
