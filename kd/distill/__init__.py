"""Distillation: what a student learns from its teachers.

losses     logit losses (KL, DKD, DIST: SOFT_LOSSES) and KnowledgeDistillationLoss
hooks      forward hooks on named layers, adapters, --list-layers
teachers   the frozen teacher(s) and their ensemble; the sanity check
cache      the teacher's top-k logits per training view, computed once (FKD)
distiller  Distiller: the task the training loop runs when distilling
"""
