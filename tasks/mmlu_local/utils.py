"""`!function utils.load` for the MMLU task YAMLs of this folder."""

from lm_eval_layers.data import load  # noqa: F401
