"""The code a student folder ships, so that Hugging Face tools load it like any custom-code model.

Every student folder (converted, a training run's ``final/``, a merge) holds two small modules
and an ``auto_map`` in its ``config.json``, as custom-code models on the Hub do, so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

works in a fresh process with nothing imported first (lm-eval's ``--model hf``, vLLM-style
loaders, notebooks). The modules are shims: they import the classes from the installed
``megadistill`` package, so the folder never carries a stale copy of the model code and a loaded
model is the package's own :class:`~megadistill.model.modeling.HybridForCausalLM`. Without the
package, transformers stops with "requires the following packages ...: megadistill".
"""

from __future__ import annotations

import json
from pathlib import Path

from megadistill.integrity import atomic_write_json, atomic_write_text

CONFIG_MODULE = "configuration_megadistill"
MODELING_MODULE = "modeling_megadistill"
AUTO_MAP = {
    "AutoConfig": f"{CONFIG_MODULE}.HybridConfig",
    "AutoModel": f"{MODELING_MODULE}.HybridModel",
    "AutoModelForCausalLM": f"{MODELING_MODULE}.HybridForCausalLM",
}
_HEADER = '''"""megadistill hybrid student: the classes come from the installed megadistill package
(pip install megadistill); this file lets transformers load the folder with trust_remote_code."""

'''
CODE_FILES = {
    f"{CONFIG_MODULE}.py": _HEADER + "from megadistill.model.configuration import HybridConfig\n\n"
    '__all__ = ["HybridConfig"]\n',
    f"{MODELING_MODULE}.py": _HEADER
    + "from megadistill.model.modeling import HybridForCausalLM, HybridModel\n\n"
    '__all__ = ["HybridForCausalLM", "HybridModel"]\n',
}


def write_remote_code(folder: str | Path) -> None:
    """Write the shim modules into ``folder`` and set ``auto_map`` in its ``config.json``."""
    folder = Path(folder)
    for name, text in CODE_FILES.items():
        atomic_write_text(folder / name, text)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    if config.get("auto_map") != AUTO_MAP:
        config["auto_map"] = dict(AUTO_MAP)
        atomic_write_json(config_file, config)
