//! Tools that read the audit trail back: the PostgreSQL copy of the audit stream
//! ([`database`]) and `batchscore audit sink`, which keeps that copy up to date ([`sink`]).

pub mod database;
pub mod sink;
