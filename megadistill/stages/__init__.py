"""Training stages: stage I alignment, stage II distillation, their losses and teacher targets.

Modules are imported directly (``megadistill.stages.losses``, ``megadistill.stages.teacher_targets``)
so that importing the package stays light.
"""
