"""Conversation data: records, chat templates, and renderings that know where every message's content lies.

Records (data.chat). JSONL (one JSON object per line; blank lines are skipped), parquet, or a folder written by
`datasets.Dataset.save_to_disk`, read from local files only. Every record holds either
    messages: [{role, content}, ...]     role: system | user | assistant | tool; content: a string
    prompt + completion                  each a string (prompt: one user message; completion: one assistant
                                         message) or a list of messages (TRL's conversational form)
Other keys of a message (name, tool_calls, tool_call_id) reach the template unchanged; an assistant message with
`tool_calls` may have a null content. A record that is not an object, has neither form (or both), an unknown role,
a content that is not a string, or no assistant message with a non-empty content is an error that names its line
(JSONL) or row (parquet, dataset folders) and its file.

Templates. Each model renders a conversation with its own chat template: its tokenizer's, or a Jinja file
(data.chat_template for the student, data.teacher_chat_template for the teacher). A tokenizer without a template
and no file is an error naming the option that supplies one.

Renderings. `render` returns the text and, per message, the span of its content in it. It renders the conversation
twice: once with every content replaced by a placeholder (private-use characters no template touches), which
locates each content unambiguously, and once as it is. Walking both, every literal piece of template text must
match, and at each placeholder the text must hold the content verbatim, or stripped of surrounding whitespace for
templates that trim (`Span.offset` then counts the characters dropped in front). A template that changes a content
otherwise, or renders one twice, is an error: alignment by message needs each content once, as written.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant", "tool")
_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")


@dataclass(frozen=True)
class Conversation:
    """Validated messages (dicts with role and content, extra keys kept) and where the record came from."""

    messages: tuple[dict, ...]
    where: str

    def answers(self) -> list[int]:
        """Indices of the assistant messages with a non-empty content (the supervised answers)."""
        return [i for i, m in enumerate(self.messages) if m["role"] == "assistant" and m["content"]]


@dataclass(frozen=True)
class Span:
    """A message content in a rendering: characters [start, end); `offset` = characters of the raw content before
    `start` that the template dropped (leading whitespace), so raw position = rendering position - start + offset."""

    start: int
    end: int
    offset: int


@dataclass(frozen=True)
class Rendering:
    text: str
    spans: tuple[Span | None, ...]  # per message; None where the template leaves the message out


# ---------------------------------------------------------------- records


def _message(item, where: str, index: int) -> dict:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: message {index} is {type(item).__name__}, not an object with role and content")
    role, content = item.get("role"), item.get("content")
    if role not in ROLES:
        raise ValueError(f"{where}: message {index} has role {role!r}; use one of {', '.join(ROLES)}")
    if content is None and role == "assistant" and item.get("tool_calls"):
        content = ""
    if not isinstance(content, str):
        raise ValueError(f"{where}: message {index} ({role}) has a content of type {type(content).__name__}; it "
                         f"must be a string")
    return {**item, "content": content}


def _messages(items, where: str, field: str, first: int = 0) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise ValueError(f"{where}: `{field}` must be a non-empty list of {{role, content}} messages, not "
                         f"{type(items).__name__} {str(items)[:80]!r}")
    return [_message(item, where, first + i) for i, item in enumerate(items)]


def _side(value, role: str, where: str, field: str, first: int) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _messages(value, where, field, first)


def conversation(record, where: str) -> Conversation:
    """One record (a JSON object or a table row as a dict) as a validated Conversation; ValueError naming `where`."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be an object with `messages` or `prompt` + `completion`, not "
                         f"{type(record).__name__}")
    present = {k for k in ("messages", "prompt", "completion") if record.get(k) is not None}
    if "messages" in present and present & {"prompt", "completion"}:
        raise ValueError(f"{where}: the record has both `messages` and `prompt`/`completion`; keep one form")
    if "messages" in present:
        messages = _messages(record["messages"], where, "messages")
    elif present == {"prompt", "completion"}:
        prompt = _side(record["prompt"], "user", where, "prompt", 0)
        messages = prompt + _side(record["completion"], "assistant", where, "completion", len(prompt))
    else:
        raise ValueError(f"{where}: the record has no `messages` list and no `prompt` + `completion` pair (its "
                         f"keys: {sorted(record)}); data.chat reads conversations in one of these two forms")
    conv = Conversation(tuple(messages), where)
    if not conv.answers():
        raise ValueError(f"{where}: the conversation has no assistant turn with a non-empty content; every record "
                         f"needs an answer to supervise")
    return conv


def _jsonl_records(file: Path, key: str):
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{key}: line {number} of {file}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            yield record, where


def _table_records(file: Path, key: str):
    import pyarrow.parquet as pq

    for number, record in enumerate(pq.read_table(file).to_pylist(), 1):
        yield record, f"{key}: row {number} of {file}"


def _dataset_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _folder_records(path: Path, key: str):
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"{key}={str(path)!r} is a dataset with splits {sorted(dataset)} and no `train`; point "
                             f"{key} at one split's folder")
        dataset = dataset["train"]
    for number, record in enumerate(dataset, 1):
        yield record, f"{key}: row {number} of {path}"


def read_conversations(path: str, fmt: str = "auto", key: str = "data.path") -> list[Conversation]:
    """Every record of a JSONL/parquet file, glob or folder, or of a `save_to_disk` dataset folder, validated."""
    from semalign_ds import data as datamod

    root = Path(str(path)).expanduser()
    if _dataset_folder(root):
        records = _folder_records(root, key)
    else:
        keys = datamod.Keys(key, None if key != "data.path" else "data.format", "data.text_field")
        files, builder = datamod.data_files({"path": str(path), "format": fmt}, keys)
        if builder == "text":
            raise ValueError(f"{key}={str(path)!r} holds text files; conversations (data.chat) are read from JSONL, "
                             f"parquet or a `datasets` folder")
        reader = _jsonl_records if builder == "json" else _table_records
        records = (item for file in files for item in reader(file, key))
    conversations = [conversation(record, where) for record, where in records]
    if not conversations:
        raise ValueError(f"{key}={str(path)!r} holds no conversation; add records")
    return conversations


# ---------------------------------------------------------------- templates and renderings


def chat_template(tokenizer, file: str | None, option: str, role: str) -> str:
    """The Jinja chat template a model renders with: the file `option` names, else its tokenizer's own."""
    if file:
        path = Path(file).expanduser()
        if not path.is_file():
            raise ValueError(f"{option}={file!r} is not a file; point it at a Jinja chat template")
        return path.read_text(encoding="utf-8")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or "?"
        raise ValueError(f"the {role}'s tokenizer ({name}) has no chat template; supply one as a Jinja file with "
                         f"{option}=FILE")
    return template


def _apply(tokenizer, template: str, messages, generation_prompt: bool, where: str, role: str) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except TemplateError as err:
        raise ValueError(f"{where}: the {role}'s chat template refuses this conversation ({err}); fix the record "
                         f"or supply another template") from None


def _content_forms(content: str) -> list[tuple[str, int]]:
    """(text, characters dropped in front) a template may render a content as: verbatim first, then trimmed."""
    lead = len(content) - len(content.lstrip())
    forms = [(content, 0), (content.strip(), lead), (content.rstrip(), 0), (content.lstrip(), lead)]
    return list(dict.fromkeys(forms))


def _locate(skeleton: str, plain: str, messages, where: str, role: str) -> tuple[Span | None, ...]:
    """Walk the placeholder rendering against the real one; the span of every content (see the module doc)."""
    pieces = _PLACEHOLDER.split(skeleton)  # literal, index, literal, index, ..., literal
    spans: list[Span | None] = [None] * len(messages)
    pos = 0
    for i in range(0, len(pieces), 2):
        literal = pieces[i]
        if not plain.startswith(literal, pos):
            raise ValueError(f"{where}: the {role}'s chat template writes text that depends on the message contents; "
                             f"alignment by message needs contents rendered as written")
        pos += len(literal)
        if i + 1 == len(pieces):
            break
        m, after = int(pieces[i + 1]), pieces[i + 2]
        if spans[m] is not None:
            raise ValueError(f"{where}: the {role}'s chat template renders message {m} twice; alignment by message "
                             f"needs each content once")
        for text, offset in _content_forms(messages[m]["content"]):
            if plain.startswith(text, pos) and plain.startswith(after, pos + len(text)):
                spans[m] = Span(pos, pos + len(text), offset)
                pos += len(text)
                break
        else:
            raise ValueError(f"{where}: the {role}'s chat template changes the content of message {m} (not verbatim, "
                             f"not trimmed), or writes text next to it that depends on it; alignment by message needs "
                             f"contents rendered as written")
    if pos != len(plain):
        raise ValueError(f"{where}: the {role}'s chat template writes text that depends on the message contents")
    return tuple(spans)


def render(tokenizer, template: str, messages, where: str = "", role: str = "student",
           generation_prompt: bool = False) -> Rendering:
    """The conversation as the template writes it, with every message content's span (see the module docstring)."""
    marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
    skeleton = _apply(tokenizer, template, marked, generation_prompt, where, role)
    plain = _apply(tokenizer, template, messages, generation_prompt, where, role)
    return Rendering(plain, _locate(skeleton, plain, messages, where, role))


def prompt_of(conv: Conversation) -> tuple[list[dict], str]:
    """(the messages before the conversation's last answer, that answer): a held-out prompt and its reference."""
    last = conv.answers()[-1]
    return list(conv.messages[:last]), conv.messages[last]["content"]


# ---------------------------------------------------------------- the check pass


def _model_has_template(path: str) -> bool:
    """A tokenizer folder's chat template, seen without loading it (tokenizer_config.json or chat_template.jinja)."""
    folder = Path(path).expanduser()
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return False


def _template_problem(file: str | None, model_path: str, option: str, role: str, gguf: bool) -> str | None:
    if file:
        return None if Path(file).expanduser().is_file() else \
            f"{option}={file!r} is not a file; point it at a Jinja chat template"
    if gguf or _model_has_template(model_path):
        return None  # a GGUF checkpoint's template is known once converted (checked when the run renders)
    return (f"the {role}'s tokenizer ({model_path}) has no chat template; supply one as a Jinja file with "
            f"{option}=FILE")


def config_problems(cfg, with_eval: bool = True) -> list[str]:
    """The chat options' problems that need files, each with its fix (the check pass): the template files or the
    tokenizers' own templates, and every record of data.path (and of the eval sets)."""
    d, e = cfg.data, cfg.eval
    problems: list[str] = []  # the ranges and the options set without data.chat: config.py's validators
    if not d.chat:
        return problems
    for args in ((d.chat_template, cfg.student.path, "data.chat_template", "student", bool(cfg.student.gguf_file)),
                 (d.teacher_chat_template, cfg.teacher.path, "data.teacher_chat_template", "teacher",
                  bool(cfg.teacher.gguf_file))):
        problem = _template_problem(*args)
        problems += [problem] if problem else []
    sets = [(d.path, d.format, "data.path")]
    sets += [(path, "auto", f"eval.sets.{name}") for name, path in e.sets.items()] if with_eval else []
    for path, fmt, key in sets:
        try:
            read_conversations(path, fmt, key)
        except ValueError as err:
            problems.append(str(err))
    return problems
