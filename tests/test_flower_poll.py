"""fedsafe.engines.flower.supernode: Flower's SuperNode with its hard-coded waits capped (issue 22)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("flwr")

from fedsafe.engines.flower import supernode  # noqa: E402
from fedsafe.engines.flower.deploy import SUPERNODE_POLL_S, supernode_command  # noqa: E402
from fedsafe.errors import FedsafeError  # noqa: E402


def test_capped_time_caps_sleep_and_passes_the_rest_through(monkeypatch):
    slept = []
    monkeypatch.setattr(supernode._time, "sleep", slept.append)
    capped = supernode.CappedTime(0.2)
    capped.sleep(3)
    capped.sleep(0.05)
    assert slept == [0.2, 0.05]
    assert capped.monotonic is supernode._time.monotonic
    with pytest.raises(ValueError):
        supernode.CappedTime(0)


def test_the_supernode_loop_sleeps_at_most_the_cap_after_patching():
    # in a fresh interpreter: the patch changes a Flower module for the rest of the process
    code = textwrap.dedent("""
        import time
        from fedsafe.engines.flower import supernode
        from flwr.supernode import start_client_internal as loop
        assert loop.time is time, "Flower's loop no longer sleeps through `time`"
        slept = []
        time.sleep = slept.append
        assert supernode.cap_supernode_waits(0.2) is None
        loop.time.sleep(3)      # the wait after an empty pull
        loop.time.sleep(0.5)    # the wait for a ClientApp's reply
        assert slept == [0.2, 0.2], slept
        assert supernode.cap_supernode_waits(0.1) is None  # a second call changes the cap, does not stack
        loop.time.sleep(3)
        assert slept[-1] == 0.1, slept
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_unknown_flower_version_runs_flowers_own_timing(monkeypatch):
    import flwr

    monkeypatch.setattr(flwr, "__version__", "9.0.0", raising=False)
    reason = supernode.cap_supernode_waits(0.2)
    assert reason and "9.0.0" in reason
    from flwr.supernode import start_client_internal as loop

    assert not isinstance(loop.time, supernode.CappedTime)


def test_supernode_command_uses_the_launcher_unless_poll_is_zero():
    capped = supernode_command("127.0.0.1:9092", 9094, partition_id=0)
    assert capped[:3] == [sys.executable, "-m", "fedsafe.engines.flower.supernode"]
    assert capped[3:6] == ["--poll", str(SUPERNODE_POLL_S), "--"]
    assert "--superlink" in capped[6:]
    plain = supernode_command("127.0.0.1:9092", 9094, partition_id=0, poll_s=0)
    assert plain[0] == "flower-supernode" and plain[1:] == capped[6:]
    with pytest.raises(FedsafeError, match="poll"):
        supernode_command("127.0.0.1:9092", 9094, partition_id=0, poll_s=-1)


def test_launcher_rejects_a_negative_poll():
    proc = subprocess.run([sys.executable, "-m", "fedsafe.engines.flower.supernode", "--poll", "-1", "--", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--poll" in proc.stderr


def test_launcher_splits_its_option_from_flowers_with_or_without_the_separator(monkeypatch):
    seen = {}
    import flwr.supernode.cli as cli

    monkeypatch.setattr(supernode, "cap_supernode_waits", lambda poll: seen.setdefault("poll", poll) and None)
    monkeypatch.setattr(cli, "flower_supernode", lambda: seen.setdefault("argv", list(sys.argv)))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    flwr_args = ["--insecure", "--superlink", "127.0.0.1:9092", "--port", "9094"]
    supernode.main(["--poll", "0.3", "--", *flwr_args])
    assert seen == {"poll": 0.3, "argv": ["flower-supernode", *flwr_args]}
    seen.clear()
    supernode.main(["--poll", "0.3", *flwr_args])  # the warm worker's launcher drops the "--"
    assert seen == {"poll": 0.3, "argv": ["flower-supernode", *flwr_args]}
