"""Only answer tokens carry loss: the student's three terms (relation geometry, top-k KL, CE labels) on packets of
packed conversations, for one tokenizer and for a pair with different chat templates whose packet comes from the
real ZeRO-3 teacher engine (in this process, one CPU rank). The gradient of each term with respect to the student's
states and logits is non-zero exactly at the positions the answer mask allows, zero everywhere else. Plain-text
packets pass through untouched."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from semalign_ds import chat, chat_blocks
from semalign_ds.data import pack_sequences
from semalign_ds.engines.student import ObjectiveSpec, StudentStage
from semalign_ds.run.topology import with_answers
from semalign_ds.transport.packet import SupervisionPacket
from test_chat import CONV, student_side, teacher_side

DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"
SECOND = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name 123 digits."},
                       {"role": "assistant", "content": "1, 2 and 3."}]}


def tiny(vocab: int, hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=512)).eval()


def blocks_of(teacher=None, train_on_prompts=False):
    convs = [chat.conversation(CONV, "a"), chat.conversation(SECOND, "b"), chat.conversation(CONV, "c")]
    return chat_blocks.pack_conversations(convs, student_side(), 96, teacher=teacher,
                                          train_on_prompts=train_on_prompts)


def stage_for(model) -> StudentStage:
    from semalign_ds.engines.ds_config import load_template, student_ds_config

    ds = student_ds_config(load_template(DS_CONFIGS / "student_zero2.json"), bf16=False, micro_batch=2,
                           grad_accum=1, world_size=1, grad_clip=1.0, hidden_size=model.config.hidden_size)
    spec = ObjectiveSpec(layer_objective="relation_geometry", output_objective="kl", w_label=1.0)
    return StudentStage(model, 1, ds_config=ds, lr=1e-3, warmup_steps=0, total_steps=1, weight_decay=0.0,
                        objective=spec, train_layers=[1, 2])


def supervised_rows(stage: StudentStage, packet: SupervisionPacket) -> dict[str, torch.Tensor]:
    """Per loss term, the (row, position) cells where its gradient w.r.t. the student's states (layer term) or
    logits (output and label terms) is non-zero."""
    states, logits = stage._forward(packet, stage.engine.module)
    states = {l: s.detach().requires_grad_(True) for l, s in states.items()}
    logits = logits.detach().requires_grad_(True)
    terms = stage._losses(states, logits, packet)
    cells = {}
    for name, value in terms.items():
        leaves = [states[l] for l in sorted(states)] if name == "layer" else [logits]
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
        cells[name] = sum(g.abs().sum(-1) for g in grads if g is not None) > 0
    return cells


def predicts(mask_BT: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(mask_BT)
    out[:, :-1] = mask_BT[:, 1:]
    return out


def test_one_tokenizer_only_answers_carry_loss(single_rank_env):
    blocks = blocks_of()
    tok = student_side().tokenizer
    g = torch.Generator().manual_seed(0)
    B, T = blocks.ids_NT.shape
    packet = SupervisionPacket(ids_BT=blocks.ids_NT, mask_BT=blocks.mask_NT, sample_ids_B=blocks.sample_ids_N,
                               targets={l: torch.randn(B, T, 32, generator=g) for l in (1, 2)},
                               top_values_BTK=torch.randn(B, T, 8, generator=g),
                               top_idx_BTK=torch.randint(0, len(tok), (B, T, 8), generator=g),
                               tail_BT=torch.rand(B, T, generator=g) * 0.1)
    answers = blocks.loss_mask_NT
    stage = stage_for(tiny(len(tok), 32, 2, seed=1))
    try:
        cells = supervised_rows(stage, with_answers(packet, blocks))
        everything = supervised_rows(stage, packet)  # the same packet without the answer mask: every real token
    finally:
        stage.finish()
    assert answers.any() and (answers.sum() < blocks.mask_NT.sum() / 2)  # prompts and templates dominate
    assert torch.equal(cells["layer"], answers)
    assert torch.equal(cells["out"], predicts(answers))  # predictions OF answer tokens (and each answer's end)
    assert torch.equal(cells["label"], predicts(answers))
    assert torch.equal(everything["layer"], blocks.mask_NT) and torch.equal(everything["label"],
                                                                           predicts(blocks.mask_NT) & blocks.mask_NT)


def test_two_templates_only_aligned_answers_carry_teacher_loss(single_rank_env):
    from semalign_ds.engines.ds_config import load_template, teacher_ds_config
    from semalign_ds.engines.teacher import StudentPositions, TeacherEngine
    from semalign_ds.method.basis import shared_vocabulary
    from semalign_ds.method.targets import target_recipes

    teacher_side_ = teacher_side()
    blocks = blocks_of(teacher_side_)
    tok_S, tok_T = student_side().tokenizer, teacher_side_.tokenizer
    ds = teacher_ds_config(load_template(DS_CONFIGS / "teacher_zero3_offload_cpu.json"), offload="cpu", bf16=False,
                           micro_batch=len(blocks), world_size=1, device="cpu", hidden_size=48)
    teacher = TeacherEngine.wrap(tiny(len(tok_T), 48, 3, seed=2), ds)
    ids_T, ids_S = shared_vocabulary(tok_T, tok_S, 100, len(tok_T), len(tok_S))
    M = torch.randn(32, 48, generator=torch.Generator().manual_seed(3))
    packet = teacher.emit(blocks.teacher_ids_NU, blocks.teacher_mask_NU, blocks.sample_ids_N,
                          target_recipes([1, 3], "layer"), M, top_k=8, tau=1.0, need_logits=True,
                          target_dtype=torch.float32, logit_ids_T=ids_T, logit_ids_S=ids_S,
                          student=StudentPositions(blocks.ids_NT, blocks.mask_NT, blocks.align_NT, blocks.exact_NT))
    answers, aligned = blocks.loss_mask_NT, blocks.mask_NT & (blocks.align_NT >= 0)
    stage = stage_for(tiny(len(tok_S), 32, 2, seed=1))
    try:
        cells = supervised_rows(stage, with_answers(packet, blocks))
    finally:
        stage.finish()
    template = blocks.mask_NT & (blocks.align_NT < 0)
    assert template.sum() > answers.sum()  # two templates' worth of markers, a default system prompt: unaligned
    assert torch.equal(cells["layer"], answers & aligned)  # answer tokens with a teacher state, nothing else
    assert torch.equal(cells["out"], predicts(answers) & aligned & blocks.exact_NT)
    assert not (cells["layer"] & template).any() and not (cells["out"] & template).any()
    assert cells["out"].any() and cells["layer"].sum() >= 0.6 * answers.sum()
    assert torch.equal(cells["label"], predicts(answers))  # the student's own labels: every answer token + its end


def test_plain_text_packets_pass_through_unchanged():
    tok = student_side().tokenizer
    blocks = pack_sequences(["x = 12345  # digits", "its 45"], tok, seq_len=8)
    assert blocks.loss_mask_NT is None and blocks.stats is None
    packet = SupervisionPacket(ids_BT=blocks.ids_NT, mask_BT=blocks.mask_NT, sample_ids_B=blocks.sample_ids_N)
    assert with_answers(packet, blocks) is packet
    assert packet.layer_mask_BT is packet.mask_BT and packet.output_mask_BT is packet.mask_BT
    assert torch.equal(packet.label_mask_BT, blocks.mask_NT[:, :-1] & blocks.mask_NT[:, 1:])
    from semalign_ds.transport import schema

    convs = blocks_of()  # a conversation's answer mask never travels: the flat (wire) form is the same
    bare = SupervisionPacket(ids_BT=convs.ids_NT, mask_BT=convs.mask_NT, sample_ids_B=convs.sample_ids_N)
    masked = with_answers(bare, convs)
    assert masked.loss_mask_BT is not None and bare.loss_mask_BT is None
    assert schema.packet_to_flat(masked).keys() == schema.packet_to_flat(bare).keys()


@pytest.mark.parametrize("option", [{"chat_template": "x.jinja"}, {"train_on_prompts": True},
                                    {"chat_overlong": "truncate"}])
def test_chat_options_without_chat_are_refused(option):
    from semalign_ds import config as cfgmod

    with pytest.raises(ValueError, match=f"data.{next(iter(option))} is set but data.chat is false"):
        cfgmod.config_from_dict({"data": option})
