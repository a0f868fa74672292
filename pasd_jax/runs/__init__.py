"""A training run on disk: its Orbax checkpoints, the models they hold, and reading them back as full PASD models.

`train` writes runs and `sampling` / `convert export` read them; both stand on this floor, so inference never
imports the training package.
"""
