"""Cheap signals from forward passes of the full model on calibration text:
angular distance d = arccos(cos(h_in, h_out)) / π (Gromov et al.; last token or all tokens) and
block influence BI = 1 − E_t[cos(h_in,t, h_out,t)] (ShortGPT), for every block."""

from __future__ import annotations

import torch

from lm_eval_layers.arch import layout_for
from lm_eval_layers.calibration import calibration_windows


@torch.no_grad()
def block_similarity(model: torch.nn.Module, batches: list[torch.Tensor], position: str = "last") -> dict[str, list[float]]:
    """Per-block angular distance and block influence, averaged over every token of the
    calibration batches (over every window's last token for the angular distance at `last`)."""
    blocks = layout_for(model).find_blocks(model)
    assert blocks is not None
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def hooks(i: int):
        def pre(_m, args, kwargs):
            inputs[i] = (args[0] if args else kwargs["hidden_states"]).float()

        def post(_m, _args, _kwargs, out):
            outputs[i] = (out[0] if isinstance(out, tuple) else out).float()

        return pre, post

    handles = []
    for i, block in enumerate(blocks):
        pre, post = hooks(i)
        handles += [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post, with_kwargs=True)]
    # Sums over every token (every window's last token for `last`) and their counts: batches of
    # unequal size (6 windows in batches of 4) weigh each token alike, as the definitions do.
    angular = torch.zeros(len(blocks), dtype=torch.float64)
    influence = torch.zeros(len(blocks), dtype=torch.float64)
    positions = tokens = 0
    try:
        for ids in batches:
            model(ids.to(model.device))
            for i in range(len(blocks)):
                cos = torch.nn.functional.cosine_similarity(inputs[i], outputs[i], dim=-1).double()  # batch × tokens
                chosen = cos[:, -1] if position == "last" else cos.reshape(-1)
                angular[i] += (torch.arccos(chosen.clamp(-1, 1)) / torch.pi).sum()
                influence[i] += (1 - cos).sum()
            positions, tokens = positions + chosen.numel(), tokens + cos.numel()
    finally:
        for h in handles:
            h.remove()
    return {"angular": (angular / positions).tolist(), "bi": (influence / tokens).tolist()}


def calibration_batches(tokenizer, text: str, tokens: int = 128, count: int = 16, batch: int = 8) -> list[torch.Tensor]:
    """Up to `count` windows of `tokens` tokens from the start of `text`, batched."""
    return list(calibration_windows(tokenizer, text, count, tokens, exact=False).split(batch))
