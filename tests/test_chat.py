"""Conversation data without a model: records and their errors, chat templates, renderings with message spans, the
answers-only mask (one tokenizer), the alignment by message across two templates, packing and the overlong rule.
Tokenizers are tiny byte-level BPEs built here, with chat templates written here; nothing is downloaded."""
from __future__ import annotations

import json

import numpy as np
import pytest

from semalign_ds import chat, chat_blocks
from semalign_ds.demo.chat_demo import STUDENT_TEMPLATE

from test_cross_tokenizer import EOS, byte_bpe  # noqa: E402
CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a "
          "helpful bot.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
STUDENT_MERGES = [("Ġ", "1"), ("Ġ1", "2"), ("Ġ12", "3"), ("4", "5"), ("i", "t"), ("it", "s"), ("U", "s"),
                  ("Us", "e"), ("Use", "r"), ("A", "s"), ("As", "s")]
TEACHER_MERGES = [("Ġ", "d"), ("Ġd", "i"), ("Ġdi", "g"), ("Ġdig", "i"), ("Ġdigi", "t"), ("Ġdigit", "s"),
                  ("W", "h"), ("Wh", "a"), ("Wha", "t")]
CONV = {"messages": [{"role": "user", "content": "What is 12345 + 1?"},
                     {"role": "assistant", "content": "It is 12346, five digits."},
                     {"role": "user", "content": "And 45?"},
                     {"role": "assistant", "content": "Two digits: 45."}]}


def chat_bpe(merges: list[tuple[str, str]], specials: tuple[str, ...] = (), template: str | None = None):
    """test_cross_tokenizer's byte-level BPE with chosen merges, plus extra special tokens and a chat template."""
    fast = byte_bpe(merges)
    fast.add_special_tokens({"additional_special_tokens": list(specials)})
    fast.chat_template = template
    return fast


def student_side(merges=STUDENT_MERGES) -> chat_blocks.Side:
    tok = chat_bpe(merges)
    return chat_blocks.Side(tok, chat.chat_template(tok, str(STUDENT_TEMPLATE), "data.chat_template", "student"),
                            "student")


def teacher_side() -> chat_blocks.Side:
    tok = chat_bpe(TEACHER_MERGES, ("<|im_start|>", "<|im_end|>"), CHATML)
    return chat_blocks.Side(tok, chat.chat_template(tok, None, "data.teacher_chat_template", "teacher"), "teacher")


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


# ---------------------------------------------------------------- records


def test_record_forms_and_tool_messages(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        CONV,
        {"prompt": "Say hi.", "completion": "Hi."},
        {"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Add 1 and 2."}],
         "completion": [{"role": "assistant", "content": None, "tool_calls": [{"name": "add"}]},
                        {"role": "tool", "content": "3"}, {"role": "assistant", "content": "3."}]},
    ])
    convs = chat.read_conversations(path)
    assert [len(c.messages) for c in convs] == [4, 2, 5]
    assert convs[1].messages == ({"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."})
    assert convs[2].messages[2]["content"] == "" and convs[2].messages[2]["tool_calls"] == [{"name": "add"}]
    assert convs[0].answers() == [1, 3] and convs[2].answers() == [4]
    assert chat.prompt_of(convs[0]) == (list(convs[0].messages[:3]), "Two digits: 45.")


@pytest.mark.parametrize("record, needle", [
    ({"messages": [{"role": "user", "content": "hi"}]}, r"line 3 of .*no assistant turn"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, r"line 3 of .*message 0 has role 'bot'; use one of system"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     r"line 3 of .*message 0 \(user\) has a content of type int; it must be a string"),
    ({"text": "plain"}, r"line 3 of .*no `messages` list and no `prompt` \+ `completion`"),
    ({"messages": [], "prompt": "x", "completion": "y"}, r"line 3 of .*both `messages` and `prompt`"),
    ({"prompt": "x", "completion": ""}, r"line 3 of .*no assistant turn with a non-empty content"),
    ("[1, 2]", r"line 3 of .*a record must be an object"),
    ("{not json", r"line 3 of .*not valid JSON"),
])
def test_malformed_records_name_their_line(tmp_path, record, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", [CONV, "", record])  # line 2 is blank (skipped, still counted)
    with pytest.raises(ValueError, match=needle):
        chat.read_conversations(path)


def test_parquet_and_dataset_folder_rows(tmp_path):
    import datasets

    rows = [CONV, {"messages": [{"role": "user", "content": "x"}]}]
    datasets.Dataset.from_list(rows[:1]).to_parquet(str(tmp_path / "ok.parquet"))
    assert len(chat.read_conversations(str(tmp_path / "ok.parquet"))) == 1
    datasets.Dataset.from_list([{"messages": m["messages"]} for m in rows]).save_to_disk(str(tmp_path / "folder"))
    with pytest.raises(ValueError, match=r"row 2 of .*folder: the conversation has no assistant turn"):
        chat.read_conversations(str(tmp_path / "folder"))
    (tmp_path / "t.txt").write_text("plain text")
    with pytest.raises(ValueError, match=r"holds text files; conversations .* JSONL, parquet"):
        chat.read_conversations(str(tmp_path / "t.txt"))


# ---------------------------------------------------------------- templates and renderings


def test_missing_template_names_the_option(tmp_path):
    tok = chat_bpe([])
    with pytest.raises(ValueError, match=r"student's tokenizer .* has no chat template; supply one as a Jinja file "
                                         r"with data.chat_template=FILE"):
        chat.chat_template(tok, None, "data.chat_template", "student")
    with pytest.raises(ValueError, match=r"data.teacher_chat_template='/nope.jinja' is not a file"):
        chat.chat_template(tok, "/nope.jinja", "data.teacher_chat_template", "teacher")


def test_spans_locate_every_content_verbatim_or_trimmed():
    convs = chat.conversation({"messages": [{"role": "user", "content": "  padded question  "},
                                            {"role": "assistant", "content": "user"}]}, "rec")
    tok = chat_bpe([], ("<|im_start|>", "<|im_end|>"))
    r = chat.render(tok, CHATML, convs.messages)
    # the answer "user" also occurs in the role markers: the placeholders find the right occurrence
    assert [r.text[s.start:s.end] for s in r.spans] == ["  padded question  ", "user"]
    assert r.text[r.spans[1].start - len("assistant\n"):r.spans[1].start] == "assistant\n"
    trimming = CHATML.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")
    t = chat.render(tok, trimming, convs.messages)
    assert t.text[t.spans[0].start:t.spans[0].end] == "padded question" and t.spans[0].offset == 2


@pytest.mark.parametrize("template, needle", [
    (CHATML.replace("{{ m['content'] }}", "{{ m['content'] }}{{ m['content'] }}"), "renders message 0 twice"),
    (CHATML.replace("{{ m['content'] }}", "{{ m['content'] | upper }}"), "changes the content of message 0"),
    (CHATML.replace("{{ m['content'] }}", "{% if m['content'] | length > 5 %}long: {% endif %}{{ m['content'] }}"),
     "changes the content of message 0 .* or writes text next to it that depends on it"),
    ("{{ messages[0]['content'] | length }}" + CHATML,
     "writes text that depends on the message contents"),
    ("{{ raise_exception('roles must alternate') }}", r"rec 7: the student's chat template refuses .*alternate"),
])
def test_templates_that_break_alignment_are_refused(template, needle):
    conv = chat.conversation({"prompt": "hello there", "completion": "hi"}, "rec 7")
    with pytest.raises(ValueError, match=needle):
        chat.render(chat_bpe([]), template, conv.messages, conv.where)


# ---------------------------------------------------------------- the answers-only mask (one tokenizer)


def test_loss_mask_covers_answers_and_their_end_of_turn_only():
    student = student_side()
    conv = chat.conversation(CONV, "rec")
    piece = chat_blocks.make_piece(conv, student, None, 200)
    tok = student.tokenizer
    text = tok.decode(piece.ids.tolist())
    assert text == chat.render(tok, student.template, conv.messages).text  # the rendering, token for token
    assert tok.decode(piece.ids[piece.content].tolist()) == "It is 12346, five digits.Two digits: 45."
    assert tok.decode(piece.ids[piece.loss].tolist()) == f"It is 12346, five digits.{EOS}Two digits: 45.{EOS}"
    assert not piece.loss[:np.flatnonzero(piece.content)[0]].any()  # the prompt is not supervised
    blocks = chat_blocks.pack_conversations([conv], student, 200)
    assert blocks.loss_mask_NT is not None and not blocks.cross
    assert int(blocks.loss_mask_NT.sum()) == int(piece.loss.sum())
    assert not (blocks.loss_mask_NT & ~blocks.mask_NT).any()  # padding never
    everything = chat_blocks.pack_conversations([conv], student, 200, train_on_prompts=True)
    assert everything.loss_mask_NT is None  # every real token, as plain text


# ---------------------------------------------------------------- two templates: alignment by message


def _message_of(side, piece_ids, conv):
    _, placed = side.place(conv.messages, conv.where)
    return placed


def test_alignment_by_message_across_two_templates():
    student, teacher = student_side(), teacher_side()
    conv = chat.conversation(CONV, "rec")
    piece = chat_blocks.make_piece(conv, student, teacher, 200)
    s_place, t_place = _message_of(student, piece.ids, conv), _message_of(teacher, piece.teacher_ids, conv)
    s_tok = student.tokenizer.convert_ids_to_tokens(piece.ids.tolist())
    t_tok = teacher.tokenizer.convert_ids_to_tokens(piece.teacher_ids.tolist())
    template = s_place.message_P < 0
    assert template.any() and (piece.align[template] == -1).all() and not piece.exact[template].any()
    aligned = np.flatnonzero(piece.align >= 0)
    assert len(aligned) > 10 and (t_place.message_P[piece.align[aligned]] == s_place.message_P[aligned]).all()
    assert (t_place.ends_P[piece.align[aligned]] <= s_place.eff_P[aligned]).all()  # no look-ahead
    # hand-checked: the student's "Ġ123" + "45" against the teacher's single digits, "digits" merged by the teacher
    i = s_tok.index("Ġ123")
    assert (t_tok[piece.align[i]], t_tok[piece.align[i + 1]]) == ("3", "5") and piece.exact[i] and piece.exact[i + 1]
    end_of_content = [k for k in aligned if s_place.ends_P[k] == s_place.content_end[s_place.message_P[k]]]
    assert end_of_content and not piece.exact[end_of_content].any()  # the templates differ after a content
    # the teacher's template tokens (<|im_start|>, role names, its default system prompt) are never a target
    t_template = set(np.flatnonzero(t_place.message_P < 0).tolist())
    assert t_template and not t_template & set(piece.align[aligned].tolist())


def test_packing_keeps_conversations_whole_and_counts_the_overlong():
    student, teacher = student_side(), teacher_side()
    convs = [chat.conversation(CONV, f"rec {i}") for i in range(5)]
    long = {"messages": [*CONV["messages"], {"role": "user", "content": "x " * 200},
                         {"role": "assistant", "content": "y " * 200}]}
    convs.insert(2, chat.conversation(long, "long"))
    one = len(chat_blocks.make_piece(convs[0], student, None, 10**6).ids)
    blocks = chat_blocks.pack_conversations(convs, student, 2 * one + 3, teacher=teacher)
    assert blocks.stats["dropped"] == 1 and blocks.stats["packed"] == 5 and len(blocks) == 3
    assert blocks.mask_NT.sum(1).tolist() == [2 * one, 2 * one, one]  # whole conversations, never split
    rows = blocks.ids_NT[0][blocks.mask_NT[0]].tolist()
    assert rows[:one] == rows[one:]  # two copies of the same conversation, each whole
    assert blocks.cross and blocks.align_NT.max() < blocks.teacher_mask_NU.sum(1).max()
    assert 0.5 < blocks.stats["answer_aligned_share"] <= 1.0
    truncated = chat_blocks.pack_conversations(convs, student, 2 * one + 3, teacher=teacher, overlong="truncate")
    assert truncated.stats["truncated"] == 1 and truncated.stats["dropped"] == 0 and truncated.stats["packed"] == 6
    capped = chat_blocks.pack_conversations(convs, student, 2 * one + 3, max_sequences=1)
    assert len(capped) == 1 and capped.stats["left_out"] == 3
    assert "1 dropped" in chat_blocks.describe(blocks.stats)
    with pytest.raises(ValueError, match=r"none of the 6 conversations fits in data.seq_len=8 .*chat_overlong"):
        chat_blocks.pack_conversations(convs, student, 8)


def test_instruction_set_is_deterministic_valid_and_split_by_id(tmp_path):
    import sysconfig
    from pathlib import Path

    from semalign_ds.demo import instructions

    recipe = {**instructions.RECIPE, "max_doc_items": 80, "snippets": 40}
    root = Path(sysconfig.get_paths()["stdlib"])
    records = instructions.build_records(root, recipe)
    assert records == instructions.build_records(root, recipe)
    ids = {split: {r["id"] for r in rows} for split, rows in records.items()}
    assert all(ids.values()) and sum(map(len, ids.values())) == 120 and not (ids["train"] & ids["test"])
    convs = [chat.conversation(r, r["id"]) for rows in records.values() for r in rows]  # every record is valid
    assert any(len(c.answers()) == 2 for c in convs) and any(c.messages[0]["role"] == "system" for c in convs)
    assert instructions.run_snippet("x = [3, 1]\nx.append(2)\nprint(sorted(x), len('apple'))") == "[1, 2, 3] 5"
    (tmp_path / "shapes.py").write_text('def area(w, h=2):\n    """Return the area of a w by h rectangle, in square\n'
                                        '    units.\n\n    More detail.\n    """\n\n\ndef _hidden():\n    """Private, '
                                        'never asked about."""\n\n\nclass Box:\n    """Box."""\n')
    items = instructions.doc_items(tmp_path, recipe)  # read with ast: the module is never imported
    assert items == [{"id": "doc:shapes.area", "name": "shapes.area", "signature": "`shapes.area(w, h=2)`",
                      "answer": "Return the area of a w by h rectangle, in square units."}]  # Box: too short
