"""The Triton pin: the ``triton`` mLSTM backend is refused with one line where it cannot run (no
triton, triton >= 3.8 without block pointers, CPU tensors without the interpreter), falling back
to ``chunkwise`` with one warning, or raising at the start of GPU training."""

import logging

import pytest
import torch

from megadistill.config import ConfigError
from megadistill.errors import MegadistillError
from megadistill.hybrid import HybridSettings
from megadistill.model import HybridConfig, backends
from megadistill.model.mlstm import mlstm_forward
from megadistill.teachers.tiny import tiny_teacher_config


@pytest.fixture
def triton_version(monkeypatch):
    """Set the installed triton's version as the backend check reads it (None: not installed)."""
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def set_version(version, torch_version="2.13.0+cpu"):
        monkeypatch.setattr(backends, "_triton_version", lambda: version)
        monkeypatch.setattr(backends, "_torch_version", lambda: torch_version)

    return set_version


def test_status_names_the_version_to_install(triton_version):
    triton_version(None)
    assert "pip install triton==3.7.1" in backends.triton_backend_status("cuda")
    for newer in ("3.8.0", "3.9.0+git1a2b3c", "4.0.1"):
        triton_version(newer)
        why = backends.triton_backend_status("cuda")
        assert f"triton {newer} removed the block pointers" in why
        assert "pip install triton==3.7.1" in why
    for usable in ("3.7.1", "3.7.0", "3.3.1"):
        triton_version(usable)
        assert backends.triton_backend_status("cuda") is None


def test_a_torch_that_requires_triton_3_8_is_named_with_the_torch_to_install(triton_version):
    # torch 2.14.1's wheels require triton~=3.8.0: the pinned triton alone would break torch
    for torch_version in ("2.14.1", "2.14.1+cu130", "2.15.0"):
        triton_version("3.8.0", torch_version)
        why = backends.triton_backend_status("cuda")
        assert f"torch {torch_version} requires triton >= 3.8" in why
        assert "pip install 'torch==2.13.*' triton==3.7.1" in why
        triton_version(None, torch_version)
        assert "pip install 'torch==2.13.*' triton==3.7.1" in backends.triton_backend_status("cpu")


def test_cpu_tensors_need_the_interpreter(triton_version, monkeypatch):
    triton_version("3.7.1")
    assert "TRITON_INTERPRET=1" in backends.triton_backend_status("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.triton_backend_status("cpu") is None


def test_forward_falls_back_to_chunkwise_with_one_warning(triton_version, caplog):
    triton_version("3.9.0")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 4, generator=g) for _ in range(3))
    gates = [torch.randn(1, 2, 12, generator=g) + 3 for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="megadistill.model.backends"):
        h, _ = mlstm_forward(q, k, v, *gates, backend="triton", chunk_size=16)
        h2, _ = mlstm_forward(q, k, v, *gates, backend="triton", chunk_size=16)
    ref, _ = mlstm_forward(q, k, v, *gates, backend="chunkwise", chunk_size=16)
    assert torch.equal(h, ref) and torch.equal(h2, ref)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "triton 3.9.0" in warnings[0] and "using 'chunkwise'" in warnings[0]


def test_gpu_training_start_refuses_an_unusable_triton(triton_version, caplog):
    triton_version("3.8.0")
    with pytest.raises(MegadistillError, match=r"triton==3\.7\.1.*'chunkwise'") as err:
        backends.require_mlstm_backend("triton", "cuda")
    assert "\n" not in str(err.value)
    backends.require_mlstm_backend("chunkwise", "cuda")  # nothing to check
    with caplog.at_level(logging.WARNING, logger="megadistill.model.backends"):
        backends.require_mlstm_backend("triton", "cpu")  # CPU: falls back, warns once
    assert len(caplog.records) == 1
    triton_version("3.7.1")
    backends.require_mlstm_backend("triton", "cuda")


def test_settings_refuse_what_the_kernel_cannot_run():
    for chunk in (8, 24):
        with pytest.raises(ConfigError, match="power of 2 >= 16"):
            HybridSettings(mlstm_backend="triton", chunk_size=chunk)
    HybridSettings(mlstm_backend="triton", chunk_size=64)
    HybridSettings(mlstm_backend="chunkwise", chunk_size=24)
    teacher = tiny_teacher_config("llama")  # head_dim 16
    HybridConfig.from_teacher(teacher, mlstm_backend="triton", chunk_size=16)
    with pytest.raises(ValueError, match="feature_dim and head_dim >= 16"):
        HybridConfig.from_teacher(teacher, mlstm_backend="triton", chunk_size=16, feature_dim=8)
