"""shapiq's Shapley approximators on this project's games (`--estimator shapiq:NAME`).

shapiq is an optional extra (`pip install lm-eval-layers[shapiq]`), imported only here and only
when such an estimator runs. A project game becomes a shapiq `Game` whose value function is the
cached game, so the evaluations shapiq spends are counted, stored and resumed like ours. shapiq's
approximators report no standard errors: the intervals of these estimates have zero width, and
the bootstrap over examples is the only uncertainty reported.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lm_eval_layers.errors import UsageError
from lm_eval_layers.importance.estimators import Estimate, end_values
from lm_eval_layers.importance.games import CachedGame

PREFIX = "shapiq:"

# NAME → (shapiq class, constructor options): the approximators of the Shapley value (index SV).
APPROXIMATORS: dict[str, tuple[str, dict[str, Any]]] = {
    "kernelshap": ("KernelSHAP", {"pairing_trick": True}),
    "kaddshap": ("kADDSHAP", {"max_order": 2, "pairing_trick": True}),
    "kaddshap3": ("kADDSHAP", {"max_order": 3, "pairing_trick": True}),
    "svarm": ("SVARM", {"pairing_trick": True}),
    "permutation": ("PermutationSamplingSV", {}),
    "stratified": ("StratifiedSamplingSV", {}),
    "unbiased-kernelshap": ("UnbiasedKernelSHAP", {"pairing_trick": True}),
    "proxyspex": ("ProxySPEX", {"index": "SV", "max_order": 2}),
}


def check_name(estimator: str) -> str:
    """The NAME of `shapiq:NAME` as a key of `APPROXIMATORS`, in any case, or given as shapiq's
    own class name (`shapiq:KernelSHAP`; `kADDSHAP` is its order-2 entry), checked before any
    model loads."""
    import importlib.util

    given = estimator[len(PREFIX):].lower()
    names = {name: name for name in APPROXIMATORS}
    for name, (cls, _) in APPROXIMATORS.items():
        names.setdefault(cls.lower(), name)
    if given not in names:
        raise UsageError(f"--estimator {estimator}: unknown shapiq approximator; use shapiq:" + "|".join(APPROXIMATORS))
    if importlib.util.find_spec("shapiq") is None:
        raise UsageError(f"--estimator {estimator} needs shapiq: pip install lm-eval-layers[shapiq]")
    return names[given]


def _shapiq() -> Any:
    try:
        import shapiq
    except ImportError:
        raise UsageError("--estimator shapiq:NAME needs shapiq: pip install lm-eval-layers[shapiq]") from None
    return shapiq


def as_shapiq_game(game: CachedGame) -> Any:
    """The project game as a shapiq `Game` (unnormalised: values are the game's own)."""
    shapiq = _shapiq()

    class ProjectGame(shapiq.Game):
        def __init__(self) -> None:
            super().__init__(n_players=game.n, normalize=False)

        def value_function(self, coalitions: np.ndarray) -> np.ndarray:
            return game(coalitions)

    return ProjectGame()


def approximate(game: CachedGame, budget: int, seed: int, estimator: str) -> Estimate:
    """shapiq's NAME approximator with `budget` coalitions of the game."""
    name = check_name(estimator)
    shapiq = _shapiq()
    cls, options = APPROXIMATORS[name]
    if cls == "ProxySPEX":
        try:
            import lightgbm  # noqa: F401  (ProxySPEX's surrogate)
        except ImportError:
            raise UsageError("shapiq:proxyspex needs lightgbm: pip install lm-eval-layers[shapiq]") from None
    v_empty, v_full = end_values(game)
    approximator = getattr(shapiq, cls)(n=game.n, random_state=seed, **options)
    values = approximator.approximate(budget, as_shapiq_game(game))
    phi = np.array([values[(i,)] for i in range(game.n)], dtype=float)
    return Estimate(PREFIX + name, phi, np.zeros(game.n), game.evaluations, v_empty, v_full, {"shapiq": cls})
