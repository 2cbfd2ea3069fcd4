"""Exceptions meant for people: each names the field, path or client that is wrong."""


class FedsafeError(Exception):
    """Base class of errors fedsafe reports to users without a traceback."""


class ConfigError(FedsafeError):
    """A configuration value, file path or field name is wrong."""


class DataError(FedsafeError):
    """A data source is missing, empty or lacks a mapped field."""


class UpdateRejected(FedsafeError):
    """A client update failed validation (NaN/Inf, wrong shape or dtype, norm too large)."""


DECRYPT_REFUSED = "refused to decrypt"  # starts every DecryptRefused message (a Flower error reason carries it)


class DecryptRefused(FedsafeError):
    """The key holder (or the server on its behalf) refuses to decrypt a sum of too few clients (secure
    aggregation; the Flower engine raises it when a SuperNode's reply says so, so it lives here)."""


def did_you_mean(name: str, known: list[str] | set[str] | tuple[str, ...]) -> str:
    """``"; did you mean fl.rounds?"`` for the known name closest to ``name`` (difflib), or ``""`` when none is close.

    ``name`` and ``known`` are dotted field paths; list indices in ``name`` (``roles.0.clients``) match the
    ``roles.N.clients`` form of ``known``. A name whose last part is a field of another section
    (``rounds`` -> ``fl.rounds``) is matched too.
    """
    import difflib
    import re

    known = sorted(set(known))
    generic = re.sub(r"\.\d+(?=\.|$)", ".N", name)
    best = difflib.get_close_matches(generic, known, n=1, cutoff=0.75)
    if not best:  # the right field in the wrong place, or a typo in the leaf only
        leaf = generic.rsplit(".", 1)[-1]
        parent = generic.rsplit(".", 1)[0] + "." if "." in generic else ""
        siblings = [k for k in known if k.startswith(parent) and "." not in k[len(parent):]]
        close = difflib.get_close_matches(leaf, [k[len(parent):] for k in siblings], n=1, cutoff=0.6)
        best = [parent + close[0]] if close else [k for k in known if k.rsplit(".", 1)[-1] == leaf][:1]
    if not best:
        return ""
    suggestion = best[0]
    if ".N" in suggestion and generic != name:  # give back the user's own indices
        for index in re.findall(r"\.(\d+)(?=\.|$)", name):
            suggestion = suggestion.replace(".N", f".{index}", 1)
    return f"; did you mean {suggestion}?"


def field_paths(model: type, prefix: str = "") -> dict:
    """Every dotted field path of a pydantic model class (lists as ``roles.N.field``) -> its FieldInfo, in
    declaration order: the candidates of :func:`did_you_mean` and the rows of ``fedsafe run --help-config``."""
    import typing

    from pydantic import BaseModel

    out: dict = {}

    def models_in(tp) -> list[tuple[type, str]]:
        origin = typing.get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return [(tp, "")]
        if origin in (list, tuple, set):
            return [(m, ".N" + suffix) for arg in typing.get_args(tp) for m, suffix in models_in(arg)]
        if origin is dict:
            return []
        return [m for arg in typing.get_args(tp) for m in models_in(arg)]  # Union, Optional, Annotated

    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        out[path] = info
        if prefix.count(".") > 6:  # recursive schemas (DataSource.exclude) stop here
            continue
        for sub, suffix in models_in(info.annotation):
            if sub is not model:
                out.update(field_paths(sub, f"{path}{suffix}."))
    return out
