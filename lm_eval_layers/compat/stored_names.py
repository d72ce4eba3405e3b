"""transformers' checkpoint conversion mapping (`conversion_mapping.get_checkpoint_conversion_mapping`
and its `WeightRenaming`/`WeightConverter` entries' `source_patterns`/`target_patterns`, new in
transformers 5): how a stored tensor name becomes the loaded model's parameter name, so that the
checkpoint writer zeroes on disk exactly the projections the loaded model has.
"""

from __future__ import annotations

import functools
import re

_PREFIX = "model.layers.0."  # block-relative names are mapped as a block's full name


@functools.lru_cache(maxsize=None)
def _rules(model_type: str) -> tuple[tuple[re.Pattern[str], str, bool], ...]:
    """(pattern, replacement, is a renaming) for each source pattern of the family's mapping:
    renamings are regular expressions; converters' patterns are names with `*` for an expert index."""
    from transformers.conversion_mapping import WeightRenaming, get_checkpoint_conversion_mapping

    rules = []
    for entry in get_checkpoint_conversion_mapping(model_type) or ():
        renaming = isinstance(entry, WeightRenaming)
        target = entry.target_patterns[0]
        for source in entry.source_patterns:
            pattern = re.compile(source) if renaming else re.compile(re.escape(source).replace(r"\*", r"\d+"))
            rules.append((pattern, target, renaming))
    return tuple(sorted(rules, key=lambda r: not r[2]))  # renamings first, as transformers applies them


def loaded_name(model_type: str, stored: str) -> str:
    """The name (relative to a block) that transformers gives the parameter a checkpoint stores as
    `stored` (relative to a block): `block_sparse_moe.output_linear.weight` is Granite-MoE's
    `block_sparse_moe.experts.down_proj`; unchanged where the family maps nothing."""
    name = _PREFIX + stored
    for pattern, target, _ in _rules(model_type):
        match = pattern.search(name)
        if match:
            name = name[:match.start()] + target + name[match.end():]
    return name[len(_PREFIX):] if name.startswith(_PREFIX) else stored
