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
from pathlib import Path
from typing import Any, Sequence

from rich.table import Table

from lm_eval_layers.errors import UsageError
from lm_eval_layers.training.ila_file import TOP_SHARES, load_json, order_by_score, require, share_label, top_k, top_units
from lm_eval_layers.training.ila_file import validate as validate_ila

SCORES_FIX = "give a scores.json written by `surgery score --unit block`"


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def expected_jaccard(n: int, k: int) -> float:
    """E[|A ∩ B| / |A ∪ B|] for two independent uniformly random K-subsets of N items."""
    if not 0 < k <= n:
        raise ValueError(f"need 0 < K <= N, got K={k}, N={n}")
    total = math.comb(n, k)
    return sum(math.comb(k, x) * math.comb(n - k, k - x) / total * x / (2 * k - x) for x in range(max(0, 2 * k - n), k + 1))


def _top_sets(document: dict[str, Any]) -> dict[str, set[str]]:
    return {share_label(p): {u["name"] for u in top_units(document, p)} for p in TOP_SHARES}


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


def block_totals(document: dict[str, Any], name: str) -> list[float]:
    """Σ σ(s) per block, in block order."""
    require(document, ("blocks",), name)
    for i, block in enumerate(document["blocks"]):
        require(block, ("block", "total"), f"{name} block entry {i}")
    return [b["total"] for b in sorted(document["blocks"], key=lambda b: b["block"])]


def compare_scores(name: str, document: dict[str, Any], scores_name: str, scores: dict[str, Any]) -> dict[str, Any]:
    """Per-block ILA totals against a `surgery score` file's block values: Spearman ρ and the
    top-K overlap |top_K(ILA) ∩ top_K(scores)| / K (chance: K / N)."""
    from scipy import stats

    require(scores, ("unit", "num_layers", "units"), scores_name, SCORES_FIX)
    if scores["unit"] != "block":
        raise UsageError(f"{scores_name} scores {scores['unit']} units; compare with a `surgery score --unit block` file")
    for i, unit in enumerate(scores["units"]):
        require(unit, ("index", "value"), f"{scores_name} unit {i}", SCORES_FIX)
    totals = block_totals(document, name)
    values = [float(u["value"]) for u in sorted(scores["units"], key=lambda u: int(u["index"]))]
    if len(values) != len(totals) or scores["num_layers"] != document["num_layers"]:
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


def compare_files(paths: Sequence[Path]) -> dict[str, list[dict[str, Any]]]:
    """Every pair of the ila.json files, and every ila.json against every scores.json among `paths`."""
    from lm_eval_layers.importance.scoring import SCHEMA as SCORES_SCHEMA

    runs, scores = [], []
    for path in paths:
        document = load_json(path)
        if document.get("schema") == SCORES_SCHEMA:
            scores.append((str(path), document))
        else:
            runs.append((str(path), validate_ila(document, path)))
    if not runs or len(runs) + len(scores) < 2:
        raise UsageError("compare needs two ila.json files, or one with a scores.json of `surgery score`")
    return {"pairs": compare_runs(runs),
            "scores": [compare_scores(name, doc, s_name, s_doc) for name, doc in runs for s_name, s_doc in scores]}


def tables(comparison: dict[str, list[dict[str, Any]]]) -> list[Table]:
    """The comparison as rich tables: the pairs' overlaps, then ILA against the scores files."""
    out = []
    pairs, against = comparison["pairs"], comparison["scores"]
    if pairs:
        t = Table(title="ILA top sets: Jaccard overlap (chance = expected Jaccard of two random K-of-N sets)")
        for col in ("A", "B", "top", "K of N", "Jaccard", "chance"):
            t.add_column(col, justify="left" if col in ("A", "B") else "right")
        for r in pairs:
            t.add_row(r["a"], r["b"], r["top"], f"{r['k']} of {r['n']}", f"{r['jaccard']:.3f}", f"{r['chance']:.3f}")
        out.append(t)
    if against:
        t = Table(title="per-block ILA totals vs `surgery score` values (top-K overlap, chance K/N)")
        for col in ("ILA", "scores", "method", "Spearman ρ", *(f"top {r['top']}" for r in against[0]["top_k"])):
            t.add_column(col, justify="left" if col in ("ILA", "scores", "method") else "right")
        for r in against:
            t.add_row(r["ila"], r["scores"], str(r["method"]), f"{r['spearman']:+.3f}",
                      *(f"{o['overlap']:.2f} ({o['chance']:.2f})" for o in r["top_k"]))
        out.append(t)
    return out
