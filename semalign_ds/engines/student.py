"""The student's frontier stage: a fresh DeepSpeed ZeRO-2 engine in which only decoder layer k is trainable.

METHOD.md §4-6. Per stage k: everything is frozen (requires_grad False) except layer k's parameters, or LoRA
weights added to layer k only. Layers below k then build no autograd graph (their inputs and parameters need
no grad); frozen layers above k still pass gradients back to layer k for the output (KL) term. The optimizer is
a torch AdamW over the trainable parameters; the learning rate follows a step-count warmup + cosine schedule set
by hand before every optimizer step, so a resumed stage continues exactly. `finish()` merges LoRA, destroys
the engine and leaves every parameter frozen; the same student model object is reused by the next stage.

Loss per micro-batch: w_layer * layer + w_out * output + w_label * label, where
- layer: relation_geometry | cosine between R_S = h^(k) - h^(k-1) (target kind 'residual') or h^(k) ('state')
  and packet.targets[k]; fisher_logits compares the student's head on h^(k) and on the target ('state');
- output: kl (teacher top-k + tail bucket, or full logits) | label_cosine | ce on the final logits;
- label: next-token cross-entropy (when w_label > 0).
Legend: B batch, T tokens, D_S student hidden, V vocabulary, K top-k; ids_BT, mask_BT, hidden_BTD, logits_BTV.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from semalign_ds.engines.teacher import import_deepspeed, model_device_kind
from semalign_ds.method import objectives as obj
from semalign_ds.method.lora import add_lora, merge_lora
from semalign_ds.models.adapters import get_adapter
from semalign_ds.models.capture import capture_states
from semalign_ds.transport.packet import SupervisionPacket

LAYER_OBJECTIVES = ("relation_geometry", "cosine", "fisher_logits", "none")
OUTPUT_OBJECTIVES = ("kl", "label_cosine", "ce", "none")


@dataclass(frozen=True)
class ObjectiveSpec:
    """Which losses a stage optimises and their weights (METHOD.md §4-5)."""

    layer_objective: str = "relation_geometry"
    output_objective: str = "kl"
    tau: float = 1.0
    w_layer: float = 1.0
    w_out: float = 1.0
    w_label: float = 0.0
    target_kind: str = "residual"  # 'residual' (R_S vs aligned residual) or 'state' (h^(k) vs aligned state)

    def __post_init__(self):
        if self.layer_objective not in LAYER_OBJECTIVES:
            raise ValueError(f"method.layer_objective must be one of {LAYER_OBJECTIVES}, got {self.layer_objective!r}")
        if self.output_objective not in OUTPUT_OBJECTIVES:
            raise ValueError(f"method.output_objective must be one of {OUTPUT_OBJECTIVES}, "
                             f"got {self.output_objective!r}")
        if self.target_kind not in ("residual", "state"):
            raise ValueError(f"target kind must be 'residual' or 'state', got {self.target_kind!r}")
        if self.layer_objective == "fisher_logits" and self.target_kind != "state":
            raise ValueError("method.layer_objective 'fisher_logits' compares the head on states: emit state "
                             "targets (target kind 'state')")
        if self.tau <= 0:
            raise ValueError(f"objectives.tau must be > 0, got {self.tau}")
        if min(self.w_layer, self.w_out, self.w_label) < 0 or not self.active_terms():
            raise ValueError("the loss weights must be >= 0 and at least one active term (w_layer with a layer "
                             "objective, w_out with an output objective, or w_label) must be > 0")

    def active_terms(self) -> list[str]:
        terms = []
        if self.w_layer > 0 and self.layer_objective != "none":
            terms.append("layer")
        if self.w_out > 0 and self.output_objective != "none":
            terms.append("out")
        if self.w_label > 0:
            terms.append("label")
        return terms


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to lr, then cosine decay to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms/biases); empty groups dropped."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _next_token(ids_BT: torch.Tensor, mask_BT: torch.Tensor, logits_BTV: torch.Tensor):
    """(logits at t, label ids_{t+1}, mask where both t and t+1 are real)."""
    return logits_BTV[:, :-1], ids_BT[:, 1:], mask_BT[:, :-1] & mask_BT[:, 1:]


class StudentStage:
    """One frontier stage k of the student under a fresh ZeRO-2 engine; `.step(packet)`, then `.finish()`."""

    def __init__(self, model: nn.Module, stage_k: int, *, ds_config: dict, lr: float, warmup_steps: int,
                 total_steps: int, weight_decay: float, objective: ObjectiveSpec, adapter_kind: str = "full",
                 lora_rank: int = 16, lora_alpha: float = 32.0, lora_targets=None, mpu=None):
        if adapter_kind not in ("full", "lora"):
            raise ValueError(f"schedule.adapter must be 'full' or 'lora', got {adapter_kind!r}")
        if ds_config.get("zero_optimization", {}).get("stage") != 2:
            raise ValueError("the student's DeepSpeed config must use zero_optimization.stage 2; build it with "
                             "student_ds_config")
        self.model, self.adapter, self.k = model, get_adapter(model, key="student"), int(stage_k)
        self.adapter.layer(self.k)  # range check
        self.objective, self.adapter_kind = objective, adapter_kind
        self.lr, self.warmup_steps, self.total_steps = float(lr), int(warmup_steps), int(total_steps)
        self.steps = 0  # optimizer steps taken in this stage
        self.engine = self.optimizer = None
        params = self._make_trainable(lora_rank, lora_alpha, lora_targets)
        optimizer = torch.optim.AdamW(_param_groups(params, weight_decay), lr=self.current_lr())
        try:
            deepspeed = import_deepspeed(model_device_kind(model))
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                     config=ds_config, mpu=mpu)
        except BaseException:
            self.finish()  # leave the shared student model as it was: no LoRA wrappers, all frozen
            raise
        self.engine.train()

    def _make_trainable(self, lora_rank: int, lora_alpha: float, lora_targets) -> list[nn.Parameter]:
        self.model.requires_grad_(False)
        layer = self.adapter.layer(self.k)
        if self.adapter_kind == "lora":
            targets = tuple(lora_targets) if lora_targets else self.adapter.family.lora_targets
            return add_lora(layer, targets, lora_rank, lora_alpha)
        layer.requires_grad_(True)
        return list(layer.parameters())

    @property
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def current_lr(self) -> float:
        return lr_at(self.steps, self.lr, self.warmup_steps, self.total_steps)

    # ---- one micro-batch ----

    def step(self, packet: SupervisionPacket) -> dict[str, float]:
        """Forward, loss, backward and (at an accumulation boundary) one optimizer step on one packet."""
        if self.engine is None:
            raise RuntimeError(f"stage {self.k} is finished; build a new StudentStage")
        packet = packet.to(self.engine.device)
        lr = self.current_lr()
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        with capture_states(self.adapter, {self.k - 1, self.k}) as states:
            out = self.engine(input_ids=packet.ids_BT, attention_mask=packet.mask_BT.long(), use_cache=False)
        terms = self._losses(states, out.logits, packet)
        total = sum(getattr(self.objective, f"w_{name}") * value for name, value in terms.items())
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(total)
        self.engine.step()
        self.steps += int(boundary)
        metrics = {"loss": float(total.detach()), "lr": lr, "tokens": packet.num_tokens}
        for name in ("layer", "out", "label"):
            metrics[f"{name}_loss"] = float(terms[name].detach()) if name in terms else 0.0
        return metrics

    def _losses(self, states: dict, logits_BTV: torch.Tensor, packet: SupervisionPacket) -> dict:
        active, terms = self.objective.active_terms(), {}
        if "layer" in active:
            terms["layer"] = self._layer_loss(states, packet)
        if "out" in active:
            terms["out"] = self._output_loss(logits_BTV, packet)
        if "label" in active:
            terms["label"] = obj.ce(*_next_token(packet.ids_BT, packet.mask_BT, logits_BTV))
        return terms

    def _layer_loss(self, states: dict, packet: SupervisionPacket) -> torch.Tensor:
        if self.k not in packet.targets:
            raise ValueError(f"the packet has no target for student layer {self.k} (it has "
                             f"{sorted(packet.targets)}); the teacher must emit this stage's recipe")
        target, mask = packet.targets[self.k], packet.mask_BT
        h = states[self.k]
        x = h - states[self.k - 1] if self.objective.target_kind == "residual" else h
        kind = self.objective.layer_objective
        if kind == "relation_geometry":
            return obj.relation_geometry(x, target, mask)
        if kind == "cosine":
            return obj.cosine_layer(x, target, mask)
        with torch.no_grad():
            zt = self.adapter.logits(target.to(h.dtype))
        return obj.fisher_logits(self.adapter.logits(x), zt, mask)

    def _output_loss(self, logits_BTV: torch.Tensor, packet: SupervisionPacket) -> torch.Tensor:
        kind, mask, tau = self.objective.output_objective, packet.mask_BT, self.objective.tau
        if kind == "kl":
            if packet.top_idx_BTK is not None:
                return obj.kl_topk(logits_BTV, packet.top_values_BTK, packet.top_idx_BTK, packet.tail_BT, mask, tau)
            if packet.full_logits_BTV is not None:
                return obj.kl_full(logits_BTV, packet.full_logits_BTV, mask, tau)
            raise ValueError("method.output_objective is 'kl' but the packet carries no teacher logits; let the "
                             "teacher emit logits (top-k or full)")
        zs, labels, valid = _next_token(packet.ids_BT, mask, logits_BTV)
        return obj.label_cosine(zs, labels, valid) if kind == "label_cosine" else obj.ce(zs, labels, valid)

    # ---- end of stage ----

    def finish(self) -> nn.Module:
        """Merge LoRA into layer k, destroy the engine, freeze everything; returns the student model."""
        if self.engine is not None:
            self.engine.destroy()
            self.engine = self.optimizer = None
        if self.adapter_kind == "lora":
            merge_lora(self.adapter.layer(self.k))
        self.model.requires_grad_(False)
        return self.model
