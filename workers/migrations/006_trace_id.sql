-- The OpenTelemetry trace id of each audited request (32 lowercase hex digits), when the request came with a
-- W3C `traceparent` or the fleet traced it: from an audit row to the request's whole path in a trace viewer.
-- Nullable: rows written before, and requests without a trace context, have none. No index: a trace leads to
-- its request (the spans carry `switchyard.request_id`), and the ledger's writes stay as cheap as they were.
ALTER TABLE llm_audit ADD COLUMN IF NOT EXISTS trace_id text;
