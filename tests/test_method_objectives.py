"""Layer and output objectives (METHOD.md §4-5)."""
import pytest
import torch

from semalign_ds.method import objectives as obj


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _mask(B, T, lengths):
    return torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


@pytest.mark.parametrize("form", ["cov", "gram", "auto"])
def test_geometry_matches_tt_form(form):
    g = _gen(1)
    rs = torch.randn(3, 9, 5, generator=g, dtype=torch.float64)
    rt = torch.randn(3, 9, 5, generator=g, dtype=torch.float64) + 0.5 * rs
    mask = _mask(3, 9, [9, 6, 3])
    fast = obj.relation_geometry(rs, rt, mask, form=form)
    torch.testing.assert_close(fast, obj.relation_geometry_naive(rs, rt, mask), atol=1e-6, rtol=1e-6)
    assert 0.0 < float(fast) < 4.0


def test_geometry_gradients_match_naive():
    g = _gen(2)
    rs = torch.randn(2, 12, 4, generator=g, dtype=torch.float64, requires_grad=True)
    rt = torch.randn(2, 12, 4, generator=g, dtype=torch.float64)
    mask = _mask(2, 12, [12, 7])
    (g_fast,) = torch.autograd.grad(obj.relation_geometry(rs, rt, mask, form="cov"), rs)
    (g_ref,) = torch.autograd.grad(obj.relation_geometry_naive(rs, rt, mask), rs)
    torch.testing.assert_close(g_fast, g_ref, atol=1e-8, rtol=1e-6)
    assert g_fast[1, 7:].abs().max() == 0  # padded tokens get no gradient


def test_geometry_padding_changes_nothing():
    g = _gen(3)
    rs = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    rt = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    base = obj.relation_geometry(rs, rt, torch.ones(2, 6, dtype=torch.bool), form="cov")
    pad_s = torch.randn(2, 5, 4, generator=g, dtype=torch.float64) * 100
    pad_t = torch.randn(2, 5, 4, generator=g, dtype=torch.float64) * 100
    rs_p, rt_p = torch.cat([rs, pad_s], 1), torch.cat([rt, pad_t], 1)
    mask_p = torch.cat([torch.ones(2, 6, dtype=torch.bool), torch.zeros(2, 5, dtype=torch.bool)], 1)
    for form in ("cov", "gram"):
        torch.testing.assert_close(obj.relation_geometry(rs_p, rt_p, mask_p, form=form), base, atol=1e-6, rtol=0)
    # left padding too, in float32
    left = obj.relation_geometry(torch.cat([pad_s, rs], 1).float(), torch.cat([pad_t, rt], 1).float(),
                                 mask_p.flip(1))
    torch.testing.assert_close(left.double(), base, atol=1e-6, rtol=0)


def test_geometry_edge_cases():
    rs = torch.randn(2, 4, 3)
    mask = _mask(2, 4, [1, 0])  # no sequence has 2 valid tokens
    loss = obj.relation_geometry(rs.requires_grad_(), torch.randn(2, 4, 3), mask)
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    x = torch.randn(1, 8, 3)
    assert float(obj.relation_geometry(x, 7.0 * x + 2.0)) == pytest.approx(0.0, abs=1e-5)  # scale/shift invariant
    big = obj.relation_geometry(x.bfloat16() * 1e4, x.bfloat16())
    assert big.dtype == torch.float32 and torch.isfinite(big)
    with pytest.raises(ValueError, match="form"):
        obj.relation_geometry(x, x, form="bogus")


def test_cosine_layer_masks():
    x = torch.randn(2, 5, 4)
    t = x.clone()
    t[:, 3:] = -x[:, 3:]  # padded tokens point the other way
    mask = _mask(2, 5, [3, 3])
    assert float(obj.cosine_layer(x, t, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(obj.cosine_layer(x, t)) == pytest.approx(2 * 2 / 5, abs=1e-5)


def _kl_ref(p, zs):
    return (p * (p.log() - torch.log_softmax(zs, -1))).sum(-1)


def test_fisher_equals_second_order_kl():
    g = _gen(4)
    zt = torch.randn(2, 3, 11, generator=g, dtype=torch.float64)
    d = torch.randn(2, 3, 11, generator=g, dtype=torch.float64)
    fisher = obj.fisher_logits(zt + d, zt)
    p = torch.softmax(zt, -1)
    for eps in (1e-2, 1e-3):
        kl = _kl_ref(p, zt + eps * d).mean()
        assert float(kl / eps ** 2) == pytest.approx(float(fisher), rel=10 * eps)
    # explicit quadratic form with diag(p) - p p^T
    H = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    quad = 0.5 * torch.einsum("btv,btvw,btw->bt", d, H, d).mean()
    torch.testing.assert_close(fisher, quad)
    mask = _mask(2, 3, [2, 0])
    torch.testing.assert_close(obj.fisher_logits(zt + d, zt, mask), 0.5 * torch.einsum(
        "btv,btvw,btw->bt", d, H, d)[0, :2].mean())


def test_kl_full_against_reference():
    g = _gen(5)
    zs, zt = torch.randn(2, 4, 9, generator=g), torch.randn(2, 4, 9, generator=g)
    mask = _mask(2, 4, [4, 1])
    tau = 2.0
    ref = tau ** 2 * _kl_ref(torch.softmax(zt / tau, -1), zs / tau)[mask].mean()
    torch.testing.assert_close(obj.kl_full(zs, zt, mask, tau), ref)
    zt_inf = zt.clone()
    zt_inf[..., 0] = float("-inf")  # teacher mass exactly 0 on a token: 0 log 0 = 0
    assert torch.isfinite(obj.kl_full(zs, zt_inf, mask))
    assert float(obj.kl_full(zt, zt, mask)) == pytest.approx(0.0, abs=1e-6)


def test_kl_topk_full_k_equals_full_kl_and_nonnegative():
    g = _gen(6)
    for trial in range(20):
        V = 5 + trial
        scale = 1.0 + 5.0 * (trial % 4)
        zs = torch.randn(2, 3, V, generator=g) * scale
        zt = torch.randn(2, 3, V, generator=g) * scale
        mask = _mask(2, 3, [3, 2])
        tau = (0.5, 1.0, 2.0)[trial % 3]
        vals, idx, tail = obj.teacher_topk(zt, V, tau)
        assert tail.abs().max() < 1e-6
        torch.testing.assert_close(obj.kl_topk(zs, vals, idx, tail, mask, tau), obj.kl_full(zs, zt, mask, tau),
                                   atol=1e-5, rtol=1e-4)
        for k in (1, 2, V // 2):
            vals, idx, tail = obj.teacher_topk(zt, k, tau)
            assert (tail >= 0).all() and (tail <= 1).all()
            assert float(obj.kl_topk(zs, vals, idx, tail, mask, tau)) >= 0.0
            # bucketing can only lose information: the top-k KL never exceeds the full KL
            full = float(obj.kl_full(zs, zt, mask, tau))
            assert float(obj.kl_topk(zs, vals, idx, tail, mask, tau)) <= full * (1 + 1e-5) + 1e-5
        assert float(obj.kl_topk(zt, *obj.teacher_topk(zt, 2, tau), mask, tau)) == pytest.approx(0.0, abs=1e-5)


def test_kl_topk_extreme_student_and_grad():
    zt = torch.randn(1, 2, 30)
    vals, idx, tail = obj.teacher_topk(zt, 4)
    zs = torch.full((1, 2, 30), -50.0)
    zs.scatter_(-1, idx, 50.0)  # student tail mass underflows to 0
    zs.requires_grad_()
    loss = obj.kl_topk(zs, vals, idx, tail)
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    loss.backward()
    assert torch.isfinite(zs.grad).all()
    with pytest.raises(ValueError, match="topk"):
        obj.teacher_topk(zt, 31)


def test_label_cosine_and_ce():
    g = _gen(7)
    zs = torch.randn(2, 4, 6, generator=g)
    labels = torch.randint(0, 6, (2, 4), generator=g)
    labels[1, 3] = -100
    mask = _mask(2, 4, [4, 3])
    z, y = zs[mask], labels[mask]
    ref_cos = 1 - (z.gather(-1, y[:, None]).squeeze(-1) / z.norm(dim=-1)).mean()
    torch.testing.assert_close(obj.label_cosine(zs, labels, mask), ref_cos)
    torch.testing.assert_close(obj.ce(zs, labels, mask), torch.nn.functional.cross_entropy(z, y))
    torch.testing.assert_close(obj.ce(zs, labels), obj.ce(zs, labels, mask))  # -100 ignored without a mask
    onehot = torch.nn.functional.one_hot(labels.clamp_min(0), 6).float() * 3.0
    assert float(obj.label_cosine(onehot, labels, mask)) == pytest.approx(0.0, abs=1e-6)
    out = obj.ce(zs.bfloat16(), labels, mask)
    assert out.dtype == torch.float32 and out.dim() == 0


def test_kl_topk_full_k_gradient_equals_full():
    g = _gen(8)
    zs = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    mask = _mask(2, 3, [3, 1])
    (g_top,) = torch.autograd.grad(obj.kl_topk(zs, *obj.teacher_topk(zt, 7, 1.5), mask, 1.5), zs)
    (g_full,) = torch.autograd.grad(obj.kl_full(zs, zt, mask, 1.5), zs)
    torch.testing.assert_close(g_top, g_full, atol=1e-7, rtol=1e-6)
