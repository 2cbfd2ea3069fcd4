"""Constrained local updates: ``config`` (the ``constrained`` section), ``plugin`` (the hook), ``loss_terms`` (the
L2 and KL terms added to the local loss)."""
