"""accelerate's offload hooks (tested with 1.15–1.16): a module whose parameters accelerate keeps
offloaded (`device_map` with cpu/disk entries) holds meta tensors, and its `_hf_hook` (an
`AlignDevicesHook`, or a `SequentialHook` of them) holds the real values in `weights_map`.
"""

from __future__ import annotations

import torch
from torch import nn

from lm_eval_layers.compat import UpstreamChanged


def offloaded_values(block: nn.Module) -> dict[int, torch.Tensor]:
    """Real values of the parameters accelerate keeps offloaded (meta tensors), by parameter id,
    on the device the block runs on."""
    out: dict[int, torch.Tensor] = {}
    hooked = False
    for sub in block.modules():
        hook = getattr(sub, "_hf_hook", None)
        hooked = hooked or hook is not None
        for h in getattr(hook, "hooks", [hook]) if hook is not None else []:
            if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
                for name, param in sub.named_parameters(recurse=False):
                    if param.device.type == "meta":
                        out[id(param)] = h.weights_map[name].to(h.execution_device)
    meta = [p for p in block.parameters() if p.device.type == "meta"]
    if hooked and any(id(p) not in out for p in meta):  # a weightless model (no hooks) has nothing to read
        raise UpstreamChanged("accelerate", "where offload hooks keep the values of offloaded parameters")
    return out
