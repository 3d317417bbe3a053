"""The operator's commands, one module per noun (`ask`, `status`, `dlq`).

Each noun's module has `register(sub)`, which adds its subparser and sets `run` to its
async implementation; `workers/cli.py` only calls the registrations. `fleet.py` finds the
fleet for them and `preflight.py` holds the checks a long-running process makes before it
starts. Every command exits 0 when it did what was asked, 1 when what it was asked for is
not there or is refused, and 2 when NATS cannot be reached or holds no Switchyard fleet.
"""
