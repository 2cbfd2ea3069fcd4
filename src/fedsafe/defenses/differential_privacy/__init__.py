"""Differential privacy: ``config`` (the ``dp`` section), ``plugin`` (the hooks), ``mechanism`` (DP-FedAvg at the
server, DP-SGD at the clients, the accountant)."""
