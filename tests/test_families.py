"""The sweep over every decoder family of the installed transformers (tests/families.py): no plan
is ever silently wrong or a crash, and the families people evaluate today are exact."""

from __future__ import annotations

import pytest

from families import CHECKS, MUST_WORK, decoder_families, quiet, sweep_family

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    quiet()
    work = tmp_path_factory.mktemp("families")
    return {name: sweep_family(name, work) for name in decoder_families()}


def test_no_family_is_silently_wrong_or_crashes(results):
    bad = [f"{name} {check}: {r.status[check]} ({r.detail.get(check, '')})" for name, r in results.items()
           for check in CHECKS if r.status.get(check) in ("WRONG", "crash")]
    assert not bad, "\n".join(bad)


def test_must_work_families_are_exact_in_memory_and_on_disk(results):
    missing = [f"{name} {check}: {results[name].status.get(check, 'not built')} ({results[name].detail.get(check) or results[name].detail.get('build', '')})"
               for name in MUST_WORK for check in ("drop", "copy-zero", "cache", "disk")
               if results[name].status.get(check) != "exact"]
    assert not missing, "\n".join(missing)


def test_most_buildable_families_are_exact_for_drop_and_copy_zero(results):
    built = [r for r in results.values() if r.cls]
    exact = [r for r in built if all(r.status.get(c) == "exact" for c in ("drop", "copy-zero"))]
    # 131 of 175 on transformers 5.25 (the issue targets 95%: a miss); a floor against regressions
    assert len(built) >= 150 and len(exact) >= 0.7 * len(built), (len(exact), len(built))
