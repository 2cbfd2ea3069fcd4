"""Secure aggregation with CKKS: ``config`` (the ``secure_agg`` section), ``plugin`` (the hooks), ``params`` (CKKS
parameters and the rule check), ``keys`` (key files of a deployment), ``protocol`` (the parties and the wire format),
``pruning`` (the mask schedule)."""
