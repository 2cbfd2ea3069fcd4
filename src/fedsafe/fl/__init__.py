"""fedsafe.fl."""
