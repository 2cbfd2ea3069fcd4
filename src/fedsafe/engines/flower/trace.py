"""Timestamps of a deployed Flower round, for finding where its wall time goes (``FEDSAFE_FLOWER_TRACE``).

Set ``FEDSAFE_FLOWER_TRACE=/path/trace.jsonl`` in the environment of the SuperLink, the SuperNodes and the
worker (``LocalFederation`` passes its environment on): every fedsafe component appends one JSON line per
event ``{"t": unix time, "pid", "event", ...}``. Flower's processes inherit the variable, so the ClientApp
processes Flower starts for every message trace too, including when the process was created (``proc_start``,
from ``/proc``), which separates interpreter start-up and Flower's own work from fedsafe's.
:func:`breakdown` turns a trace into per-message phases (``benchmarks/engine_overhead.py --trace``).

Standard library only: this module is imported before anything heavy, to time the imports themselves.
"""

from __future__ import annotations

import json
import os
import time

TRACE_ENV = "FEDSAFE_FLOWER_TRACE"


def enabled() -> bool:
    return bool(os.environ.get(TRACE_ENV))


def process_start_time() -> float | None:
    """Unix time at which this process was created (Linux ``/proc``), or None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5), counted after the ")" of the command name
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def mark(event: str, **fields) -> None:
    """Append one event to the trace file (no-op unless ``FEDSAFE_FLOWER_TRACE`` is set)."""
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    line = json.dumps({"t": time.time(), "pid": os.getpid(), "event": event, **fields}, default=str)
    with open(path, "a") as f:  # one short write per line: lines from concurrent processes do not interleave
        f.write(line + "\n")


def read(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# the events of one train message, in order; a phase is the gap between two consecutive events present
ORDER = ["server_push", "proc_start", "app_import_start", "app_import_end", "forward_start", "handler_start",
         "model_ready", "fit_start", "fit_end", "handler_end", "forward_end", "server_reply"]
LABELS = {
    ("server_push", "proc_start"): "SuperNode pull + SuperExec poll + ClientApp process spawn",
    ("proc_start", "app_import_start"): "interpreter start, flwr imports, Runtime API pull, FAB install",
    ("app_import_start", "app_import_end"): "fedsafe ClientApp module imports",
    ("app_import_end", "forward_start"): "Flower: load ClientApp, Context",
    ("app_import_end", "handler_start"): "Flower: load ClientApp, Context (+ torch, fedsafe imports: no worker)",
    ("forward_start", "handler_start"): "to the warm worker (pickle + socket)",
    ("handler_start", "model_ready"): "model + data build (cached in a warm worker)",
    ("model_ready", "fit_start"): "decode the message",
    ("fit_start", "fit_end"): "local training",
    ("fit_end", "handler_end"): "encode the reply",
    ("handler_end", "forward_end"): "back from the warm worker",
    ("handler_end", "server_reply"): "reply push + SuperNode push wait + server poll",
    ("forward_end", "server_reply"): "reply push + SuperNode push wait + server poll",
}


def breakdown(events: list[dict]) -> list[dict]:
    """Per train message: ``{phase label: seconds}`` between consecutive events of :data:`ORDER`.

    Events are joined by message id: the server's ``server_push``/``server_reply``, the ClientApp's
    ``forward_*`` and the training events carry ``mid``; the ClientApp process's start-up events are joined
    through the pid that handled (or forwarded) the message.
    """
    by_pid: dict[int, dict] = {}
    for e in events:
        by_pid.setdefault(e["pid"], {}).setdefault(e["event"], e)
    by_mid: dict[str, dict] = {}
    for e in events:
        if not e.get("mid"):
            continue
        slot = by_mid.setdefault(e["mid"], {})
        slot.setdefault(e["event"], e["t"])
        if e["event"] == "server_push":
            slot["round"] = e.get("round")
    for slot in by_mid.values():
        for e in events:  # the ClientApp process: the one that forwarded the message, else the one that trained
            if e.get("mid") and e["t"] == slot.get("forward_start", slot.get("handler_start")):
                for name in ("proc_start", "app_import_start", "app_import_end"):
                    pe = by_pid.get(e["pid"], {}).get(name)
                    if pe is not None:
                        slot[name] = pe.get("at") or pe["t"]
                break
    rows = []
    for mid, slot in by_mid.items():
        if "server_push" not in slot or "fit_start" not in slot:
            continue  # not a train message
        present = [name for name in ORDER if name in slot]
        row = {"mid": mid, "round": slot.get("round")}
        for a, b in zip(present, present[1:]):
            label = LABELS.get((a, b), f"{a} -> {b}")
            row[label] = row.get(label, 0.0) + slot[b] - slot[a]
        row["total"] = slot[present[-1]] - slot["server_push"]
        rows.append(row)
    return rows
