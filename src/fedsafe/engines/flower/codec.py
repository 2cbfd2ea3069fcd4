"""The Flower engine's codec: plain fedsafe objects <-> Flower records (tensors -> ArrayRecord, scalars and bytes ->
ConfigRecord), and the message types the server and the SuperNodes exchange.

Every message carries a ``fedsafe`` ConfigRecord (:func:`run_meta`): the experiment config as YAML, the run token
and the server's CKKS key id when secure aggregation is on.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # never phone home from experiments

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402

from fedsafe.errors import FedsafeError  # noqa: E402
from fedsafe.fl.client import ClientResult, RoundConfig  # noqa: E402

TRAIN = "train"
QUERY = "query"
DECRYPT = "query.decrypt"  # a key-holding SuperNode decrypts the round's encrypted sum (secure aggregation)

_SCALARS = (bool, int, float, str, bytes)


def to_array(t: torch.Tensor) -> Array:
    """A tensor as a Flower Array (on the CPU; half precisions as float32)."""
    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return Array(np.ascontiguousarray(t.numpy()))


def _is_config_value(v) -> bool:
    if isinstance(v, _SCALARS):
        return True
    if isinstance(v, list) and v and all(isinstance(x, _SCALARS) for x in v):
        return len({type(x) for x in v}) == 1
    return False


_SEP = "::"  # nested dict keys: "outer::inner"


def encode_values(values: dict, arrays: ArrayRecord, config: ConfigRecord, what: str) -> None:
    """Put a (nested) dict of tensors / scalars / bytes / JSON-able values into an ArrayRecord and a ConfigRecord."""
    nulls: list[str] = []
    dicts: list[str] = []

    def put(prefix: str, mapping: dict) -> None:
        for key, v in mapping.items():
            full = prefix + str(key)
            if v is None:
                nulls.append(full)
            elif isinstance(v, dict):
                dicts.append(full)
                put(full + _SEP, v)
            elif isinstance(v, torch.Tensor):
                arrays[full] = to_array(v)
            elif isinstance(v, np.ndarray):
                arrays[full] = Array(np.ascontiguousarray(v))
            elif _is_config_value(v):
                config[full] = v
            else:
                try:
                    config["json:" + full] = json.dumps(v)
                except TypeError as exc:
                    raise FedsafeError(f"{what}[{full!r}] of type {type(v).__name__} cannot travel in a Flower "
                                       "message (use tensors, bytes, numbers, strings, dicts or JSON-able "
                                       "values)") from exc

    put("", values)
    if nulls:
        config["__none__"] = nulls
    if dicts:
        config["__dicts__"] = dicts


def decode_values(arrays: ArrayRecord | None, config: ConfigRecord | None) -> dict:
    """Inverse of :func:`encode_values` (tensors come back as torch tensors on the CPU)."""
    flat: dict = {}
    config = dict(config or {})
    for key in config.pop("__dicts__", []):
        flat[key] = {}
    for key in config.pop("__none__", []):
        flat[key] = None
    for key, arr in (arrays or {}).items():
        flat[key] = torch.from_numpy(np.array(arr.numpy(), copy=True))
    for key, v in config.items():
        if key.startswith("json:"):
            flat[key[5:]] = json.loads(v)
        else:
            flat[key] = v
    out: dict = {}
    for key in sorted(flat, key=lambda k: k.count(_SEP)):  # parents before children
        *parents, leaf = key.split(_SEP)
        node = out
        for part in parents:
            node = node[part]
        node[leaf] = flat[key]
    return out


def run_meta(config_yaml: str, token: str, he_key_id: str | None, **more) -> ConfigRecord:
    """The ``fedsafe`` record every message carries: experiment config, run token, the server's HE key id."""
    meta = {**more, "config": config_yaml, "token": token}
    if he_key_id is not None:
        meta["he_key_id"] = he_key_id
    return ConfigRecord(meta)


def encode_train(global_vec: torch.Tensor, rc: RoundConfig, client_id: str, config_yaml: str,
                 token: str, he_key_id: str | None = None) -> RecordDict:
    """The content of a train message: global adapter, round config and which client to train."""
    rc_arrays, rc_config = ArrayRecord(), ConfigRecord()
    encode_values({f.name: getattr(rc, f.name) for f in dataclasses.fields(rc)}, rc_arrays, rc_config,
                  "RoundConfig")
    return RecordDict({"global": ArrayRecord({"vec": to_array(global_vec)}),
                       "rc_arrays": rc_arrays, "rc": rc_config,
                       "fedsafe": run_meta(config_yaml, token, he_key_id, client_id=client_id)})


def decode_train(content: RecordDict) -> tuple[torch.Tensor, RoundConfig, str, str, str]:
    """(global_vec, round config, client id, experiment config YAML, run token) from a train message."""
    global_vec = torch.from_numpy(np.array(content["global"]["vec"].numpy(), copy=True))
    known = {f.name for f in dataclasses.fields(RoundConfig)}
    values = decode_values(content["rc_arrays"], content["rc"])
    rc = RoundConfig(**{k: v for k, v in values.items() if k in known})
    meta = content["fedsafe"]
    return global_vec, rc, meta["client_id"], meta["config"], meta["token"]


def encode_result(res: ClientResult) -> RecordDict:
    """A client's reply: update vector, extra (tensors/bytes), metrics and sample count."""
    extra_arrays, extra_config = ArrayRecord(), ConfigRecord()
    encode_values(res.extra, extra_arrays, extra_config, "ClientResult.extra")
    numeric = {k: float(v) if isinstance(v, float) else v for k, v in res.metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    other = {k: v for k, v in res.metrics.items() if k not in numeric}
    return RecordDict({"update": ArrayRecord({"vec": to_array(res.update)}),
                       "extra_arrays": extra_arrays, "extra": extra_config,
                       "metrics": MetricRecord(numeric),
                       "result": ConfigRecord({"client_id": res.client_id, "num_samples": int(res.num_samples),
                                               "metrics_json": json.dumps(other, default=str)})})


def decode_result(content: RecordDict) -> ClientResult:
    """Inverse of :func:`encode_result`; raises KeyError/ValueError on a malformed reply."""
    update = torch.from_numpy(np.array(content["update"]["vec"].numpy(), copy=True))
    meta = content["result"]
    metrics = dict(content["metrics"]) if "metrics" in content else {}
    metrics.update(json.loads(meta.get("metrics_json", "{}")))
    extra = decode_values(content.get("extra_arrays"), content.get("extra"))
    return ClientResult(str(meta["client_id"]), update, int(meta["num_samples"]), metrics, extra)


def encode_decrypt(aggregate, mask: torch.Tensor, round: int, config_yaml: str, token: str,
                   he_key_id: str | None = None) -> RecordDict:
    """The content of a ``query.decrypt`` message: the encrypted sum (with its client count), the round's mask."""
    arrays, config = ArrayRecord(), ConfigRecord()
    encode_values(aggregate.to_wire(), arrays, config, "EncryptedAggregate")
    return RecordDict({"mask": ArrayRecord({"mask": to_array(mask)}), "aggregate_arrays": arrays,
                       "aggregate": config, "fedsafe": run_meta(config_yaml, token, he_key_id, round=int(round))})


