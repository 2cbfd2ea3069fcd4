"""Exceptions meant for people: each names the field, path or client that is wrong."""


class FedsafeError(Exception):
    """Base class of errors fedsafe reports to users without a traceback."""


class ConfigError(FedsafeError):
    """A configuration value, file path or field name is wrong."""


class DataError(FedsafeError):
    """A data source is missing, empty or lacks a mapped field."""


class UpdateRejected(FedsafeError):
    """A client update failed validation (NaN/Inf, wrong shape or dtype, norm too large)."""
