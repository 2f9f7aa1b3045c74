"""Teacher-student distillation: losses, students built from a teacher, the objective, ``distill()`` and the stage.

Importing the package registers the ``distill`` recipe stage.
"""

from slimtune.compress.distill.distill import DistillResult, Distillation, distill, prepare_distillation
from slimtune.compress.distill.losses import attention_kl, embedding_loss, hidden_mse, soft_kl
from slimtune.compress.distill.objective import (DistillationModel, DistillConfig, DistillObjective, LossWeights,
                                                 TeacherCache, uniform_layer_map)
from slimtune.compress.distill.stage import Distill
from slimtune.compress.distill.student import StudentSpec, build_student

__all__ = ["Distill", "DistillConfig", "DistillObjective", "DistillResult", "Distillation", "DistillationModel",
           "LossWeights", "StudentSpec", "TeacherCache", "attention_kl", "build_student", "distill", "embedding_loss",
           "hidden_mse", "prepare_distillation", "soft_kl", "uniform_layer_map"]
