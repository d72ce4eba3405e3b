"""`!function utils.load` for the MMLU task YAMLs of this folder."""

from lm_eval_layers.task_data import load  # noqa: F401
