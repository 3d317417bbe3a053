-- The audit ledger: one row per request that ended, written by the auditor.
CREATE TABLE IF NOT EXISTS llm_audit (
    request_id          text PRIMARY KEY,
    account             text NOT NULL,
    use_case            text NOT NULL,
    tier                text NOT NULL,
    status              text NOT NULL CHECK (status IN ('ok', 'error')),
    code                text,
    provider            text,
    model               text,
    attempts            jsonb NOT NULL DEFAULT '[]',
    input_tokens        integer NOT NULL DEFAULT 0,
    output_tokens       integer NOT NULL DEFAULT 0,
    cache_read_tokens   integer NOT NULL DEFAULT 0,
    cache_write_tokens  integer NOT NULL DEFAULT 0,
    reasoning_tokens    integer NOT NULL DEFAULT 0,
    raw_usage           jsonb,
    cost_usd            numeric(18, 10),
    latency_ms          integer NOT NULL DEFAULT 0,
    ttft_ms             integer,
    started_at          timestamptz NOT NULL,
    finished_at         timestamptz NOT NULL,
    prompt_chars        integer NOT NULL DEFAULT 0,
    prompt_sha256       text NOT NULL DEFAULT '',
    finish_reason       text,
    metadata            jsonb NOT NULL DEFAULT '{}',
    recorded_at         timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS llm_audit_account_finished ON llm_audit (account, finished_at);
