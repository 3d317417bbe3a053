-- Request ids are unique per account, not across accounts: two accounts may send the same id,
-- and each must keep its own row. The ledger's key becomes (account, request_id).
-- Adding the key builds its index while holding the table's lock: the auditor waits meanwhile
-- (its events stay in LLM_EVENTS), so a large ledger is best migrated in a quiet hour.
ALTER TABLE llm_audit DROP CONSTRAINT llm_audit_pkey;
ALTER TABLE llm_audit ADD CONSTRAINT llm_audit_pkey PRIMARY KEY (account, request_id);

-- Looking a request up by its id alone (an operator with only the id at hand) stays indexed.
CREATE INDEX llm_audit_request_id ON llm_audit (request_id);
