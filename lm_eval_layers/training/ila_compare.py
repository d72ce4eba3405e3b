"""`surgery ila compare`: how much two ILA rankings agree, against what chance gives, and how the
layers a fine-tune needs line up with the layers inference needs (a `surgery score` file).

Chance for the overlap of two top-K sets of N units: the intersection X of two independent
uniformly random K-subsets is hypergeometric, P(X = x) = C(K, x) C(N − K, K − x) / C(N, K), so the
expected Jaccard index is Σ_x P(X = x) · x / (2K − x), computed exactly here (K/(2N − K) is only
the ratio of the expectations E[X] / E[|A ∪ B|]).
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Any, Sequence

from lm_eval_layers.errors import UsageError
from lm_eval_layers.training.ila_report import TOP_SHARES, order_by_score, share_label, top_k


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def expected_jaccard(n: int, k: int) -> float:
    """E[|A ∩ B| / |A ∪ B|] for two independent uniformly random K-subsets of N items."""
    if not 0 < k <= n:
        raise ValueError(f"need 0 < K <= N, got K={k}, N={n}")
    total = math.comb(n, k)
    return sum(math.comb(k, x) * math.comb(n - k, k - x) / total * x / (2 * k - x) for x in range(max(0, 2 * k - n), k + 1))


def _top_sets(document: dict[str, Any]) -> dict[str, set[str]]:
    units = document["units"]
    order = sorted(units, key=lambda u: u["rank"])
    return {share_label(p): {u["name"] for u in order[:top_k(p, len(units))]} for p in TOP_SHARES}


def compare_runs(documents: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Jaccard of the top 10/25/50% sets for every pair of runs, with the chance level beside it."""
    rows = []
    for (name_a, a), (name_b, b) in combinations(documents, 2):
        units_a, units_b = [u["name"] for u in a["units"]], [u["name"] for u in b["units"]]
        if units_a != units_b:
            raise UsageError(
                f"{name_a} and {name_b} rank different units ({len(units_a)} vs {len(units_b)}, unit {a['unit']} vs "
                f"{b['unit']}); compare runs of the same model with the same --unit"
            )
        sets_a, sets_b = _top_sets(a), _top_sets(b)
        n = len(units_a)
        for p in TOP_SHARES:
            label, k = share_label(p), top_k(p, n)
            rows.append({"a": name_a, "b": name_b, "top": label, "k": k, "n": n,
                         "jaccard": jaccard(sets_a[label], sets_b[label]), "chance": expected_jaccard(n, k)})
    return rows


def block_totals(document: dict[str, Any]) -> list[float]:
    """Σ σ(s) per block, in block order."""
    return [b["total"] for b in sorted(document["blocks"], key=lambda b: b["block"])]


def compare_scores(name: str, document: dict[str, Any], scores_name: str, scores: dict[str, Any]) -> dict[str, Any]:
    """Per-block ILA totals against a `surgery score` file's block values: Spearman ρ and the
    top-K overlap |top_K(ILA) ∩ top_K(scores)| / K (chance: K / N)."""
    from scipy import stats

    if scores.get("unit") != "block":
        raise UsageError(f"{scores_name} scores {scores.get('unit')} units; compare with a `surgery score --unit block` file")
    totals = block_totals(document)
    values = [float(u["value"]) for u in sorted(scores["units"], key=lambda u: int(u["index"]))]
    if len(values) != len(totals) or scores.get("num_layers") != document["num_layers"]:
        raise UsageError(f"{scores_name} scores {len(values)} blocks but {name} has {len(totals)}; use files of the same model")
    rho = float(stats.spearmanr(totals, values).statistic)
    ila_order, score_order = order_by_score(totals), order_by_score(values)
    n = len(totals)
    overlap = []
    for p in TOP_SHARES:
        k = top_k(p, n)
        shared = len(set(ila_order[:k]) & set(score_order[:k]))
        overlap.append({"top": share_label(p), "k": k, "n": n, "overlap": shared / k, "chance": k / n})
    return {"ila": name, "scores": scores_name, "method": scores.get("method"), "spearman": rho, "top_k": overlap}
