"""Training (torch): data sets, attacks, the adversarial epoch, ADMM, checkpoints, multi-process runs."""
