"""Every use of an upstream internal that no public API offers, fenced here and only here.

Each module owns one upstream seam and each seam has a test in tests/test_compat.py that fails
loudly when an upgrade changes it (tests/test_compat.py also greps the rest of the package for
private upstream names). A seam that breaks at run time raises `UpstreamChanged` naming the
package and the version range tested, never a silently different number.

- `stored_names`: transformers' checkpoint conversion mapping (stored name -> loaded name).
- `loading`: the options transformers' `from_pretrained` takes through `**kwargs` (declared).
- `harness`: lm-eval's HFLM (rank and world size, the token-level scoring step, the
  tokenisation seam), its response cache's SqliteDict table, its console entry point.
- `offload`: accelerate's offload hooks (the real values of offloaded parameters).
- `gguf_names`: transformers' GGUF tensor-name mapping and tensor processors.
- `trainer_state`: the Trainer's token count at the start of a (resumed) session.
"""

from __future__ import annotations


class UpstreamChanged(RuntimeError):
    """An upstream package no longer behaves as a fenced seam relies on: upgrade lm-eval-layers
    or install the versions in pyproject.toml's bounds."""

    def __init__(self, package: str, what: str) -> None:
        from importlib.metadata import version

        super().__init__(f"{package} {version(package)} changed {what}; lm-eval-layers is tested with the "
                         "versions its pyproject.toml allows: install those or upgrade lm-eval-layers")
