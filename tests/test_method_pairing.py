"""Layer pairing (METHOD.md §3)."""
import math
import random

import pytest

from semalign_ds.method import pairing


def _monotone(pairs, strict):
    return all((b > a) if strict else (b >= a) for a, b in zip(pairs, pairs[1:]))


def test_default_pairing_paper_cases():
    assert pairing.default_pairing(40, 32) == [math.floor(1.25 * k) for k in range(1, 33)]
    assert pairing.default_pairing(20, 10) == [2 * k for k in range(1, 11)]
    assert pairing.default_pairing(3, 6) == [1, 1, 1, 2, 2, 3]  # max(1, .) floor for deeper students
    with pytest.raises(ValueError, match="L_S"):
        pairing.default_pairing(4, 0)


def test_repair_critical_first_layer_at_or_above():
    pairs = pairing.default_pairing(20, 10)  # 2, 4, ..., 20
    assert pairing.repair_critical(pairs, 7) == [2, 4, 6, 7, 10, 12, 14, 16, 18, 20]
    assert pairing.repair_critical(pairs, 8) == pairs  # already paired: unchanged
    assert pairing.repair_critical(pairs, 1) == [1, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert pairing.repair_critical([1, 2, 3], 5, L_T=5) == [1, 2, 5]  # none >= l*: k_dag = L_S


def test_repair_critical_shifts_neighbours_monotone():
    assert pairing.repair_critical([3, 5, 6], 4, L_T=6) == [3, 4, 6]
    # non-monotone input maps: neighbours of k_dag move so the map ends strictly increasing
    assert pairing.repair_critical([4, 2, 6], 5, L_T=6) == [3, 4, 5]
    assert pairing.repair_critical([2, 7, 3], 6, L_T=8) == [2, 6, 7]  # later entries pushed up
    assert pairing.repair_critical([1, 2, 2, 3], 4, L_T=4) == [1, 2, 3, 4]  # L_T == L_S: strict
    rng = random.Random(0)
    for _ in range(300):
        L_S = rng.randint(1, 12)
        L_T = rng.randint(1, 40)
        l_star = rng.randint(1, L_T)
        repaired = pairing.repair_critical(pairing.default_pairing(L_T, L_S), l_star, L_T)
        assert l_star in repaired and len(repaired) == L_S
        assert all(1 <= l <= L_T for l in repaired)
        assert _monotone(repaired, strict=L_T >= L_S)
        default = pairing.default_pairing(L_T, L_S)
        changed = sum(a != b for a, b in zip(repaired, default))
        assert changed == (0 if l_star in default else 1)  # on the default map only k_dag moves


def test_interpolation_values():
    rows = pairing.interpolation(40, 32)
    assert rows[0] == (1, 2, 0.25)  # u = 1.25
    assert rows[3] == (5, 6, 0.0)  # u = 5
    assert rows[-1] == (39, 40, 1.0)  # u = 40 -> a clipped to 39, lam 1
    assert pairing.interpolation(20, 10)[2] == (6, 7, 0.0)
    assert pairing.interpolation(3, 6)[0] == (1, 2, 0.0)  # u = 0.5 -> a clipped to 1, lam clipped to 0
    assert pairing.interpolation(1, 3) == [(1, 1, 0.0)] * 3
    for a, b, lam in pairing.interpolation(13, 7):
        assert b == a + 1 and 0.0 <= lam <= 1.0


def test_build_pairing_critical_and_json_roundtrip():
    scores = [0.1] * 20
    scores[6] = 5.0  # layer 7 is critical
    table = pairing.build_pairing(20, 10, scores_abs=scores, scores_signed=[-s for s in scores])
    assert table.critical_layer == 7 and table.mode == "critical"
    assert table.sources() == [2, 4, 6, 7, 10, 12, 14, 16, 18, 20]
    assert table.rows[3].score == 5.0 and table.rows[0].score == 0.1
    back = pairing.PairingTable.from_json(table.to_json())
    assert back == table
    assert pairing.span_sources(table) == [0, 2, 4, 6, 7, 10, 12, 14, 16, 18]


def test_build_pairing_interpolate_manual_and_errors():
    table = pairing.build_pairing(40, 32, scores_abs={l: float(l == 4) for l in range(1, 41)}, interpolate=True)
    assert pairing.default_pairing(40, 32)[:4] == [1, 2, 3, 5]
    assert table.rows[3].source_layer == 4 and table.rows[3].interp is None  # critical row stays exact
    assert table.rows[0].interp == (1, 2, 0.25)
    assert pairing.PairingTable.from_json(table.to_json()) == table
    plain = pairing.build_pairing(40, 32)
    assert plain.sources() == pairing.default_pairing(40, 32) and plain.critical_layer is None
    manual = pairing.build_pairing(6, 3, manual=[1, 3, 6])
    assert manual.sources() == [1, 3, 6] and manual.mode == "manual"
    with pytest.raises(ValueError, match=r"pairing\.manual"):
        pairing.build_pairing(6, 3, manual=[1, 3, 7])
    with pytest.raises(ValueError, match=r"pairing\.manual"):
        pairing.build_pairing(6, 3, manual=[1, 3])
    with pytest.raises(ValueError, match="scores_abs"):
        pairing.build_pairing(6, 3, scores_abs=[1.0, 2.0])


def test_teacher_layers_needed():
    table = pairing.build_pairing(20, 10)
    assert pairing.teacher_layers_needed(table, "layer") == sorted({l for k in range(1, 11) for l in (2 * k - 1, 2 * k)})
    assert pairing.teacher_layers_needed(table, "span") == list(range(0, 21, 2))
    interp = pairing.build_pairing(3, 2, interpolate=True)  # u = 1.5, 3 -> (1,2,.5), (2,3,1)
    assert pairing.teacher_layers_needed(interp, "layer") == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="method.residual"):
        pairing.teacher_layers_needed(table, "bogus")
