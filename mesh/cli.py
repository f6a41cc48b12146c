"""The `swarm-mesh` command.

    swarm-mesh run [--config F]        serve the reporting API until SIGTERM/SIGINT
    swarm-mesh nodes | incidents | proposals | decisions | refusals [--config F] [--json]
    swarm-mesh keygen | nats-config | block | revoke   (mesh/fleetcmd.py)
    swarm-mesh init | enroll                          (mesh/setup.py: a mesh in one directory,
                                                       a node's credentials)
    swarm-mesh node-revoke | node-revocations         (mesh/nodecmd.py: a node's certificates
                                                       refused, its votes void)

Query commands read the store named in the config (while the service runs, too) and
print human tables, or JSON for scripts with --json. Exit codes: 0 success, 1 an
unexpected failure, 2 bad input (config, store, address, TLS files). Errors are one
sentence on stderr, never a traceback.

Subcommands live in COMMANDS; another module adds its own with register() (the decision
service's block, revoke, keygen, nats-config).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable

from agent import __version__
from agent.logs import JsonFormatter
from mesh import config as mesh_config
from mesh import views
from mesh.config import MeshConfig, MeshConfigError
from mesh.server import MeshServer, StartError
from mesh.store import Store, StoreError, open_store

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
STOP_DECIDER_S = 3.0
log = logging.getLogger("swarm_mesh")


class UsageError(ValueError):
    """Bad input from the command line; one sentence, exit 2."""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace, MeshConfig], int]
    uses_config: bool = True      # False: no --config, the handler gets the built-in defaults
    epilog: str = ""              # more for the command's --help


COMMANDS: dict[str, Command] = {}


def register(name: str, help: str, add_args: Callable[[argparse.ArgumentParser], None],
             handler: Callable[[argparse.Namespace, MeshConfig], int],
             uses_config: bool = True, epilog: str = "") -> None:
    """Add a subcommand; `handler(args, cfg)` returns the exit code and may raise
    MeshConfigError, StoreError, StartError or UsageError (printed as one sentence)."""
    COMMANDS[name] = Command(name, help, add_args, handler, uses_config, epilog)


# ---- run
class PlainFormatter(logging.Formatter):
    """One readable line: time, level, message, then key=value extras."""

    def format(self, record: logging.LogRecord) -> str:
        data = json.loads(JsonFormatter().format(record))
        ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(data.pop("ts")))
        head = f"{ts} {data.pop('level')} {data.pop('msg')}"
        data.pop("logger", None)
        return " ".join([head, *(f"{k}={json.dumps(v, default=str)}" for k, v in data.items())])


def setup_logging(cfg: MeshConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if cfg.log_format == "json" else PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.log_level.upper())


async def serve(cfg: MeshConfig, store: Store, decider=None) -> None:
    """Serve until SIGTERM or SIGINT; a second one exits at once. With a decider (the
    config has signing:), proposals go to it, its loop republishes pending decisions and
    promotes canaries, and proposals stored before a crash are decided on at start.
    With nats.server, nats-server is started first (ready before anything connects),
    restarted whenever it dies, and stopped last."""
    embedded = None
    if cfg.nats_server is not None:
        from mesh.natsproc import EmbeddedNats
        embedded = EmbeddedNats(cfg.nats_server)
        await embedded.start()
    try:
        await _serve(cfg, store, decider, embedded)
    finally:
        if embedded is not None:
            await embedded.stop()


async def _serve(cfg: MeshConfig, store: Store, decider, embedded) -> None:
    server = MeshServer(cfg, store, on_proposal=decider.on_proposal if decider else None)
    metrics = _metrics(cfg, store, server, decider, embedded)
    try:
        await server.start()
    except BaseException:
        if metrics is not None:
            metrics.close()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            os._exit(EXIT_FAILURE)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    tasks = []
    if embedded is not None:
        tasks.append(asyncio.create_task(embedded.supervise(stop)))
    if decider is not None:
        tasks.append(asyncio.create_task(decider.run(stop)))
        tasks.append(asyncio.create_task(decider.sweep()))
    print(json.dumps({"listening": server.address, "decisions": decider is not None,
                      "nats_pid": embedded.pid if embedded else None,
                      "metrics": _address(metrics.address) if metrics else None}), flush=True)
    log.info("mesh service ready", extra={"listen": server.address, "store": store.dialect,
                                          "version": __version__,
                                          "decisions": decider is not None,
                                          "embedded_nats": embedded is not None})
    try:
        await stop.wait()
        log.info("stopping")
    finally:
        stop.set()
        if tasks:
            done, stuck = await asyncio.wait(tasks, timeout=STOP_DECIDER_S)
            for t in stuck:                 # a stuck publish or lock: say where, stop anyway
                where = "".join(f"{f.f_code.co_filename}:{f.f_lineno} " for f in t.get_stack(limit=8))
                log.warning("decision service stopped uncleanly: a task did not finish",
                            extra={"task": t.get_coro().__qualname__, "at": where})
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await server.stop()
        if decider is not None:
            await decider.close()
        if metrics is not None:
            metrics.close()
        log.info("stopped", extra={"counters": server.service.counters})


def _address(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _metrics(cfg: MeshConfig, store: Store, server: MeshServer, decider, embedded):
    """The Prometheus endpoint (mesh/metrics.py), bound before anything serves; None when
    metrics_listen is null. StartError when the address cannot be bound."""
    if cfg.metrics_listen is None:
        return None
    from mesh.metrics import MeshMetrics

    metrics = MeshMetrics(store, lambda: dict(server.service.counters), decider=decider,
                          embedded=embedded, stale_s=cfg.node_stale_s)
    try:
        metrics.serve(cfg.metrics_listen)
    except OSError as e:
        raise StartError(f"cannot serve metrics on {cfg.metrics_listen}: "
                         f"{e.strerror or e} (metrics_listen: null turns them off)") from None
    return metrics


def _run(args: argparse.Namespace, cfg: MeshConfig) -> int:
    cfg.require_tls()
    setup_logging(cfg)
    store = open_store(cfg.store)
    try:
        decider = None
        if cfg.signing:
            from mesh.fleetcmd import decider_of
            decider = decider_of(cfg, store)
        else:
            log.warning("no signing: section: reports are stored, no fleet decisions are made")
        asyncio.run(serve(cfg, store, decider))
    finally:
        store.close()
    return EXIT_OK


# ---- queries
def query(args: argparse.Namespace, cfg: MeshConfig, fetch: Callable[[Store], list[dict]],
          lines: Callable[[list[dict], float], list[str]]) -> int:
    store = open_store(cfg.store, create=False)
    try:
        rows = fetch(store)
    finally:
        store.close()
    if args.json:
        print(json.dumps(rows, sort_keys=True, default=str))
    else:
        print("\n".join(lines(rows, time.time())))
    return EXIT_OK


def _nodes(args: argparse.Namespace, cfg: MeshConfig) -> int:
    now = time.time()
    return query(args, cfg, lambda s: views.with_status(s.nodes(), now, cfg.node_stale_s),
                  views.nodes_lines)


def _incidents(args: argparse.Namespace, cfg: MeshConfig) -> int:
    state = None if args.state == "all" else args.state
    return query(args, cfg, lambda s: s.incidents(event_class=args.event_class, state=state,
                                                   node=args.node, limit=args.limit),
                  views.incidents_lines)


def _proposals(args: argparse.Namespace, cfg: MeshConfig) -> int:
    return query(args, cfg, lambda s: s.proposals(target=args.target, node=args.node,
                                                   limit=args.limit), views.proposals_lines)


def _decisions(args: argparse.Namespace, cfg: MeshConfig) -> int:
    active_at = time.time() if args.active else None
    return query(args, cfg, lambda s: s.decisions(active_at=active_at, limit=args.limit,
                                                   target=args.target, state=args.state),
                  views.decisions_lines)


def _refusals(args: argparse.Namespace, cfg: MeshConfig) -> int:
    return query(args, cfg, lambda s: s.refusals(limit=args.limit, node=args.node),
                  views.refusals_lines)


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return n


def add_limit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=_positive_int, default=1000,
                   help="at most this many (default 1000)")


def _incident_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--class", dest="event_class", help="only this event class")
    p.add_argument("--state", default="live",
                   help="live (open, mitigated, escalated: the default), all, or one state")
    p.add_argument("--node", help="only this node")
    add_limit(p)


def _proposal_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node", help="only this node's")
    p.add_argument("--target", help="only for this target (as proposed, e.g. 203.0.113.7/32)")
    add_limit(p)


def _decision_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", choices=("pending", "published", "failed"),
                   help="only in this state (failed: nats-server refused it for good; "
                        "`swarm-mesh refusals` says why)")
    p.add_argument("--target", help="only for this target (normal form, e.g. 203.0.113.7/32)")
    p.add_argument("--active", action="store_true", help="only those not expired yet")
    add_limit(p)


def _refusal_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node", help="only this node's")
    add_limit(p)


register("run", "serve the mesh reporting API (mutual TLS) until SIGTERM", lambda p: None, _run)
register("nodes", "every node: alive, stale or revoked, versions, fleet sequence, open "
         "incidents",
         lambda p: None, _nodes)
register("incidents", "incidents across the fleet (live ones by default), by class",
         _incident_args, _incidents)
register("proposals", "blocks nodes asked the fleet to enforce, newest first",
         _proposal_args, _proposals)
register("decisions", "fleet decisions, newest first", _decision_args, _decisions)
register("refusals", "proposals and decisions refused, with the reason, newest first",
         _refusal_args, _refusals)


from mesh import fleetcmd  # noqa: E402,F401  (registers keygen, nats-config, block, revoke)
from mesh import enroll, setup  # noqa: E402,F401  (register init, enroll)
from mesh import nodecmd  # noqa: E402,F401  (registers node-revoke, node-revocations)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swarm-mesh", description="The Swarm mesh service: "
                                "receives every node's reports and decides fleet blocks.",
                                epilog="exit codes: 0 success, 1 failure, 2 bad input")
    p.add_argument("--version", action="version", version=f"swarm-mesh {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help,
                            epilog=cmd.epilog or None)
        if cmd.uses_config:
            sp.add_argument("--config", metavar="FILE", help="YAML config (default: "
                            f"{mesh_config.SYSTEM_CONFIG} if present, else built-in defaults)")
        if cmd.name != "run":
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        cmd.add_args(sp)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        cmd = COMMANDS[args.command]
        cfg = mesh_config.load(args.config) if cmd.uses_config else MeshConfig()
        code = COMMANDS[args.command].handler(args, cfg)
    except (MeshConfigError, StoreError, StartError, UsageError) as e:
        print(f"swarm-mesh: {e}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        code = EXIT_FAILURE
    except BrokenPipeError:          # `swarm-mesh nodes | head`
        sys.stderr.close()
        code = EXIT_OK
    except Exception as e:           # a bug: still one line for the operator
        log.debug("unexpected failure", exc_info=True)
        print(f"swarm-mesh: unexpected failure: {type(e).__name__}: {e}", file=sys.stderr)
        code = EXIT_FAILURE
    sys.exit(code)


if __name__ == "__main__":
    main()
