-- Profiles: the name, about line and avatar (a media id of an image) a user shows, and who sees the
-- about line and avatar: 'everyone' who sees the name, their 'contacts', or 'nobody'. The name goes
-- to whoever shares a group with them, or a direct conversation in which they have written, and to
-- their contacts (see Store::profiles_for). `profile_at` is when it last changed (Unix ms).
ALTER TABLE chat_users ADD COLUMN profile_name TEXT;
ALTER TABLE chat_users ADD COLUMN about TEXT;
ALTER TABLE chat_users ADD COLUMN avatar TEXT;
ALTER TABLE chat_users ADD COLUMN profile_visibility TEXT NOT NULL DEFAULT 'contacts';
ALTER TABLE chat_users ADD COLUMN profile_at BIGINT NOT NULL DEFAULT 0;
