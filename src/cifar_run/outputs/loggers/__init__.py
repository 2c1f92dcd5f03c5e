"""Experiment trackers fed by a run: steps.csv, TensorBoard event files, MLflow runs.

`Tracker` (tracker.py) is what run.py holds: it turns the loop's per-step losses into rows a
few times a second and hands rows, epochs and the final results to each chosen logger (the
`logger` config group). The run folder's own files do not depend on it.
"""
