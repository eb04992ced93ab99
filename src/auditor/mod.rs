//! The `batchscore audit` commands: tools an auditor runs on the audit trail the workers write
//! (docs/AUDIT.md), outside the worker. Nothing in the worker uses them.

pub mod reproduce;
