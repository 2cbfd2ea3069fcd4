"""What an honest-but-curious server learns from the updates it sees (issue 20).

- :mod:`.update_mia`: update-level membership inference (loss drop caused by an update, reference-calibrated);
- :mod:`.reconstruction`: DAGER-style text reconstruction from the LoRA A factors of a single-step update;
- :mod:`.plugin`: the ``server_view_attack`` plug-in (section ``server_view``) that runs both on every view the
  server has of a round: individual updates, a clipped and noised update, the (securely aggregated) sum.
"""
