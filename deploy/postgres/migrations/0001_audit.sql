-- The audit trail in PostgreSQL (docs/AUDIT.md, "A database for the questions"): one row per
-- record of the audit stream, the sink's resume point, and the lines it could not read.
-- Applied once by `batchscore audit sink` (or `--migrate-only`), in a transaction, and recorded
-- in audit_migrations.

-- One row per audit record. A record's identity is its chain and its place in it: seq restarts
-- at 0 with every chain, so chain_id is part of the key, and worker_id keeps two workers' chains
-- apart even if they drew the same chain id.
CREATE TABLE audit_record (
    worker_id      text        NOT NULL,
    chain_id       text        NOT NULL,
    seq            bigint      NOT NULL CHECK (seq >= 0),
    prev_sha256    text,
    job_id         text,
    correlation_id text,
    user_id        text,
    app_id         text,
    queue          text        NOT NULL,
    lane           text        NOT NULL,
    model          text,
    version        bigint,
    model_sha256   text,
    inputs_sha256  text,
    outputs_sha256 text,
    encrypted      boolean     NOT NULL,
    status         text        NOT NULL,
    error_code     text,
    -- Epoch milliseconds exactly as the record has them (the worker's clock) ...
    received_ms    bigint      NOT NULL,
    scored_ms      bigint      NOT NULL,
    -- ... and as a time, for queries by date. to_timestamp(double precision) is immutable.
    scored_at      timestamptz GENERATED ALWAYS AS (to_timestamp(scored_ms::double precision / 1000)) STORED,
    batch_id       bigint,
    -- Where the sink read the record: the stream, the offset of its message, and its line in
    -- that message (from 0).
    stream         text        NOT NULL,
    stream_offset  bigint      NOT NULL,
    line_no        integer     NOT NULL,
    -- The record's exact bytes (its line without the line break), from which every digest can
    -- be recomputed, and their sha256, which the next record of the chain names as prev_sha256.
    body           text        NOT NULL,
    body_sha256    text        NOT NULL,
    PRIMARY KEY (worker_id, chain_id, seq)
);

CREATE INDEX audit_record_job_id ON audit_record (job_id);
CREATE INDEX audit_record_model_version ON audit_record (model, version);
CREATE INDEX audit_record_scored_at ON audit_record (scored_at);

-- Where the sink goes on for each stream: the offset of the first message it has not stored.
-- Written in the transaction that stores the rows, so a restarted sink resumes exactly there.
CREATE TABLE audit_sink_offset (
    stream      text   PRIMARY KEY,
    next_offset bigint NOT NULL CHECK (next_offset >= 0)
);

-- Lines of the stream that are not records (not JSON, a member missing or of the wrong type),
-- and records whose key is already stored with other bytes: kept here with the reason, so that
-- nothing read is lost silently.
CREATE TABLE audit_rejected_line (
    stream      text        NOT NULL,
    "offset"    bigint      NOT NULL,
    line_no     integer     NOT NULL,
    body        bytea       NOT NULL,
    problem     text        NOT NULL,
    rejected_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, "offset", line_no)
);

-- The roles. Roles belong to the whole cluster, so another database may have created them
-- already; two migrations running at once may race to create one.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'batchscore_audit_sink') THEN
        CREATE ROLE batchscore_audit_sink NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'batchscore_audit_reader') THEN
        CREATE ROLE batchscore_audit_reader NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

-- The sink appends and moves its offset; it can neither change nor remove a stored record.
GRANT SELECT, INSERT ON audit_record TO batchscore_audit_sink;
GRANT SELECT, INSERT ON audit_rejected_line TO batchscore_audit_sink;
GRANT SELECT, INSERT, UPDATE ON audit_sink_offset TO batchscore_audit_sink;
GRANT SELECT ON audit_migrations TO batchscore_audit_sink;

-- Auditors read everything and write nothing.
GRANT SELECT ON audit_record, audit_sink_offset, audit_rejected_line, audit_migrations TO batchscore_audit_reader;
