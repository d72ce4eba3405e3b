"""The architecture table of the README, generated from the family sweep (tests/families.py):
every decoder family of the installed transformers as a tiny random model, each check exact /
refused / WRONG / crash / n/a, written as Markdown and JSON.

    .venv/bin/python benchmarks/families.py --out out/families --readme README.md   # ~5 min on 2 CPU cores

`--readme` replaces the table between the `families:start` / `families:end` markers of that file.
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
    parser.add_argument("--readme", type=Path, help="a Markdown file whose families:start/end block to replace")
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
    both = [r for r in built if all(r["status"].get(c) == "exact" for c in ("drop", "copy-zero"))]
    import transformers

    summary = (f"transformers {transformers.__version__}: {len(records)} causal-LM model types, {len(built)} built from a "
               f"generic small config; {len(both)} exact for both drop and copy-zero, {len(exact)} of them on disk too; "
               f"WRONG or crash: {', '.join(bad) or 'none'}.")
    table = "| family | " + " | ".join(CHECKS) + " |\n|---|" + "---|" * len(CHECKS) + "\n" + "\n".join(rows)
    (args.out / "families.md").write_text(summary + "\n\n" + table + "\n")
    (args.out / "families.json").write_text(json.dumps(records, indent=1) + "\n")
    if args.readme:
        text = args.readme.read_text()
        head, rest = text.split("<!-- families:start -->", 1)
        _, tail = rest.split("<!-- families:end -->", 1)
        block = f"{summary}\n\n<details><summary>Every family, every check</summary>\n\n{table}\n\n</details>\n"
        args.readme.write_text(f"{head}<!-- families:start -->\n{block}<!-- families:end -->{tail}")
    print(f"{summary} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
