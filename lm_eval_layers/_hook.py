"""Register the `layered` model with lm-eval the moment lm-eval builds its model registry.

lm-eval 0.4.13 has no plugin discovery for models, yet `lm_eval --model layered` must work from
the stock console script. The installed `lm_eval_layers.pth` imports this module at start-up; it
only adds an import hook (no torch, no lm-eval import), so unrelated processes pay nothing. When
`lm_eval.models` is first imported, the hook adds a lazy registry entry pointing at `LayeredLM`.
"""

import sys

_WATCHED = "lm_eval.models"
MODEL_NAME = "layered"
MODEL_TARGET = "lm_eval_layers.model:LayeredLM"


def register() -> None:
    """Add `layered` to lm-eval's model registry as a lazy placeholder (idempotent)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


class _RegisterAfterImport:
    """A meta-path finder (duck-typed: importlib.abc alone costs ~20 ms of start-up)."""

    def find_spec(self, fullname: str, path=None, target=None) -> "importlib.machinery.ModuleSpec | None":
        if fullname != _WATCHED:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module) -> None:
            exec_module(module)
            register()

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


if _WATCHED in sys.modules:
    register()
elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())
