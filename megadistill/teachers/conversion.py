"""Conversion teacher -> initial hybrid student, fingerprints, and parameter inspection.

The student reuses every teacher weight under the same name and adds only the new parameters
(feature maps and gates), initialised from a seed: the same teacher + seed always gives the same
student, identified by its fingerprint (sha256 over every parameter's name, dtype, shape, bytes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from megadistill.errors import CheckpointError, MegadistillError
from megadistill.integrity import atomic_dir
from megadistill.model import HybridConfig, HybridForCausalLM
from megadistill.teachers.registry import adapter_for

log = logging.getLogger(__name__)
CONFIGS_DIR = Path(__file__).parent / "configs"
INIT_FILE = "megadistill_init.json"
# Non-persistent buffers and tied copies that a teacher state dict may carry.
_IGNORED_TEACHER_KEYS = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every parameter, in name order."""
    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        t = p.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def check_teacher_config(cfg: PretrainedConfig) -> None:
    """Refuse configs the student cannot reproduce, naming the field."""
    adapter_for(cfg.model_type)
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if getattr(cfg, "head_dim", None) is None and cfg.hidden_size % heads:
        raise MegadistillError(
            f"teacher hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {heads}"
        )
    if heads % kv:
        raise MegadistillError(
            f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
        )
    if head_dim % 2:
        raise MegadistillError(f"head_dim {head_dim} must be even for RoPE")


def _check_teacher_weights(teacher_sd: dict[str, torch.Tensor], student: HybridForCausalLM) -> None:
    student_sd = student.state_dict()
    new = set(student.new_parameter_names())
    for name, t in teacher_sd.items():
        if name.endswith(_IGNORED_TEACHER_KEYS):
            continue
        if name not in student_sd:
            raise MegadistillError(f"teacher weight '{name}' has no place in the student")
        if tuple(t.shape) != tuple(student_sd[name].shape):
            raise MegadistillError(
                f"teacher weight '{name}' has shape {tuple(t.shape)} but its config implies "
                f"{tuple(student_sd[name].shape)}: mismatched head_dim/heads in config.json?"
            )
    tied = student.config.tie_word_embeddings
    missing = [
        n
        for n in student_sd
        if n not in teacher_sd and n not in new and not (tied and n == "lm_head.weight")
    ]
    if missing:
        raise MegadistillError(f"teacher is missing weight '{missing[0]}' ({len(missing)} in all)")


def convert(
    teacher: torch.nn.Module, seed: int = 0, **hybrid: Any
) -> tuple[HybridForCausalLM, str]:
    """Build the initial student of ``teacher``.

    Args:
        teacher: a transformers causal LM of a supported family.
        seed: seed of the new parameters.
        **hybrid: hybrid settings (window, num_sinks, gate_mode, ...; see HybridConfig).

    Returns:
        The student (same dtype as the teacher, eval mode) and its fingerprint.
    """
    check_teacher_config(teacher.config)
    cfg = HybridConfig.from_teacher(teacher.config, **hybrid)
    dtype = next(teacher.parameters()).dtype
    student = HybridForCausalLM(cfg).to(dtype)
    teacher_sd = teacher.state_dict()
    _check_teacher_weights(teacher_sd, student)
    sd = {k: v for k, v in teacher_sd.items() if not k.endswith(_IGNORED_TEACHER_KEYS)}
    missing, unexpected = student.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    student.init_new_parameters(seed)
    student.eval()
    return student, fingerprint(student)


def _parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    import yaml

    out = {}
    for text in overrides:
        if "=" not in text:
            raise MegadistillError(
                f"hybrid setting {text!r} must look like key=value (e.g. window=512)"
            )
        key, val = text.split("=", 1)
        out[key.strip()] = yaml.safe_load(val)
    return out


def load_teacher(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load a teacher from a Hugging Face folder, with clear errors for missing/corrupt files."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"teacher folder {path} has no config.json")
    cfg = AutoConfig.from_pretrained(path)
    check_teacher_config(cfg)
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise CheckpointError(f"teacher folder {path} has no weight files (*.safetensors or *.bin)")
    _check_weight_shapes(path, cfg)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"could not read the teacher weights in {path}: {exc}") from exc


def _check_weight_shapes(path: Path, cfg: PretrainedConfig) -> None:
    """Compare safetensors headers with the shapes config.json implies (meta device, no memory)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        expected = {
            k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()
        }
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt") as fh:
                for name in fh.keys():
                    shape = tuple(fh.get_slice(name).get_shape())
                    if name in expected and shape != expected[name]:
                        raise CheckpointError(
                            f"teacher weight '{name}' in {file.name} has shape {shape} but "
                            f"config.json implies {expected[name]}: mismatched head_dim/heads?"
                        )
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(
                f"teacher weight file {file} is corrupt or truncated: {exc}"
            ) from exc


def convert_pretrained(
    teacher_path: str | Path,
    out_dir: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Convert a teacher folder into a student folder (written atomically, with checksums)."""
    hybrid = _parse_overrides(overrides)
    seed = int(hybrid.pop("seed", seed))
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise MegadistillError(
            f"output {out_dir} already exists; remove it or choose another --out"
        )
    teacher = load_teacher(teacher_path)
    try:
        student, fp = convert(teacher, seed=seed, **hybrid)
    except ValueError as exc:
        raise MegadistillError(str(exc)) from exc
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        student.save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json"):  # fmt: skip
            src = Path(teacher_path) / name
            if src.is_file():
                shutil.copy2(src, tmp / name)
        meta = {"fingerprint": fp, "seed": seed, "teacher": str(Path(teacher_path).resolve()),
                "hybrid": hybrid}  # fmt: skip
        (tmp / INIT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("converted %s -> %s (fingerprint %s)", teacher_path, out_dir, fp[:12])
    return out_dir


def shipped_configs() -> dict[str, Path]:
    """Real 7B-class teacher configs shipped with the package (facts, no weights)."""
    return {p.stem: p for p in sorted(CONFIGS_DIR.glob("*.json"))}


def load_teacher_config(name_or_path: str | Path) -> PretrainedConfig:
    """A teacher config from a shipped name, a config.json, or a model folder."""
    shipped = shipped_configs()
    if str(name_or_path) in shipped:
        path = shipped[str(name_or_path)]
    else:
        path = Path(name_or_path)
        path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise MegadistillError(
            f"no teacher config at {name_or_path}; give a model folder, a config.json, or one of: "
            f"{', '.join(shipped)}"
        )
    data = json.loads(path.read_text())
    if "model_type" not in data:
        raise MegadistillError(f"{path} has no model_type")
    adapter_for(data["model_type"])
    return AutoConfig.for_model(data.pop("model_type"), **data)


def count_parameters(teacher_cfg: PretrainedConfig, **hybrid: Any) -> dict[str, int]:
    """Teacher and student parameter counts, built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    check_teacher_config(teacher_cfg)
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(teacher_cfg)
        student = HybridForCausalLM(HybridConfig.from_teacher(teacher_cfg, **hybrid))
    new = set(student.new_parameter_names())
    count_t = sum(p.numel() for p in teacher.parameters())
    count_s = sum(p.numel() for p in student.parameters())
    count_new = sum(p.numel() for n, p in student.named_parameters() if n in new)
    return {"teacher": count_t, "student": count_s, "new": count_new}


def inspect_teacher(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """Human-readable teacher vs student parameter counts."""
    cfg = load_teacher_config(name_or_path)
    hybrid = _parse_overrides(overrides)
    counts = count_parameters(cfg, **hybrid)
    share = counts["new"] / counts["student"]
    return (
        f"teacher   {cfg.model_type}: {counts['teacher']:>15,d} parameters\n"
        f"student   hybrid : {counts['student']:>15,d} parameters\n"
        f"new (feature maps + gates): {counts['new']:,d} ({share:.4%} of the student)"
    )
