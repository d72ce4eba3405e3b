"""The Trainer's token count at the start of this session (tested with transformers 5.24–5.25):
`state.num_input_tokens_seen` counts every session of a resumed run, and the Trainer keeps the
count it resumed from in the private `_initial_num_input_tokens_seen` (set by `train()`)."""

from __future__ import annotations

from typing import Any

from lm_eval_layers.compat import UpstreamChanged


def session_tokens(trainer: Any) -> int:
    """Input tokens this `train()` call consumed (earlier sessions of a resumed run left out)."""
    start = getattr(trainer, "_initial_num_input_tokens_seen", None)
    if not isinstance(start, int):
        raise UpstreamChanged("transformers", "where the Trainer keeps the token count a session starts from")
    return trainer.state.num_input_tokens_seen - start
