"""fedsafe.engines."""
