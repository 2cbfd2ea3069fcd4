"""fedsafe.evaluation."""
