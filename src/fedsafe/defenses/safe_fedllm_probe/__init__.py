"""The Safe-FedLLM probe (Tao et al., ACL 2026) as a defense: ``config`` (the ``probe`` section), ``plugin`` (the
hooks), ``shadow`` (the server's shadow clients). The classifier is a rule, :mod:`fedsafe.aggregators.probe`, with
its decision rules in :mod:`fedsafe.aggregators.probe_decision`."""
