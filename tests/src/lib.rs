//! Integration tests of shardq against real Postgres servers.
