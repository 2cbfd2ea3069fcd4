"""Privacy extraction from the trained model: ``config`` (the ``privacy`` section), ``plugin`` (the hooks),
``extraction`` (canaries, the extraction attacks and membership inference), ``cli`` (``fedsafe attack``)."""
