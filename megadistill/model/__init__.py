"""The hybrid student: mLSTM + sliding-window attention with sinks, mixed per head.

Importing this package registers the student with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(student_dir)`` works offline after ``import megadistill.model``.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from megadistill.model.cache import HybridCache
from megadistill.model.configuration import HybridConfig
from megadistill.model.modeling import HybridForCausalLM, HybridModel

AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)

__all__ = ["HybridCache", "HybridConfig", "HybridForCausalLM", "HybridModel"]
