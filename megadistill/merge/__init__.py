"""Stage III: read ZeRO-3 expert checkpoints from disk and merge them into one Hugging Face model.

- :mod:`~megadistill.merge.torch_file`: lazy reads from ``torch.save`` files (no engine, no mmap).
- :mod:`~megadistill.merge.zero_reader`: :class:`ZeroCheckpoint`, any tensor slice of a ZeRO-3 tag.
- :mod:`~megadistill.merge.hf_reader` / :mod:`~megadistill.merge.hf_writer`: safetensors folders.
- :mod:`~megadistill.merge.merge`: :func:`merge_experts` (average, task arithmetic, TIES).
- :mod:`~megadistill.merge.tools`: inspect, consolidate, convert to a universal checkpoint.
"""

from megadistill.merge.merge import MergeConfig, consolidate, merge_experts
from megadistill.merge.zero_reader import TensorSpec, ZeroCheckpoint, resolve_tag_dir

__all__ = [
    "MergeConfig",
    "TensorSpec",
    "ZeroCheckpoint",
    "consolidate",
    "merge_experts",
    "resolve_tag_dir",
]
