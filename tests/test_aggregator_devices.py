"""Aggregation rules keep every tensor on the device of the updates they are given.

The GPU check (benchmarks/gpu_check.sh, aggregation_cuda) found rules that allocated their Gram matrix or
output on the CPU while the updates were on CUDA. CI has no GPU, so this test makes the same mistake visible
on the CPU: with torch's default device set to ``meta``, any tensor a rule creates without naming the device
of its input lands on ``meta``, and mixing it with the CPU updates raises (or leaves the result off the CPU).
"""

from __future__ import annotations

import pytest
import torch

from fedsafe import aggregators
from fedsafe.errors import ConfigError

RULES = [name for name in sorted(aggregators.REGISTRY) if name != "probe"]  # probe needs a model and shadows


def _updates():
    gen = torch.Generator().manual_seed(0)
    updates = torch.randn(10, 3000, generator=gen) * 1e-3
    updates[:2] += 5e-3
    samples = torch.randint(10, 100, (10,), generator=gen).float()
    return updates, samples, [f"c{i}" for i in range(10)]


@pytest.mark.parametrize("name", RULES)
def test_rule_allocates_on_the_device_of_its_input(name):
    try:
        reference_rule, rule = aggregators.get(name), aggregators.get(name)
    except (ConfigError, TypeError):
        pytest.skip(f"{name} needs parameters")
    updates, samples, ids = _updates()
    for r in (reference_rule, rule):
        if hasattr(r, "server_update"):  # FLTrust: the server's own update, trained on its root data in a run
            r.server_update = updates[2:].mean(dim=0)
    ref = reference_rule(updates.clone(), samples.clone(), ids)
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        got = rule(updates.clone(), samples.clone(), ids)
    finally:
        torch.set_default_device(previous)
    assert got.update.device.type == "cpu", f"{name} returned its update on {got.update.device}"
    assert torch.equal(got.update, ref.update)
    assert torch.as_tensor(got.client_weights).device.type == "cpu"
