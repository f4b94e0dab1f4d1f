-- Where users are connected, for node-targeted fan-out between the nodes of a cluster. The same SQL
-- runs on SQLite and PostgreSQL (one node on SQLite never reads it). Sharding: chat_presence is
-- keyed by user (distributed on user_id); chat_nodes is small and read with every fan-out (a
-- reference table). A migration's version must differ from every other crate's: on PostgreSQL they
-- share one migration history.

-- Each live node, with when it stops counting as alive unless it beats again.
CREATE TABLE chat_nodes (
    node_id     TEXT PRIMARY KEY,
    alive_until BIGINT NOT NULL
);

-- A user with at least one connected device on a node. Rows of a node that stopped beating are
-- ignored at once and swept later.
CREATE TABLE chat_presence (
    user_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    PRIMARY KEY (user_id, node_id)
);
CREATE INDEX chat_presence_node ON chat_presence (node_id);
