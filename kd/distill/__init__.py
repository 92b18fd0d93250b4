"""Distillation: what a student learns from its teachers.

losses          logit losses (KL, DKD, DIST: SOFT_LOSSES), KnowledgeDistillationLoss, check_loss_config
feature_losses  feature / relational losses (MSE, attention, RKD: FEATURE_LOSSES)
hooks           forward hooks on named layers, adapters, --list-layers
teachers        TeacherEnsemble and CachedTeacher (one logits(batch)); loading and the checks at start
cache           the teacher's top-k logits per training view (FKD): format, key, reading; cache_build writes one
distiller       Distiller: the task the training loop runs when distilling
"""
