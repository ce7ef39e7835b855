"""Layer pairing between teacher and student (METHOD.md §3).

Layers are 1-indexed: student layer k in 1..L_S is paired with teacher source layer l_T(k) in
1..L_T; lists of source layers are indexed k-1. Layer 0 (the embedding output) is never a source.
Attribution scores passed in here are either a list indexed l-1 for l = 1..L_T or a dict {l: score}.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Mapping, Sequence


def _check_depths(L_T: int, L_S: int) -> None:
    for name, value in (("L_T", L_T), ("L_S", L_S)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int layer count, got {value!r}")


def default_pairing(L_T: int, L_S: int) -> list[int]:
    """l_T(k) = max(1, floor(L_T / L_S * k)) for k = 1..L_S (exact integer arithmetic)."""
    _check_depths(L_T, L_S)
    return [max(1, (L_T * k) // L_S) for k in range(1, L_S + 1)]


def _monotone_around(pairs: list[int], pin: int, L_T: int, step: int) -> list[int]:
    """Raise later / lower earlier entries (never pairs[pin]) until each exceeds its predecessor by
    >= step, then clamp to [1, L_T]. A map that is already monotone comes back unchanged."""
    for i in range(1, len(pairs)):
        if i != pin:
            pairs[i] = max(pairs[i], pairs[i - 1] + step)
    for i in range(len(pairs) - 1, -1, -1):
        if i != pin:
            cap = L_T if i == len(pairs) - 1 else pairs[i + 1] - step
            pairs[i] = min(pairs[i], cap)
    return [min(max(l, 1), L_T) for l in pairs]


def repair_critical(pairs: Sequence[int], l_star: int, L_T: int | None = None) -> list[int]:
    """Re-pair student layer k_dag = min{k : l_T(k) >= l*} (L_S if none) to the critical layer l*.

    Neighbours are shifted only if needed to keep the map monotone: strictly increasing when there
    are enough teacher layers (L_T >= L_S) and room around l*, else non-decreasing; values stay in
    [1, L_T]. For the default pairing no neighbour ever moves.
    """
    pairs = list(pairs)
    L_T = L_T if L_T is not None else max(max(pairs), l_star)
    if not 1 <= l_star <= L_T:
        raise ValueError(f"critical layer {l_star} outside teacher layers 1..{L_T}")
    if l_star in pairs:
        return pairs
    k_dag = next((k for k, l in enumerate(pairs, start=1) if l >= l_star), len(pairs))
    pairs[k_dag - 1] = l_star
    return _monotone_around(pairs, k_dag - 1, L_T, 1 if L_T >= len(pairs) else 0)


def interpolation(L_T: int, L_S: int) -> list[tuple[int, int, float]]:
    """Per student layer (a, b, lam): u = L_T k / L_S, a = clip(floor u, 1, L_T-1), b = a+1, lam = clip(u-a, 0, 1).

    The interpolated source state is (1 - lam) h^(a) + lam h^(b). With L_T = 1 every row is (1, 1, 0.0).
    """
    _check_depths(L_T, L_S)
    if L_T == 1:
        return [(1, 1, 0.0)] * L_S
    rows = []
    for k in range(1, L_S + 1):
        u = Fraction(L_T * k, L_S)
        a = min(max(u.numerator // u.denominator, 1), L_T - 1)
        lam = min(max(u - a, Fraction(0)), Fraction(1))
        rows.append((a, a + 1, float(lam)))
    return rows


@dataclass
class PairingRow:
    """One student layer. If ``interp`` is set (a, b, lam), the source state is the interpolation
    (1 - lam) h^(a) + lam h^(b); otherwise it is h^(source_layer). ``score`` is the source layer's
    absolute attribution score (None without attribution)."""
    student_layer: int
    source_layer: int
    interp: tuple[int, int, float] | None = None
    score: float | None = None


@dataclass
class PairingTable:
    """The stage-1 artifact: one row per student layer plus the attribution scores it came from."""
    L_T: int
    L_S: int
    rows: list[PairingRow]
    scores_abs: list[float] | None = None
    scores_signed: list[float] | None = None
    critical_layer: int | None = None
    mode: str = "default"
    meta: dict = field(default_factory=dict)

    def sources(self) -> list[int]:
        return [r.source_layer for r in self.rows]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "PairingTable":
        data = json.loads(text)
        rows = [PairingRow(r["student_layer"], r["source_layer"],
                           tuple(r["interp"]) if r.get("interp") is not None else None, r.get("score"))
                for r in data.pop("rows")]
        return cls(rows=rows, **data)


def _scores_list(scores, L_T: int, name: str) -> list[float] | None:
    if scores is None:
        return None
    if isinstance(scores, Mapping):
        missing = [l for l in range(1, L_T + 1) if l not in scores]
        if missing:
            raise ValueError(f"{name} lacks teacher layers {missing}; score every layer 1..{L_T}")
        return [float(scores[l]) for l in range(1, L_T + 1)]
    values = [float(s) for s in scores]
    if len(values) != L_T:
        raise ValueError(f"{name} has {len(values)} entries, expected one per teacher layer 1..{L_T}")
    return values


def _validate_manual(manual: Sequence[int], L_T: int, L_S: int) -> list[int]:
    manual = list(manual)
    if len(manual) != L_S or not all(isinstance(l, int) and 1 <= l <= L_T for l in manual):
        raise ValueError(f"pairing.manual must list {L_S} source layers (one per student layer), each an int "
                         f"in 1..{L_T}; got {manual}")
    return manual


def build_pairing(L_T: int, L_S: int, scores_abs=None, critical: bool = True, interpolate: bool = False,
                  manual: Sequence[int] | None = None, scores_signed=None) -> PairingTable:
    """Build the pairing table: manual list, else default pairing (re-paired to the critical layer when
    ``critical`` and scores are given), optionally with interpolation rows (the re-paired critical row
    keeps its exact source layer)."""
    _check_depths(L_T, L_S)
    abs_list = _scores_list(scores_abs, L_T, "scores_abs")
    signed_list = _scores_list(scores_signed, L_T, "scores_signed")
    critical_layer, mode = None, "default"
    if manual is not None:
        sources, mode = _validate_manual(manual, L_T, L_S), "manual"
    else:
        sources = default_pairing(L_T, L_S)
        if critical and abs_list is not None:
            critical_layer = max(range(1, L_T + 1), key=lambda l: abs_list[l - 1])
            sources, mode = repair_critical(sources, critical_layer, L_T), "critical"
    interps = interpolation(L_T, L_S) if interpolate and manual is None else [None] * L_S
    rows = []
    for k, (src, ip) in enumerate(zip(sources, interps), start=1):
        if critical_layer is not None and src == critical_layer:
            ip = None
        score = abs_list[src - 1] if abs_list is not None else None
        rows.append(PairingRow(k, src, ip, score))
    mode = mode + "+interpolate" if any(r.interp for r in rows) else mode
    return PairingTable(L_T, L_S, rows, abs_list, signed_list, critical_layer, mode)


def span_sources(table: PairingTable) -> list[int]:
    """For `residual: span`: the previous source layer l_T(k-1) per student layer, with l_T(0) = 0."""
    return [0] + table.sources()[:-1]


def teacher_layers_needed(table: PairingTable, residual: str = "layer") -> list[int]:
    """Sorted teacher states h^(l) (0..L_T) the residual targets of this table need."""
    if residual not in ("layer", "span"):
        raise ValueError(f"method.residual must be 'layer' or 'span', got {residual!r}")
    needed: set[int] = set()
    prev = span_sources(table)
    for row, p in zip(table.rows, prev):
        tops = (row.interp[0], row.interp[1]) if row.interp else (row.source_layer,)
        needed.update(tops)
        needed.update({p} if residual == "span" else {t - 1 for t in tops})
    return sorted(needed)
