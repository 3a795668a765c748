"""Teacher families (adapters behind a registry) and conversion teacher -> student."""

from megadistill.teachers.registry import ADAPTERS, adapter_for, supported_families


def convert(teacher, seed: int = 0, **hybrid):
    """See :func:`megadistill.teachers.conversion.convert`."""
    from megadistill.teachers.conversion import convert as _convert

    return _convert(teacher, seed=seed, **hybrid)


__all__ = ["ADAPTERS", "adapter_for", "convert", "supported_families"]
