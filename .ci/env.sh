# Sourced by .ci/test, .ci/demo and .ci/canary: which environment to set up and use.
# MEGADISTILL_LATEST=1 selects the drift canary's .venv-latest (today's newest allowed releases)
# instead of .venv (the tested set in constraints.txt).
if [ "${MEGADISTILL_LATEST:-0}" = "1" ]; then
    VENV=.venv-latest
    SETUP_ARGS=(--latest)
else
    VENV=.venv
    SETUP_ARGS=()
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
