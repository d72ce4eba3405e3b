"""The options transformers' `PreTrainedModel.from_pretrained` accepts (tested with 5.24–5.25).

Its signature names only some of them; the rest it pops from `**kwargs` (attn_implementation,
device_map, quantization_config, …). The plugin checks a user's model_args against this declared
list so that a misspelt key fails in a second; tests/test_compat.py compares the list with
transformers' source, so an upgrade that adds or removes an option fails there, not for a user.
"""

from __future__ import annotations

import inspect

# popped from `**kwargs` by from_pretrained (private `_…` options left out: not a user's to give)
POPPED_OPTIONS = frozenset({
    "adapter_kwargs", "adapter_name", "allow_all_kernels", "attn_implementation", "device_map", "device_mesh",
    "distributed_config", "dtype", "experts_implementation", "generation_config", "gguf_file", "kernel_config",
    "kernels_mode", "key_mapping", "max_memory", "offload_buffers", "offload_folder", "output_loading_info",
    "proxies", "quantization_config", "state_dict", "subfolder", "torch_dtype", "tp_plan", "tp_size",
    "tqdm_class", "trust_remote_code", "use_kernels", "variant",
})
NEWER = {"kernels_mode": "5.25"}  # options of POPPED_OPTIONS that transformers added in the tested range


def loading_options() -> frozenset[str]:
    """Every option a user may pass on to `from_pretrained`: its named parameters and the
    declared options it takes from `**kwargs`."""
    import transformers

    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    signature = inspect.signature(transformers.PreTrainedModel.from_pretrained)
    return frozenset({name for name, p in signature.parameters.items() if p.kind in kinds}) | POPPED_OPTIONS
