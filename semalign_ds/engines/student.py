"""The student's frontier stage: a fresh DeepSpeed ZeRO-2 engine in which only decoder layer k is trainable.

Baselines (schedule.mode full) use the same class with `train_layers`: every listed layer trainable in one stage,
the layer objective averaged over those layers.

METHOD.md §4-6. Per stage k: everything is frozen (requires_grad False) except layer k's parameters, or LoRA
weights added to layer k only. Layers below k then build no autograd graph (their inputs and parameters need
no grad); frozen layers above k still pass gradients back to layer k for the output (KL) term. The optimizer is
a torch AdamW over the trainable parameters; the learning rate follows a step-count warmup + cosine schedule set
by hand before every optimizer step, so a resumed stage continues exactly. `finish()` merges LoRA, destroys
the engine and leaves every parameter frozen; the same student model object is reused by the next stage.

Loss per micro-batch: w_layer * layer + w_out * output + w_label * label, where
- layer: relation_geometry | cosine | mse between R_S = h^(k) - h^(k-1) (target kind 'residual') or h^(k)
  ('state') and packet.targets[k] (for mse the unnormalised M R_T); fisher_logits compares the student's head on
  h^(k) and on the target ('state');
  hidden_mse (baseline layer KD): mean squared error between R_S and P_k R_T, where packet.targets[k] is the
  UNaligned teacher residual (D_T wide) and P_k a learned D_T -> D_S linear map (zero-initialised) trained with
  the stage and dropped at finish();
- output: kl (teacher top-k + tail bucket, or full logits) | uld (sorted-probability matching, no shared ids) |
  label_cosine | ce on the final logits;
Cross-tokenizer packets carry masks: the layer losses run over packet.layer_mask_BT (positions with an aligned
teacher state), kl/uld over packet.output_mask_BT (exact positions); the label term over every real token.
Conversation data narrows all three to the answers (packet.loss_mask_BT; the label term via packet.label_mask_BT).
- label: next-token cross-entropy (when w_label > 0).
Gradient balancing (ObjectiveSpec.layer_balance): the layer weight is set every micro-step so that the layer term's
gradient has a fixed fraction of the output term's gradient norm (StudentStage._balance; one extra forward and two
extra backward passes per micro-step).
Legend: B batch, T tokens, D_S student hidden, V vocabulary, K top-k; ids_BT, mask_BT, hidden_BTD, logits_BTV.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from semalign_ds.config import active_terms
from semalign_ds.engines.kl_lean import kl_topk_lean
from semalign_ds.engines.teacher import import_deepspeed, model_device_kind
from semalign_ds.method import objectives as obj
from semalign_ds.method.lr import warmup_cosine
from semalign_ds.method.lora import add_lora, merge_lora
from semalign_ds.models.adapters import get_adapter
from semalign_ds.models.capture import capture_states
from semalign_ds.transport.packet import SupervisionPacket


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
    layer_balance: float | None = None  # gradient-balanced layer weight (a fraction of the output gradient's norm)
    log_grad_cosine: bool = False  # measure cos(g_layer, g_out) every micro-step without balancing

    def active_terms(self) -> list[str]:
        """The terms with a positive weight (config.active_terms: the rules were checked when the config was
        parsed; an ObjectiveSpec is built from a validated config, or by tests)."""
        return active_terms(self)


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to lr, then cosine decay to 0."""
    return lr * warmup_cosine(step, warmup_steps, total_steps)


def _param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms/biases); empty groups dropped."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _hidden_mse(x_BTD: torch.Tensor, projected_BTD: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of the per-channel mean squared error (padding excluded exactly)."""
    err_BT = (x_BTD.float() - projected_BTD.float()).pow(2).mean(-1)
    keep_BT = mask_BT.to(err_BT.device, torch.bool)
    return err_BT[keep_BT].mean() if bool(keep_BT.any()) else err_BT.sum() * 0.0


class _WithProjections(nn.Module):
    """The student plus the hidden_mse projections, so one ZeRO-2 engine trains both; forward is the student's."""

    def __init__(self, student: nn.Module, projections: nn.ModuleDict):
        super().__init__()
        self.student, self.projections = student, projections

    def forward(self, **kwargs):
        return self.student(**kwargs)


def _next_token(packet: SupervisionPacket, logits_BTV: torch.Tensor):
    """(logits at t, label ids_{t+1}, mask where both t and t+1 are real and, for conversations, t+1 is an answer
    token: packet.label_mask_BT)."""
    return logits_BTV[:, :-1], packet.ids_BT[:, 1:], packet.label_mask_BT


def _flat_grad(loss: torch.Tensor, params: list[nn.Parameter], retain_graph: bool = False) -> torch.Tensor:
    """d loss / d params as one float32 vector (zeros for parameters the loss does not reach). autograd.grad: the
    parameters' .grad and their (ZeRO-2) accumulation hooks are untouched."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).float().reshape(-1) for p, g in zip(params, grads)])


class _FrontierReached(Exception):
    """Raised by a forward hook on the deepest trained layer to end a forward that needs nothing above it."""


def _stop_at_frontier(module, args, output):
    raise _FrontierReached


class StudentStage:
    """One frontier stage k of the student under a fresh ZeRO-2 engine; `.step(packet)`, then `.finish()`."""

    def __init__(self, model: nn.Module, stage_k: int, *, ds_config: dict, lr: float, warmup_steps: int,
                 total_steps: int, weight_decay: float, objective: ObjectiveSpec, adapter_kind: str = "full",
                 lora_rank: int = 16, lora_alpha: float = 32.0, lora_targets=None, mpu=None,
                 train_layers=None, teacher_hidden: int | None = None):
        """train_layers: the layers trainable in this stage (default [stage_k]; schedule.mode full lists all);
        teacher_hidden: D_T, needed by the hidden_mse layer objective for its projections."""
        if adapter_kind not in ("full", "lora"):
            raise ValueError(f"schedule.adapter must be 'full' or 'lora', got {adapter_kind!r}")
        if ds_config.get("zero_optimization", {}).get("stage") != 2:
            raise ValueError("the student's DeepSpeed config must use zero_optimization.stage 2; build it with "
                             "student_ds_config")
        self.model, self.adapter, self.k = model, get_adapter(model, key="student"), int(stage_k)
        self.layers = sorted({int(l) for l in train_layers}) if train_layers else [self.k]
        for l in {self.k, *self.layers}:
            self.adapter.layer(l)  # range check
        self.objective, self.adapter_kind = objective, adapter_kind
        self.projections = self._make_projections(teacher_hidden)
        self.lr, self.warmup_steps, self.total_steps = float(lr), int(warmup_steps), int(total_steps)
        self.steps = 0  # optimizer steps taken in this stage
        self.engine = self.optimizer = None
        params = self._make_trainable(lora_rank, lora_alpha, lora_targets)
        module = model
        if self.projections is not None:
            params += list(self.projections.parameters())
            module = _WithProjections(model, self.projections)
        optimizer = torch.optim.AdamW(_param_groups(params, weight_decay), lr=self.current_lr())
        try:
            deepspeed = import_deepspeed(model_device_kind(model))
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                                                     config=ds_config, mpu=mpu)
        except BaseException:
            self.finish()  # leave the shared student model as it was: no LoRA wrappers, all frozen
            raise
        self.engine.train()

    def _make_trainable(self, lora_rank: int, lora_alpha: float, lora_targets) -> list[nn.Parameter]:
        self.model.requires_grad_(False)
        params: list[nn.Parameter] = []
        for l in self.layers:
            layer = self.adapter.layer(l)
            if self.adapter_kind == "lora":
                targets = tuple(lora_targets) if lora_targets else self.adapter.family.lora_targets
                params += add_lora(layer, targets, lora_rank, lora_alpha)
            else:
                layer.requires_grad_(True)
                params += list(layer.parameters())
        return params

    def _make_projections(self, teacher_hidden: int | None) -> nn.ModuleDict | None:
        """hidden_mse: one zero-initialised D_T -> D_S linear map per trained layer (else None)."""
        if self.objective.layer_objective != "hidden_mse" or "layer" not in self.objective.active_terms():
            return None
        if not teacher_hidden:
            raise ValueError("method.layer_objective 'hidden_mse' needs the teacher's hidden size (teacher_hidden) "
                             "for its learned projection")
        ref = next(self.model.parameters())
        projections = nn.ModuleDict({str(l): nn.Linear(int(teacher_hidden), self.adapter.hidden_size, bias=False)
                                     for l in self.layers}).to(device=ref.device, dtype=ref.dtype)
        for proj in projections.values():
            nn.init.zeros_(proj.weight)
        return projections

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
        weights = {name: getattr(self.objective, f"w_{name}") for name in self.objective.active_terms()}
        balance = self._balance(packet, weights)
        states, logits = self._forward(packet)
        terms = self._losses(states, logits, packet)
        del logits  # the loss holds what backward needs; the B x T x V logits need not live through it
        total = sum(weights[name] * value for name, value in terms.items())
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(total)
        self.engine.step()
        self.steps += int(boundary)
        metrics = {"loss": float(total.detach()), "lr": lr, "tokens": packet.num_tokens, **balance}
        for name in ("layer", "out", "label"):
            metrics[f"{name}_loss"] = float(terms[name].detach()) if name in terms else 0.0
        return metrics

    def _balance(self, packet: SupervisionPacket, weights: dict) -> dict[str, float]:
        """Gradient balancing (method.layer_balance) and/or its measurement (method.log_grad_cosine).

        The layer and output terms' gradients w.r.t. the trainable parameters are taken separately on a forward of
        the bare module (the engine's forward hooks its outputs so that any backward through them starts DeepSpeed's
        gradient reduction): one extra forward and two extra backward passes per micro-step (the layer term's
        reaches only the frontier layer, the output term's runs through every layer above it). With
        layer_balance = f the layer weight becomes w = f * ||w_out g_out|| / ||g_layer|| (detached; 0 when either
        gradient is 0), so the layer term's gradient is f times the output term's in norm. Per rank, on its own
        micro-batch. Updates `weights` in place; returns grad_cos_layer_kl and w_layer_effective (step metrics)."""
        spec = self.objective
        if spec.layer_balance is None and not spec.log_grad_cosine:
            return {}
        params = [p for p in self.engine.module.parameters() if p.requires_grad]
        states, logits = self._forward(packet, self.engine.module)
        terms = self._losses(states, logits, packet)
        g_layer = _flat_grad(terms["layer"], params, retain_graph=True)
        g_out = _flat_grad(terms["out"], params)
        n_layer, n_out = g_layer.norm(), g_out.norm()
        ok = bool(n_layer > 0 and n_out > 0)
        cos = float(g_layer @ g_out / (n_layer * n_out)) if ok else 0.0
        if spec.layer_balance is not None:
            weights["layer"] = float(spec.layer_balance * weights["out"] * n_out / n_layer) if ok else 0.0
        return {"grad_cos_layer_kl": cos, "w_layer_effective": weights["layer"]}

    def _forward(self, packet: SupervisionPacket, module=None) -> tuple[dict, torch.Tensor | None]:
        """(captured states, logits_BTV or None) from the engine (or `module`). Without an output or label term the
        forward stops after the deepest trained layer: the layers above it and the head would only cost time."""
        inputs = dict(input_ids=packet.ids_BT, attention_mask=packet.mask_BT.long(), use_cache=False)
        with capture_states(self.adapter, {l - d for l in self.layers for d in (0, 1)}) as states:
            if {"out", "label"} & set(self.objective.active_terms()):
                return states, (module or self.engine)(**inputs).logits
            top = self.adapter.layer(max(self.layers))
            handle = top.register_forward_hook(_stop_at_frontier)  # registered after the capture hook: runs after it
            try:
                self.engine(**inputs)
            except _FrontierReached:
                pass
            finally:
                handle.remove()
        return states, None

    def _losses(self, states: dict, logits_BTV: torch.Tensor | None, packet: SupervisionPacket) -> dict:
        active, terms = self.objective.active_terms(), {}
        if "layer" in active:
            terms["layer"] = self._layer_loss(states, packet)
        if "out" in active:
            terms["out"] = self._output_loss(logits_BTV, packet)
        if "label" in active:
            terms["label"] = obj.ce(*_next_token(packet, logits_BTV))
        return terms

    def _layer_loss(self, states: dict, packet: SupervisionPacket) -> torch.Tensor:
        """The layer objective, averaged over the stage's trained layers (one for the frontier schedule)."""
        missing = [l for l in self.layers if l not in packet.targets]
        if missing:
            raise ValueError(f"the packet has no target for student layer(s) {missing} (it has "
                             f"{sorted(packet.targets)}); the teacher must emit this stage's recipe")
        losses = [self._one_layer_loss(l, states, packet.targets[l], packet.layer_mask_BT) for l in self.layers]
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    def _one_layer_loss(self, l: int, states: dict, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = states[l]
        x = h - states[l - 1] if self.objective.target_kind == "residual" else h
        kind = self.objective.layer_objective
        if kind == "relation_geometry":
            return obj.relation_geometry(x, target, mask)
        if kind == "cosine":
            return obj.cosine_layer(x, target, mask)
        if kind == "mse":
            return obj.mse_layer(x, target, mask)
        if kind == "hidden_mse":
            return _hidden_mse(x, self.projections[str(l)](target.to(x.dtype)), mask)
        with torch.no_grad():
            zt = self.adapter.logits(target.to(h.dtype))
        return obj.fisher_logits(self.adapter.logits(x), zt, mask)

    def _output_loss(self, logits_BTV: torch.Tensor, packet: SupervisionPacket) -> torch.Tensor:
        kind, mask, tau = self.objective.output_objective, packet.output_mask_BT, self.objective.tau
        if kind == "uld":
            if packet.top_values_BTK is None:
                raise ValueError("method.output_objective is 'uld' but the packet carries no teacher top-k "
                                 "probabilities; let the teacher emit them (method.top_k > 0)")
            return obj.uld_topk(logits_BTV, packet.top_values_BTK, packet.tail_BT, mask, tau)
        if kind == "kl":
            if packet.top_idx_BTK is not None:
                return kl_topk_lean(logits_BTV, packet.top_values_BTK, packet.top_idx_BTK, packet.tail_BT, mask, tau)
            if packet.full_logits_BTV is not None:
                return obj.kl_full(logits_BTV, packet.full_logits_BTV, mask, tau)
            raise ValueError("method.output_objective is 'kl' but the packet carries no teacher logits; let the "
                             "teacher emit logits (top-k or full)")
        zs, labels, valid = _next_token(packet, logits_BTV)
        return obj.label_cosine(zs, labels, valid) if kind == "label_cosine" else obj.ce(zs, labels, valid)

    # ---- end of stage ----

    def finish(self) -> nn.Module:
        """Merge LoRA into layer k, destroy the engine, freeze everything; returns the student model."""
        if self.engine is not None:
            self.engine.destroy()
            self.engine = self.optimizer = None
        if self.adapter_kind == "lora":
            for l in self.layers:
                merge_lora(self.adapter.layer(l))
        self.projections = None  # hidden_mse projections live only as long as their stage
        self.model.requires_grad_(False)
        return self.model
