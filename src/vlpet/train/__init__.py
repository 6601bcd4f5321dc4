"""Training and evaluation: the paper's multitask recipe (spec §4), checkpoints, resume, metrics."""
