#!/bin/bash
#SBATCH --job-name=megadistill-olmo3_7b
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:15:00
#SBATCH --output=megadistill-olmo3_7b-%j.out
#
# Distil Olmo-3-7B into a hybrid xLSTM student: submits the recipe's whole DAG (one array task per
# expert running stage I + II on its nodes -> merge -> final distillation -> evaluation, each
# `afterok` on the previous) and exits; the pipeline's own jobs do the work.
#
#   sbatch slurm/distill_olmo7b.sh [OVERRIDES...]    e.g. resources.expert.partition=gpu
#   megadistill pipeline status RUN_DIR              where each job stands, and why
#   RUN_DIR=runs/olmo3_7b-123 sbatch slurm/distill_olmo7b.sh   resume an ended run (same overrides)
#
# Submit from the repository root (or set MEGADISTILL_HOME). Environment:
#   RECIPE   the recipe (default: megadistill/recipes/olmo3_7b.yaml)
#   RUN_DIR  the run directory on a shared filesystem (default: runs/olmo3_7b-<job id>)
#   PYTHON   an interpreter with megadistill installed (default: python3)
set -euo pipefail

home=${MEGADISTILL_HOME:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
cd "$home"
recipe=${RECIPE:-megadistill/recipes/olmo3_7b.yaml}
run_dir=${RUN_DIR:-runs/olmo3_7b-${SLURM_JOB_ID:-$(date +%Y%m%d-%H%M%S)}}

exec "${PYTHON:-python3}" -m megadistill.cli pipeline submit "$recipe" --run-dir "$run_dir" "$@"
