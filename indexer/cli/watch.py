"""`indexer watch`: the daemon that keeps the store equal to watched folders."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from indexer.cli.common import common_options, model_options
from indexer.settings import Settings

log = logging.getLogger("indexer")

FLAGS = {  # flag → setting, applied by main()
    "poll": "watch.poll",
    "max_wait": "watch.max_wait",
    "control_port": "watch.control_port",
    "json_logs": "watch.json_logs",
    "host": "serve.host",
    "port": "serve.port",
}


def register(sub: Any) -> None:
    """Add the ``watch`` subcommand to the parser."""
    p = sub.add_parser(
        "watch",
        help="keep the store equal to folders: index new, changed, moved and deleted images as they happen",
        description=(
            "Reconcile the store with PATH... (as `indexer index` does), then follow filesystem events until "
            "SIGTERM/SIGINT. The daemon owns the store: every other command (search, status, index, dedup, "
            "cluster, export) asks it. With --serve it also serves the web page and the search API."
        ),
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="folders to watch (default: [watch] paths)")
    p.add_argument("--poll", action="store_true", default=None, help="poll instead of inotify (network shares)")
    p.add_argument("--max-wait", type=float, metavar="S", help="run a partial batch after S seconds (default 0.5)")
    p.add_argument(
        "--confirm-deletes",
        action="store_true",
        help="apply held mass deletions at start-up (a one-off: never put it in a service unit)",
    )
    p.add_argument("--control-port", type=int, metavar="PORT", help="port of /healthz, /metrics (default: any)")
    p.add_argument(
        "--serve",
        action="store_true",
        help="also serve the web page and the search API (serve.* settings; one port: serve.host:serve.port)",
    )
    p.add_argument("--host", help="with --serve: address to bind (default 127.0.0.1; any other needs an API key)")
    p.add_argument("--port", type=int, help="with --serve: port (default 8000; 0: any free port)")
    p.add_argument("--json-logs", action="store_true", default=None, help="log one JSON object per line")
    common_options(p)
    model_options(p)
    p.set_defaults(handler=cmd_watch)


def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    from indexer.sources.watch import check_watch_roots

    roots = check_watch_roots(args.paths or settings.watch.paths)  # before the heavy imports: usage errors are quick
    if (args.host is not None or args.port is not None) and not args.serve:
        from indexer.errors import ConfigError

        raise ConfigError("--host/--port", "they choose where --serve serves the page: add --serve")
    setup_daemon_logging(settings, args.verbose)

    from indexer.daemon.lifecycle import Daemon

    daemon = Daemon(settings, roots, confirm_deletes=args.confirm_deletes, serve=args.serve)
    daemon.install_signal_handlers()
    return daemon.run()


def setup_daemon_logging(settings: Settings, verbose: int) -> None:
    """A long-running command logs at ``log_level`` (or -v/-vv if more), as text or one JSON object per line."""
    level = _log_level(settings.log_level, verbose)
    logging.getLogger("indexer").setLevel(level)
    if level > logging.DEBUG:  # the daemon logs its own line per batch
        logging.getLogger("indexer.ingest.embed").setLevel(logging.WARNING)
    formatter = JsonFormatter() if settings.watch.json_logs else logging.Formatter(TEXT_FORMAT)
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    for handler in root.handlers:
        handler.setFormatter(formatter)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _log_level(configured: str, verbose: int) -> int:
    level = logging.getLevelNamesMapping()[configured]
    if verbose >= 2:
        return logging.DEBUG
    return min(level, logging.INFO) if verbose == 1 else level


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)
