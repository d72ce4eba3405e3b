"""lm-eval-layers: layer-level surgery and evaluation of Hugging Face causal LMs.

Kept import-free on purpose: a one-line .pth imports `lm_eval_layers._hook` in every Python
process, so this package must cost nothing to import.
"""

__version__ = "0.1.0"
