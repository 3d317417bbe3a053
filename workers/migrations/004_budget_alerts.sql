-- Budget alerts: one row per account, period and threshold, the first time an account's settled
-- spend crosses `alert_at` (or 100 %) of a daily or monthly budget. Written by the auditor from
-- `llm.alerts.budget`; the key makes a redelivered alert a no-op.
CREATE TABLE IF NOT EXISTS llm_budget_alerts (
    account        text NOT NULL,
    period         text NOT NULL CHECK (period IN ('day', 'month')),
    period_key     text NOT NULL,          -- d20261130, m202611 (in limits.timezone)
    threshold_pct  integer NOT NULL,
    limit_usd      numeric(18, 6) NOT NULL,
    spent_usd      numeric(18, 6) NOT NULL,
    request_id     text NOT NULL,          -- the request whose settlement crossed it
    raised_at      timestamptz NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account, period_key, threshold_pct)
);
