"""Switchyard's long-running processes and the embedded dev stack."""
