"""The run context: what every phase of a run reads, built once by pipeline.prepare and never changed.

Data flows one way: phases take the context (and the typed resume.Progress where they advance the run) and return
what they produce; nothing keeps a free-form progress dict.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from semalign_ds.config import RunConfig
from semalign_ds.data import TokenBlocks
from semalign_ds.cluster.distributed import DistInfo


@dataclass(frozen=True)
class RunContext:
    cfg: RunConfig
    info: DistInfo  # this rank's place among the ranks of its role
    out: Path  # the directory the run writes (output_dir; the spool dir for `teach`)
    role: str  # colocated | writer (teach) | teacher | student (disaggregated student, or a spool reader)
    tracker: object
    tok_T: object
    tok_S: object
    student: torch.nn.Module  # trained in place, stage by stage
    teacher: object | None  # engines.teacher.TeacherEngine; None where this rank holds no teacher
    blocks: TokenBlocks
    vocab: object  # supervision.VocabMap
    group: object = None  # this role's process group (None: the world)
    mpu: object = None  # engines.teacher.GroupMPU over `group` (None: the world)

    @property
    def writes(self) -> bool:
        """The rank that writes the run's files and logs to MLflow (teacher ranks of a split job never do)."""
        return self.info.is_main and self.role != "teacher"
