"""The run context: what every phase of a run reads, built once by pipeline.prepare and never changed.

Data flows one way: phases take the context (and the typed resume.Progress where they advance the run) and return
what they produce; nothing keeps a free-form progress dict. `spec` is the run's RunSpec (spec.py): the method,
the roles, the stages, the packet layout and the store, the same object `semalign plan` computes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from semalign_ds.cluster.distributed import DistInfo
from semalign_ds.config import RunConfig
from semalign_ds.data import TokenBlocks
from semalign_ds.spec import RunSpec

if TYPE_CHECKING:  # the engines import deepspeed lazily; the tokenizers come from transformers
    from transformers import PreTrainedTokenizerBase

    from semalign_ds.engines.teacher import GroupMPU, TeacherEngine
    from semalign_ds.run.supervision import VocabMap
    from semalign_ds.tracking import NullTracker


@dataclass(frozen=True)
class RunContext:
    cfg: RunConfig
    info: DistInfo  # this rank's place among the ranks of its role
    out: Path  # the directory the run writes (output_dir; the spool dir for `teach`)
    role: str  # colocated | writer (teach) | teacher | student (disaggregated student, or a spool reader)
    tracker: NullTracker
    tok_T: PreTrainedTokenizerBase
    tok_S: PreTrainedTokenizerBase
    student: torch.nn.Module  # trained in place, stage by stage
    teacher: TeacherEngine | None  # None where this rank holds no teacher (or the method needs none)
    blocks: TokenBlocks
    vocab: VocabMap
    spec: RunSpec
    group: torch.distributed.ProcessGroup | None = None  # this role's process group (None: the world)
    mpu: GroupMPU | None = None  # over `group` (None: the world)

    @property
    def writes(self) -> bool:
        """The rank that writes the run's files and logs to MLflow (teacher ranks of a split job never do)."""
        return self.info.is_main and self.role != "teacher"
