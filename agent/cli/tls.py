"""--remote's mutual TLS: the channel credentials, and why a handshake failed.

gRPC reports every failed handshake as UNAVAILABLE, and when the agent refuses the client
certificate it just closes the connection ("Socket closed"): no reason crosses the wire.
So when a --remote call fails that way, `diagnose` finds the reason here: it repeats the
handshake with Python's ssl module (a failure to verify the agent's certificate against
--ca is reported as such), and when the agent hangs up on us it verifies the client
certificate against --ca the way the agent verifies it (as a TLS client certificate:
chain, dates, purpose), which names the usual causes: expired or not yet valid, signed by
another CA, key not matching. The caller reports it as permission denied (exit 5).
"""
from __future__ import annotations

import argparse
import socket
import ssl
from pathlib import Path

import grpc

# Texts in gRPC's UNAVAILABLE details that mean the TLS handshake failed.
HANDSHAKE_SIGNS = ("Socket closed", "handshake", "Handshake", "SSL_ERROR", "certificate")


def credentials(args: argparse.Namespace) -> grpc.ChannelCredentials:
    """Channel credentials from --ca/--cert/--key; ValueError names what is missing,
    OSError what cannot be read."""
    missing = [o for o in ("cert", "key", "ca") if not getattr(args, o)]
    if missing:
        raise ValueError("--remote needs " + ", ".join(f"--{o}" for o in missing) +
                         " (the agent only accepts mutual TLS)")
    return grpc.ssl_channel_credentials(root_certificates=Path(args.ca).read_bytes(),
                                        private_key=Path(args.key).read_bytes(),
                                        certificate_chain=Path(args.cert).read_bytes())


def split_address(where: str) -> tuple[str, int]:
    """"host:port", "[v6]:port" -> (host, port); ValueError when malformed."""
    host, sep, port = where.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"--remote must be HOST:PORT, got {where!r}")
    return host.strip("[]"), int(port)


def diagnose(args: argparse.Namespace, timeout_s: float) -> str | None:
    """Why the agent at args.remote refuses a TLS handshake with these files, or None when
    the handshake succeeds (or the agent cannot be reached at all)."""
    try:
        host, port = split_address(args.remote)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2   # the agent's verdict inside the handshake
        ctx.load_verify_locations(cafile=args.ca)
        ctx.load_cert_chain(args.cert, args.key)
        ctx.set_alpn_protocols(["h2"])
    except (ValueError, OSError, ssl.SSLError) as e:
        return f"cannot use the TLS files: {e}"
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            with ctx.wrap_socket(raw, server_hostname=host):
                return None
    except ssl.SSLCertVerificationError as e:
        return (f"the agent's certificate failed verification against --ca {args.ca}: "
                f"{e.verify_message}")
    except ssl.SSLError as e:
        refused = e
    except OSError:
        return None    # not a TLS verdict: the caller reports the agent unreachable
    try:
        why = _own_certificate_problem(args)
    except (OSError, ssl.SSLError):
        why = None
    if why is not None:
        return f"the agent refused the client certificate: {why}"
    return (f"the agent refused the client certificate ({refused.reason or refused}), "
            f"although it verifies against --ca {args.ca}: is the agent's control.tls_ca "
            "another CA?")


def _own_certificate_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with --cert/--key as a client certificate under --ca, checked with an
    in-memory handshake in which a local server verifies it; None when nothing is."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(args.cert, args.key)        # any certificate serves the server
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(cafile=args.ca)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    client.load_cert_chain(args.cert, args.key)
    bios = [ssl.MemoryBIO() for _ in range(4)]
    c = client.wrap_bio(bios[0], bios[1])
    s = server.wrap_bio(bios[2], bios[3], server_side=True)
    done = [False, False]
    for _ in range(20):
        for i, end in enumerate((c, s)):
            if done[i]:
                continue
            try:
                end.do_handshake()
                done[i] = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLCertVerificationError as e:
                return _VERIFY.get(e.verify_code, e.verify_message)
            except ssl.SSLError as e:
                if i == 1:
                    return str(e.reason or e)
                done[i] = True   # the client side only learns of the server's alert
        bios[2].write(bios[1].read())
        bios[0].write(bios[3].read())
        if all(done):
            try:           # TLS 1.3: the server's verdict follows the client's Finished
                s.read(1)
            except ssl.SSLWantReadError:
                return None
            except ssl.SSLCertVerificationError as e:
                return _VERIFY.get(e.verify_code, e.verify_message)
            except ssl.SSLError as e:
                return str(e.reason or e)
            return None
    return None


# OpenSSL verify codes -> what they mean for a client certificate under --ca.
_VERIFY = {
    10: "it has expired",
    9: "it is not yet valid",
    20: "it is not signed by the CA in --ca (unknown issuer)",
    2: "it is not signed by the CA in --ca (unknown issuer)",
    19: "it is not signed by the CA in --ca (self-signed chain)",
    18: "it is self-signed, not signed by the CA in --ca",
    26: "it is not meant for client authentication (extended key usage)",
    7: "its signature does not verify",
}
