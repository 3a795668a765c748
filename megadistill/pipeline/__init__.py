"""The distillation pipeline: recipe -> DAG (experts -> merge -> final -> eval) -> SLURM or local.

Modules: ``recipe`` (typed recipe), ``dag`` (steps and their commands), ``step`` (per-rank step
runner), ``slurm`` (submit / status), ``local`` (run on one machine), ``process`` (process groups),
``lock`` (one run per folder). Nothing here imports torch.
"""

from megadistill.pipeline.dag import PipelineError, Step, build_dag, step_commands, write_plan
from megadistill.pipeline.recipe import PipelineRecipe, load_recipe, recipe_from_dict

__all__ = [
    "PipelineError",
    "PipelineRecipe",
    "Step",
    "build_dag",
    "load_recipe",
    "recipe_from_dict",
    "step_commands",
    "write_plan",
]
