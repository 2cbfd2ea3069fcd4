"""The post-hoc defense (Ye et al.): after training, fine-tune the global adapter on aligned and normal rows.
``config`` (the ``posthoc`` section), ``plugin`` (the hook), ``finetune`` (the data and the fine-tuning)."""
