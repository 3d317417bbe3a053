-- Spend reports (`switchyard report`): one row per audited request, with the dimensions a report
-- groups by spelled out. Percentiles are taken in the report's query, over the rows it selects.
-- An error refused before any provider was chosen has no provider or model: shown as '-', so it
-- still counts in its group instead of vanishing into a NULL key.
CREATE OR REPLACE VIEW llm_report_rows AS
SELECT
    request_id,
    account,
    use_case,
    tier,
    coalesce(provider, '-')                  AS provider,
    coalesce(model, '-')                     AS model,
    (finished_at AT TIME ZONE 'UTC')::date   AS day,      -- UTC, whatever the session's time zone
    status = 'ok'                            AS ok,
    code,
    latency_ms,
    ttft_ms,
    input_tokens,
    output_tokens,
    coalesce(cost_usd, 0)                    AS cost_usd,
    started_at,
    finished_at
FROM llm_audit;

-- A report covers a recent window of every account; the (account, finished_at) index serves one
-- account only.
CREATE INDEX IF NOT EXISTS llm_audit_finished ON llm_audit (finished_at);
