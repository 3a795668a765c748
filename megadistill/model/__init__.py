"""The hybrid student: mLSTM + sliding-window attention with sinks, mixed per head.

Every student folder ships ``auto_map`` and two shim modules (see :mod:`.remote_code`), so
``AutoModelForCausalLM.from_pretrained(student_dir, trust_remote_code=True)`` works in a fresh
process. Importing this package also registers the student with transformers' Auto classes, so
after ``import megadistill.model`` the folder loads without ``trust_remote_code``.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from megadistill.model.cache import HybridCache
from megadistill.model.configuration import HybridConfig
from megadistill.model.modeling import HybridForCausalLM, HybridModel

AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)

__all__ = ["HybridCache", "HybridConfig", "HybridForCausalLM", "HybridModel"]
