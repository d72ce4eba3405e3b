"""The SQLite store of evaluated coalitions: each one's per-example columns, committed as soon
as it is measured, so runs resume, budgets extend, and any metric reuses them.

A row answers only for its context (model files, dtype, tasks, document limit, unit, and the
tasks' configs and documents): a store written for another model, task set or edited task YAML
is never read back for this one. The file is created by
the first evaluation it keeps, so a run refused before any evaluation leaves none behind.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from lm_eval_layers.columns import Columns


class Store:
    def __init__(self, path: Path | None, context: dict[str, Any]) -> None:
        """`path` None keeps the evaluations in memory, for the life of this object."""
        self.path = path
        self.context = json.dumps(context, sort_keys=True)
        self._db: sqlite3.Connection | None = None

    def within(self, extra: dict[str, Any]) -> "Store":
        """The same file, answering only for this context narrowed by `extra` (known later, e.g.
        the tasks' configs once they are loaded)."""
        return Store(self.path, {**json.loads(self.context), **extra})

    def _open(self, create: bool) -> sqlite3.Connection | None:
        if self._db is None and (create or self.path is None or self.path.exists()):
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)  # --out in a new folder, as prune makes it
            self._db = sqlite3.connect(":memory:" if self.path is None else str(self.path))
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS coalitions (context TEXT, coalition TEXT, scores TEXT, PRIMARY KEY (context, coalition))"
            )
            self._db.commit()
        return self._db

    def __len__(self) -> int:
        db = self._open(create=False)
        return db.execute("SELECT COUNT(*) FROM coalitions WHERE context = ?", (self.context,)).fetchone()[0] if db else 0

    def get(self, coalition: str) -> dict[str, Columns] | None:
        db = self._open(create=False)
        row = db.execute(
            "SELECT scores FROM coalitions WHERE context = ? AND coalition = ?", (self.context, coalition)
        ).fetchone() if db else None
        return json.loads(row[0]) if row else None

    def put(self, coalition: str, scores: dict[str, Columns]) -> None:
        db = self._open(create=True)
        assert db is not None
        db.execute("INSERT OR REPLACE INTO coalitions VALUES (?, ?, ?)", (self.context, coalition, json.dumps(scores)))
        db.commit()
