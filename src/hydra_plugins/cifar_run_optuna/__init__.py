"""cifar-run's Hydra sweeper plugin: hydra/sweeper=optuna (conf/hydra/sweeper/optuna.yaml)."""
