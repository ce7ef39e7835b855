"""Semantic bases, shared vocabulary and the folded alignment map (METHOD.md §1-2)."""
import pytest
import torch

from semalign_ds.method import basis


class FakeTokenizer:
    def __init__(self, vocab):
        self._vocab = dict(vocab)

    def get_vocab(self):
        return dict(self._vocab)


def _heads(V=50, D_T=12, D_S=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(V, D_T, generator=g, dtype=torch.float64),
            torch.randn(V, D_S, generator=g, dtype=torch.float64))


def test_output_basis_is_unit_pinv_columns():
    W_T, _ = _heads()
    S = basis.output_basis(W_T, dtype=torch.float64)
    assert S.shape == (12, 50)
    torch.testing.assert_close(S.norm(dim=0), torch.ones(50, dtype=torch.float64))
    pinv = torch.linalg.pinv(W_T)
    cos = (S * pinv).sum(0) / pinv.norm(dim=0)
    torch.testing.assert_close(cos, torch.ones(50, dtype=torch.float64))
    # columns of pinv(W) are the dual basis: W S has a positive diagonal, W pinv(W) is a projector
    assert (torch.diagonal(W_T @ S) > 0).all()


def test_output_basis_by_vocabulary_chunks_equals_one_pass():
    W_T, _ = _heads(V=53)
    whole = basis.output_basis(W_T, dtype=torch.float64, chunk=1000)
    torch.testing.assert_close(basis.output_basis(W_T, dtype=torch.float64, chunk=7), whole)
    torch.testing.assert_close(whole, basis.output_basis(W_T.float()).double(), atol=1e-5, rtol=1e-4)


def test_input_basis_rows_transposed():
    E = torch.randn(30, 6, dtype=torch.float64)
    S = basis.input_basis(E, dtype=torch.float64)
    torch.testing.assert_close(S, (E / E.norm(dim=1, keepdim=True)).T)


def test_folded_map_equals_naive_decomposition():
    W_T, W_S = _heads()
    S_T = basis.output_basis(W_T, dtype=torch.float64)
    S_S = basis.output_basis(W_S, dtype=torch.float64)
    ids = torch.arange(50)
    M = basis.alignment_map(S_T, S_S, ids, ids, chunk=7)  # chunking must not change the result
    assert M.shape == (8, 12) and M.dtype == torch.float64
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(basis.align(M, x), basis.naive_align(x, S_T, S_S, ids, ids), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(M, S_S @ S_T.T)


def test_align_subset_ids_and_dtypes():
    W_T, W_S = _heads()
    S_T, S_S = basis.output_basis(W_T), basis.output_basis(W_S)  # float32 default
    ids_T, ids_S = torch.tensor([3, 7, 9, 20]), torch.tensor([1, 7, 30, 2])
    M = basis.alignment_map(S_T, S_S, ids_T, ids_S)
    assert M.dtype == torch.float32
    x = torch.randn(1, 4, 12).to(torch.bfloat16)
    y = basis.align(M, x)
    assert y.dtype == torch.bfloat16 and y.shape == (1, 4, 8)
    assert basis.align(M, x, out_dtype=torch.float32).dtype == torch.float32
    ref = basis.naive_align(x.float(), S_T, S_S, ids_T, ids_S)
    torch.testing.assert_close(basis.align(M, x.float()), ref, atol=1e-5, rtol=1e-5)
    assert basis.align(M, torch.zeros(1, 1, 12)).abs().max() == 0  # zero vector (padding) -> zero


def test_shared_vocabulary_same_tokenizer_all_ids():
    tok = FakeTokenizer({f"t{i}": i for i in range(10)})
    ids_T, ids_S = basis.shared_vocabulary(tok, tok, min_shared=5)
    assert ids_T.tolist() == list(range(10)) and ids_S.tolist() == list(range(10))
    assert ids_T.dtype == torch.long
    same_vocab = FakeTokenizer(tok.get_vocab())
    ids_T2, _ = basis.shared_vocabulary(tok, same_vocab, min_shared=5, V_T=8, V_S=12)
    assert ids_T2.tolist() == list(range(8))  # ids beyond the smaller head are not shared


def test_shared_vocabulary_intersection_of_strings():
    tok_T = FakeTokenizer({"a": 0, "b": 1, "c": 2, "d": 3, "e": 4})
    tok_S = FakeTokenizer({"e": 0, "c": 1, "x": 2, "a": 3, "b": 9})
    ids_T, ids_S = basis.shared_vocabulary(tok_T, tok_S, min_shared=2)
    assert ids_T.tolist() == [0, 1, 2, 4]  # sorted by teacher id
    assert ids_S.tolist() == [3, 9, 1, 0]
    ids_T, ids_S = basis.shared_vocabulary(tok_T, tok_S, min_shared=2, V_S=5)  # 'b' -> 9 has no head row
    assert ids_T.tolist() == [0, 2, 4] and ids_S.tolist() == [3, 1, 0]


def test_head_larger_than_tokenizer_vocab():
    tok = FakeTokenizer({f"t{i}": i for i in range(6)})
    ids_T, _ = basis.shared_vocabulary(tok, tok, min_shared=1, V_T=64, V_S=64)
    assert ids_T.tolist() == list(range(6))


def test_too_few_shared_tokens_error():
    tok_T = FakeTokenizer({"a": 0, "b": 1, "c": 2})
    tok_S = FakeTokenizer({"a": 0, "y": 1, "z": 2})
    with pytest.raises(ValueError, match=r"method\.min_shared_tokens.*") as err:
        basis.shared_vocabulary(tok_T, tok_S, min_shared=2)
    assert "share 1 tokens" in str(err.value)


def test_different_tokenizers_map_matches_naive():
    W_T, W_S = _heads(V=40)
    S_T = basis.output_basis(W_T, dtype=torch.float64)
    S_S = basis.output_basis(W_S, dtype=torch.float64)
    tok_T = FakeTokenizer({f"w{i}": i for i in range(40)})
    tok_S = FakeTokenizer({f"w{(i * 7) % 50}": i for i in range(40)})
    ids_T, ids_S = basis.shared_vocabulary(tok_T, tok_S, min_shared=10)
    M = basis.alignment_map(S_T, S_S, ids_T, ids_S, chunk=4)
    x = torch.randn(3, 2, 12, dtype=torch.float64)
    torch.testing.assert_close(basis.align(M, x), basis.naive_align(x, S_T, S_S, ids_T, ids_S), atol=1e-6, rtol=1e-6)


def test_cache_key_by_value():
    W = torch.randn(20, 4)
    assert basis.basis_cache_key(W) == basis.basis_cache_key(W.clone().double())
    W2 = W.clone()
    W2[3, 1] += 1e-3
    assert basis.basis_cache_key(W) != basis.basis_cache_key(W2)
    assert basis.basis_cache_key(W) != basis.basis_cache_key(W.reshape(40, 2))
    big = torch.randn(300, 50)
    key = basis.basis_cache_key(big, full_limit=1000)  # subsampled path
    assert key == basis.basis_cache_key(big.clone(), full_limit=1000) and len(key) == 64
    big2 = big.clone()
    big2[0, 0] += 1.0  # first row is always hashed
    assert basis.basis_cache_key(big2, full_limit=1000) != key
