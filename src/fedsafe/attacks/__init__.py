"""fedsafe.attacks."""
