"""The layer plan: the one place where `drop`, `keep`, `drop_attn`, `drop_mlp`, `insert` and
`preset` are parsed and validated, so the lm-eval plugin and the `surgery` CLI build the very
same stack of blocks.

Parsing (`PlanSpec.from_args`) needs no model and catches syntax errors; resolving against a
depth (`PlanSpec.resolve`) needs only the layer count from the config, so every bad plan is
refused before any weight is loaded. Indices are 0-based on the *original* model, ranges are
inclusive and negative indices count from the end.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from lm_eval_layers.errors import PlanError
from lm_eval_layers.repair.spec import Repair, parse_repair, repair_runs
from lm_eval_layers.scores_file import Scores

INITS = ("copy", "avg", "copy-zero", "avg-zero")
_SEPARATOR = re.compile(r"\s*[,;]\s*|\s+")  # one comma or semicolon (spaces around allowed), or spaces
_INDEX_OR_RANGE = re.compile(r"^(-?\d+)(?:-(-?\d+))?$")


def unit_name(block: int, half: str | None = None) -> str:
    """The one written form of what importance and search remove, in every JSON file and table:
    a whole block `7`, or one of its branches `attn.7` / `mlp.7` (`drop_attn=7` in plan syntax)."""
    return str(block) if half is None else f"{half}.{block}"


@dataclass(frozen=True)
class Slot:
    """One block of the resulting stack.

    An original block has one source and `synthesized=False`: it shares the original weights.
    A synthesised block is a copy of `sources[0]` or the elementwise mean of its two sources;
    `zero_out` zeroes every residual-branch output projection, which makes it the identity.
    """

    sources: tuple[int, ...]
    synthesized: bool = False
    zero_out: bool = False
    drop_attn: bool = False
    drop_mlp: bool = False

    @property
    def source(self) -> int:
        return self.sources[0]

    @property
    def init(self) -> str | None:
        """The insert recipe in plan syntax (`avg-zero`, …), None for an original block."""
        if not self.synthesized:
            return None
        base = "avg" if len(self.sources) == 2 else "copy"
        return f"{base}-zero" if self.zero_out else base

    def describe(self) -> str:
        if self.synthesized:
            return f"{self.init}({','.join(map(str, self.sources))})"
        halves = [name for name, gone in (("attn", self.drop_attn), ("mlp", self.drop_mlp)) if gone]
        return f"{self.source}" + (f" without {'+'.join(halves)}" if halves else "")


@dataclass(frozen=True)
class Insert:
    after: int
    init: str


@dataclass(frozen=True)
class LayerPlan:
    """A validated plan for a model of `num_layers` blocks: the ordered slots of the variant, and
    the fitted-map repair of its dropped runs, if asked for (`lm_eval_layers.repair`)."""

    num_layers: int
    slots: tuple[Slot, ...]
    repair: Repair | None = None

    @classmethod
    def identity(cls, num_layers: int) -> LayerPlan:
        return cls(num_layers, tuple(Slot((i,)) for i in range(num_layers)))

    @property
    def is_identity(self) -> bool:
        return self == LayerPlan.identity(self.num_layers)

    @property
    def dropped(self) -> tuple[int, ...]:
        kept = {s.source for s in self.slots if not s.synthesized}
        return tuple(i for i in range(self.num_layers) if i not in kept)

    @property
    def new_slots(self) -> tuple[int, ...]:
        """Positions (in the variant) of synthesised blocks: the ones to train after expansion."""
        return tuple(k for k, s in enumerate(self.slots) if s.synthesized)

    def describe(self) -> str:
        """The plan in words, for logs, tables and model cards."""
        parts = []
        if self.dropped:
            parts.append(f"drop blocks {format_indices(self.dropped)}")
        for name, attr in (("attention", "drop_attn"), ("MLP", "drop_mlp")):
            hit = [s.source for s in self.slots if getattr(s, attr)]
            if hit:
                parts.append(f"remove the {name} branch of blocks {format_indices(hit)}")
        by_init: dict[str, list[int]] = {}
        for slot in self.slots:
            if slot.synthesized:
                by_init.setdefault(slot.init or "", []).append(slot.source)
        for init, after in by_init.items():
            parts.append(f"insert {init} after {','.join(map(str, after))}")
        if self.repair is not None:
            parts.append(self.repair.describe())
        body = "; ".join(parts) if parts else "unchanged"
        return f"{self.num_layers} -> {len(self.slots)} blocks: {body}"

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON; `repair` appears only when set, so an unrepaired plan's record (and
        every cache key made from it) is what it always was."""
        out: dict[str, Any] = {"num_layers": self.num_layers, "slots": [asdict(s) for s in self.slots]}
        if self.repair is not None:
            out["repair"] = self.repair.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerPlan:
        slots = tuple(
            Slot(**{**s, "sources": tuple(s["sources"])}) for s in data["slots"]
        )
        repair = Repair.from_dict(data["repair"]) if data.get("repair") else None
        return cls(int(data["num_layers"]), slots, repair)


def format_indices(indices: Iterable[int]) -> str:
    """`[1,2,3,7]` -> `1-3,7`: compact and in the plan's own syntax."""
    out: list[str] = []
    run: list[int] = []
    for i in sorted(set(indices)):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [i]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(out)


# ---------------------------------------------------------------------------------------------
# parsing (no model needed)

Range = tuple[int, int]


def _items(name: str, value: Any) -> list[str]:
    """Flatten a model_args value (int, float, string, list) into index/range tokens. An empty
    item (`3;;5`, a trailing `;`) is refused rather than skipped: it is a typo more often than
    not, and skipping it would evaluate a plan the user did not write."""
    if value is None:
        return []
    if isinstance(value, bool):
        raise PlanError(f"{name}={value!r} is not a block index; give indices like {name}=3 or {name}=24-27")
    if isinstance(value, (list, tuple)):
        tokens = [_items(name, v) for v in value]
        if [] in tokens:
            raise PlanError(f"{name}: {value!r} has an empty item; remove it")
        return [tok for group in tokens for tok in group]
    if isinstance(value, float):
        if not value.is_integer():
            raise PlanError(f"{name}={value} is not a whole block index; give indices like {name}=3")
        return [str(int(value))]
    if isinstance(value, int):
        return [str(value)]
    if isinstance(value, str):
        text = value.strip().strip("[]").strip().strip("'\"").strip()
        tokens = _SEPARATOR.split(text) if text else []
        if "" in tokens:
            raise PlanError(f"{name}: {value!r} has an empty item; separate items with one ',' or ';', e.g. {name}=3;5-7")
        return tokens
    raise PlanError(f"{name}={value!r} has an unsupported type; give indices like {name}=3,5-7")


def _parse_ranges(name: str, value: Any) -> tuple[Range, ...]:
    """Indices and inclusive ranges; a range written backwards is refused here when its ends
    have the same sign (then it is backwards at every depth), otherwise when it is resolved."""
    tokens = _items(name, value)
    if value is not None and not tokens:
        raise PlanError(f"{name} is empty; give blocks, e.g. {name}=3 or {name}=24-27, or leave {name} out")
    ranges = []
    for tok in tokens:
        m = _INDEX_OR_RANGE.match(tok.strip("'\""))
        if not m:
            raise PlanError(
                f"{name}: cannot read {tok!r}; use indices and inclusive ranges like "
                f"{name}=3, {name}=24-27, {name}=-2 or {name}=3;5-7"
            )
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) is not None else start
        if start > end and (start < 0) == (end < 0):
            raise PlanError(_backwards(name, f"{start}-{end}", end, start))
        ranges.append((start, end))
    return tuple(ranges)


def _backwards(name: str, written: str, low: int, high: int) -> str:
    return f"{name}: range {written} is empty (start after end); write it as low-high, e.g. {name}={low}-{high}"


def _parse_inserts(value: Any) -> tuple[tuple[int, str], ...]:
    if value is None:
        return ()
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if not isinstance(v, str):
            raise PlanError(f"insert={v!r}: each insert is POS:INIT, e.g. insert=3:copy or insert=1:avg-zero;5:copy-zero")
    tokens = _items("insert", value)
    if not tokens:
        raise PlanError("insert is empty; give POS:INIT items, e.g. insert=3:copy or insert=1:avg-zero;5:copy-zero, or leave insert out")
    inserts = []
    for tok in tokens:
        tok = tok.strip("'\"")
        pos, sep, init = tok.rpartition(":")
        if not sep or not re.fullmatch(r"-?\d+", pos):
            raise PlanError(f"insert: cannot read {tok!r}; write POS:INIT, e.g. insert=3:copy or insert=1:avg-zero;5:copy-zero")
        if init not in INITS:
            raise PlanError(f"insert: unknown init {init!r} in {tok!r}; use one of {', '.join(INITS)}")
        inserts.append((int(pos), init))
    return tuple(inserts)


def _parse_preset(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip().strip("'\"").lower()
    if not text:
        raise PlanError("preset is empty; use preset=slayer or preset=llama-pro:K, or leave preset out")
    if text == "slayer":
        return text
    m = re.fullmatch(r"llama-pro:(\d+)", text)
    if m and int(m.group(1)) > 0:
        return text
    raise PlanError(f"preset: unknown preset {value!r}; use preset=slayer or preset=llama-pro:K with K a positive number of blocks")


@dataclass(frozen=True)
class PlanSpec:
    """What the user asked for, parsed but not yet checked against a model's depth."""

    drop: tuple[Range, ...] = ()
    keep: tuple[Range, ...] | None = None
    drop_attn: tuple[Range, ...] = ()
    drop_mlp: tuple[Range, ...] = ()
    insert: tuple[tuple[int, str], ...] = ()
    preset: str | None = None
    lowest: tuple[Scores, int] | None = None  # a scores file and K, checked against the model in resolve()
    fixed: tuple[LayerPlan, str | None] | None = None  # from a plan file: the plan and its model_type
    repair: Repair | None = None  # a fitted-map repair of the dropped runs (replaces a plan file's own)

    ARGS = ("drop", "keep", "drop_attn", "drop_mlp", "insert", "preset", "scores", "drop_lowest", "plan",
            "repair", "ridge", "calibration", "tokens")

    @classmethod
    def from_args(
        cls,
        drop: Any = None,
        keep: Any = None,
        drop_attn: Any = None,
        drop_mlp: Any = None,
        insert: Any = None,
        preset: Any = None,
        scores: Any = None,
        drop_lowest: Any = None,
        plan: Any = None,
        repair: Any = None,
        ridge: Any = None,
        calibration: Any = None,
        tokens: Any = None,
        seed: Any = None,
    ) -> PlanSpec:
        fitted = parse_repair(repair, ridge, calibration, tokens, seed)
        if plan is not None:
            others = [k for k, v in (("drop", drop), ("keep", keep), ("drop_attn", drop_attn), ("drop_mlp", drop_mlp),
                                     ("insert", insert), ("preset", preset), ("scores", scores)) if v is not None]
            if others:
                raise PlanError(f"plan= is a whole plan; it does not combine with {', '.join(others)}: give one or the other")
            return cls(fixed=read_plan_file(plan), repair=fitted)
        if drop is not None and keep is not None:
            raise PlanError("drop and keep are exclusive: give the blocks to remove (drop=) or the ones to keep (keep=), not both")
        return cls(
            drop=_parse_ranges("drop", drop),
            keep=_parse_ranges("keep", keep) if keep is not None else None,
            drop_attn=_parse_ranges("drop_attn", drop_attn),
            drop_mlp=_parse_ranges("drop_mlp", drop_mlp),
            insert=_parse_inserts(insert),
            preset=_parse_preset(preset),
            lowest=_lowest_units(scores, drop_lowest),
            repair=fitted,
        )

    @property
    def is_empty(self) -> bool:
        return self == PlanSpec()

    # -----------------------------------------------------------------------------------------
    # resolving against a depth

    def resolve(self, num_layers: int, model_type: str | None = None) -> LayerPlan:
        """Check the plan against a model with `num_layers` blocks and build its slots."""
        plan = self._slots(num_layers, model_type)
        if self.repair is not None:
            plan = LayerPlan(plan.num_layers, plan.slots, self.repair)
        elif plan.repair is not None:
            plan.repair.check_text()
        repair_runs(plan)  # what a repair cannot fold is refused here, before any weight is read
        return plan

    def _slots(self, num_layers: int, model_type: str | None) -> LayerPlan:
        n = num_layers
        if self.fixed is not None:
            plan, planned_type = self.fixed
            if plan.num_layers != n:
                raise PlanError(f"the plan file is for a model with {plan.num_layers} blocks, this one has {n}; "
                                "make the plan on this model")
            if planned_type and model_type and planned_type != model_type:
                raise PlanError(f"the plan file is for a {planned_type} model, this one is {model_type}; make the plan on this model")
            return plan
        preset_drops, inserts = self._preset(n)
        if self.keep is not None:
            keep = _resolve("keep", self.keep, n)
            drops = sorted(set(range(n)) - set(keep))
        else:
            drops = _resolve("drop", self.drop, n)
        drops = sorted(set(drops) | set(preset_drops))
        if len(drops) == n:
            raise PlanError(f"the plan drops all {n} blocks; keep at least one block")
        attn = _resolve("drop_attn", self.drop_attn, n)
        mlp = _resolve("drop_mlp", self.drop_mlp, n)
        if self.lowest is not None:
            scores, k = self.lowest
            units = scores.lowest_for(k, n, model_type)  # depth and architecture first, then K
            if scores.unit == "block":
                drops = sorted(set(drops) | set(units))
            else:  # units ordered attn0, mlp0, attn1, ...
                attn = sorted(set(attn) | {u // 2 for u in units if u % 2 == 0})
                mlp = sorted(set(mlp) | {u // 2 for u in units if u % 2 == 1})
            if len(drops) == n:
                raise PlanError(f"drop_lowest removes all {n} blocks; drop fewer")
        for name, half in (("drop_attn", attn), ("drop_mlp", mlp)):
            both = sorted(set(half) & set(drops))
            if both:
                raise PlanError(
                    f"{name}: block(s) {format_indices(both)} are dropped whole already; "
                    f"remove them from {name} or from drop"
                )
        for raw_pos, init in self.insert:
            pos = _resolve_index("insert", raw_pos, n)
            if init.startswith("avg") and pos + 1 >= n:
                raise PlanError(
                    f"insert {raw_pos}:{init} averages blocks {pos} and {pos + 1}, but block {pos} is the "
                    f"last one; use {init.replace('avg', 'copy')} or an earlier position"
                )
            inserts.append((pos, init))

        by_position: dict[int, list[str]] = {}
        for pos, init in inserts:
            by_position.setdefault(pos, []).append(init)
        slots: list[Slot] = []
        for i in range(n):
            if i not in drops:
                slots.append(Slot((i,), drop_attn=i in attn, drop_mlp=i in mlp))
            for init in by_position.get(i, []):
                sources = (i, i + 1) if init.startswith("avg") else (i,)
                slots.append(Slot(sources, synthesized=True, zero_out=init.endswith("-zero")))
        return LayerPlan(n, tuple(slots))

    def _preset(self, n: int) -> tuple[list[int], list[tuple[int, str]]]:
        """Drops and inserts of a preset, scaled to depth n (Llama SLayer's S strategy; LLaMA-Pro)."""
        if self.preset is None:
            return [], []
        if self.preset == "slayer":
            # Llama SLayer's S strategy: an avg-zero block after every odd block of the first
            # half, and the last L/16 blocks removed (32 -> 38 for Llama-2-7B).
            n_drop = max(1, round(n / 16))
            inserts = [(i, "avg-zero") for i in range(1, n // 2, 2)]
            if n < 4 or not inserts:
                raise PlanError(f"preset=slayer needs a model with at least 4 blocks; this one has {n}")
            return list(range(n - n_drop, n)), inserts
        k = int(self.preset.split(":")[1])
        if k > n:
            raise PlanError(f"preset={self.preset} inserts {k} blocks but the model has only {n}; use K <= {n}")
        # LLaMA-Pro: one function-preserving copy after every (L/K)-th block.
        return [], [((j + 1) * n // k - 1, "copy-zero") for j in range(k)]


def _lowest_units(scores: Scores | None, k: Any) -> tuple[Scores, int] | None:
    """A scores file and K, checked for syntax only: the file is checked against the model's
    depth and architecture, and K against its units, once the model is known (`resolve`)."""
    if scores is None and k is None:
        return None
    if scores is None or k is None:
        raise PlanError("scores and drop_lowest go together: scores=PATH,drop_lowest=K")
    if isinstance(k, bool) or not isinstance(k, (int, float)) or int(k) != k or k < 1:
        raise PlanError(f"drop_lowest={k!r} must be a positive whole number of units")
    if not isinstance(scores, Scores):
        raise TypeError("scores must be a Scores object: read the file with lm_eval_layers.scores_file.read_scores")
    return scores, int(k)


def _resolve_index(name: str, i: int, n: int) -> int:
    if not -n <= i < n:
        raise PlanError(
            f"{name}: block {i} is out of range for a model with {n} blocks; use 0..{n - 1} or -{n}..-1"
        )
    return i % n


def parse_indices(name: str, spec: Any, num_layers: int) -> list[int]:
    """Block indices in the plan's syntax (`0-7`, `3;5-7`, `-1`) resolved against a depth: what
    selections outside a plan (e.g. the blocks `surgery train` trains) use."""
    return _resolve(name, _parse_ranges(name, spec), num_layers)


def _resolve(name: str, ranges: tuple[Range, ...], n: int) -> list[int]:
    seen: list[int] = []
    for start, end in ranges:
        a, b = _resolve_index(name, start, n), _resolve_index(name, end, n)
        if a > b:
            raise PlanError(_backwards(name, f"{start}-{end}", b, a))
        for i in range(a, b + 1):
            if i in seen:
                raise PlanError(f"{name}: block {i} is listed twice; list each block once")
            seen.append(i)
    return sorted(seen)


def read_plan_file(path: Any) -> tuple[LayerPlan, str | None]:
    """A whole plan from a file that records one under `plan` (`layer_plan.json` of a written
    folder, `search.json` of `surgery search`), with the model type it was made for."""
    import json
    from pathlib import Path

    file = Path(str(path).strip("'\""))
    try:
        record = json.loads(file.read_text())
        data = record["plan"]
        plan = LayerPlan.from_dict(data)
    except FileNotFoundError:
        raise PlanError(f"plan={file}: no such file; give a layer_plan.json or search.json") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PlanError(f"plan={file} holds no plan ({type(e).__name__}: {str(e)[:80]}); give a layer_plan.json "
                        "or search.json") from None
    bad = [s for s in plan.slots for j in s.sources if not 0 <= j < plan.num_layers]
    if not plan.slots or bad:
        raise PlanError(f"plan={file} is not a valid plan of {plan.num_layers} blocks; write it with surgery")
    planned = record.get("model_type")
    return plan, planned if isinstance(planned, str) else None


def plan_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the plan's arguments out of a model_args dict (the rest goes to lm-eval's `hf`)."""
    return {name: kwargs.pop(name) for name in PlanSpec.ARGS if name in kwargs}


def plan_text_args(text: str) -> dict[str, Any]:
    """A plan written as one string in the plugin's syntax (`drop=20-27`, `drop=3;5-7,drop_attn=0`,
    `insert=1:avg,3:copy`; '' is the full model) split into its arguments: a comma starts a new
    argument only before `name=`, so `drop=3,5-7` reads as one argument."""
    args: dict[str, Any] = {}
    name = None
    for part in text.split(",") if text.strip() else []:
        key, sep, value = part.partition("=")
        key = key.strip()
        if sep and key in PlanSpec.ARGS:
            if key in args:
                raise PlanError(f"plan {text!r} gives {key} twice; give each argument once")
            name, args[key] = key, value
        elif sep:
            raise PlanError(f"plan {text!r}: unknown argument {key!r}; use {', '.join(PlanSpec.ARGS)}")
        elif name is None:
            raise PlanError(f"plan {text!r}: write name=value, e.g. drop=20-27 or preset=llama-pro:4 ('' = the full model)")
        else:
            args[name] += "," + part
    if str(args.get("drop_lowest", "")).strip().isdigit():
        args["drop_lowest"] = int(args["drop_lowest"])
    return args
