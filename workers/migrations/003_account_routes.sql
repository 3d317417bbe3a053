-- Accounts' own routes: for an account and a use case, the targets (`pool:model`, in order) to use
-- instead of the config's route, for one tier or for every tier ('*'). A request's own tier wins
-- over '*'. Written by `switchyard accounts route set|delete`; every dispatcher caches the active
-- rows and reloads them when the trigger below notifies the channel `llm_account_routes`.
CREATE TABLE IF NOT EXISTS llm_account_routes (
    account     text NOT NULL CHECK (account ~ '^[A-Za-z0-9_-]{1,128}$'),
    use_case    text NOT NULL CHECK (use_case ~ '^[A-Za-z0-9_-]{1,128}$'),
    tier        text NOT NULL DEFAULT '*' CHECK (tier ~ '^([A-Za-z0-9_-]{1,128}|[*])$'),
    targets     text[] NOT NULL CHECK (cardinality(targets) > 0),
    key_ref     text,                 -- the account's own key, by reference; never the key itself
    active      boolean NOT NULL DEFAULT true,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account, use_case, tier)
);

-- An UPDATE by hand still says when the row last changed.
CREATE OR REPLACE FUNCTION llm_account_routes_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER llm_account_routes_touch BEFORE UPDATE ON llm_account_routes
    FOR EACH ROW EXECUTE FUNCTION llm_account_routes_touch();

-- One notification per statement, delivered at commit: the dispatchers reload the whole table.
CREATE OR REPLACE FUNCTION llm_account_routes_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('llm_account_routes', TG_OP);
    RETURN NULL;
END
$$;

CREATE TRIGGER llm_account_routes_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON llm_account_routes
    FOR EACH STATEMENT EXECUTE FUNCTION llm_account_routes_notify();
