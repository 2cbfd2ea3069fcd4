"""The release gate: may this adapter ship? ``config`` (the policy schema, light), ``verdict`` (measure and
decide, the ``fedsafe gate`` command), ``plugin`` (the same check after a run's training)."""
