"""`swarm-mesh` commands of the decision service: keygen, nats-config, block, revoke.

    swarm-mesh keygen --dir /etc/swarm-mesh           the decision signing key (and .pub for agents)
    swarm-mesh nats-config --dir /etc/swarm-mesh/nats [--node NAME ...]
                                                      nats-server config + 0600 password files
    swarm-mesh block 203.0.113.7 --reason "..." [--ttl 3600] [--operator NAME]
    swarm-mesh revoke 203.0.113.7 --reason "..."

block and revoke are a human on the mesh: authoritative (no corroboration), still bounded
by the allowlists, the prefix limit and the lifetime cap; a refusal is recorded and
printed. They decide under the same file lock as the running service, sign with its key
and publish themselves, so they work while the service is down too.
"""
from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
from pathlib import Path

from agent.fleet.decision import DecisionError, generate_key
from mesh import cli, supersede
from mesh.config import MeshConfig, MeshConfigError
from mesh.decide import Decider
from mesh.natsconf import ServerSettings, write_fleet
from mesh.store import open_store


def decider_of(cfg: MeshConfig, store) -> Decider:
    """The config's decider; a wrong or missing nats:/signing:/policy: is a config error."""
    if not cfg.signing:
        raise MeshConfigError("signing: private_key is not set (swarm-mesh keygen makes one)")
    try:
        return Decider.from_config(store, cfg.nats, cfg.signing, cfg.policy, listen=cfg.listen)
    except (ValueError, DecisionError) as e:
        raise MeshConfigError(str(e)) from None


def _keygen(args: argparse.Namespace, cfg: MeshConfig) -> int:
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    private, public = d / "decisions.key", d / "decisions.pub"
    if private.exists():
        raise cli.UsageError(f"{private} exists; a signing key is never overwritten")
    kid = generate_key(private, public)
    out = {"key_id": kid, "private_key": str(private), "public_key": str(public)}
    print(json.dumps(out) if args.json else
          f"key {kid}: {private} (keep it on the mesh; signing.private_key) and {public} "
          "(give it to every agent: fleet.keys)")
    return cli.EXIT_OK


def _nats_config(args: argparse.Namespace, cfg: MeshConfig) -> int:
    d = Path(args.dir)
    try:
        settings = ServerSettings(store_dir=str(d / "jetstream"), host=args.host, port=args.port,
                                  tls_cert=args.tls_cert or "", tls_key=args.tls_key or "",
                                  tls_ca=args.tls_ca or "")
        paths = write_fleet(d, settings, tuple(args.node or ("node",)))
    except (ValueError, OSError) as e:
        raise cli.UsageError(f"nats-config: {e}") from None
    out = {k: str(v) for k, v in paths.items()}
    print(json.dumps(out) if args.json else
          f"wrote {paths['config']}; start it with: nats-server -c {paths['config']}\n"
          f"mesh password: {paths['mesh']} (nats.password_file); node passwords: " +
          ", ".join(str(paths[n]) for n in (args.node or ("node",))))
    return cli.EXIT_OK


LOGIN_VAR = "SWARM_MESH_LOGIN"      # set by the packaged launcher (packaging/swarm-mesh)


def operator_of(args: argparse.Namespace) -> str:
    """Who decides, for the record: --operator, else the login the packaged launcher
    names when it drops from root to the service user (whose USER and LOGNAME it sets),
    else sudo's caller, else the login name. Each is a claim of whoever ran the command
    (the launcher's, root's), not a proof."""
    return (args.operator or os.environ.get(LOGIN_VAR) or os.environ.get("SUDO_USER")
            or getpass.getuser())


def _decide(args: argparse.Namespace, cfg: MeshConfig, revoke: bool) -> int:
    store = open_store(cfg.store)
    decider = decider_of(cfg, store)

    async def go():
        try:
            if revoke:
                return await decider.revoke(args.target, args.reason, operator_of(args))
            return await decider.block(args.target, args.ttl, args.reason, operator_of(args))
        finally:
            await decider.close()
    try:
        outcome = asyncio.run(go())
        d = outcome.decision
        published = (store.latest_decision(d.target) or {}).get("state") if d else None
    finally:
        store.close()
    if args.json:
        print(json.dumps({"outcome": outcome.kind, "reason": outcome.reason,
                          "decision": d.to_dict() if d else None, "state": published,
                          "covering": list(outcome.covering)}))
    elif outcome.kind == "decide":
        print(f"{d.action} {d.target} until {d.expires_at:.0f} (decision {d.id}): {published}"
              + ("" if published == "published" else
                 "; nats-server is unreachable, the service publishes it when it can"))
        if outcome.covering:
            print("warning: " + supersede.covering_note(d.target, outcome.covering))
    else:
        print(f"{outcome.kind}: {outcome.reason}")
    return cli.EXIT_OK if outcome.kind == "decide" else cli.EXIT_FAILURE


def _ttl(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = 0.0
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return v


def _keygen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", required=True, help="where decisions.key and decisions.pub go")


def _nats_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", required=True, help="where nats.conf, jetstream/ and passwords go")
    p.add_argument("--host", default="0.0.0.0", help="address nats-server listens on")
    p.add_argument("--port", type=int, default=4222)
    p.add_argument("--node", action="append",
                   help="a node user (repeat; default one shared user 'node')")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-ca", help="require client certificates signed by this CA")


def _block_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="address or network, e.g. 203.0.113.7 or 198.51.100.0/24")
    p.add_argument("--reason", required=True, help="why (recorded in the decision)")
    p.add_argument("--ttl", type=_ttl, help="seconds (default policy.default_ttl_s, capped)")
    p.add_argument("--operator", help="who decides (default: the login name)")


def _revoke_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="the blocked address or network")
    p.add_argument("--reason", required=True, help="why (recorded in the revocation)")
    p.add_argument("--operator", help="who decides (default: the login name)")


cli.register("keygen", "make the Ed25519 key that signs fleet decisions", _keygen_args, _keygen)
cli.register("nats-config", "write nats-server's config (JetStream, mesh and node users)",
             _nats_args, _nats_config)
cli.register("block", "an operator's fleet block (signed, published to every node)",
             _block_args, lambda a, c: _decide(a, c, revoke=False))
cli.register("revoke", "lift a fleet block everywhere (a node's certificate: node-revoke)",
             _revoke_args,
             lambda a, c: _decide(a, c, revoke=True))
