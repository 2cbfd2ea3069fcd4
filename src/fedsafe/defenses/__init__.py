"""fedsafe.defenses: defense plug-ins (fedsafe.plugins) by name, and the mechanisms they drive."""


def get(name: str):
    """The defense plug-in class registered as ``name``."""
    from fedsafe.plugins import get as _get

    return _get(name, "defense")


def available() -> list[str]:
    """Names of the registered defense plug-ins."""
    from fedsafe.plugins import available as _available

    return _available("defense")
