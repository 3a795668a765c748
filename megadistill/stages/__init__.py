"""Training stages, one module each: :mod:`.align` (stage I), :mod:`.distill` (stage II),
:mod:`.teacher_targets` (the teacher's offline top-k targets); what they share (engines, trainer,
checkpoints) is :mod:`.runner`, the stage II loss :mod:`.losses`, their configs :mod:`.config`.

Modules are imported directly (``megadistill.stages.align``, ...) so that importing the package
stays light. Exporting a stage's final student is the pipeline's step
(:mod:`megadistill.pipeline.stage`): nothing here imports the merge package.
"""
