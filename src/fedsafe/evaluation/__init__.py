"""fedsafe.evaluation."""

from fedsafe.evaluation.refusal import detect_refusals, detector_version, refusal_scores

__all__ = ["detect_refusals", "refusal_scores", "detector_version", "DETECTOR_AGREEMENT"]


def __getattr__(name: str):
    # the measured agreement of the shipped refusal detector with human labels, read on first use
    if name == "DETECTOR_AGREEMENT":
        from fedsafe.evaluation import refusal

        return refusal.DETECTOR_AGREEMENT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
