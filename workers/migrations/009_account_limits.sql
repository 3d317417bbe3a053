-- Accounts' own limits: a row overrides the routing config's [limits] for one account, field by field
-- (router/limits.py). NULL: the config's value applies. 'Infinity': no limit, whatever the config says
-- (for per_second, tokens_per_minute, daily_usd and monthly_usd). Written by
-- `switchyard accounts limits set|delete` (and `switchyard budget set`); every dispatcher keeps the rows
-- in memory and reloads them when the trigger below notifies the channel `llm_account_limits`.
CREATE TABLE IF NOT EXISTS llm_account_limits (
    account            text PRIMARY KEY CHECK (account ~ '^[A-Za-z0-9_-]{1,128}$'),
    per_second         double precision CHECK (per_second > 0),
    burst              integer CHECK (burst >= 1),
    tokens_per_minute  double precision
                       CHECK (tokens_per_minute >= 1 AND (tokens_per_minute = 'Infinity'
                              OR tokens_per_minute = trunc(tokens_per_minute))),
    daily_usd          double precision CHECK (daily_usd >= 0),
    monthly_usd        double precision CHECK (monthly_usd >= 0),
    alert_at           double precision CHECK (alert_at > 0 AND alert_at <= 1),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION llm_account_limits_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER llm_account_limits_touch BEFORE UPDATE ON llm_account_limits
    FOR EACH ROW EXECUTE FUNCTION llm_account_limits_touch();

-- One notification per statement, delivered at commit: the dispatchers reload the whole table.
CREATE OR REPLACE FUNCTION llm_account_limits_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('llm_account_limits', TG_OP);
    RETURN NULL;
END
$$;

CREATE TRIGGER llm_account_limits_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON llm_account_limits
    FOR EACH STATEMENT EXECUTE FUNCTION llm_account_limits_notify();
