"""The demo's world: a teacher and a student LM pretrained on the Python standard library's source.

Nothing is downloaded. The corpus is read from ``sysconfig.get_paths()['stdlib']``:
- GENERAL domain (both models): the stdlib's ``.py`` files, one document per file, leaving out
  test folders (test/, tests/, idle_test/), idlelib/, pydoc_data/, encodings/ (codec tables),
  site-packages/, __pycache__/ and the machine-specific ``_sysconfigdata*`` module.
- TARGET domain (teacher only): English documentation prose. The string values of
  ``pydoc_data/topics.py`` (the reference manual's topics, ~465k characters) and the stdlib's
  own prose ``.txt`` files (``idlelib/*.txt``, ``LICENSE.txt``; ~130k characters; grammar files
  such as lib2to3's are left out), cut into documents of at most ~2000 characters at blank lines.
Each domain's documents go to train/validation/test by a hash of their id (stable, 90/5/5).

One byte-level BPE tokenizer, trained on both train splits, is shared by both models. The teacher
(a larger LlamaForCausalLM) pretrains on general + target train sequences; the student (smaller)
on exactly the same general sequences and nothing else. Both, the tokenizer and the JSONL files
the SemAlign pipeline reads (a "text" field per line) are cached under
``<root>/<scale>-<recipe hash>/``; root is the ``cache_dir`` argument, else ``$SEMALIGN_CACHE/demo-v1``,
else ``~/.cache/semalign_ds/demo-v1``. A build is written to a temporary folder and renamed into
place with its manifest, so a half-written cache is never used; a cache whose manifest does not
match its files is removed and rebuilt.

Shape legend: N sequences, T tokens (seq_len), B batch. ``seqs_NT`` are packed int64 token ids.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import math
import os
import shutil
import sysconfig
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from semalign_ds import files
from semalign_ds.evaluation.evaluate import perplexity
from semalign_ds.method.lr import warmup_cosine

log = logging.getLogger(__name__)

RECIPE_VERSION = 1
EOS, PAD = "<|endoftext|>", "<|pad|>"
_SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "pydoc_data", "encodings", "site-packages", "__pycache__"}
_COMMON = dict(version=RECIPE_VERSION, seed=1234, splits=(0.90, 0.05, 0.05), chunk_chars=2000,
               warmup=0.05, min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0)
RECIPES: dict[str, dict] = {
    "default": dict(_COMMON, general_max_chars=None, target_max_chars=None, vocab_size=4096,
                    seq_len=128, batch=16, teacher_steps=270, target_fraction=0.35,
                    teacher=dict(layers=4, hidden=256, heads=4, intermediate=688, lr=2e-3),
                    student=dict(layers=2, hidden=128, heads=4, intermediate=344, lr=3e-3),
                    transfer_sequences=1000, general_test_max_seqs=160),
    "tiny": dict(_COMMON, general_max_chars=150_000, target_max_chars=60_000, vocab_size=320,
                 seq_len=32, batch=4, teacher_steps=12, target_fraction=0.35,
                 teacher=dict(layers=2, hidden=32, heads=2, intermediate=64, lr=3e-3),
                 student=dict(layers=1, hidden=16, heads=2, intermediate=32, lr=3e-3),
                 transfer_sequences=60, general_test_max_seqs=8),
}
DATA_FILES = {"transfer_jsonl": "transfer.jsonl", "target_val_jsonl": "target_val.jsonl",
              "target_test_jsonl": "target_test.jsonl", "general_test_jsonl": "general_test.jsonl"}


@dataclass
class DemoAssets:
    """Paths of a built demo world; ``stats`` holds pretraining perplexities, sizes and times."""
    cache_dir: Path
    teacher_path: Path
    student_path: Path
    tokenizer_path: Path
    transfer_jsonl: Path
    target_val_jsonl: Path
    target_test_jsonl: Path
    general_test_jsonl: Path
    stats: dict = field(default_factory=dict)
    from_cache: bool = False


# ----------------------------------------------------------------------------- corpus
def stdlib_root() -> Path:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not (root / "pydoc_data" / "topics.py").is_file():
        raise ValueError(f"the demo needs the standard library's source with pydoc_data/topics.py; "
                         f"not found under {root} (install a full CPython, not a stripped one)")
    return root


def general_files(root: Path) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        found += [Path(folder, f) for f in files if f.endswith(".py") and not f.startswith("_sysconfigdata")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def target_files(root: Path) -> list[Path]:
    return [root / "pydoc_data" / "topics.py"] + sorted(root.glob("idlelib/*.txt")) + sorted(root.glob("LICENSE*.txt"))


def _chunks(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` at blank lines into pieces of at most ~max_chars (a long paragraph stays whole)."""
    out, cur = [], ""
    for para in text.split("\n\n"):
        if cur and len(cur) + len(para) + 2 > max_chars:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    return [c for c in out + [cur] if c.strip()]


def _topics(path: Path) -> dict[str, str]:
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "topics" for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError(f"{path} has no 'topics = {{...}}' assignment; this Python's pydoc_data is unexpected")


def _budget(docs: list[tuple[str, str]], max_chars: int | None) -> list[tuple[str, str]]:
    if max_chars is None:
        return docs
    out, used = [], 0
    for doc in docs:
        if used + len(doc[1]) <= max_chars:
            out.append(doc)
            used += len(doc[1])
    return out


def load_corpus(root: Path, recipe: dict) -> dict[str, list[tuple[str, str]]]:
    """{'general': [(doc_id, text)], 'target': [...]}, both in sorted, deterministic order."""
    general = [(p.relative_to(root).as_posix(), p.read_bytes().decode("utf-8", "replace")) for p in general_files(root)]
    target = []
    for path in target_files(root):
        rel = path.relative_to(root).as_posix()
        sources = _topics(path) if path.suffix == ".py" else {"": path.read_text(encoding="utf-8", errors="replace")}
        for key in sorted(sources):
            for i, chunk in enumerate(_chunks(sources[key], recipe["chunk_chars"])):
                target.append((f"{rel}::{key}#{i}" if key else f"{rel}#{i}", chunk))
    return {"general": _budget(general, recipe["general_max_chars"]),
            "target": _budget(target, recipe["target_max_chars"])}


def _unit_hash(doc_id: str) -> float:
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:12], 16) / 16**12


def split_by_hash(docs: list[tuple[str, str]], fractions) -> dict[str, list[tuple[str, str]]]:
    """train/validation/test by a stable hash of each doc id; val and test get at least one doc."""
    ranked = sorted(docs, key=lambda d: _unit_hash(d[0]))
    n_train = min(int(round(fractions[0] * len(ranked))), len(ranked) - 2)
    n_val = max(1, int(round(fractions[1] * len(ranked))))
    if n_train < 1:
        raise ValueError(f"a domain needs at least 3 documents to split; got {len(docs)}")
    parts = {"train": ranked[:n_train], "validation": ranked[n_train:n_train + n_val], "test": ranked[n_train + n_val:]}
    return {k: sorted(v) for k, v in parts.items()}


# ----------------------------------------------------------------------------- tokenizer + packing
def train_tokenizer(texts: list[str], vocab_size: int, seq_len: int):
    """Byte-level BPE as a transformers PreTrainedTokenizerFast (eos = bos = <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=4 * seq_len)


def pack(tokenizer, texts: list[str], seq_len: int, max_seqs: int | None = None) -> torch.Tensor:
    """Concatenate texts (each followed by EOS) and cut into ``seqs_NT``; the remainder is dropped."""
    ids: list[int] = []
    for start in range(0, len(texts), 64):
        for enc in tokenizer.backend_tokenizer.encode_batch(texts[start:start + 64], add_special_tokens=False):
            ids.extend(enc.ids + [tokenizer.eos_token_id])
        if max_seqs is not None and len(ids) >= max_seqs * seq_len:
            break
    n = len(ids) // seq_len if max_seqs is None else min(len(ids) // seq_len, max_seqs)
    return torch.tensor(ids[:n * seq_len], dtype=torch.long).view(n, seq_len)


def in_hash_order(docs: list[tuple[str, str]]) -> list[str]:
    return [text for _, text in sorted(docs, key=lambda d: _unit_hash(d[0]))]


# ----------------------------------------------------------------------------- models + training
def make_llama(spec: dict, vocab_size: int, seq_len: int, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=spec["hidden"], num_hidden_layers=spec["layers"],
                      num_attention_heads=spec["heads"], num_key_value_heads=spec["heads"],
                      intermediate_size=spec["intermediate"], max_position_embeddings=4 * seq_len,
                      tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()


def _optimizer(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def lr_factor(step: int, total: int, warmup: float, min_ratio: float) -> float:
    """Linear warmup over ``warmup * total`` steps (at least one), then cosine decay to ``min_ratio``."""
    return warmup_cosine(step, max(1, int(warmup * total)), total, min_ratio)


def pretrain(model, seqs_NT: torch.Tensor, recipe: dict, lr: float, device, desc: str, progress: bool) -> dict:
    """One pass over ``seqs_NT`` (already shuffled) in batches; AdamW, cosine LR, float32."""
    model.to(device).train()
    opt = _optimizer(model, lr, recipe["weight_decay"])
    steps = len(seqs_NT) // recipe["batch"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, recipe["warmup"], recipe["min_lr_ratio"]))
    start, losses = time.perf_counter(), []
    for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        ids_BT = seqs_NT[step * recipe["batch"]:(step + 1) * recipe["batch"]].to(device)
        loss = model(input_ids=ids_BT, labels=ids_BT, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["grad_clip"])
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    tail = losses[-max(1, steps // 10):]
    return {"steps": steps, "tokens": steps * recipe["batch"] * seqs_NT.shape[1], "final_loss": sum(tail) / len(tail),
            "train_seconds": round(time.perf_counter() - start, 2), "params": sum(p.numel() for p in model.parameters())}


def eval_ppl(model, seqs_NT: torch.Tensor, device, batch: int = 32) -> float:
    mask_NT = torch.ones_like(seqs_NT, dtype=torch.bool)
    return perplexity(model, ((seqs_NT[i:i + batch], mask_NT[i:i + batch]) for i in range(0, len(seqs_NT), batch)), device)


def _shuffled(seqs_NT: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` rows drawn epoch by epoch (each epoch a fresh permutation)."""
    if len(seqs_NT) == 0:
        raise ValueError("no packed sequences to train on: the corpus split is too small for seq_len")
    reps = math.ceil(n / len(seqs_NT))
    return torch.cat([seqs_NT[torch.randperm(len(seqs_NT), generator=gen)] for _ in range(reps)])[:n]


def training_streams(gen_NT, tgt_NT, recipe: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher rows, student rows): the student's rows are exactly the teacher's general rows."""
    total = recipe["teacher_steps"] * recipe["batch"]
    n_gen = recipe["batch"] * round((1 - recipe["target_fraction"]) * recipe["teacher_steps"])
    g = torch.Generator().manual_seed(recipe["seed"])
    general = _shuffled(gen_NT, n_gen, g)
    teacher = torch.cat([general, _shuffled(tgt_NT, total - n_gen, g)])
    return teacher[torch.randperm(len(teacher), generator=g)], general


# ----------------------------------------------------------------------------- cache
def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    root = cache_dir or files.cache_root("demo-v1")
    return Path(root).expanduser()


def recipe_key(recipe: dict, root: Path) -> str:
    """Hash of the recipe and of the corpus files' names and sizes (another Python -> another key)."""
    files = general_files(root) + target_files(root)
    fingerprint = [(p.relative_to(root).as_posix(), p.stat().st_size) for p in files]
    blob = json.dumps({"recipe": recipe, "corpus": fingerprint}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _assets(folder: Path, manifest: dict, from_cache: bool) -> DemoAssets:
    data = {k: folder / "data" / v for k, v in DATA_FILES.items()}
    return DemoAssets(cache_dir=folder, teacher_path=folder / "teacher", student_path=folder / "student",
                      tokenizer_path=folder / "tokenizer", stats=manifest["stats"], from_cache=from_cache, **data)


def read_valid_manifest(folder: Path, key: str) -> dict | None:
    """The manifest if the folder is a complete build of ``key`` (all listed files, right sizes)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        ok = manifest.get("key") == key and manifest.get("files") and all(
            (folder / rel).is_file() and (folder / rel).stat().st_size == size for rel, size in manifest["files"].items())
    except (OSError, ValueError, AttributeError):
        return None
    return manifest if ok else None


def _write_manifest(folder: Path, key: str, recipe: dict, stats: dict) -> None:
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    manifest = {"key": key, "recipe": recipe, "stats": stats, "files": files}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, default=list))


@contextmanager
def _build_env(threads: int, progress: bool):
    """torch threads = ``threads`` and transformers' own bars ("Writing model shards") only with ``progress``;
    both restored afterwards."""
    from transformers.utils import logging as hf_logging

    before = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(threads)
    (hf_logging.enable_progress_bar if progress else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        (hf_logging.enable_progress_bar if before[1] else hf_logging.disable_progress_bar)()


# ----------------------------------------------------------------------------- build
def _write_jsonl(path: Path, docs: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for doc_id, text in docs:
            f.write(json.dumps({"text": text, "id": doc_id}, ensure_ascii=False) + "\n")


def _transfer_docs(tokenizer, docs: list[tuple[str, str]], n_tokens: int) -> list[tuple[str, str]]:
    out, used = [], 0
    for doc in sorted(docs, key=lambda d: _unit_hash(d[0])):
        if used >= n_tokens:
            break
        out.append(doc)
        used += len(tokenizer.backend_tokenizer.encode(doc[1], add_special_tokens=False).ids) + 1
    return sorted(out)


def _write_data(out: Path, tokenizer, parts: dict, recipe: dict) -> dict:
    transfer = _transfer_docs(tokenizer, parts["target"]["train"], recipe["transfer_sequences"] * recipe["seq_len"])
    for name, docs in [("transfer_jsonl", transfer), ("target_val_jsonl", parts["target"]["validation"]),
                       ("target_test_jsonl", parts["target"]["test"]), ("general_test_jsonl", parts["general"]["test"])]:
        _write_jsonl(out / "data" / DATA_FILES[name], docs)
    splits = {dom: {s: [d for d, _ in docs] for s, docs in sp.items()} for dom, sp in parts.items()}
    splits["transfer"] = [d for d, _ in transfer]
    (out / "data" / "splits.json").write_text(json.dumps(splits, indent=1))
    return {"transfer_docs": len(transfer), **{f"{dom}_{s}_docs": len(v) for dom, sp in parts.items() for s, v in sp.items()}}


def _train_models(out: Path, tokenizer, parts: dict, recipe: dict, device, progress: bool) -> dict:
    t, T = time.perf_counter(), recipe["seq_len"]
    gen_NT = pack(tokenizer, in_hash_order(parts["general"]["train"]), T,
                  max_seqs=recipe["batch"] * recipe["teacher_steps"])
    tgt_NT = pack(tokenizer, in_hash_order(parts["target"]["train"]), T)
    tests = {"target_test": pack(tokenizer, in_hash_order(parts["target"]["test"]), T),
             "general_test": pack(tokenizer, in_hash_order(parts["general"]["test"]), T, recipe["general_test_max_seqs"])}
    teacher_rows, student_rows = training_streams(gen_NT, tgt_NT, recipe)
    stats = {"pack_seconds": round(time.perf_counter() - t, 2), "target_train_seqs": len(tgt_NT),
             **{f"{k}_seqs": len(v) for k, v in tests.items()}}
    for role, rows, seed in [("teacher", teacher_rows, recipe["seed"]), ("student", student_rows, recipe["seed"] + 1)]:
        model = make_llama(recipe[role], len(tokenizer), T, tokenizer, seed)
        stats[role] = pretrain(model, rows, recipe, recipe[role]["lr"], device, f"pretrain {role}", progress)
        stats[role].update({f"{k}_ppl": round(eval_ppl(model, v, device), 3) for k, v in tests.items()})
        if progress:
            tqdm.write(f"demo {role}: {stats[role]['steps']} steps in {stats[role]['train_seconds']:.0f} s; perplexity "
                       f"target {stats[role]['target_test_ppl']:.1f}, general {stats[role]['general_test_ppl']:.1f}")
        model.to("cpu").save_pretrained(out / role)
        tokenizer.save_pretrained(out / role)
    return stats


def _build(out: Path, key: str, recipe: dict, device, progress: bool) -> None:
    start = time.perf_counter()
    corpus = load_corpus(stdlib_root(), recipe)
    parts = {dom: split_by_hash(docs, recipe["splits"]) for dom, docs in corpus.items()}
    train_texts = [t for _, t in parts["general"]["train"] + parts["target"]["train"]]
    tokenizer = train_tokenizer(train_texts, recipe["vocab_size"], recipe["seq_len"])
    tokenizer.save_pretrained(out / "tokenizer")
    stats = {"tokenizer_seconds": round(time.perf_counter() - start, 2), "vocab_size": len(tokenizer),
             "seq_len": recipe["seq_len"], "device": str(device)}
    stats.update(_write_data(out, tokenizer, parts, recipe))
    stats.update(_train_models(out, tokenizer, parts, recipe, device, progress))
    t, s = stats["teacher"], stats["student"]
    stats["target_ppl_reduction"] = round(1 - t["target_test_ppl"] / s["target_test_ppl"], 4)
    stats["general_ppl_reduction"] = round(1 - t["general_test_ppl"] / s["general_test_ppl"], 4)
    stats["build_seconds"] = round(time.perf_counter() - start, 2)
    _write_manifest(out, key, recipe, stats)


def general_replay_jsonl(assets: DemoAssets, scale: str = "default") -> Path:
    """The general domain's training documents (the stdlib code the student was pretrained on), in the order its
    pretraining drew them, as JSONL: the demo's replay data for data.replay_fraction. Written once into the
    demo's data folder (temporary file, renamed)."""
    path = assets.cache_dir / "data" / "general_replay.jsonl"
    if path.is_file():
        return path
    wanted = set(json.loads((assets.cache_dir / "data" / "splits.json").read_text())["general"]["train"])
    docs = [d for d in load_corpus(stdlib_root(), RECIPES[scale])["general"] if d[0] in wanted]
    if len(docs) != len(wanted):
        raise ValueError(f"the demo cache {assets.cache_dir} lists {len(wanted)} general training documents but this "
                         f"Python's stdlib has {len(docs)} of them; delete the cache folder to rebuild it")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _write_jsonl(tmp, sorted(docs, key=lambda d: _unit_hash(d[0])))
    os.replace(tmp, path)
    return path


def build_demo_assets(cache_dir=None, device: str | torch.device = "cpu", progress: bool = True,
                      scale: str = "default", threads: int = 2, recipe: dict | None = None) -> DemoAssets:
    """Build (or reuse from the cache) the demo's tokenizer, teacher, student and JSONL data.

    ``cache_dir``: cache root (else $SEMALIGN_CACHE/demo-v1, else ~/.cache/semalign_ds/demo-v1); ``device``: where the
    models pretrain; ``scale``: 'default' (a few minutes on 2 cores) or 'tiny' (seconds, for tests); ``threads``:
    torch intra-op threads during the build (restored afterwards); ``recipe``: a recipe of the caller's (e.g. the
    quality benchmark's bigger pair) cached under the name ``scale``, instead of RECIPES[scale]. Concurrent callers
    wait on a file lock.
    """
    if recipe is None and scale not in RECIPES:
        raise ValueError(f"scale={scale!r} is unknown; use one of {sorted(RECIPES)}")
    recipe, root = recipe or RECIPES[scale], cache_root(cache_dir)
    key = recipe_key(recipe, stdlib_root())
    folder = root / f"{scale}-{key}"
    with files.cache_lock(root / f".{scale}-{key}.lock"):
        manifest = read_valid_manifest(folder, key)
        if manifest is not None:
            return _assets(folder, manifest, from_cache=True)
        if folder.exists():
            log.warning("demo cache %s is incomplete or corrupt; removing it and rebuilding", folder)
            shutil.rmtree(folder)
        for stale in root.glob(f".tmp-{scale}-{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{scale}-{key}-", dir=root))
        try:
            with _build_env(threads, progress):
                _build(tmp, key, recipe, torch.device(device), progress)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return _assets(folder, read_valid_manifest(folder, key), from_cache=False)
