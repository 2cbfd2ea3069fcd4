"""Flower's SuperNode, polling faster: ``python -m fedsafe.engines.flower.supernode --poll S -- ARGS``.

Flower 1.41's SuperNode loop (``flwr/supernode/start_client_internal.py``) has three hard-coded waits and no
setting for them: 3 s after a pull that found no message (line 263), and 0.5 s between checks for the ClientApp's
reply (line 470) and for a reply object's content (line 506). In a federation round the first one is paid on
almost every message: a node that has just replied pulls again, finds nothing because the server is still
aggregating, and sleeps 3 s while the next round's message waits on the SuperLink (``flwr`` issue #3670 and the
deployment breakdown in issue 22 of this project).

This launcher runs Flower's own ``flower-supernode`` entry point, unchanged, in this process, after capping
those three waits at ``S`` seconds: it gives that one module a stand-in for ``time`` whose ``sleep`` is
``min(seconds, S)``. Nothing else of Flower changes: transport, TLS, node authentication, retries, the
ClientApp processes and the message protocol are Flower's. The cost is more pull requests while a node idles:
``1 / S`` per second per node to the SuperLink (5/s at the default 0.2 s), negligible on a few nodes; raise ``S``
(or pass 0 for Flower's own timing) for federations of hundreds of nodes.

Guarded: the cap is applied only where the installed Flower is a version whose loop was read
(:data:`KNOWN_VERSIONS`) and the module still sleeps through ``time.sleep``; otherwise the SuperNode runs
unmodified and says why on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time as _time

DEFAULT_POLL_S = 0.2
KNOWN_VERSIONS = ("1.41.",)  # flwr versions whose start_client_internal waits were read (see the docstring)


class CappedTime:
    """Stands in for the ``time`` module inside one Flower module: every ``sleep`` is capped at ``cap`` s."""

    def __init__(self, cap: float):
        if cap <= 0:
            raise ValueError(f"poll cap must be > 0 seconds, got {cap}")
        self.cap = float(cap)

    def sleep(self, seconds: float) -> None:
        _time.sleep(min(float(seconds), self.cap))

    def __getattr__(self, name):  # time.time, time.monotonic, ...: the real module's
        return getattr(_time, name)


def cap_supernode_waits(poll_s: float) -> str | None:
    """Cap the SuperNode loop's waits at ``poll_s``; returns None when applied, else the reason it was not."""
    import flwr
    from flwr.supernode import start_client_internal as loop

    version = getattr(flwr, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("flwr")
    if not version.startswith(KNOWN_VERSIONS):
        return (f"flwr {version} is not a version whose SuperNode waits were read ({', '.join(KNOWN_VERSIONS)}x); "
                "running Flower's own timing")
    current = getattr(loop, "time", None)
    if isinstance(current, CappedTime):
        current.cap = float(poll_s)
        return None
    if current is not _time:
        return "flwr.supernode.start_client_internal no longer sleeps through `time`; running Flower's own timing"
    loop.time = CappedTime(poll_s)
    return None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m fedsafe.engines.flower.supernode",
                                     description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--poll", type=float, default=DEFAULT_POLL_S,
                        help="cap in seconds on the SuperNode's waits (0: Flower's own 3 s / 0.5 s)")
    if "--" in argv:  # everything after "--" is Flower's
        split = argv.index("--")
        args, flwr_args = parser.parse_args(argv[:split]), argv[split + 1:]
    else:  # a wrapper (the warm worker's launcher) may have consumed the "--": the rest is Flower's, in order
        args, flwr_args = parser.parse_known_args(argv)
    if args.poll < 0:
        parser.error(f"--poll must be >= 0 seconds, got {args.poll}")
    if args.poll > 0:
        reason = cap_supernode_waits(args.poll)
        if reason:
            print(f"fedsafe supernode: {reason}", file=sys.stderr, flush=True)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *flwr_args]
    flower_supernode()


if __name__ == "__main__":
    main()
