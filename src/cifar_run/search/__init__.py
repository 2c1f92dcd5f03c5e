"""Hyperparameter search: an Optuna study run as a Hydra sweep (hydra/sweeper=optuna)."""
