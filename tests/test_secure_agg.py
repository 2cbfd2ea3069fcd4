"""Secure aggregation (CKKS) and shared-mask LoRA pruning: correctness against plaintext FedAvg, key
separation, mask agreement, bandwidth, parameter validation and the HE compatibility rules."""

import math
import re

import pytest
import tenseal as ts
import torch
from pydantic import ValidationError

from fedsafe.defenses.secure_aggregation.pruning import MaskSchedule, mask_digest, pruning_mask, pruning_schedule
from fedsafe.defenses.secure_aggregation.protocol import (
    WIRE_ERROR_KEY,
    WIRE_KEY,
    CKKSParams,
    EncryptedAggregate,
    KeyHolder,
    SecureAggClient,
    SecureAggregator,
    SecureAggServer,
    fedshield_aggregate,
    fedshield_decrypt,
    aggregate_encrypted,
    check_compatible,
    decrypt_aggregate,
    encrypt_update,
    fedavg_weights,
    fedshield_encrypt,
    he_security_level,
    load_context,
)
from fedsafe.errors import ConfigError, UpdateRejected
from fedsafe.fl.params import FlatLoRA, ParamSpec


@pytest.fixture(scope="module")
def keys() -> KeyHolder:
    return KeyHolder(CKKSParams())


def lora_scale_updates(n: int, d: int, seed: int) -> torch.Tensor:
    """Updates with LoRA-update magnitudes: |x| log-uniform in [1e-3, 1e-1], random signs."""
    g = torch.Generator().manual_seed(seed)
    magnitude = 10 ** (-3 + 2 * torch.rand(n, d, generator=g))
    sign = torch.where(torch.rand(n, d, generator=g) < 0.5, -1.0, 1.0)
    return (magnitude * sign).float()


def run_round(keys, global_vec, updates, num_samples, ratio, specs=None):
    """Client encrypt -> server sum -> key-holder decrypt, each with only its own context bytes."""
    mask = pruning_mask(global_vec, ratio, specs)
    weights = fedavg_weights(num_samples)
    client_ctx, server_ctx = keys.client_context_bytes(), keys.server_context_bytes()
    encrypted = [encrypt_update(client_ctx, updates[k], float(weights[k]), mask) for k in range(len(updates))]
    agg = aggregate_encrypted(server_ctx, encrypted)
    return mask, weights, encrypted, agg, decrypt_aggregate(client_ctx, agg, mask)


def test_encrypted_aggregation_equals_weighted_fedavg(keys):
    d, n = 10_000, 4
    updates = lora_scale_updates(n, d, seed=1)
    global_vec = torch.randn(d, generator=torch.Generator().manual_seed(2)) * 0.05
    num_samples = [120, 30, 400, 50]
    mask, weights, encrypted, agg, delta = run_round(keys, global_vec, updates, num_samples, ratio=0.3)

    reference = (weights[:, None] * updates.double()).sum(0)
    err = (delta.double() - reference)[mask].abs().max().item()
    assert err < 1e-6, f"max abs error {err:.2e} on kept coordinates"
    assert int(mask.sum()) == d - 3000 and agg.length == d - 3000
    assert torch.all(delta[~mask] == 0)
    # The weighting matters: the unweighted mean (FedShield's) is far off at this scale.
    unweighted = updates.double().mean(0)
    assert (delta.double() - unweighted)[mask].abs().max().item() > 1e-3


def test_server_cannot_decrypt(keys):
    d = 5000
    updates = lora_scale_updates(2, d, seed=3)
    mask, _, _, agg, _ = run_round(keys, torch.ones(d), updates, [1, 1], ratio=0.0)

    server = load_context(keys.server_context_bytes())
    assert server.is_public() and not server.has_secret_key()
    with pytest.raises(ValueError):  # SEAL itself refuses: there is no secret key in the context
        ts.ckks_vector_from(server, agg.chunks[0]).decrypt()
    with pytest.raises(ValueError):
        server.secret_key()
    with pytest.raises(ConfigError, match="secret-key"):
        decrypt_aggregate(keys.server_context_bytes(), agg, mask)
    # And the server must not be handed the secret key by mistake.
    enc = encrypt_update(keys.client_context_bytes(), updates[0], 1.0, mask)
    with pytest.raises(ConfigError, match="server_context_bytes"):
        aggregate_encrypted(keys.client_context_bytes(), [enc])
    # The client context does decrypt, so the failure above is about the key, not the ciphertext.
    client = load_context(keys.client_context_bytes())
    assert len(ts.ckks_vector_from(client, agg.chunks[0]).decrypt()) == 4096


def test_mask_is_deterministic_with_index_tie_break():
    values = torch.tensor([1.0, 0.5, 0.5, 0.5, 2.0])
    mask = pruning_mask(values, 0.4)  # prunes floor(0.4 * 5) = 2: among the tied 0.5s the earliest is kept
    assert mask.tolist() == [True, True, False, False, True]

    # Heavy ties (values quantised to 8 levels): two independent computations, one from a float64 CUDA-style
    # copy of the same vector, give the same mask.
    g = torch.Generator().manual_seed(4)
    global_vec = torch.randint(-4, 4, (20_000,), generator=g).float() * 0.01
    specs = [ParamSpec("t0.lora_A.weight", (100, 80), 0), ParamSpec("t0.lora_B.weight", (12_000,), 8000)]
    first = pruning_mask(global_vec, 0.37, specs)
    second = pruning_mask(global_vec.clone().double(), 0.37, list(reversed(specs)))
    assert torch.equal(first, second) and mask_digest(first) == mask_digest(second)
    # Exact per-tensor count and magnitude order: every kept |value| >= every pruned |value| in a tensor.
    for s in specs:
        seg_mask, seg = first[s.offset: s.offset + s.numel], global_vec[s.offset: s.offset + s.numel].abs()
        assert int((~seg_mask).sum()) == math.floor(0.37 * s.numel)
        assert seg[seg_mask].min() >= seg[~seg_mask].max()


def test_mask_keeps_all_zero_lora_b_at_round_one(tiny):
    from fedsafe.models import attach_lora

    model, _ = tiny
    flat = FlatLoRA(attach_lora(model, r=4, alpha=8))
    global_vec = flat.get()
    is_b = flat.mask(kind="B")
    assert torch.all(global_vec[is_b] == 0)  # PEFT initialises B to zero
    mask = pruning_mask(global_vec, 0.5, flat.specs)
    assert torch.all(mask[is_b])  # all-zero tensors are kept whole
    for s in flat.specs:
        if s.kind == "A":
            assert int(mask[s.offset: s.offset + s.numel].sum()) == s.numel - s.numel // 2
    # Without specs the whole vector is ranked at once, so the zero B entries go first.
    assert not torch.any(pruning_mask(global_vec, 0.5)[is_b])
    with pytest.raises(ConfigError, match="tile"):
        pruning_mask(global_vec, 0.5, flat.specs[1:])


def test_ciphertext_bytes_shrink_with_pruning(keys):
    d = 10 * 4096
    update = lora_scale_updates(1, d, seed=5)[0]
    global_vec = torch.randn(d, generator=torch.Generator().manual_seed(6))
    sizes = {}
    for ratio in (0.0, 0.2, 0.5):
        mask = pruning_mask(global_vec, ratio)
        enc = encrypt_update(keys.client_context_bytes(), update, 1.0, mask)
        assert enc.num_ciphertexts == math.ceil(int(mask.sum()) / 4096)  # slots fully used
        sizes[ratio] = enc.nbytes
    assert sizes[0.5] < 0.6 * sizes[0.0] and sizes[0.2] < 0.9 * sizes[0.0]
    # FedShield's scheme encrypts the zeros too: no saving.
    baseline = fedshield_encrypt(keys.client_context_bytes(), update, 0.5)
    assert baseline.num_ciphertexts == 10


def test_fedshield_baseline_is_the_unweighted_mean_of_locally_pruned_updates(keys):
    d = 6000
    specs = [ParamSpec("a.lora_A.weight", (2500,), 0), ParamSpec("a.lora_B.weight", (3500,), 2500)]
    updates = lora_scale_updates(3, d, seed=11)
    encrypted = [fedshield_encrypt(keys.client_context_bytes(), u, 0.5, specs) for u in updates]
    assert encrypted[0].num_ciphertexts == 1 + 1  # one tensor at a time: ceil(2500/4096) + ceil(3500/4096)
    mean = fedshield_decrypt(keys.client_context_bytes(), fedshield_aggregate(keys.server_context_bytes(), encrypted))
    local = torch.stack([u.double() * pruning_mask(u, 0.5, specs) for u in updates])  # each client's own mask
    assert (mean.double() - local.mean(0)).abs().max().item() < 1e-6
    assert (mean.double() == 0).sum() < d // 2  # masks differ between clients, so few entries are all-zero


def test_pruned_coordinates_keep_global_value():
    d, n = 9000, 3
    specs = [ParamSpec("a.lora_A.weight", (4000,), 0), ParamSpec("a.lora_B.weight", (5000,), 4000)]
    global_vec = torch.randn(d, generator=torch.Generator().manual_seed(7)) * 0.05
    updates = lora_scale_updates(n, d, seed=8)
    agg = SecureAggregator(CKKSParams(), prune_start=0.2, prune_end=0.5, total_rounds=4, specs=specs)
    delta, info = agg.aggregate(global_vec, updates, [10, 20, 30], round=3)
    new_global = global_vec + delta
    mask = pruning_mask(global_vec, 0.4, specs)
    assert info["ratio"] == pytest.approx(0.4) and info["he_kept_values"] == int(mask.sum()) == d - 1600 - 2000
    assert torch.equal(new_global[~mask], global_vec[~mask])
    reference = global_vec.double() + (fedavg_weights([10, 20, 30])[:, None] * updates.double()).sum(0)
    assert (new_global.double() - reference)[mask].abs().max().item() < 1e-6
    assert len(info["bytes_per_client"]) == n and info["client_weights"] == pytest.approx([1 / 6, 2 / 6, 3 / 6])


def test_pruning_schedule_is_linear():
    assert pruning_schedule(1, 5) == pytest.approx(0.2)
    assert pruning_schedule(3, 5) == pytest.approx(0.35)
    assert pruning_schedule(5, 5) == pytest.approx(0.5)
    assert pruning_schedule(1, 1, 0.3, 0.6) == pytest.approx(0.3)
    with pytest.raises(ConfigError, match="round"):
        pruning_schedule(6, 5)
    with pytest.raises(ConfigError, match="prune_end"):
        pruning_schedule(1, 5, 0.2, 1.0)


def test_ckks_params_validation_and_security_level():
    p = CKKSParams()
    assert p.slot_count == 4096 and p.total_coeff_bits == 160 and p.security_level() == 128
    assert "128-bit" in p.security_label()
    assert CKKSParams(coeff_mod_bit_sizes=[50, 30, 50]).security_level() == 192  # 130 <= 152
    assert CKKSParams(coeff_mod_bit_sizes=[40, 30, 40], global_scale=2**30).security_level() == 256  # 110 <= 118
    assert he_security_level(8192, 218) == 128 and he_security_level(8192, 219) is None
    assert he_security_level(16384, 300) == 192
    for kwargs, field in [
        ({"poly_modulus_degree": 3000}, "poly_modulus_degree"),
        ({"coeff_mod_bit_sizes": [60, 60, 60, 60]}, "coeff_mod_bit_sizes"),  # 240 > 218
        ({"coeff_mod_bit_sizes": [60, 70, 60]}, "coeff_mod_bit_sizes"),
        ({"coeff_mod_bit_sizes": [60]}, "coeff_mod_bit_sizes"),
        ({"global_scale": 2.0**60}, "global_scale"),
        ({"encryption": "rsa"}, "encryption"),
        ({"poly_modulus_degree": 4096}, "coeff_mod_bit_sizes"),  # 160 > 109 at N=4096
    ]:
        with pytest.raises(ValidationError, match=field):
            CKKSParams(**kwargs)


def test_other_parameters_round_trip():
    """A smaller ring (2048 slots), one data prime and symmetric encryption still give the weighted FedAvg."""
    params = CKKSParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=[50, 50], global_scale=2**35,
                        encryption="symmetric")
    assert params.security_level() == 128  # 100 <= 109
    d = 5000
    updates = lora_scale_updates(2, d, seed=9)
    secure = SecureAggregator(params, 0.0, 0.0)
    delta, info = secure.aggregate(torch.ones(d), updates, [1, 3], round=1)
    assert info["he_ciphertexts_per_client"] == 3  # ceil(5000 / 2048)
    reference = 0.25 * updates[0].double() + 0.75 * updates[1].double()
    assert (delta.double() - reference).abs().max().item() < 1e-6
    # With a single data prime there is no rescale level, so a server-side scalar is refused up front.
    mask = torch.ones(d, dtype=torch.bool)
    enc = encrypt_update(secure.key_holder.client_context_bytes(), updates[0], 1.0, mask)
    with pytest.raises(ConfigError, match="rescale"):
        aggregate_encrypted(secure.key_holder.server_context_bytes(), [enc], scale=0.5)


def test_aggregate_rejects_mismatched_masks(keys):
    d = 3000
    updates = lora_scale_updates(2, d, seed=10)
    g = torch.Generator().manual_seed(15)
    m1 = pruning_mask(torch.randn(d, generator=g), 0.2)
    m2 = pruning_mask(torch.randn(d, generator=g), 0.2)
    client = keys.client_context_bytes()
    encrypted = [encrypt_update(client, updates[0], 0.5, m1, client_id="client_00"),
                 encrypt_update(client, updates[1], 0.5, m2, client_id="client_01")]
    with pytest.raises(UpdateRejected, match="client_01"):
        aggregate_encrypted(keys.server_context_bytes(), encrypted)
    bad = updates[0].clone()
    bad[int(m1.nonzero()[0])] = float("nan")  # on a kept coordinate (a pruned NaN is never encrypted)
    with pytest.raises(UpdateRejected, match="NaN"):
        encrypt_update(client, bad, 0.5, m1)


def test_check_compatible():
    check_compatible("fedavg")
    check_compatible("FedAvg", "fedprox")
    check_compatible("fedavg", None)
    for name in ("krum", "median", "trimmed_mean", "bulyan", "foolsgold", "probe", "probe+median"):
        with pytest.raises(ConfigError, match=re.escape(f"aggregator.name='{name}'")):
            check_compatible(name)
    with pytest.raises(ConfigError, match="probing"):
        check_compatible("fedavg", probing=True)
    with pytest.raises(ConfigError, match="max_update_norm"):
        check_compatible("fedavg", max_update_norm=5.0)
    with pytest.raises(ConfigError, match="dp.client_level"):
        check_compatible("fedavg", server_clipping=True)
    for algo in ("fedadam", "fedyogi", "fedadagrad", "fedavgm", "scaffold"):
        with pytest.raises(ConfigError, match=re.escape(f"fl.algorithm='{algo}'")):
            check_compatible("fedavg", algo)


def test_config_section_validates_params_and_refuses_plaintext_rules():
    import yaml

    from fedsafe.config import ExperimentConfig, dump_config, load_config

    cfg = load_config(None, ["secure_agg.enabled=true", "secure_agg.ckks.coeff_mod_bit_sizes=[50,30,50]",
                             "fl.algorithm=fedprox"])
    assert cfg.secure_agg.ckks.security_level() == 192 and cfg.secure_agg.prune_end == 0.5
    assert ExperimentConfig.model_validate(yaml.safe_load(dump_config(cfg))) == cfg  # what config.yaml stores
    for override, field in [("aggregator.name=krum", "aggregator.name"), ("fl.algorithm=fedadam", "fl.algorithm"),
                            ("fl.algorithm=scaffold", "fl.algorithm"), ("aggregator.max_update_norm=3",
                                                                        "aggregator.max_update_norm"),
                            ("dp.client_level=true", "dp.client_level"),
                            ("secure_agg.ckks.poly_modulus_degree=4096", "secure_agg.ckks"),
                            ("secure_agg.prune_end=1.0", "secure_agg.prune_end")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(None, ["secure_agg.enabled=true", override])
    load_config(None, ["aggregator.name=krum", "roles.0.clients=5", "fl.clients_per_round=5"])  # fine without HE


def test_parties_exchange_plain_data_and_drop_bad_clients(keys):
    """The engine path: encrypted ClientResults carry only plain types; bad clients are dropped, the rest reweighted."""
    from fedsafe.fl.client import ClientResult, RoundConfig

    d = 6000
    specs = [ParamSpec("l.lora_A.weight", (2000,), 0), ParamSpec("l.lora_B.weight", (4000,), 2000)]
    global_vec = torch.randn(d, generator=torch.Generator().manual_seed(12)) * 0.05
    updates = lora_scale_updates(4, d, seed=13)
    samples = [10, 30, 20, 40]
    client = SecureAggClient(keys.client_context_bytes(), specs, 0.5, 0.5, total_rounds=3)
    server = SecureAggServer(keys.server_context_bytes(), client.decrypt, CKKSParams(), MaskSchedule(specs, 0.5, 0.5, 3))
    rc = RoundConfig(round=2, lr=0.0, local_steps=1, batch_size=1, total_samples=sum(samples))
    results = [client.encrypt_result(ClientResult(f"c{k}", updates[k], samples[k], {"update_norm": 1.0}),
                                     global_vec, rc) for k in range(4)]
    for r in results:
        assert r.update.numel() == 0 and "update_norm" not in r.metrics  # nothing in plaintext
        payload = r.extra[WIRE_KEY]
        assert all(isinstance(c, bytes) for c in payload["ciphertexts"])
        assert {type(v) for k, v in payload.items() if k != "ciphertexts"} <= {str, int, float}
    # client c1 sends a corrupted ciphertext, client c3 could not encrypt (e.g. NaN in its update)
    bad = dict(results[1].extra[WIRE_KEY])
    bad["ciphertexts"] = [bad["ciphertexts"][0][:1000]]
    results[1].extra[WIRE_KEY] = bad
    mask = pruning_mask(global_vec, 0.5, specs)
    nan_update = updates[3].clone()
    nan_update[~mask] = float("nan")  # on pruned coordinates a NaN is never encrypted, so it does no harm...
    assert WIRE_KEY in client.encrypt_result(ClientResult("c3", nan_update, samples[3]), global_vec, rc).extra
    nan_update[int(mask.nonzero()[0])] = float("nan")  # ...on a kept one the client refuses to encrypt
    results[3] = client.encrypt_result(ClientResult("c3", nan_update, samples[3]), global_vec, rc)
    assert WIRE_KEY not in results[3].extra and "NaN" in results[3].extra[WIRE_ERROR_KEY]

    delta, stats = server.aggregate(results, global_vec, round=2)
    assert [x["client_id"] for x in stats["dropped"]] == ["c1", "c3"] and stats["kept"] == [0, 2]
    assert "NaN" in stats["dropped"][1]["reason"]
    reference = (10 * updates[0].double() + 20 * updates[2].double()) / 30  # FedAvg over the clients that arrived
    assert (delta.double() - reference)[mask].abs().max().item() < 1e-6
    assert torch.all(delta[~mask] == 0)
    assert stats["client_weights"] == pytest.approx([1 / 3, 0.0, 2 / 3, 0.0])
    # The key holder also accepts the aggregate in wire form (what a Flower key-holding client receives).
    again = SecureAggClient(keys.client_context_bytes(), specs, 0.5, 0.5, total_rounds=3)
    from fedsafe.defenses.secure_aggregation.protocol import CiphertextSum, EncryptedUpdate

    total = CiphertextSum(keys.server_context_bytes())
    for r in (results[0], results[2]):
        total.add(EncryptedUpdate.from_wire(r.extra[WIRE_KEY], r.client_id))
    wire = total.result().to_wire()
    assert torch.allclose(again.decrypt(wire, global_vec, 2), delta, atol=1e-7)
    assert isinstance(EncryptedAggregate.from_wire(wire), EncryptedAggregate)
    # The server derives the round's mask itself (public data): a client that used another mask is dropped
    # even when it arrives first.
    stale = client.encrypt_result(ClientResult("stale", updates[1], samples[1]), global_vec * 2 + 0.01, rc)
    _, stats = server.aggregate([stale, results[0], results[2]], global_vec, round=2)
    assert [x["client_id"] for x in stats["dropped"]] == ["stale"] and "mask" in stats["dropped"][0]["reason"]
    assert stats["kept"] == [1, 2]


def test_full_run_he_on_matches_he_off(tmp_path, monkeypatch, test_seed):
    """`fedsafe run` path on the tiny model: secure_agg on (no pruning) gives the FedAvg run's adapter.

    Checked where the answer is exact rather than where it depends on the training path:
    - every round's decrypted aggregate is the weighted FedAvg of the very updates the clients encrypted
      (pure CKKS error, measured ~1.5e-8, bound 1e-6);
    - round 1 starts from the same adapter in both runs, so its adapters differ by CKKS error only (1e-6).
    Round 2 then trains from starting points that differ by that error. With one AdamW step a coordinate
    moves by lr * g / (|g| + eps), a function of the gradient with slope at most lr / eps = 2e6, so the
    1e-8-scale start difference can grow on coordinates whose gradient is ~0: measured max 9e-7..4.8e-5
    (relative 3e-7..1.1e-5) over FEDSAFE_TEST_SEED 0-3 x 1-2 threads, so the earlier bound of 1e-4 had a 2x
    margin on some seeds. The final adapter gets a bound with headroom (1e-3, relative 1e-3), still far below
    what a diverging run costs: a missing client or a wrong weight moves B by ~lr / 3 = 7e-3.
    """
    import json

    from safetensors.torch import load_file

    from fedsafe.config import load_config
    from fedsafe.pipeline import run_experiment
    from fedsafe.rundir import RunDir

    sent, decrypted = [], []
    encrypt_result, decrypt = SecureAggClient.encrypt_result, SecureAggClient.decrypt

    def record_encrypt(self, result, global_vec, rc):
        sent.append((rc.round, result.update.double().clone(), result.num_samples / rc.total_samples))
        return encrypt_result(self, result, global_vec, rc)

    def record_decrypt(self, aggregate, global_vec, round):
        delta = decrypt(self, aggregate, global_vec, round)
        decrypted.append((round, delta.double().clone(), global_vec.double().clone()))
        return delta

    monkeypatch.setattr(SecureAggClient, "encrypt_result", record_encrypt)
    monkeypatch.setattr(SecureAggClient, "decrypt", record_decrypt)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"placeholder instruction {i}",
                                        "response": f"placeholder answer {i} " * 2}) + "\n" for i in range(24)))
    finals, records, round1 = {}, {}, {}
    for he in (False, True):
        cfg = load_config(None, [
            "model.name=tiny", f"seed={test_seed}", "lora.r=4", "fl.rounds=2", "fl.local_steps=1",
            "fl.batch_size=2", "fl.lr=0.02", "fl.lr_schedule=constant", "data.samples_per_client=4",
            "data.max_length=128", "roles.0.clients=3", "fl.clients_per_round=3", f"output_dir={tmp_path / str(he)}",
            f"roles.0.data=[{{path: {data}}}]", "roles.0.samples_per_client=4", "fl.save_every_round=true",
            f"secure_agg.enabled={str(he).lower()}", "secure_agg.prune_start=0", "secure_agg.prune_end=0"])
        result = run_experiment(cfg, progress=False)
        run_dir = RunDir.open(result.run_dir)
        finals[he] = torch.load(run_dir.checkpoint_path, weights_only=False)["server"]["global_vec"]
        records[he] = list(run_dir.records("round"))
        round1[he] = load_file(str(run_dir.adapter_dir(1) / "adapter_model.safetensors"))
    info = records[True][-1]["aggregator_info"]
    assert info["secure_agg"] and info["he_kept_values"] == info["he_total_values"] == finals[True].numel()
    assert records[True][-1]["cosine"] is None and records[False][-1]["cosine"] is not None
    assert records[True][0]["client_weights"] == pytest.approx(records[False][0]["client_weights"])
    assert max(r["update_norm"] for r in records[False]) > 1e-3  # training really moved the adapter
    # each round's decrypted sum is the weighted FedAvg of what the clients sent, whatever their training did
    assert [r for r, _, _ in decrypted] == [1, 2] and len(sent) == 6
    for rnd, delta, _ in decrypted:
        reference = sum(w * u for r, u, w in sent if r == rnd)
        assert (delta - reference).abs().max().item() < 1e-6
        assert reference.abs().max().item() > 1e-3  # ... and that sum is not trivially zero
    _, delta, start = decrypted[1]  # and it is what the server applied
    assert (finals[True].double() - (start + delta)).abs().max().item() < 1e-6
    assert max((round1[True][k] - round1[False][k]).abs().max().item() for k in round1[False]) < 1e-6
    diff = finals[True] - finals[False]
    assert diff.abs().max().item() < 1e-3 and (diff.norm() / finals[False].norm()).item() < 1e-3


def test_tiny_fl_rounds_with_pruning_he_on_matches_plaintext(tiny, test_seed):
    """Two FedAvg rounds of real local training with pruning 0.2 -> 0.5: HE == plaintext with the same masks."""
    from fedsafe.models import attach_lora

    model, tok = tiny
    peft_model = attach_lora(model, r=4, alpha=8, seed=test_seed)
    flat = FlatLoRA(peft_model)
    start = flat.get()
    num_samples, rounds = [8, 16, 40], 2
    prune_start, prune_end = 0.2, 0.5
    secure = SecureAggregator(CKKSParams(), prune_start, prune_end, rounds, specs=flat.specs)

    def local_update(global_vec, client, rnd):
        flat.set(global_vec)
        opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
        g = torch.Generator().manual_seed(1000 * test_seed + 100 * rnd + client)
        ids = torch.randint(0, len(tok), (4, 12), generator=g)
        for _ in range(2):
            loss = peft_model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        return flat.get() - global_vec

    # Both aggregations see the same round inputs (the plaintext trajectory): two separately trained runs
    # would start round 2 from adapters that differ by CKKS noise (~1e-9), enough to reorder near-tied
    # magnitudes in round 2's pruning mask and so prune different coordinates, on some seed or machine.
    global_vec = start.clone()
    for rnd in range(1, rounds + 1):
        updates = torch.stack([local_update(global_vec, k, rnd) for k in range(3)])
        with_he, info = secure.aggregate(global_vec, updates, num_samples, rnd)
        ratio = pruning_schedule(rnd, rounds, prune_start, prune_end)
        mask = pruning_mask(global_vec, ratio, flat.specs)
        delta = ((fedavg_weights(num_samples)[:, None] * updates.double()).sum(0) * mask).float()
        assert info["he_mask_digest"] == mask_digest(mask) and int(mask.sum()) < flat.numel  # same mask, pruned
        assert (with_he - delta).abs().max().item() < 1e-6
        assert torch.all(with_he[~mask] == 0) and delta.abs().max().item() > 1e-3  # training moved the adapter
        global_vec = global_vec + delta


def test_encrypted_result_survives_a_flower_message(keys):
    """The HE path crosses the plain client/server boundary: a Flower message carries the ciphertext bytes."""
    pytest.importorskip("flwr")
    from fedsafe.engines.flower.codec import decode_result, encode_result
    from fedsafe.fl.client import ClientResult, RoundConfig

    d = 5000
    client = SecureAggClient(keys.client_context_bytes(), None, 0.0, 0.0, total_rounds=1)
    server = SecureAggServer(keys.server_context_bytes(), client.decrypt, CKKSParams(), MaskSchedule(None, 0, 0, 1))
    global_vec, updates = torch.zeros(d), lora_scale_updates(2, d, seed=14)
    rc = RoundConfig(round=1, lr=0.0, local_steps=1, batch_size=1, total_samples=30)
    sent = [client.encrypt_result(ClientResult(f"c{k}", updates[k], 10 * (k + 1), {"loss": 1.0}), global_vec, rc)
            for k in range(2)]
    received = [decode_result(encode_result(r)) for r in sent]
    assert received[0].update.numel() == 0 and received[0].extra[WIRE_KEY]["ciphertexts"] == sent[0].extra[WIRE_KEY][
        "ciphertexts"]
    delta, stats = server.aggregate(received, global_vec, round=1)
    reference = (10 * updates[0].double() + 20 * updates[1].double()) / 30
    assert not stats["dropped"] and (delta.double() - reference).abs().max().item() < 1e-6


# --- key files of a deployment (`fedsafe flower keys`) ----------------------------------------------------

@pytest.fixture(scope="module")
def key_files(tmp_path_factory):
    from fedsafe.defenses.secure_aggregation.keys import write_key_files

    return write_key_files(CKKSParams(), tmp_path_factory.mktemp("keys"))


def test_key_files_give_the_secret_key_to_the_clients_only(key_files):
    import os
    import stat

    from fedsafe.defenses.secure_aggregation.keys import read_key_file

    server = read_key_file(key_files.server, "server", CKKSParams())
    clients = read_key_file(key_files.clients, "clients", CKKSParams())
    assert server.key_id == clients.key_id == key_files.key_id
    assert stat.S_IMODE(os.stat(key_files.clients).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(key_files.server).st_mode) == 0o644
    assert sorted(p.name for p in key_files.clients.parent.iterdir()) == ["clients.ctx", "server.ctx"]  # no temp
    assert not load_context(server.context).is_private() and load_context(clients.context).is_private()
    # a round with the files alone: clients encrypt, the server sums, the server cannot decrypt, a client can
    d = 3000
    updates, global_vec = lora_scale_updates(2, d, seed=21), torch.randn(d) * 0.05
    mask = pruning_mask(global_vec, 0.3)
    encrypted = [encrypt_update(clients.context, updates[k], w, mask) for k, w in enumerate((0.25, 0.75))]
    agg = aggregate_encrypted(server.context, encrypted)
    with pytest.raises(ConfigError, match="secret-key"):
        decrypt_aggregate(server.context, agg, mask)
    delta = decrypt_aggregate(clients.context, agg, mask)
    reference = 0.25 * updates[0].double() + 0.75 * updates[1].double()
    assert (delta.double() - reference)[mask].abs().max().item() < 1e-6


def test_key_files_are_not_overwritten_by_accident(tmp_path):
    from fedsafe.defenses.secure_aggregation.keys import write_key_files

    first = write_key_files(CKKSParams(), tmp_path)
    with pytest.raises(ConfigError, match="--force"):
        write_key_files(CKKSParams(), tmp_path)
    assert write_key_files(CKKSParams(), tmp_path, overwrite=True).key_id != first.key_id


def test_bad_key_files_are_refused_with_a_reason(key_files, tmp_path, caplog):
    import json
    import logging

    from fedsafe.defenses.secure_aggregation.keys import _header, read_key_file

    def broken(name: str, data: bytes):
        path = tmp_path / name
        path.write_bytes(data)
        return path

    raw_clients, raw_server = key_files.clients.read_bytes(), key_files.server.read_bytes()
    head_end = raw_clients.index(b"\n", raw_clients.index(b"\n") + 1) + 1
    meta = json.loads(raw_clients.split(b"\n")[1])
    secret_body, public_body = raw_clients[head_end:], raw_server[raw_server.index(b"\n", 30) + 1:]
    cases = [
        (tmp_path / "absent.ctx", "clients", "no such file"),
        (broken("garbage.ctx", bytes(range(256)) * 8), "clients", "not a fedsafe CKKS key file"),
        (broken("truncated.ctx", raw_clients[:-500]), "clients", "damaged"),
        (broken("header.ctx", raw_clients[:head_end - 5] + b"\n" + secret_body), "clients", "header is damaged"),
        (key_files.clients, "server", "holds the secret key"),  # the secret file given to the server
        (key_files.server, "clients", "public context"),  # the public file given to a node
        # a header that lies about the role: the server still never accepts a secret key
        (broken("liar.ctx", _header("server", meta["key_id"], CKKSParams(), secret_body) + secret_body), "server",
         "holds the secret key"),
        (broken("resized.ctx", _header("server", meta["key_id"], CKKSParams(poly_modulus_degree=16384), public_body)
                + public_body), "server", "modified"),
    ]
    for path, role, message in cases:
        with pytest.raises(ConfigError, match=message):
            read_key_file(path, role)
    with pytest.raises(ConfigError, match=r"secure_agg\.ckks is N=16384"):  # keys made for other CKKS parameters
        read_key_file(key_files.clients, "clients", CKKSParams(poly_modulus_degree=16384))
    readable = broken("readable.ctx", raw_clients)
    readable.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="fedsafe"):
        read_key_file(readable, "clients")
    assert "chmod 600" in caplog.text


def test_flower_keys_command_writes_the_key_set(tmp_path):
    pytest.importorskip("flwr")
    from typer.testing import CliRunner

    from fedsafe.defenses.secure_aggregation.keys import read_key_file
    from fedsafe.engines.flower.cli import flower_app

    out = tmp_path / "keys"
    result = CliRunner().invoke(flower_app, ["keys", "--out", str(out), "--set", "secure_agg.enabled=true",
                                             "--set", "secure_agg.ckks.global_scale=1073741824"])
    assert result.exit_code == 0, result.output
    assert "SECRET" in result.output and str(out / "server.ctx") in result.output
    params = CKKSParams(global_scale=2.0 ** 30)  # the config's parameters reach the files
    assert read_key_file(out / "clients.ctx", "clients", params).key_id == read_key_file(out / "server.ctx",
                                                                                         "server", params).key_id
    again = CliRunner().invoke(flower_app, ["keys", "--out", str(out)])
    assert again.exit_code != 0 and isinstance(again.exception, ConfigError)


# --- no decryption of a sum of fewer than secure_agg.min_clients clients ----------------------------------

def _encrypted_results(client, global_vec, updates, samples, rc):
    from fedsafe.fl.client import ClientResult

    return [client.encrypt_result(ClientResult(f"c{k}", updates[k], samples[k]), global_vec, rc)
            for k in range(len(samples))]


def test_server_refuses_to_decrypt_fewer_than_min_clients(keys):
    """In process: with one kept ciphertext nothing is decrypted; delta is None and the stats say why."""
    from fedsafe.defenses.secure_aggregation.protocol import DecryptRefused
    from fedsafe.fl.client import RoundConfig

    d = 3000
    global_vec, updates, samples = torch.randn(d) * 0.05, lora_scale_updates(3, d, seed=31), [10, 20, 30]
    client = SecureAggClient(keys.client_context_bytes(), None, 0.2, 0.2, total_rounds=1)
    asked = []

    def key_holder(aggregate, g, rnd):
        asked.append(aggregate.num_clients)
        return client.decrypt(aggregate, g, rnd)

    server = SecureAggServer(keys.server_context_bytes(), key_holder, CKKSParams(), MaskSchedule(None, 0.2, 0.2, 1))
    assert server.min_clients == client.min_clients == 2  # the default
    rc = RoundConfig(round=1, lr=0.0, local_steps=1, batch_size=1, total_samples=sum(samples))
    results = _encrypted_results(client, global_vec, updates, samples, rc)
    bad = dict(results[1].extra[WIRE_KEY])
    bad["ciphertexts"] = [bad["ciphertexts"][0][:1000]]  # corrupted: dropped
    results[1].extra[WIRE_KEY] = bad
    results[2].extra = {WIRE_ERROR_KEY: "could not encrypt"}  # dropped
    delta, stats = server.aggregate(results, global_vec, round=1)
    assert delta is None and asked == []  # the key holder was never asked
    assert "1 of 3 encrypted updates kept, fewer than secure_agg.min_clients=2" in stats["skipped"]
    assert [x["client_id"] for x in stats["dropped"]] == ["c1", "c2"]  # still listed
    assert stats["client_weights"] == [0.0, 0.0, 0.0] and stats["kept"] == [] and stats["update_norm"] == 0.0
    assert stats["aggregator_info"]["skipped"] == stats["skipped"]
    # two kept: decrypted, the weighted FedAvg of the two
    results = _encrypted_results(client, global_vec, updates, samples, rc)
    delta, stats = server.aggregate(results[:2], global_vec, round=1)
    mask = client.mask(global_vec, 1)
    reference = (10 * updates[0].double() + 20 * updates[1].double()) / 30
    assert "skipped" not in stats and asked == [2] and (delta.double() - reference)[mask].abs().max() < 1e-6
    # a higher minimum refuses the same two
    strict = SecureAggServer(keys.server_context_bytes(), key_holder, CKKSParams(), MaskSchedule(None, 0.2, 0.2, 1),
                             min_clients=3)
    delta, stats = strict.aggregate(results[:2], global_vec, round=1)
    assert delta is None and "min_clients=3" in stats["skipped"] and asked == [2]
    # a server that would decrypt one (min_clients=1) still gets nothing from a key holder that refuses
    lax = SecureAggServer(keys.server_context_bytes(), key_holder, CKKSParams(), MaskSchedule(None, 0.2, 0.2, 1),
                          min_clients=1)
    delta, stats = lax.aggregate(results[:1], global_vec, round=1)
    assert delta is None and asked == [2, 1]
    assert stats["skipped"].startswith("the key holder refused to decrypt a sum of 1 client update(s)")
    # the stacked helper refuses too, rather than returning one client's update
    with pytest.raises(DecryptRefused, match="fewer than secure_agg.min_clients=2"):
        SecureAggregator(CKKSParams(), 0.0, 0.0, 1, key_holder=keys).aggregate(global_vec, updates[:1], [5], 1)


def test_key_holder_refuses_to_decrypt_a_sum_of_fewer_than_min_clients(keys):
    """decrypt_aggregate checks the aggregate's client count (and names) before it decrypts anything."""
    from fedsafe.defenses.secure_aggregation.protocol import CiphertextSum, DecryptRefused

    d = 3000
    updates, global_vec = lora_scale_updates(2, d, seed=32), torch.randn(d) * 0.05
    mask = pruning_mask(global_vec, 0.3)
    client, server = keys.client_context_bytes(), keys.server_context_bytes()
    enc = [encrypt_update(client, updates[k], 0.5, mask, client_id=f"c{k}") for k in range(2)]
    single = aggregate_encrypted(server, enc[:1])
    assert single.num_clients == 1 and single.client_ids == ("c0",)
    with pytest.raises(DecryptRefused, match=r"refused to decrypt a sum of 1 client update\(s\), fewer than "
                                             r"secure_agg\.min_clients=2"):
        decrypt_aggregate(client, single, mask)
    # what it would have revealed: that client's own update
    revealed = decrypt_aggregate(client, single, mask, min_clients=1)
    assert (revealed.double() - updates[0].double())[mask].abs().max() < 1e-6
    pair = aggregate_encrypted(server, enc)
    assert decrypt_aggregate(client, pair, mask).shape == (d,)
    with pytest.raises(DecryptRefused, match="min_clients=3"):
        decrypt_aggregate(client, pair, mask, min_clients=3)
    # the same client's ciphertexts added twice do not make a sum of two
    total = CiphertextSum(server)
    total.add(enc[0])
    total.add(enc[0])
    with pytest.raises(DecryptRefused, match=r"names client\(s\) \['c0'\] more than once"):
        decrypt_aggregate(client, total.result(), mask)
    # a wire aggregate whose count or names were edited is refused as well
    wire = pair.to_wire()
    for edit, message in [({"num_clients": 1}, "claims to sum 1 clients but names 2"),
                          ({"num_clients": 1, "client_ids": ["c0"]}, "a sum of 1 client"),
                          ({"client_ids": ["c0", "c1", "c2"]}, "claims to sum 2 clients but names 3")]:
        with pytest.raises(DecryptRefused, match=re.escape(message)):
            decrypt_aggregate(client, EncryptedAggregate.from_wire({**wire, **edit}), mask)
    with pytest.raises(DecryptRefused):  # the client party's decrypt applies its min_clients
        SecureAggClient(client, None, 0.3, 0.3, 1).decrypt(single.to_wire(), global_vec, 1)
    with pytest.raises(ConfigError, match="secure_agg.min_clients"):
        decrypt_aggregate(client, pair, mask, min_clients=0)


@pytest.fixture
def task_identity():
    """Flower messages need a run/task identity; Flower sets it in its runtimes, tests set it here."""
    pytest.importorskip("flwr")
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield


def test_flower_key_holder_refuses_a_sum_of_fewer_than_its_minimum(key_files, task_identity):
    """A SuperNode's decrypt query: the node's own he-min-clients (default 2) holds even if the server's config
    says 1; the engine then skips the round instead of asking the next node."""
    from flwr.app import Context, Message, RecordDict

    from fedsafe.config import dump_config, load_config
    from fedsafe.defenses.secure_aggregation.keys import read_key_file
    from fedsafe.defenses.secure_aggregation.protocol import DecryptRefused
    from fedsafe.engines.flower import client_app, codec
    from fedsafe.engines.flower.server import FlowerEngine, round_min_results

    keys = read_key_file(key_files.clients, "clients", CKKSParams())
    server_ctx = read_key_file(key_files.server, "server", CKKSParams()).context
    d = 2000
    updates, global_vec = lora_scale_updates(2, d, seed=33), torch.zeros(d)
    mask = torch.ones(d, dtype=torch.bool)
    enc = [encrypt_update(keys.context, updates[k], 0.5, mask, client_id=f"client_0{k}") for k in range(2)]

    def ask(aggregate, min_clients_config, **node_config):
        cfg = load_config(None, ["secure_agg.enabled=true", f"secure_agg.min_clients={min_clients_config}",
                                 "fl.clients_per_round=2"])
        content = codec.encode_decrypt(aggregate, mask, 1, dump_config(cfg), "deployed", key_files.key_id)
        message = Message(content, dst_node_id=1000, message_type=codec.DECRYPT)
        context = Context(run_id=1, node_id=1000, state=RecordDict(), run_config={},
                          node_config={"partition-id": 0, "he-context": str(key_files.clients), **node_config})
        reply = client_app.handle_decrypt(message, context)
        return torch.from_numpy(reply.content["delta"]["vec"].numpy().copy())

    single = aggregate_encrypted(server_ctx, enc[:1])
    with pytest.raises(DecryptRefused, match="fewer than secure_agg.min_clients=2"):
        ask(single, 1)  # the config the server sent asks for 1: the node's floor of 2 wins
    assert (ask(single, 1, **{"he-min-clients": 1}).double() - updates[0].double()).abs().max() < 1e-6  # opted in
    pair = aggregate_encrypted(server_ctx, enc)
    assert (ask(pair, 2).double() - (updates[0].double() + updates[1].double()) / 2).abs().max() < 1e-6
    with pytest.raises(DecryptRefused, match="min_clients=3"):
        ask(pair, 2, **{"he-min-clients": 3})

    # the engine side: a refusing node ends the attempt (the round is skipped), no other node is asked
    cfg = load_config(None, ["secure_agg.enabled=true", "roles.0.clients=3"])
    engine = FlowerEngine(None, cfg, [], token="t")
    engine.node_of = {"client_00": 1000, "client_01": 1001}
    asked = []

    def refusing(node, aggregate, mask, round, timeout):
        asked.append(node)
        return None, "Flower error 0: refused to decrypt a sum of 1 client update(s), fewer than ..."

    engine._decrypt_on = refusing
    with pytest.raises(DecryptRefused, match=r"refused to decrypt \(SuperNode 1000, client client_00\)"):
        engine.decrypt(single, mask, 1)
    assert asked == [1000]
    # and a Flower round with fewer replies than the sum needs is skipped before anything is summed
    assert engine.min_results == 2 and "secure_agg.min_clients=2" in engine._min_results_why
    krum = load_config(None, ["roles.0.clients=6", "fl.clients_per_round=6", "aggregator.name=krum"])
    assert round_min_results(krum) == (5, "flower.min_results=1; aggregator krum needs 5")


def test_deployment_keys_come_from_the_plugin_hook_not_the_section_name(monkeypatch):
    """The Flower engine learns the key parameters and the key holders' minimum through Plugin.deployment_keys:
    secure aggregation declares its section's ckks and min_clients (enabled or not, for `fedsafe flower keys`),
    and a round's minimum follows whatever the hook returns."""
    from fedsafe.config import load_config
    from fedsafe.defenses.secure_aggregation.plugin import SecureAggregation
    from fedsafe.engines.flower.node import encrypted_keys
    from fedsafe.engines.flower.server import round_min_results
    from fedsafe.plugins import DeploymentKeys, deployment_keys

    off = load_config(None, [])
    on = load_config(None, ["secure_agg.enabled=true", "secure_agg.min_clients=3", "roles.0.clients=4",
                            "fl.clients_per_round=4"])
    from fedsafe.defenses.secure_aggregation.deployment import KEYRING

    assert deployment_keys(off) == DeploymentKeys("secure_agg", off.secure_agg.ckks, 2, enabled=False, keyring=KEYRING)
    assert encrypted_keys(off) is None and encrypted_keys(on).min_clients == 3
    assert deployment_keys(on).params == on.secure_agg.ckks
    assert round_min_results(on) == (3, "flower.min_results=1; secure_agg.min_clients=3")
    monkeypatch.setattr(SecureAggregation, "deployment_keys",
                        classmethod(lambda cls, config: DeploymentKeys("renamed", config.ckks, 4)))
    assert round_min_results(on) == (4, "flower.min_results=1; renamed.min_clients=4")
