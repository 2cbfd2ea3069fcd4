"""fedsafe.aggregators."""
