"""Conversion teacher -> initial hybrid student, fingerprints, and parameter inspection.

The student reuses every teacher weight under the same name and adds only the new parameters
(feature maps and gates), initialised from a seed: the same teacher + seed always gives the same
student, identified by its fingerprint (sha256 over the architecture: every hybrid setting and the
teacher config; and over every parameter's name, dtype, shape, bytes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from megadistill.errors import CheckpointError, MegadistillError
from megadistill.hybrid import HybridSettings
from megadistill.integrity import atomic_dir, default_modes
from megadistill.model import HybridConfig, HybridForCausalLM
from megadistill.model.remote_code import write_remote_code
from megadistill.teachers.registry import adapter_for

log = logging.getLogger(__name__)
CONFIGS_DIR = Path(__file__).parent / "configs"
INIT_FILE = "megadistill_init.json"
# Non-persistent buffers and tied copies that a teacher state dict may carry.
_IGNORED_TEACHER_KEYS = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")


# Config keys that describe a file, not what the model computes.
_BOOKKEEPING_KEYS = frozenset(
    ("_name_or_path", "architectures", "auto_map", "dtype", "torch_dtype", "transformers_version",
     "use_cache", "output_attentions", "output_hidden_states", "return_dict")
)  # fmt: skip


def architecture(config: dict[str, Any]) -> dict[str, Any]:
    """What a student computes besides its weights, from its config dict: every hybrid setting
    (``HYBRID_KEYS``: window, sinks, feature dim, gate mode, backends, ...) and every field of the
    teacher config it carries (sliding windows, layer types, RoPE, ...), minus bookkeeping keys.
    Keys are ``window`` or ``teacher_config.sliding_window``; values are JSON-normalised."""
    from megadistill.hybrid import HYBRID_KEYS

    arch: dict[str, Any] = {key: config.get(key) for key in HYBRID_KEYS}
    teacher = config.get("teacher_config") or {}
    arch.update(
        {f"teacher_config.{k}": v for k, v in teacher.items() if k not in _BOOKKEEPING_KEYS}
    )
    return json.loads(json.dumps(arch, sort_keys=True, default=str))


def architecture_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """The first architecture field (see :func:`architecture`) where two student configs
    differ, as ``"field: A vs B"``; None when they agree."""
    arch_a, arch_b = architecture(a), architecture(b)
    for key in sorted(set(arch_a) | set(arch_b)):
        if arch_a.get(key) != arch_b.get(key):
            return f"{key}={arch_a.get(key)!r} vs {key}={arch_b.get(key)!r}"
    return None


def _digest_architecture(digest: Any, config: dict[str, Any]) -> None:
    digest.update(b"architecture|" + json.dumps(architecture(config), sort_keys=True).encode())


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the architecture (:func:`architecture`, for a student) and (name, dtype,
    shape, bytes) of every parameter, in name order: students that differ in weights, window,
    sinks, backends or any other hybrid setting get different fingerprints."""
    digest = hashlib.sha256()
    if isinstance(getattr(model, "config", None), HybridConfig):
        _digest_architecture(digest, model.config.to_dict())
    for name, p in sorted(model.state_dict().items()):
        t = p.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
    return digest.hexdigest()


def check_teacher_config(cfg: PretrainedConfig) -> None:
    """Refuse configs the student cannot reproduce, naming the field."""
    reason = adapter_for(cfg.model_type).refusal(cfg)
    if reason is not None:
        raise MegadistillError(f"teacher config of {cfg.model_type} is not supported: {reason}")
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


def hybrid_overrides(
    overrides: list[str] | tuple[str, ...], base: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``key=value`` hybrid settings (the dotted overrides of every config) over ``base``,
    checked against :class:`~megadistill.hybrid.HybridSettings`; ``seed`` passes through.

    Returns:
        the given settings by name (those not given keep their defaults).
    """
    from megadistill.config import apply_overrides, from_dict

    try:
        given = apply_overrides(dict(base or {}), overrides)
        from_dict(HybridSettings, {k: v for k, v in given.items() if k != "seed"})
    except ValueError as exc:
        raise MegadistillError(f"hybrid settings: {exc}") from exc
    return given


def convert_pretrained(
    teacher_path: str | Path,
    out_dir: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Convert a teacher folder into a student folder, shard by shard, never holding a model.

    The student's shared weights are the teacher's tensors under the same names, so the teacher's
    safetensors shards are linked (or copied) as they are; the new parameters (a small fraction)
    are generated layer by layer into one extra shard, and a new index maps every name. Peak
    memory is one layer's new parameters plus one tensor while fingerprinting. The folder is
    written atomically with checksums.
    """
    hybrid = hybrid_overrides(overrides)
    seed = int(hybrid.pop("seed", seed))
    teacher_path, out_dir = Path(teacher_path), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise MegadistillError(
            f"output {out_dir} already exists; remove it or choose another --out"
        )
    cfg = _teacher_config(teacher_path)
    try:
        student_cfg = HybridConfig.from_teacher(cfg, **hybrid)
    except ValueError as exc:
        raise MegadistillError(str(exc)) from exc
    teacher_files = weight_index(teacher_path)
    with torch.device("meta"):
        skeleton = HybridForCausalLM(student_cfg)
    expected = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
    new_names = set(skeleton.new_parameter_names())
    if _converted_on_load(cfg, teacher_files, expected):
        return _convert_in_memory(teacher_path, out_dir, hybrid, seed, overwrite)
    _check_streamed_weights(teacher_path, teacher_files, expected, new_names, student_cfg)
    dtype = _stored_dtype(teacher_path, teacher_files)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        new = _new_parameters(skeleton, seed, dtype)
        _write_weights(tmp, teacher_path, teacher_files, new)
        student_cfg.dtype = str(dtype).removeprefix("torch.")
        student_cfg.save_pretrained(tmp)
        write_remote_code(tmp)
        _copy_side_files(teacher_path, tmp)
        fp = _fingerprint_folder(tmp, expected, student_cfg)
        meta = {"fingerprint": fp, "seed": seed, "teacher": str(teacher_path.resolve()),
                "hybrid": hybrid}  # fmt: skip
        (tmp / INIT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("converted %s -> %s (fingerprint %s)", teacher_path, out_dir, fp[:12])
    return out_dir


def _converted_on_load(cfg: PretrainedConfig, files: dict[str, str], expected: dict) -> bool:
    """True when transformers changes this checkpoint's layout on load (a mixture of experts
    stored one expert per tensor, fused into 3-D tensors by transformers 5): its shards cannot be
    linked as they are."""
    if adapter_for(cfg.model_type).moe == "none":
        return False
    return any(".experts." in n and n not in files for n in expected)


def _convert_in_memory(
    teacher_path: Path, out_dir: Path, hybrid: dict[str, Any], seed: int, overwrite: bool
) -> Path:
    """Convert a teacher loaded by transformers (peak memory: teacher + student, shared
    tensors), for checkpoints whose stored layout is not the loaded one."""
    from transformers import AutoModelForCausalLM

    log.info("%s stores its experts per expert: converting in memory", teacher_path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype="auto")
    try:
        student, fp = convert(teacher, seed=seed, **hybrid)
    except ValueError as exc:
        raise MegadistillError(str(exc)) from exc
    del teacher
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        student.save_pretrained(tmp)
        _copy_side_files(teacher_path, tmp)
        meta = {"fingerprint": fp, "seed": seed, "teacher": str(teacher_path.resolve()),
                "hybrid": hybrid}  # fmt: skip
        (tmp / INIT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("converted %s -> %s (fingerprint %s)", teacher_path, out_dir, fp[:12])
    return out_dir


def _copy_side_files(teacher_path: Path, folder: Path) -> None:
    for name in _SIDE_FILES:
        src = teacher_path / name
        if src.is_file():
            # copyfile, not copy2: the copy gets the umask's mode, not the teacher file's.
            shutil.copyfile(src, folder / name)


_SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja",
)  # fmt: skip
NEW_PARAMS_FILE = "model-hybrid-new-parameters.safetensors"


def _teacher_config(path: Path) -> PretrainedConfig:
    if not (path / "config.json").is_file():
        raise CheckpointError(f"teacher folder {path} has no config.json")
    cfg = AutoConfig.from_pretrained(path)
    check_teacher_config(cfg)
    return cfg


def weight_index(path: Path) -> dict[str, str]:
    """Tensor name -> safetensors file name of a Hugging Face folder (index or lone files),
    with clear errors for a corrupt index, a listed file that is missing, or no weights."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is corrupt: {exc}") from exc
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"weight file {path / missing[0]} listed in the index is missing")
        return dict(weight_map)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"folder {path} has no weight files (*.safetensors); convert .bin "
            "checkpoints with `save_pretrained(..., safe_serialization=True)` first"
        )
    out = {}
    for f in files:
        for name in _safetensors_header(f):
            out[name] = f.name
    return out


def _safetensors_header(file: Path) -> dict[str, Any]:
    """The header of a safetensors file (name -> dtype, shape, offsets), validated."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length out of range")
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"weight file {file} is corrupt or truncated: {exc}") from exc
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"weight file {file} is truncated ({size} bytes, its header needs {8 + n + end})"
        )
    return header


_ST_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


def _check_streamed_weights(
    path: Path,
    files: dict[str, str],
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
    new_names: set[str],
    cfg: HybridConfig,
) -> None:
    headers = {f: _safetensors_header(path / f) for f in sorted(set(files.values()))}
    for name, file in files.items():
        if name not in expected:
            continue  # e.g. stale rotary buffers: transformers ignores them on load
        shape = tuple(headers[file][name]["shape"])
        if shape != expected[name][0]:
            raise MegadistillError(
                f"teacher weight '{name}' in {file} has shape {shape} but config.json implies "
                f"{expected[name][0]}: mismatched head_dim/heads in config.json?"
            )
    tied = cfg.tie_word_embeddings
    missing = [
        n for n in expected
        if n not in files and n not in new_names and not (tied and n == "lm_head.weight")
    ]  # fmt: skip
    if missing:
        raise MegadistillError(f"teacher is missing weight '{missing[0]}' ({len(missing)} in all)")


def _stored_dtype(path: Path, files: dict[str, str]) -> torch.dtype:
    name = next(n for n in sorted(files) if n.endswith(("q_proj.weight", "qkv_proj.weight")))
    code = _safetensors_header(path / files[name])[name]["dtype"]
    if code not in _ST_DTYPES:
        raise MegadistillError(
            f"teacher weights have dtype {code}; expected one of {list(_ST_DTYPES)}"
        )
    return _ST_DTYPES[code]


def _new_parameters(
    skeleton: HybridForCausalLM, seed: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The new parameters, initialised layer by layer exactly as ``init_new_parameters`` does."""
    from megadistill.model.attention import NEW_PARAMETER_MODULES
    from megadistill.model.modeling import layer_generator

    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(skeleton.model.layers):
        attn = layer.self_attn
        mods = [m for m in NEW_PARAMETER_MODULES if hasattr(attn, m)]  # softmax layers: none
        for mod in mods:
            getattr(attn, mod).to_empty(device="cpu")
        attn.init_new_parameters(layer_generator(seed, i))
        for mod in mods:
            for pname, p in getattr(attn, mod).named_parameters():
                out[f"model.layers.{i}.self_attn.{mod}.{pname}"] = p.detach().to(dtype).clone()
            getattr(attn, mod).to("meta")
    return out


def _link_or_copy(src: Path, dst: Path, mode: int) -> None:
    """Hard-link ``src`` to ``dst`` (no copy; it is never written to) when ``src`` grants at
    least ``mode``, the mode a new file gets in ``dst``'s folder; else copy it.

    A link shares the teacher's inode and so its mode: a private (0o600) teacher would give a
    student that nobody else can read, and a chmod of the link would change the teacher. A
    teacher readable by more people than the umask asks for is linked (a 7B teacher's shards
    are 15 GB: copying them only to take a read bit away is not worth the disk)."""
    have = stat.S_IMODE(src.stat().st_mode)
    if have & mode == mode:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another filesystem, or the kernel refuses links to this file: copy
    else:
        log.info("copying %s (mode %o, new files get %o) instead of linking it", src, have, mode)
    shutil.copyfile(src, dst)


def _write_weights(
    tmp: Path, teacher: Path, files: dict[str, str], new: dict[str, torch.Tensor]
) -> None:
    from safetensors.torch import save_file

    mode = default_modes(tmp)[0]
    for f in sorted(set(files.values())):
        _link_or_copy(teacher / f, tmp / f, mode)
    save_file(new, str(tmp / NEW_PARAMS_FILE), metadata={"format": "pt"})
    weight_map = {**files, **{k: NEW_PARAMS_FILE for k in new}}
    total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    single = tmp / "model.safetensors"
    if single.exists() and "model.safetensors" in files.values():
        # transformers prefers an index over a lone model.safetensors only when the name differs.
        os.replace(single, tmp / "model-teacher.safetensors")
        weight_map = {k: ("model-teacher.safetensors" if v == "model.safetensors" else v)
                      for k, v in weight_map.items()}  # fmt: skip
        index["weight_map"] = dict(sorted(weight_map.items()))
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _fingerprint_folder(folder: Path, expected: dict[str, Any], cfg: HybridConfig) -> str:
    """:func:`fingerprint` of the model a folder loads into, one tensor at a time."""
    from safetensors import safe_open

    tied = cfg.tie_word_embeddings
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    digest = hashlib.sha256()
    _digest_architecture(digest, cfg.to_dict())
    for name in sorted(expected):
        src = "model.embed_tokens.weight" if tied and name == "lm_head.weight" else name
        with safe_open(folder / weight_map[src], framework="pt") as fh:
            t = fh.get_tensor(src).contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
    return digest.hexdigest()


RECIPES_DIR = Path(__file__).parent.parent / "recipes"
# Hub ids of the shipped configs, so recipes naming the real model can be planned offline. A
# shipped config and the recipe for that teacher share one name (``olmo3_7b``).
HUB_IDS = {
    "allenai/Olmo-3-1025-7B": "olmo3_7b",
    "meta-llama/Llama-3.1-8B": "llama31_8b",
    "Qwen/Qwen2.5-7B-Instruct": "qwen25_7b_instruct",
}


def shipped_configs() -> dict[str, Path]:
    """Real 7B-class teacher configs shipped with the package (facts, no weights)."""
    return {p.stem: p for p in sorted(CONFIGS_DIR.glob("*.json"))}


def shipped_recipes() -> dict[str, Path]:
    """Pipeline recipes shipped with the package, by name (``megadistill/recipes/<name>.yaml``)."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def recipe_teacher(name: str) -> tuple[str, dict[str, Any]] | None:
    """The teacher and hybrid settings of the shipped recipe ``name``; None if no such recipe."""
    from megadistill.config import load_yaml

    path = shipped_recipes().get(name)
    if path is None or Path(name).exists():
        return None
    data = load_yaml(path)
    return str(data["teacher"]), dict(data.get("hybrid") or {})


def load_teacher_config(name_or_path: str | Path) -> PretrainedConfig:
    """A teacher config from a shipped name or recipe name, a Hub id of a shipped config, a
    config.json, or a model folder."""
    shipped = shipped_configs()
    recipe = recipe_teacher(str(name_or_path))
    if recipe is not None and str(name_or_path) not in shipped:
        name_or_path = recipe[0]
    name = HUB_IDS.get(str(name_or_path), str(name_or_path))
    if name in shipped and not Path(name_or_path).exists():
        path = shipped[name]
    else:
        path = Path(name_or_path)
        path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise MegadistillError(
            f"no teacher config at {name_or_path}; give a model folder, a config.json, or one of: "
            f"{', '.join(shipped)} (or a Hub id of one: {', '.join(HUB_IDS)})"
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
    """Human-readable teacher vs student parameter counts (a recipe name brings its hybrid
    settings; ``overrides`` win)."""
    cfg = load_teacher_config(name_or_path)
    recipe = recipe_teacher(str(name_or_path))
    hybrid = hybrid_overrides(overrides, recipe[1] if recipe else None)
    hybrid.pop("seed", None)
    counts = count_parameters(cfg, **hybrid)
    share = counts["new"] / counts["student"]
    return (
        f"teacher   {cfg.model_type}: {counts['teacher']:>15,d} parameters\n"
        f"student   hybrid : {counts['student']:>15,d} parameters\n"
        f"new (feature maps + gates): {counts['new']:,d} ({share:.4%} of the student)"
    )
