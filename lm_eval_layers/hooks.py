"""Forward pre-hooks on decoder blocks: record a block's input, or start a block from a cached
one. The prefix reuse of prepared requests and of the search engine rests on these (a variant
runs only the blocks after its first change, from the hidden state recorded there)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def pre_hooks(pairs: list[tuple[nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    """Forward pre-hooks (with kwargs) on modules for the duration of one model call."""
    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module, hook in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def block_input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a block is called with (positionally or as `hidden_states=`)."""
    return args[0] if args else kwargs["hidden_states"]


def record_input(store: Callable[[torch.Tensor], None]) -> Callable[..., None]:
    """A pre-hook handing a copy of the block's input to `store`."""
    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        store(block_input(args, kwargs).detach().clone())

    return hook


def replace_input(cached: torch.Tensor) -> Callable[..., tuple[tuple, dict[str, Any]]]:
    """A pre-hook that runs the block on `cached` instead of what the layers below computed."""
    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if args:
            return (cached, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": cached}

    return hook
