"""fedsafe.evaluation."""

__all__ = ["detect_refusals", "refusal_scores", "detector_version", "DETECTOR_AGREEMENT"]


def __getattr__(name: str):
    # the refusal detector (numpy) is imported on first use, so that a light subpackage such as
    # fedsafe.evaluation.gate.config (read when a config validates) does not pull it in
    if name in __all__:
        from fedsafe.evaluation import refusal

        return getattr(refusal, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
