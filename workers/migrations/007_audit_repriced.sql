-- `switchyard reprice --apply` recomputes a row's cost from its token counts with the prices of the
-- day; the row then says when, so a cost that differs from the one the reply carried is explained.
ALTER TABLE llm_audit ADD COLUMN IF NOT EXISTS repriced_at timestamptz;
