"""Loading by path: one tiny checkpoint per supported family, saved as safetensors and loaded back through
load_causal_lm / load_config / load_tokenizer, then reached through get_adapter. Also the user errors.
Shapes: ids_BT (int64), logits_BTV.
"""
from __future__ import annotations

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from semalign_ds.models.adapters import ADAPTERS, get_adapter
from semalign_ds.models.loading import load_causal_lm, load_config, load_tokenizer, model_max_positions

HIDDEN, LAYERS, VOCAB, HEADS, POSITIONS = 32, 2, 128, 4, 64

_LLAMA_LIKE = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=POSITIONS)
TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_LLAMA_LIKE),
    "mistral": lambda: transformers.MistralConfig(**_LLAMA_LIKE, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**_LLAMA_LIKE),
    "qwen3": lambda: transformers.Qwen3Config(**_LLAMA_LIKE, head_dim=HIDDEN // HEADS),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        vocab_size=VOCAB, max_position_embeddings=POSITIONS),
    "gpt2": lambda: transformers.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB,
                                            n_positions=POSITIONS),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(
        **_LLAMA_LIKE, head_dim=HIDDEN // HEADS, sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    "mamba": lambda: transformers.MambaConfig(hidden_size=HIDDEN, state_size=4, num_hidden_layers=LAYERS,
                                              vocab_size=VOCAB, expand=2, conv_kernel=2),
}


def save_tiny(family: str, directory) -> None:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[family]())
    model.save_pretrained(directory)


def save_word_tokenizer(directory, eos: str | None = "<eos>") -> None:
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "hello", "world"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, unk_token="<unk>").save_pretrained(directory)


def test_every_adapter_family_has_a_tiny_config():
    assert set(TINY_CONFIGS) == set(ADAPTERS)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_load_family_forward_and_adapter(family, tmp_path):
    save_tiny(family, tmp_path)
    assert list(tmp_path.glob("*.safetensors")), "save_pretrained must write safetensors"
    model = load_causal_lm(tmp_path, dtype=torch.float32, device="cpu", key="student.path")
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ids_BT = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        logits_BTV = model(input_ids=ids_BT).logits
    assert logits_BTV.shape == (2, 5, VOCAB) and torch.isfinite(logits_BTV).all()

    adapter = get_adapter(model)
    assert isinstance(adapter.layers, torch.nn.ModuleList) and len(adapter.layers) == LAYERS
    assert (adapter.num_layers, adapter.hidden_size, adapter.vocab_size) == (LAYERS, HIDDEN, VOCAB)
    assert adapter.embed.weight.shape == (VOCAB, HIDDEN)
    assert adapter.lm_head.weight.shape == (VOCAB, HIDDEN)
    assert adapter.head_weight().shape == (VOCAB, HIDDEN)
    normed = adapter.final_norm(torch.randn(2, 5, HIDDEN))
    assert normed.shape == (2, 5, HIDDEN)
    with torch.no_grad():  # the adapter's parts rebuild the model's own logits
        hidden = model(input_ids=ids_BT, output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(adapter.lm_head(hidden), logits_BTV, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_load_config_reads_no_weights_and_max_positions(family, tmp_path):
    save_tiny(family, tmp_path)
    for weights in tmp_path.glob("*.safetensors"):
        weights.unlink()  # load_config must not need them
    config = load_config(tmp_path, key="teacher.path")
    assert config.model_type == family
    assert model_max_positions(config) == POSITIONS


def test_load_dtype_is_applied(tmp_path):
    save_tiny("llama", tmp_path)
    model = load_causal_lm(tmp_path, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_path_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"teacher\.path.*does not exist"):
        load_causal_lm(tmp_path / "nope", dtype=torch.float32, device="cpu", key="teacher.path")
    with pytest.raises(ValueError, match=r"teacher\.path is empty"):
        load_config("", key="teacher.path")


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match=r"student\.path.*no config\.json"):
        load_config(tmp_path, key="student.path")


def test_file_instead_of_directory(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is a file"):
        load_config(tmp_path / "model.safetensors", key="student.path")


def test_bert_model_is_not_a_causal_lm(tmp_path):
    config = transformers.BertConfig(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS,
                                     intermediate_size=64, vocab_size=VOCAB)
    transformers.BertModel(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"teacher\.path.*not a causal LM"):
        load_causal_lm(tmp_path, dtype=torch.float32, device="cpu", key="teacher.path")


def test_unsupported_causal_family_lists_supported(tmp_path):
    config = transformers.OPTConfig(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS,
                                    ffn_dim=64, vocab_size=VOCAB, word_embed_proj_dim=HIDDEN,
                                    max_position_embeddings=POSITIONS)
    transformers.OPTForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'opt' is not supported.*gpt2, gpt_neox, llama, mamba, mistral, qwen2, qwen3"):
        load_causal_lm(tmp_path, dtype=torch.float32, device="cpu", key="student.path")
    with pytest.raises(ValueError, match=r"'opt' is not supported"):
        load_config(tmp_path, key="student.path")


def test_bin_weights_are_refused(tmp_path):
    save_tiny("gpt2", tmp_path)
    for weights in tmp_path.glob("*.safetensors"):
        weights.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read: refused by name")
    with pytest.raises(ValueError, match=r"not safetensors \(pytorch_model\.bin\).*pickle.*save_pretrained"):
        load_causal_lm(tmp_path, dtype=torch.float32, device="cpu", key="teacher.path")


def test_no_weights_at_all(tmp_path):
    save_tiny("gpt2", tmp_path)
    for weights in tmp_path.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ValueError, match=r"no \*\.safetensors weights"):
        load_causal_lm(tmp_path, dtype=torch.float32, device="cpu")


def test_tokenizer_pad_defaults_to_eos(tmp_path):
    save_word_tokenizer(tmp_path)
    tokenizer = load_tokenizer(tmp_path, key="student.path")
    assert tokenizer.pad_token == "<eos>" and tokenizer.pad_token_id == tokenizer.eos_token_id == 1
    assert tokenizer("hello world", add_special_tokens=False)["input_ids"] == [2, 3]


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    save_tiny("llama", tmp_path)
    with pytest.raises(ValueError, match=r"student\.path.*no usable tokenizer"):
        load_tokenizer(tmp_path, key="student.path")
