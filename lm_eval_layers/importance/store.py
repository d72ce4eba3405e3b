"""The SQLite store of evaluated coalitions: each one's per-example columns, committed as soon
as it is measured, so runs resume, budgets extend, and any metric reuses them.

A row answers only for its context (model files, dtype, tasks, document limit, unit): a store
written for another model or task set is never read back for this one.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from lm_eval_layers.columns import Columns


class Store:
    def __init__(self, path: Path, context: dict[str, Any]) -> None:
        self.path = path
        self.context = json.dumps(context, sort_keys=True)
        self.db = sqlite3.connect(str(path))
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS coalitions (context TEXT, coalition TEXT, scores TEXT, PRIMARY KEY (context, coalition))"
        )
        self.db.commit()

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM coalitions WHERE context = ?", (self.context,)).fetchone()[0]

    def get(self, coalition: str) -> dict[str, Columns] | None:
        row = self.db.execute(
            "SELECT scores FROM coalitions WHERE context = ? AND coalition = ?", (self.context, coalition)
        ).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, coalition: str, scores: dict[str, Columns]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO coalitions VALUES (?, ?, ?)", (self.context, coalition, json.dumps(scores))
        )
        self.db.commit()
