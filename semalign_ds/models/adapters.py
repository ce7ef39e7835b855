"""One adapter table: where each supported family keeps its decoder layers, embeddings, final norm and LM head.

Teacher and student may be of different families; everything else in the project reaches layers only through
`get_adapter`. A family that is not in ADAPTERS is a clear error, never a guess.
Shapes: head weight V x D (vocab x hidden).

Gemma 3 (`gemma3_text`, Gemma3ForCausalLM) differs from the Llama layout in four ways the method sees:
- its RMSNorms scale by (1 + weight), so the final norm's gain (the logit map's g) is 1 + weight, not weight;
- the embedding module multiplies its rows by sqrt(D) (`embed_scale`): h^(0) is the scaled row, the input basis
  (unit-normalised rows) is unchanged by it;
- decoder layers alternate sliding-window and global attention (`layer_types`); each layer's own forward picks its
  mask, so captured states and hooks need nothing special;
- the head is tied to the embedding, and `final_logit_softcapping` (None for Gemma 3, set for Gemma 2) caps the
  logits: `logits()` applies it as the model's forward does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the table is read by the check pass, which must not import torch
    import torch
    from torch import nn


@dataclass(frozen=True)
class FamilyAdapter:
    """Dotted attribute paths (from the *ForCausalLM module) of the parts SemAlign needs."""

    layers: str
    embed: str
    final_norm: str
    lm_head: str
    lora_targets: tuple[str, ...]
    max_positions_attr: str = "max_position_embeddings"
    norm_gain_offset: float = 0.0  # the final norm scales by (offset + weight): 1 for Gemma's RMSNorm


_LLAMA_LIKE = FamilyAdapter(
    layers="model.layers", embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head",
    lora_targets=("v_proj", "o_proj", "up_proj", "down_proj"),
)

ADAPTERS: dict[str, FamilyAdapter] = {
    "gemma3_text": FamilyAdapter(
        layers="model.layers", embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head",
        lora_targets=("v_proj", "o_proj", "up_proj", "down_proj"), norm_gain_offset=1.0,
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gpt_neox": FamilyAdapter(
        layers="gpt_neox.layers", embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head", lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    ),
    # State-space family: MambaBlock returns the residual stream itself (h + mixer(norm(h))), not a tuple.
    "mamba": FamilyAdapter(
        layers="backbone.layers", embed="backbone.embeddings", final_norm="backbone.norm_f", lm_head="lm_head",
        lora_targets=("in_proj", "x_proj", "dt_proj", "out_proj"),
    ),
    "gpt2": FamilyAdapter(
        layers="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f", lm_head="lm_head",
        lora_targets=("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"), max_positions_attr="n_positions",
    ),
}


def family_of(config, key: str = "model") -> FamilyAdapter:
    """The adapter for a HF config; ValueError naming the family and the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"{key}: model family {model_type!r} is not supported; supported families: "
            f"{', '.join(sorted(ADAPTERS))}. Convert the checkpoint to one of them or add an adapter in "
            f"semalign_ds/models/adapters.py."
        )
    return ADAPTERS[model_type]


def _resolve(root: nn.Module, dotted: str) -> nn.Module:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


class BoundAdapter:
    """A model together with its family table: `.layers`, `.embed`, `.final_norm`, `.lm_head`, sizes."""

    def __init__(self, model: nn.Module, family: FamilyAdapter):
        self.model = model
        self.family = family
        self.config = model.config

    @property
    def layers(self) -> nn.ModuleList:
        return _resolve(self.model, self.family.layers)

    @property
    def embed(self) -> nn.Module:
        return _resolve(self.model, self.family.embed)

    @property
    def final_norm(self) -> nn.Module:
        return _resolve(self.model, self.family.final_norm)

    @property
    def lm_head(self) -> nn.Module:
        return _resolve(self.model, self.family.lm_head)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.get_text_config().hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.config.get_text_config().vocab_size)

    @property
    def max_positions(self) -> int | None:
        return max_positions(self.config)

    @property
    def embed_scale(self) -> float:
        """The factor the embedding module multiplies its rows by (sqrt(D) for Gemma, else 1)."""
        return float(getattr(self.embed, "scalar_embed_scale", 1.0))

    @property
    def layer_types(self) -> list[str]:
        """Each decoder layer's attention kind ('full_attention' where the config does not say)."""
        types = getattr(self.config.get_text_config(), "layer_types", None)
        return list(types) if types else ["full_attention"] * self.num_layers

    def layer(self, k: int) -> nn.Module:
        """Decoder layer k, 1-indexed as in METHOD.md."""
        if not 1 <= k <= self.num_layers:
            raise ValueError(f"layer {k} is out of range 1..{self.num_layers}")
        return self.layers[k - 1]

    def head_weight(self) -> torch.Tensor:
        """The LM head weight, V x D (not gathered: under ZeRO-3 call inside GatheredParameters)."""
        return self.lm_head.weight

    def norm_gain(self, weight_D: torch.Tensor | None) -> torch.Tensor | None:
        """The final norm's gain g (what it multiplies the normalised state by) from its weight: weight, or
        1 + weight for Gemma; None (g = 1) for a norm without weight."""
        return None if weight_D is None else weight_D + self.family.norm_gain_offset

    def logits(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        """The model's own head on a residual-stream state: lm_head(final_norm(h)), soft-capped where the model
        caps its logits (cap * tanh(z / cap))."""
        z = self.lm_head(self.final_norm(hidden_BTD))
        cap = getattr(self.config.get_text_config(), "final_logit_softcapping", None)
        return z if cap is None else cap * (z / cap).tanh()


def get_adapter(model: nn.Module, key: str = "model") -> BoundAdapter:
    return BoundAdapter(model, family_of(model.config, key))


def max_positions(config) -> int | None:
    family = family_of(config)
    value = getattr(config.get_text_config(), family.max_positions_attr, None)
    return int(value) if value is not None else None
