"""Training: stages, trainer, optimisation, AdaLRS, model soup."""
