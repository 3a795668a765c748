"""One training stage as the pipeline (and ``megadistill align|distill``) runs it: train, then
export the final student.

The stage (:mod:`megadistill.stages`) trains and checkpoints; exporting ``out_dir/final`` (an HF
folder consolidated from the last ZeRO-3 checkpoint, carrying the initial student's fingerprint)
is this step's, so the stages never touch the merge package.
"""

from __future__ import annotations

import logging
from pathlib import Path

from megadistill.stages.config import StageConfig
from megadistill.trainer import TrainResult

log = logging.getLogger(__name__)


def export_final(cfg: StageConfig, result: TrainResult) -> Path | None:
    """Consolidate the last checkpoint into out_dir/final, carrying the init fingerprint (rank 0
    writes, every rank waits); None when nothing is exported (disabled, preempted, no step)."""
    from megadistill.engine.distributed import barrier, rank
    from megadistill.integrity import write_manifest
    from megadistill.merge.merge import consolidate
    from megadistill.stages.runner import INIT_FILE

    final = Path(cfg.out_dir) / "final"
    if not cfg.export_final or result.preempted or result.last_checkpoint is None:
        return None
    if rank() == 0:
        consolidate(str(result.last_checkpoint), str(final), overwrite=True, tokenizer=cfg.student)
        init = Path(cfg.student) / INIT_FILE
        if init.is_file():
            (final / INIT_FILE).write_text(init.read_text())
            write_manifest(final)
        log.info("consolidated student written to %s", final)
    barrier()
    return final


def run_stage(cfg: StageConfig) -> TrainResult:
    """Run ``cfg.stage`` on every rank, then export its final student (see :func:`export_final`)."""
    if cfg.stage == "align":
        from megadistill.stages.align import run_align as run
    else:
        from megadistill.stages.distill import run_distill as run
    result = run(cfg)
    export_final(cfg, result)
    return result
