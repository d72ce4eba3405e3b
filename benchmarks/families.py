"""The architecture table of the README, generated from the family sweep (tests/families.py):
every decoder family of the installed transformers as a tiny random model, each check exact /
refused / WRONG / crash / n/a, written as Markdown and JSON.

    .venv/bin/python benchmarks/families.py --out out/families   # ~3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from families import CHECKS, decoder_families, quiet, sweep_family  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/families"))
    args = parser.parse_args()
    quiet()
    args.out.mkdir(parents=True, exist_ok=True)
    rows, records = [], []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        names = decoder_families()
        for i, name in enumerate(names, 1):
            r = sweep_family(name, Path(work))
            print(f"[{i}/{len(names)}] {name}: {' '.join(r.status.get(c, '-') for c in CHECKS) or 'not built'}", flush=True)
            records.append({"model_type": name, "class": r.cls, "status": r.status, "detail": r.detail})
            if r.cls:
                rows.append(f"| {name} | " + " | ".join(r.status.get(c, "n/a") for c in CHECKS) + " |")
    built = [r for r in records if r["class"]]
    exact = [r for r in built if all(r["status"].get(c) == "exact" for c in ("drop", "copy-zero", "disk"))]
    bad = [f"{r['model_type']} {c}" for r in built for c in CHECKS if r["status"].get(c) in ("WRONG", "crash")]
    summary = (f"{len(records)} causal-LM model types; {len(built)} built from a generic small config; "
               f"{len(exact)} exact for drop, copy-zero and on disk; WRONG or crash: {', '.join(bad) or 'none'} "
               f"({time.perf_counter() - start:.0f} s)")
    table = "| family | " + " | ".join(CHECKS) + " |\n|---|" + "---|" * len(CHECKS) + "\n" + "\n".join(rows)
    (args.out / "families.md").write_text(summary + "\n\n" + table + "\n")
    (args.out / "families.json").write_text(json.dumps(records, indent=1) + "\n")
    print(summary)


if __name__ == "__main__":
    main()
