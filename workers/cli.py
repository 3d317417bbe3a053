"""The `switchyard` command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from router.config import ConfigError

from . import metrics, processes
from .commands import accounts, ask, budget, dlq, explain, fleet, keys, providers, rate, report, reprice, status
from .commands import breaker as breaker_noun
from .commands import config as config_noun
from .commands import creds as creds_noun
from .commands import health as health_noun
from .commands.preflight import database_problem
from .runtime import configure_logging, run


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="switchyard", description="An LLM request router on a NATS worker fleet.")
    p.add_argument("--log-level", default=os.environ.get("SWITCHYARD_LOG_LEVEL", "info"))
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="the whole fleet on embedded NATS and PostgreSQL")
    up.add_argument("--config", help="routing config (TOML); default: the shipped example")
    up.add_argument("--data-dir", type=Path, default=None, help="where NATS and PostgreSQL keep data (.switchyard)")
    up.add_argument("--nats-port", type=int, default=0, help="port of the embedded nats-server (default: a free one)")
    up.add_argument("--secure", action="store_true",
                    help="a credential per process and per producer account on the embedded nats-server")

    for name, text in (("dispatcher", "the dispatcher"), ("auditor", "the auditor")):
        s = sub.add_parser(name, help=f"run {text} (NATS_URL, DATABASE_URL)")
        s.add_argument("--config")
        metrics.add_options(s)
    w = sub.add_parser("worker", help="run one pool's provider worker (NATS_URL)")
    w.add_argument("--pool", required=True)
    w.add_argument("--config")
    metrics.add_options(w)

    # the operator's commands, one module each
    for noun in (ask, status, dlq, config_noun, accounts, explain, providers, budget, rate, report, reprice, keys):
        noun.register(sub)
    breaker_noun.register(sub)
    health_noun.register(sub)
    creds_noun.register(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    command: fleet.Command | None = getattr(args, "run", None)
    if command is not None:
        sys.exit(fleet.run(command, args))
    configure_logging(args.log_level)
    try:
        _serve(args)
    except ConfigError as exc:
        sys.exit(f"switchyard: {exc}")


def _serve(args: argparse.Namespace) -> None:
    """Run `up` or one fleet process. Raises ConfigError; exits with one line when PostgreSQL is unusable."""
    cfg = processes.load_config(args.config)  # `up` loads it again; checked first all the same
    if args.command == "up":
        from .tracing import from_env as tracing_from_env
        from .up import default_data_dir, up

        # A bad OTEL_* variable is said once here, rather than by every child in a restart loop.
        tracing_from_env(os.environ, "switchyard").shutdown()

        if os.environ.get("DATABASE_URL"):
            _require_database(os.environ["DATABASE_URL"])
        data_dir = args.data_dir or default_data_dir()
        run(lambda stop: up(stop, config_path=args.config, data_dir=data_dir, nats_port=args.nats_port,
                            secure=args.secure))
        return
    nats_url = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
    if args.command == "dispatcher":
        dm = metrics.DispatcherMetrics()
        run(lambda stop: metrics.serving(dm.registry, args.metrics_port, args.metrics_host,
                                         processes.run_dispatcher(stop, cfg, nats_url, dm)))
    elif args.command == "worker":
        wm = metrics.WorkerMetrics(args.pool)
        run(lambda stop: metrics.serving(wm.registry, args.metrics_port, args.metrics_host,
                                         processes.run_worker(stop, cfg, nats_url, args.pool, wm)))
    elif args.command == "auditor":
        db = os.environ.get("DATABASE_URL")
        if not db:
            sys.exit("switchyard auditor: set DATABASE_URL to the PostgreSQL the audit ledger lives in")
        _require_database(db)
        am = metrics.AuditorMetrics()
        run(lambda stop: metrics.serving(am.registry, args.metrics_port, args.metrics_host,
                                         processes.run_auditor(stop, cfg, nats_url, db, am)))


def _require_database(url: str) -> None:
    import uvloop

    problem = uvloop.run(database_problem(url))
    if problem:
        sys.exit(f"switchyard: {problem}")


if __name__ == "__main__":
    main()
