"""fedsafe.attacks: attack plug-ins (fedsafe.plugins) by name, and the mechanisms they drive."""


def get(name: str):
    """The attack plug-in class registered as ``name``."""
    from fedsafe.plugins import get as _get

    return _get(name, "attack")


def available() -> list[str]:
    """Names of the registered attack plug-ins."""
    from fedsafe.plugins import available as _available

    return _available("attack")
