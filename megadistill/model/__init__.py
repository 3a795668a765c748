"""The hybrid student: mLSTM + sliding-window attention with sinks, mixed per head.

Every student folder ships ``auto_map`` and two shim modules (see :mod:`.remote_code`), so
``AutoModelForCausalLM.from_pretrained(student_dir, trust_remote_code=True)`` works in a fresh
process. Importing this package also registers the student with transformers' Auto classes, so
after ``import megadistill.model`` the folder loads without ``trust_remote_code``.
"""

from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from megadistill.model.cache import HybridCache
from megadistill.model.configuration import HybridConfig
from megadistill.model.modeling import HybridForCausalLM, HybridModel

AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)


def load_tokenizer(folder: str | Path, **kwargs: Any) -> Any:
    """The tokenizer of a teacher or student folder, loaded without running the folder's code.

    A student folder's ``config.json`` names its classes in ``auto_map``; loaded before the student
    is registered (the import of this package does that), transformers would ask on the terminal
    whether to run that code, and wait for an answer.
    """
    return AutoTokenizer.from_pretrained(str(folder), **kwargs)


__all__ = ["HybridCache", "HybridConfig", "HybridForCausalLM", "HybridModel", "load_tokenizer"]
