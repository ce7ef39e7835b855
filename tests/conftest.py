"""Test environment: CPU DeepSpeed, no hub, one thread per process (2 cores, several ranks)."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# DeepSpeed's JIT-built ops: this environment's own folder (cluster/extensions.py), unless the user set one
if "TORCH_EXTENSIONS_DIR" not in os.environ:
    from semalign_ds.cluster.extensions import default_dir

    os.environ["TORCH_EXTENSIONS_DIR"] = str(default_dir("cpu"))
# Semantic-basis cache of the tests: a fresh folder, not the user's ~/.cache
os.environ.setdefault("SEMALIGN_CACHE", __import__("tempfile").mkdtemp(prefix="semalign-test-cache-"))

import json
import subprocess
import sysconfig
from pathlib import Path

import pytest


def _stdlib_texts(n: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(errors="ignore") for p in sorted(root.glob("*.py"))[:n]]


def make_tiny_pair(out: Path, teacher_family: str = "llama", vocab_size: int = 384) -> dict:
    """A byte-level BPE tokenizer on stdlib text, a 4-layer teacher and a 2-layer student (random weights),
    and transfer/eval JSONL files: everything a `semalign run` needs, in a few seconds, no download."""
    import torch
    import transformers as tr
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = _stdlib_texts(24)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = tr.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    shapes = {"teacher": (teacher_family, 4, 64), "student": ("llama", 2, 32)}
    for name, (family, layers, hidden) in shapes.items():
        if family == "gpt_neox":
            config = tr.GPTNeoXConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                      num_attention_heads=4, vocab_size=len(fast), max_position_embeddings=128,
                                      eos_token_id=0, bos_token_id=0, pad_token_id=0)
        else:
            config = tr.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=len(fast),
                                    max_position_embeddings=128, eos_token_id=0, bos_token_id=0, pad_token_id=0)
        tr.AutoModelForCausalLM.from_config(config).save_pretrained(out / name)
        fast.save_pretrained(out / name)
    for split, part in (("train", texts[:16]), ("test", texts[16:])):
        with open(out / f"{split}.jsonl", "w") as f:
            for text in part:
                f.write(json.dumps({"text": text}) + "\n")
    return {"teacher": out / "teacher", "student": out / "student", "train": out / "train.jsonl",
            "test": out / "test.jsonl"}


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    return make_tiny_pair(tmp_path_factory.mktemp("tiny_pair"))


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An initialised, empty MLflow sqlite store; copying it skips MLflow's table migrations (seconds) per test."""
    import mlflow

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(empty_store, monkeypatch):
    """store(dir): the directory with an empty MLflow store of its own (as a first run would create)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def make(out: Path) -> Path:
        import shutil

        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(empty_store, out / "mlflow.db")
        return out
    return make


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA device: skipped, with the reason, where there is none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible); run on a GPU machine: pytest -m gpu")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size_kib, read_only) -> a fresh tmpfs; skipped where this process may not mount (not root)."""
    mounted = []

    def mount(size_kib: int, read_only: bool = False) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        opts = f"size={size_kib}k" + (",ro" if read_only else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'not root'}): needs root, as in CI")
        mounted.append(point)
        return point
    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


@pytest.fixture(autouse=True)
def _restore_environment():
    """In-process runs set launch variables (RANK, LOCAL_RANK, MASTER_PORT, ...): no test sees another's."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def single_rank_env(monkeypatch):
    """A complete single-rank launch environment, whatever earlier tests left in os.environ."""
    from semalign_ds.cluster.launch import free_port

    for var, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", os.environ.get("MASTER_PORT") or str(free_port()))):
        monkeypatch.setenv(var, value)
    for var in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
