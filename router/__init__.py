"""Switchyard's decision logic: config, routing, errors, pricing, provider adapters, the client."""
