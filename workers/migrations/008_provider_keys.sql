-- Provider keys stored encrypted (router/secrets.py): AES-256-GCM under the master key `key_version`
-- of SWITCHYARD_MASTER_KEYS, with the row's identity (name, account or global, version) as associated
-- data. Never the key itself: a key is only ever in clear in the memory of a worker or of the
-- `switchyard keys` command that set it. `name` is the environment variable a provider's
-- api_key_env names; `account` NULL is the key for every account, else that account's own key.
-- Written by `switchyard keys set|rotate|delete`; every provider worker follows the table through
-- the notifications below.
CREATE TABLE IF NOT EXISTS llm_provider_keys (
    name         text NOT NULL CHECK (name ~ '^[A-Za-z_][A-Za-z0-9_]{0,127}$'),
    account      text CHECK (account ~ '^[A-Za-z0-9_-]{1,128}$'),
    ciphertext   bytea NOT NULL,
    nonce        bytea NOT NULL CHECK (octet_length(nonce) = 12),
    key_version  integer NOT NULL CHECK (key_version >= 1),
    created_at   timestamptz NOT NULL DEFAULT now(),
    rotated_at   timestamptz
);

-- One key per name and account, the global one (account NULL) included: an expression index, since a
-- plain UNIQUE lets any number of NULLs in (and NULLS NOT DISTINCT needs PostgreSQL 15).
CREATE UNIQUE INDEX IF NOT EXISTS llm_provider_keys_name_account
    ON llm_provider_keys (name, (coalesce(account, '')));

-- One notification per statement, delivered at commit: the workers read the table again.
CREATE OR REPLACE FUNCTION llm_provider_keys_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('llm_provider_keys', TG_OP);
    RETURN NULL;
END
$$;

CREATE TRIGGER llm_provider_keys_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON llm_provider_keys
    FOR EACH STATEMENT EXECUTE FUNCTION llm_provider_keys_notify();
