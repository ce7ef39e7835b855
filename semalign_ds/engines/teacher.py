"""The teacher engine: DeepSpeed ZeRO-3 inference with parameters offloaded (CPU or NVMe), frozen.

It runs the teacher forward, captures the paired layers' states h^(l), maps their residuals into student
space through M (METHOD.md §2, §4) and emits SupervisionPackets with the teacher's top-k (or full) logits;
it also computes the layer attribution scores (METHOD.md §3) with activation gradients only.

Collectives: under ZeRO-3 every forward, backward and GatheredParameters all-gathers parameters, so every rank
of the teacher's data-parallel group must call forward_states/emit/attribute/head_weight in lockstep (same
number of calls, same order; batches may differ per rank). The engine's data-parallel group is the whole
process group (colocated topology), or a subgroup of the world (`mpu=`, disaggregated topology: the teacher
ranks must be the world's first ranks). On a subgroup the checkpoint is partitioned at load over that group
(zero.Init with data_parallel_group), the engine gets a GroupMPU, and ZeRO-3's trace consistency check, which
broadcasts on the world group and would wait for the student ranks forever, is switched off in this process
(shared/notes/deepspeed-cpu.md §3d; it is a sanity check only, every teacher rank runs the same model).

Vocabulary: with the student's tokenizer the teacher reads the student's token ids (the fast path). With a
different tokenizer it reads its own tokens of the same characters (B x U) and the caller passes a
`StudentPositions` (the student's ids/mask and, per student position, the aligned teacher position and whether it
is exact; alignment.py): captured states and logits are gathered at the aligned positions, so the packet stays
student-shaped (B x T), and its state/out masks leave unaligned positions out of every teacher loss. For the `kl`
output objective the caller also passes the shared vocabulary map (logit_ids_T, logit_ids_S): the top-k runs over
the shared teacher ids, the emitted ids are student ids, and the tail bucket holds all other teacher mass (outside
the top-k and outside the shared vocabulary). For `uld` (sorted_only) the top-k runs over the whole teacher
vocabulary and no ids are emitted.

Legend: B batch, T tokens, D_T / D_S teacher / student hidden size, V vocabulary, K top-k, L layers.
ids_BT int64, mask_BT bool (True = real token), hidden_BTD, logits_BTV, M_DsDt the alignment map.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Iterable, Mapping, NamedTuple

import torch
from torch import nn

from semalign_ds.cluster.distributed import all_reduce_tensor, setup_env
from semalign_ds.engines.kl_lean import rows_per_chunk
from semalign_ds.method.attribution import AttributionAccumulator, skip_layer
from semalign_ds.method.basis import align
from semalign_ds.method.objectives import ce, next_token_valid
from semalign_ds.method.targets import TargetRecipe, recipe_target
from semalign_ds.models.adapters import get_adapter
from semalign_ds.models.capture import capture_states
from semalign_ds.transport.packet import SupervisionPacket


def import_deepspeed(device: str):
    """deepspeed, imported after DS_ACCELERATOR and the launch variables are set for `device` ('cpu'/'cuda')."""
    setup_env(device)
    import deepspeed

    return deepspeed


def model_device_kind(model: nn.Module) -> str:
    """'cuda' if any parameter lives on a GPU, else 'cpu'."""
    return "cuda" if any(p.device.type == "cuda" for p in model.parameters()) else "cpu"


def _check_dtype(ds_config: dict, dtype: torch.dtype) -> None:
    bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"teacher.dtype must be float32 or bfloat16, got {dtype}")
    if bf16 != (dtype == torch.bfloat16):
        raise ValueError(f"teacher.dtype is {dtype} but the DeepSpeed config has bf16.enabled={bf16}; build the "
                         "config with teacher_ds_config(bf16=(dtype == torch.bfloat16))")


def _lm_loss(logits_BTV: torch.Tensor, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over positions whose token and next token are both real."""
    return ce(logits_BTV[:, :-1], ids_BT[:, 1:], next_token_valid(mask_BT))


def _leaf_output(module, args, output):
    """Forward hook: the embedding output as a fresh leaf that requires grad (params stay frozen)."""
    return output.detach().requires_grad_(True)


def _align_dtype(M: torch.Tensor, states: dict, target_dtype: torch.dtype) -> torch.dtype:
    """bf16 targets from bf16 states are mapped in bf16 (fp32 accumulation, ~13x the fp32 matmul rate on a GPU);
    otherwise in M's own dtype."""
    state_dtype = next(iter(states.values())).dtype if states else M.dtype
    return torch.bfloat16 if target_dtype == state_dtype == torch.bfloat16 else M.dtype


class StudentPositions(NamedTuple):
    """The student's side of a cross-tokenizer batch: ids_BT, mask_BT, align_BT (teacher position or -1), exact_BT."""

    ids_BT: torch.Tensor
    mask_BT: torch.Tensor
    align_BT: torch.Tensor
    exact_BT: torch.Tensor


def gather_positions(x_BU: torch.Tensor, align_BT: torch.Tensor) -> torch.Tensor:
    """x at the aligned teacher positions (B x U x ... -> B x T x ...); zeros where align is -1."""
    align = align_BT.to(x_BU.device)
    idx = align.clamp_min(0).reshape(*align.shape, *([1] * (x_BU.dim() - 2)))
    out = x_BU.gather(1, idx.expand(*align.shape, *x_BU.shape[2:]))
    return out.masked_fill((align < 0).reshape(idx.shape), 0)


def topk_tail(logits_BTV: torch.Tensor, k: int, tau: float, logit_ids_T: torch.Tensor | None = None,
              chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """objectives.teacher_topk(logits.float()[..., logit_ids_T], k, tau), lean: float32 copies of `chunk` tokens
    at a time (bounded temporaries), and the tail mass from two logsumexps instead of a V-wide log-softmax."""
    V = logits_BTV.shape[-1] if logit_ids_T is None else logit_ids_T.numel()
    if not 1 <= k <= V:
        raise ValueError(f"objectives.topk must be in 1..V={V}, got {k}")
    ids = None if logit_ids_T is None else logit_ids_T.to(logits_BTV.device)
    flat = logits_BTV.reshape(-1, logits_BTV.shape[-1])
    chunk = chunk or rows_per_chunk(flat.shape[-1], flat.device)
    parts = [_topk_rows(flat[i:i + chunk], k, tau, ids) for i in range(0, flat.shape[0], chunk)]
    values, idx, tail = (torch.cat(p) for p in zip(*parts))
    lead = logits_BTV.shape[:-1]
    return values.reshape(*lead, k), idx.reshape(*lead, k), tail.reshape(lead)


def _topk_rows(z_NV: torch.Tensor, k: int, tau: float, ids: torch.Tensor | None):
    """The tail is 1 - the top-k's share of the WHOLE teacher distribution (with `ids`: the top-k among the
    shared ids; mass outside the shared vocabulary lands in the tail)."""
    z = z_NV.float()
    lse_all = torch.logsumexp(z if tau == 1.0 else z / tau, dim=-1)
    if ids is not None:
        z = z.index_select(-1, ids)
    values, idx = z.topk(k, dim=-1)
    lse_top = (torch.logsumexp(values / tau, dim=-1) - lse_all).clamp_max(0.0)
    return values, idx, (-torch.expm1(lse_top)).clamp_min(0.0)


class GroupMPU:
    """Megatron-style parallel-state object pinning DeepSpeed's data-parallel group to a subgroup of the world.

    `single` is a one-rank group of this rank (no model parallelism): DeepSpeed all-reduces gradient norms over the
    model-parallel group, so it must not be the data-parallel group or the world."""

    def __init__(self, group, single):
        self.group, self.single = group, single

    def get_data_parallel_group(self):
        return self.group

    def get_data_parallel_rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank(self.group)

    def get_data_parallel_world_size(self) -> int:
        import torch.distributed as dist

        return dist.get_world_size(self.group)

    def get_model_parallel_group(self):
        return self.single

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size


def _skip_trace_check(ints) -> None:
    return None


def allow_subgroup_zero3(deepspeed) -> None:
    """ZeRO-3 on a subgroup: its trace check broadcasts on the world group and hangs; it is a sanity check only."""
    import deepspeed.runtime.zero.partition_parameters as pp
    import deepspeed.runtime.zero.partitioned_param_coordinator as ppc

    ppc.assert_ints_same_as_other_ranks = _skip_trace_check
    pp.assert_ints_same_as_other_ranks = _skip_trace_check


@contextmanager
def _partition_over(deepspeed, mpu: GroupMPU | None):
    """While loading: zero.Init (which HF's from_pretrained enters) partitions over mpu's group (None: the world)."""
    if mpu is None:
        yield
        return
    original = deepspeed.zero.Init

    class SubgroupInit(original):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("data_parallel_group", mpu.group)
            kwargs.setdefault("mpu", mpu)  # the config's batch check counts the group's ranks, not the world's
            super().__init__(*args, **kwargs)

    deepspeed.zero.Init = SubgroupInit
    try:
        yield
    finally:
        deepspeed.zero.Init = original


class TeacherEngine:
    """A frozen teacher under a ZeRO-3 inference engine; build with from_pretrained or wrap."""

    def __init__(self, engine):
        self.engine = engine
        self.model = engine.module
        self.adapter = get_adapter(self.model, key="teacher")
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    @property
    def device(self) -> torch.device:
        return torch.device(self.engine.device)

    @classmethod
    def from_pretrained(cls, path, *, ds_config: dict, dtype: torch.dtype, device: str,
                        trust_remote_code: bool = False, mpu: GroupMPU | None = None) -> "TeacherEngine":
        """Load a local HF checkpoint partitioned at load time (never whole on one rank) and wrap it; with `mpu`
        over its data-parallel subgroup."""
        from semalign_ds.models.loading import check_weights, load_config

        _check_dtype(ds_config, dtype)
        load_config(path, key="teacher.path", trust_remote_code=trust_remote_code)  # clear errors first
        check_weights(path, "teacher.path")  # no weights, or pickle ones only: the student's clear message
        deepspeed = import_deepspeed(device)
        deepspeed.init_distributed()  # zero.Init at load reads the world size from the process group
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        hf_config = HfDeepSpeedConfig(ds_config)  # must be alive during from_pretrained: zero.Init at load
        try:
            if mpu is not None:
                allow_subgroup_zero3(deepspeed)
            with _partition_over(deepspeed, mpu):
                model = AutoModelForCausalLM.from_pretrained(
                    path, dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=True,
                    use_safetensors=True)
            return cls._initialize(deepspeed, model, ds_config, mpu)
        finally:
            # Later from_pretrained calls in this process (e.g. the student) must not be partitioned.
            del hf_config
            unset_hf_deepspeed_config()

    @classmethod
    def wrap(cls, model: nn.Module, ds_config: dict, mpu: GroupMPU | None = None) -> "TeacherEngine":
        """Wrap an in-memory model (partitioned by deepspeed.initialize; tests and small teachers)."""
        deepspeed = import_deepspeed(model_device_kind(model))
        return cls._initialize(deepspeed, model, ds_config, mpu)

    @classmethod
    def _initialize(cls, deepspeed, model: nn.Module, ds_config: dict, mpu: GroupMPU | None = None):
        if ds_config.get("zero_optimization", {}).get("stage") != 3:
            raise ValueError("the teacher's DeepSpeed config must use zero_optimization.stage 3; build it with "
                             "teacher_ds_config")
        if mpu is not None:
            allow_subgroup_zero3(deepspeed)
        model.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, config=ds_config, mpu=mpu)
        engine.eval()
        return cls(engine)

    # ---- gathered weights (collective) ----

    def _gathered_cpu(self, param: nn.Parameter, keep: bool) -> torch.Tensor | None:
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.detach().to(device="cpu", dtype=torch.float32).clone() if keep else None

    def head_weight(self, keep: bool = True) -> torch.Tensor | None:
        """The LM head weight, V x D_T, float32 on CPU (gathered from all ranks: call on every rank; ranks with
        keep=False take part in the gather without copying it)."""
        return self._gathered_cpu(self.adapter.head_weight(), keep)

    def input_embedding_weight(self, keep: bool = True) -> torch.Tensor | None:
        """The input embedding matrix, V x D_T, float32 on CPU (collective like head_weight)."""
        return self._gathered_cpu(self.adapter.embed.weight, keep)

    def final_norm_gain(self, keep: bool = True) -> torch.Tensor | None:
        """The final norm's gain g (D_T, float32 on CPU; collective like head_weight; 1 + weight for Gemma's norm),
        or None on every rank when the norm has no weight (g = 1)."""
        weight = getattr(self.adapter.final_norm, "weight", None)
        return None if weight is None else self.adapter.norm_gain(self._gathered_cpu(weight, keep))

    # ---- forward ----

    def _run(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor, module: nn.Module | None = None, **kwargs):
        module = self.engine if module is None else module
        return module(input_ids=ids_BT, attention_mask=mask_BT.long(), use_cache=False, **kwargs)

    @torch.no_grad()
    def forward_states(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor, layers: Iterable[int],
                       need_logits: bool) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """({l: hidden_BTD} detached on the engine device, logits_BTV or None)."""
        ids, mask = ids_BT.to(self.device), mask_BT.to(self.device)
        # Without logits, ask for the last position only (the head still runs, so ZeRO-3's trace is unchanged).
        skip = {} if need_logits or not self._keeps_logits else {"logits_to_keep": 1}
        with capture_states(self.adapter, layers, detach=True) as states:
            out = self._run(ids, mask, **skip)
        return dict(states), (out.logits if need_logits else None)

    def emit(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor, sample_ids_B: torch.Tensor,
             recipes: Mapping[int, TargetRecipe], M_DsDt: torch.Tensor | None, *, top_k: int, tau: float,
             need_logits: bool, target_dtype: torch.dtype, logit_ids_T: torch.Tensor | None = None,
             logit_ids_S: torch.Tensor | None = None, sorted_only: bool = False,
             student: StudentPositions | None = None, normalise_targets: bool = True) -> SupervisionPacket:
        """One teacher pass -> a packet (tensors stay on the engine device; the transport moves them).

        targets[k] = align(M, recipe_target(states, recipes[k])) in target_dtype (student space, D_S wide);
        with M_DsDt None the unaligned teacher targets (D_T wide; the hidden_mse baseline).
        With need_logits: top_k > 0 gives top-k values/ids/tail at tau (ids in student vocabulary; no ids with
        sorted_only), top_k = 0 the full logits (only without a vocabulary map).
        With `student` (cross-tokenizer) ids_BT/mask_BT are the teacher's own tokens (B x U) and everything is
        gathered at student.align_BT (see the module docstring).
        normalise_targets=False: targets are M R_T without the per-token division by ||R_T|| (the mse objective).
        """
        if (logit_ids_T is None) != (logit_ids_S is None):
            raise ValueError("pass both logit_ids_T and logit_ids_S (the shared vocabulary map) or neither")
        layers = set().union(*(r.teacher_layers for r in recipes.values())) if recipes else set()
        states, logits = self.forward_states(ids_BT, mask_BT, layers, need_logits)
        if student is not None:
            states = {l: gather_positions(h, student.align_BT) for l, h in states.items()}
            ids_BT, mask_BT = student.ids_BT, student.mask_BT
        if M_DsDt is None:  # hidden_mse baseline: the raw teacher residuals (D_T wide), no alignment
            targets = {k: recipe_target(states, r).to(target_dtype) for k, r in recipes.items()}
        else:
            M = M_DsDt.to(self.device, _align_dtype(M_DsDt, states, target_dtype))
            targets = {k: align(M, recipe_target(states, r), out_dtype=target_dtype, normalise=normalise_targets)
                       for k, r in recipes.items()}
        packet = SupervisionPacket(ids_BT=ids_BT.to(self.device), mask_BT=mask_BT.to(self.device),
                                   sample_ids_B=sample_ids_B.to(self.device), targets=targets)
        if logits is not None:
            self._attach_logits(packet, logits, top_k, tau, logit_ids_T, logit_ids_S, sorted_only, student)
        if student is not None:
            valid = student.mask_BT.to(self.device) & (student.align_BT.to(self.device) >= 0)
            packet.state_mask_BT, packet.out_mask_BT = valid, valid & student.exact_BT.to(self.device)
        return packet

    def _attach_logits(self, packet: SupervisionPacket, logits_BTV: torch.Tensor, top_k: int, tau: float,
                       logit_ids_T: torch.Tensor | None, logit_ids_S: torch.Tensor | None, sorted_only: bool,
                       student: StudentPositions | None) -> None:
        if top_k <= 0:
            if logit_ids_T is not None or student is not None or sorted_only:
                raise ValueError("full teacher logits (method.top_k=0) need the same tokenizer in teacher and "
                                 "student and the kl objective; set method.top_k > 0")
            packet.full_logits_BTV = logits_BTV.float()
            return
        values, idx, tail = topk_tail(logits_BTV, top_k, tau, logit_ids_T)
        if student is not None:  # top-k of the U teacher positions first, then K-wide gathers
            values, idx, tail = (gather_positions(t, student.align_BT) for t in (values, idx, tail))
        if logit_ids_S is not None:
            idx = logit_ids_S.to(idx.device)[idx]
        packet.top_values_BTK, packet.top_idx_BTK, packet.tail_BT = values, (None if sorted_only else idx), tail

    # ---- attribution ----

    def attribute(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  layers: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer Gradient x Activation over `batches` of (ids_BT, mask_BT): (abs_L, signed_L) float64 on CPU.

        Entry i belongs to sorted(layers)[i]. The loss is the teacher's next-token LM loss; gradients are
        taken w.r.t. the captured states only (parameters stay frozen). Scores are token-weighted means over
        all batches of all teacher ranks (all-reduced), so every rank gets the same result.
        """
        acc = AttributionAccumulator(layers)
        handle = self.adapter.embed.register_forward_hook(_leaf_output)
        try:
            for ids_BT, mask_BT in batches:
                ids, mask = ids_BT.to(self.device), mask_BT.to(self.device)
                with torch.enable_grad(), capture_states(self.adapter, acc.layers, detach=False) as states:
                    # engine.module, not the engine: the engine's output hooks refuse a plain autograd backward
                    # without an optimizer; the ZeRO-3 gather/release hooks live on the module and still run.
                    loss = _lm_loss(self._run(ids, mask, self.model).logits, ids, mask)
                    acc.update(dict(states), loss, mask)
        finally:
            handle.remove()
        self._all_reduce(acc)
        return acc.means()

    def _all_reduce(self, acc: AttributionAccumulator) -> None:
        packed = torch.cat([acc.sum_abs, acc.sum_signed, acc.n_tokens.reshape(1)])
        packed = all_reduce_tensor(packed, self.device, self.engine.data_parallel_group)
        n = len(acc.layers)
        acc.sum_abs, acc.sum_signed, acc.n_tokens = packed[:n], packed[n:2 * n], packed[2 * n]

    # ---- attribution by ablation (METHOD.md §8) ----

    @torch.no_grad()
    def attribute_by_ablation(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                              layers: Iterable[int]) -> tuple[torch.Tensor, float]:
        """(score_L float64 on CPU, clean loss): score(l) = LM loss with layer l's residual contribution removed
        (the layer returns its input) minus the clean LM loss, token-weighted over `batches` of all teacher ranks
        (all-reduced, every rank gets the same). Entry i belongs to sorted(layers)[i].

        Costs 1 + len(layers) forwards per batch, no backward. The ablated layer still runs (its output is
        discarded), so every forward gathers the same ZeRO-3 parameters in the same order on every rank."""
        layers = sorted(int(l) for l in layers)
        sums = torch.zeros(len(layers) + 2, dtype=torch.float64)  # ablated losses..., clean loss, tokens
        for ids_BT, mask_BT in batches:
            ids, mask = ids_BT.to(self.device), mask_BT.to(self.device)
            n = float((mask[:, :-1] & mask[:, 1:]).sum())
            sums[-2] += n * float(_lm_loss(self._run(ids, mask).logits, ids, mask))
            for i, l in enumerate(layers):
                with skip_layer(self.adapter.layer(l)):
                    sums[i] += n * float(_lm_loss(self._run(ids, mask).logits, ids, mask))
            sums[-1] += n
        sums = all_reduce_tensor(sums, self.device, self.engine.data_parallel_group)
        if sums[-1] <= 0:
            raise ValueError("no tokens were attributed: the attribution data yielded no valid next-token pairs")
        clean = sums[-2] / sums[-1]
        return sums[:-2] / sums[-1] - clean, float(clean)
