"""Glue between the run config and the method: vocabulary map, semantic bases and M (cached), packets.

Legend: ids_BT (student ids), M_DsDt (alignment map), S_DV (semantic basis: hidden x vocab).
Different tokenizers: the shared set is the intersection of token strings; the teacher reads the student's
token sequence translated through that map, so every transfer token must be shared (checked up front).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from semalign_ds import data as datamod
from semalign_ds.method import basis as basismod
from semalign_ds.models.adapters import get_adapter
from semalign_ds.models.loading import torch_dtype
from semalign_ds.progress import phase
from semalign_ds.transport import schema
from semalign_ds.transport.packet import SupervisionPacket


@dataclass
class VocabMap:
    ids_T: torch.Tensor  # shared teacher ids, index-aligned with ids_S
    ids_S: torch.Tensor
    s2t: torch.Tensor | None  # student id -> teacher id (-1 unshared); None when the tokenizers are the same

    def to_teacher(self, ids_BT: torch.Tensor) -> torch.Tensor:
        return ids_BT if self.s2t is None else self.s2t.to(ids_BT.device)[ids_BT]


def vocab_map(cfg, tok_T, tok_S, student, blocks: datamod.TokenBlocks, teacher_vocab_size: int) -> VocabMap:
    V_S = get_adapter(student, "student.path").vocab_size
    ids_T, ids_S = basismod.shared_vocabulary(tok_T, tok_S, cfg.method.min_shared_tokens, teacher_vocab_size, V_S)
    if cfg.method.top_k > ids_T.numel():
        raise ValueError(f"method.top_k={cfg.method.top_k} is larger than the shared vocabulary "
                         f"({ids_T.numel()} tokens); lower method.top_k")
    same = ids_T.numel() == ids_S.numel() and torch.equal(ids_T, ids_S) and tok_T.get_vocab() == tok_S.get_vocab()
    if same:
        return VocabMap(ids_T, ids_S, None)
    s2t = torch.full((V_S,), -1, dtype=torch.long)
    s2t[ids_S] = ids_T
    used = torch.unique(blocks.ids_NT[blocks.mask_NT])
    missing = used[s2t[used] < 0]
    if missing.numel():
        sample = tok_S.convert_ids_to_tokens(missing[:5].tolist())
        raise ValueError(f"{missing.numel()} token types of the transfer data (e.g. {sample}) are not in the "
                         f"teacher's vocabulary, so the teacher cannot read the student's tokens; use a student "
                         f"tokenizer whose tokens the teacher's vocabulary contains")
    return VocabMap(ids_T, ids_S, s2t)


def _cache_dir() -> Path:
    return Path(os.environ.get("SEMALIGN_CACHE", Path.home() / ".cache" / "semalign_ds")) / "bases"


def semantic_basis(weight_VD: torch.Tensor, kind: str, random_basis: bool, seed: int) -> torch.Tensor:
    """S (D x V), cached on disk keyed by a hash of the weights and the kind."""
    if random_basis:
        gen = torch.Generator().manual_seed(seed)
        S = torch.randn(weight_VD.shape[1], weight_VD.shape[0], generator=gen)
        return S / S.norm(dim=0, keepdim=True)
    path = _cache_dir() / f"{kind}-{basismod.basis_cache_key(weight_VD)}.safetensors"
    if path.is_file():
        return load_file(path)["S"]
    S = basismod.output_basis(weight_VD) if kind == "output" else basismod.input_basis(weight_VD)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"S": S.contiguous()}, tmp)
    os.replace(tmp, path)
    return S


def build_map(r, table) -> torch.Tensor | None:
    """M = S_S S_T^T over the shared vocabulary (D_S x D_T), on the run's device; None for the hidden_mse
    baseline, whose packets carry the unaligned teacher residuals (its projection is learned by the student)."""
    cfg = r.cfg
    if cfg.method.layer_objective == "hidden_mse":
        return None
    kind = cfg.method.basis
    teacher_w = r.teacher.head_weight() if kind == "output" else r.teacher.input_embedding_weight()
    adapter = get_adapter(r.student)
    student_w = adapter.head_weight() if kind == "output" else adapter.embed.weight
    with phase("semantic bases + alignment map", r):
        S_T = semantic_basis(teacher_w.detach().float().cpu(), kind, cfg.method.random_basis, cfg.seed + 1)
        S_S = semantic_basis(student_w.detach().float().cpu(), kind, cfg.method.random_basis, cfg.seed + 2)
        M = basismod.alignment_map(S_T, S_S, r.vocab.ids_T, r.vocab.ids_S)
    return M.to(r.info.device)


def target_kind(cfg) -> str:
    return "state" if cfg.method.layer_objective == "fisher_logits" else "residual"


def rank_batch(r, seed: int, index: int, rank: int | None = None, world: int | None = None) -> datamod.Batch:
    """Rank `rank`'s slice (default: this rank's) of global micro-batch `index` under `seed`, the global batch
    being micro_batch_size * `world` rows (default: this role's ranks). A pure function: resume recomputes it."""
    rank = r.info.rank if rank is None else rank
    world = r.info.world_size if world is None else world
    batch = datamod.batch_at(r.blocks, r.cfg.data.micro_batch_size * world, seed, index)
    return datamod.shard_for_rank(batch, rank, world)


def rows_batch(r, first: int, count: int) -> datamod.Batch:
    """Samples first..first+count-1 in sample-id order (the spool writer's order)."""
    b = r.blocks
    return datamod.Batch(b.sample_ids_N[first:first + count], b.ids_NT[first:first + count],
                         b.mask_NT[first:first + count])


def binding(r, table=None, M_DsDt: torch.Tensor | None = None) -> dict:
    """The hashes that bind packets to this configuration (transport/schema.py); `pairing` and `map` only
    where the pairing table and M are at hand (the teacher side)."""
    cfg, m = r.cfg, r.cfg.method
    kind = target_kind(cfg)
    attributed = cfg.pairing.manual is None and cfg.pairing.critical_layer
    b = {"schema": str(schema.SCHEMA_VERSION),
         "teacher": schema.model_fingerprint(cfg.teacher.path, cfg.teacher.dtype, weights=False),
         "student": schema.model_fingerprint(cfg.student.path, cfg.student.dtype),
         "data": schema.tensor_digest(r.blocks.ids_NT, r.blocks.mask_NT),
         "method": schema.digest({"top_k": m.top_k, "tau": m.tau, "target_dtype": m.target_dtype, "basis": m.basis,
                                  "random_basis": m.random_basis, "seed": cfg.seed if m.random_basis else None,
                                  "min_shared_tokens": m.min_shared_tokens, "logits": needs_teacher_logits(cfg),
                                  "kind": kind, "layer_objective": m.layer_objective}),
         "pairing_config": schema.digest({"pairing": vars(cfg.pairing), "residual": m.residual, "kind": kind,
                                          "seed": cfg.seed if attributed else None})}
    if schema.weight_files(cfg.teacher.path):
        b["teacher_weights"] = schema.model_fingerprint(cfg.teacher.path)
    if table is not None:
        b["pairing"] = schema.digest([table.to_json(), m.residual, kind])
    if M_DsDt is not None:
        b["map"] = schema.tensor_digest(M_DsDt.float())
    return b


def needs_teacher_targets(cfg) -> bool:
    return cfg.method.layer_objective != "none" and cfg.method.w_layer > 0


def needs_teacher_logits(cfg) -> bool:
    return cfg.method.output_objective == "kl" and cfg.method.w_out > 0


def emit(r, batch: datamod.Batch, recipes: dict, M_DsDt: torch.Tensor) -> SupervisionPacket:
    """One teacher pass -> the packet for this batch (colocated transport: in memory)."""
    cfg, dev = r.cfg, r.info.device
    if not (needs_teacher_logits(cfg) or needs_teacher_targets(cfg)):  # e.g. SFT: the teacher has nothing to add
        return SupervisionPacket(ids_BT=batch.ids_BT.to(dev), mask_BT=batch.mask_BT.to(dev),
                                 sample_ids_B=batch.sample_ids_B.to(dev))
    recipes = recipes if needs_teacher_targets(cfg) else {}
    ids_T = r.vocab.to_teacher(batch.ids_BT).to(dev)
    packet = r.teacher.emit(
        ids_T, batch.mask_BT.to(dev), batch.sample_ids_B, recipes, M_DsDt,
        top_k=cfg.method.top_k, tau=cfg.method.tau, need_logits=needs_teacher_logits(cfg),
        target_dtype=torch_dtype(cfg.method.target_dtype),
        logit_ids_T=None if r.vocab.s2t is None else r.vocab.ids_T,
        logit_ids_S=None if r.vocab.s2t is None else r.vocab.ids_S,
    )
    packet.ids_BT = batch.ids_BT.to(dev)
    r.progress["teacher_passes"] = r.progress.get("teacher_passes", 0) + batch.ids_BT.shape[0] / max(1, len(r.blocks))
    return packet


def stage_plan(cfg, stages: list[int], steps_per_stage: int) -> list[tuple[int, list[int], int]]:
    """(stage id, trainable student layers, optimizer steps) per stage. frontier: one layer per stage;
    full (baselines): every listed layer in one stage (id = the last) for the same total number of steps."""
    if cfg.schedule.mode == "full":
        return [(stages[-1], list(stages), steps_per_stage * len(stages))]
    return [(k, [k], steps_per_stage) for k in stages]


def _teacher_hidden(cfg) -> int | None:
    if cfg.method.layer_objective != "hidden_mse":
        return None
    from semalign_ds.models.loading import load_config

    config = load_config(cfg.teacher.path, "teacher.path", cfg.teacher.trust_remote_code)
    return int(config.get_text_config().hidden_size)


def stage_kwargs(r, total_steps: int, train_layers: list[int] | None = None) -> dict:
    from semalign_ds.engines.ds_config import load_template, student_ds_config
    from semalign_ds.engines.student import ObjectiveSpec
    from semalign_ds import resume

    cfg, s = r.cfg, r.cfg.schedule
    template = load_template(resume.find_template(cfg.student_engine.ds_config, "student_engine.ds_config"))
    ds = student_ds_config(template, bf16=cfg.student.dtype == "bfloat16", micro_batch=cfg.data.micro_batch_size,
                           grad_accum=s.grad_accum, world_size=r.info.world_size, grad_clip=s.grad_clip,
                           hidden_size=get_adapter(r.student).hidden_size)
    m = cfg.method
    objective = ObjectiveSpec(layer_objective=m.layer_objective, output_objective=m.output_objective, tau=m.tau,
                              w_layer=m.w_layer, w_out=m.w_out, w_label=m.w_label, target_kind=target_kind(cfg))
    targets = s.lora_targets or list(get_adapter(r.student).family.lora_targets)
    return dict(ds_config=ds, lr=s.lr, warmup_steps=s.warmup_steps, total_steps=total_steps,
                weight_decay=s.weight_decay, adapter_kind=s.adapter, lora_rank=s.lora_rank,
                lora_alpha=s.lora_alpha, lora_targets=targets, objective=objective, train_layers=train_layers,
                teacher_hidden=_teacher_hidden(cfg), mpu=getattr(r, "mpu", None))
