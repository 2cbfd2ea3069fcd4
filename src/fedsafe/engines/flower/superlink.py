"""``python -m fedsafe.engines.flower.superlink --control-host H --control-port P -- <flower-superlink arguments>``.

Flower 1.41's SuperLink serves three HTTP APIs from one FastAPI app on one ``--host``/``--port``
(``flwr/superlink/cli/flower_superlink.py``, ``flwr/superlink/main.py``):

- the **Fleet API** (``/v1/fleet/...``): SuperNodes pull messages and push replies; with
  ``--enable-supernode-auth`` only nodes whose public key was registered get in (every request signed);
- the **Control API** (``/v1/control/...``): ``flwr run``, ``flwr ls``, ``flwr supernode register/list``;
  its only authentication is the account plug-in, which in the open-source distribution is a no-op
  (OIDC account login needs Flower Enterprise, ``flwr.ee``), and Flower's CLI cannot present a client
  certificate, so mutual TLS is not an option either;
- the **Runtime API** (``/v1/runtime/...``): SuperExec and the ServerApp fetch runs and push results;
  unauthenticated in subprocess isolation.

Served together, anyone who reaches the SuperNodes' port can register a node of their own, list every node's
public key and submit a run (code the SuperExec executes): node authentication is void (issue 30). This
launcher runs Flower's own SuperLink (argument parsing, the app, its middleware, state, SuperExec, TLS, node
authentication: unchanged) with two listening sockets instead of one:

- ``--host``/``--port`` of Flower's arguments: the Fleet listener, which answers ``/v1/fleet/...`` and
  ``/health`` and nothing else (404 for every Control and Runtime path);
- ``--control-host``/``--control-port`` (default ``127.0.0.1``): every API, for the operator on the server
  machine (``fedsafe flower register`` / ``submit``, or through an SSH tunnel) and the SuperExec Flower
  starts, which is pointed at this listener.

Which listener a request came through is the local address of its connection (``scope["server"]``), so a
client cannot choose it. Guarded: it runs only with a Flower version whose SuperLink was read
(:data:`KNOWN_VERSIONS`) and refuses Flower's legacy gRPC servers (``FLWR_INTERNAL_GRPC_*``), which bind
their own all-interfaces ports; anything else exits with the reason rather than start an exposed SuperLink.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sys

KNOWN_VERSIONS = ("1.41.",)  # flwr versions whose SuperLink app and lifespan were read (see the docstring)
FLEET_PATH_PREFIXES = ("/v1/fleet/",)  # what the Fleet listener serves (plus FLEET_EXACT_PATHS)
FLEET_EXACT_PATHS = ("/health",)
NOT_SERVED = ("not served on the Fleet listener: the Control and Runtime APIs listen on the SuperLink's "
              "--control-host:--control-port (default 127.0.0.1:9091 of the server machine)")
LEGACY_GRPC_ENV = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def fleet_only(app, fleet_port: int):
    """Wrap an ASGI app: requests that arrived on ``fleet_port`` may reach only the Fleet API and ``/health``."""

    async def guarded(scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            server = scope.get("server")
            on_fleet = server is None or server[1] == fleet_port  # unknown listener: treat as public
            path = scope.get("path", "")
            dot_segments = any(part in (".", "..") for part in path.split("/"))  # no climbing out of /v1/fleet/
            if on_fleet and (dot_segments or not (path.startswith(FLEET_PATH_PREFIXES) or path in FLEET_EXACT_PATHS)):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = json.dumps({"detail": NOT_SERVED}).encode()
                await send({"type": "http.response.start", "status": 404,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return guarded


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind(address)
    sock.set_inheritable(True)
    return sock


def _flwr_version() -> str:
    import flwr

    version = getattr(flwr, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("flwr")
    return version


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m fedsafe.engines.flower.superlink",
                                     description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--control-host", default="127.0.0.1", help="address of the Control and Runtime APIs")
    parser.add_argument("--control-port", type=int, required=True, help="port of the Control and Runtime APIs")
    parser.add_argument("--allow-unauthenticated-control", action="store_true",
                        help="permit a non-loopback --control-host (the Control API has no authentication)")
    if "--" not in argv:
        parser.error("give Flower's SuperLink arguments after `--`")
    split = argv.index("--")
    args, flwr_args = parser.parse_args(argv[:split]), argv[split + 1:]
    if not is_loopback(args.control_host) and not args.allow_unauthenticated_control:
        parser.error(f"--control-host {args.control_host} is not a loopback address: the Control API would "
                     "accept anyone (pass --allow-unauthenticated-control to do it anyway)")
    version = _flwr_version()
    if not version.startswith(KNOWN_VERSIONS):
        sys.exit(f"fedsafe superlink: flwr {version} is not a version whose SuperLink was read "
                 f"({', '.join(KNOWN_VERSIONS)}x); refusing to start rather than serve its Control API on the "
                 "Fleet port")
    for name in LEGACY_GRPC_ENV:
        if os.environ.get(name) == "1":
            sys.exit(f"fedsafe superlink: {name}=1 starts Flower's legacy gRPC server on its own all-interfaces "
                     "port, outside this launcher's split; unset it")

    import dataclasses
    import importlib

    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.main import create_app

    fsl = importlib.import_module("flwr.superlink.cli.flower_superlink")  # the package re-exports a function

    sys.argv = ["flower-superlink", *flwr_args]
    config = fsl._parse_superlink_lifespan_config()  # Flower's own parsing, checks and certificate loading
    fleet_host, fleet_port = config.host, config.port
    if fleet_port == args.control_port:
        sys.exit(f"fedsafe superlink: the Fleet port and --control-port are both {fleet_port}; give two ports")
    # Flower points its SuperExec at config.host:config.port (the Runtime API): make that the control listener
    config = dataclasses.replace(config, host=args.control_host, port=args.control_port)
    app = fleet_only(create_app(config, fsl.SuperLinkLifespan), fleet_port)
    sockets = [_bind(fleet_host, fleet_port), _bind(args.control_host, args.control_port)]
    scheme = "https" if config.ssl_certfile else "http"
    print(f"fedsafe superlink: Fleet API only on {scheme}://{fleet_host}:{fleet_port}; Control and Runtime APIs "
          f"on {scheme}://{args.control_host}:{args.control_port}", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, reload=False, access_log=True, workers=1,
                                           log_config=get_uvicorn_log_config(console_handler.level),
                                           ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile))
    server.run(sockets=sockets)


if __name__ == "__main__":
    main()
