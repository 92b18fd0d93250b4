"""Distillation: the logit and feature losses, feature hooks, the teachers (run online or read from a teacher cache)
and the Distiller, the task the training loop runs when distilling."""
