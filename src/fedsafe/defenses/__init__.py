"""fedsafe.defenses."""
