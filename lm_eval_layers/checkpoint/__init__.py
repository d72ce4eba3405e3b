"""Checkpoints on disk: read a model tensor by tensor (`sources`: a safetensors folder, a GGUF
file, a hub id), write a plan's variant as safetensors (`writer`, `write`), and compare a written
folder with the in-memory variant (`verify`). Library code: the `surgery` CLI calls it, and so
do training (GGUF inputs become plain folders) and Python users.

This package's `__init__` imports nothing heavy, so the file names below cost nothing to use.
"""

PLAN_FILE = "layer_plan.json"  # the plan, machine-readable, in every written folder
NEW_PARAMS_FILE = "new_parameters.json"  # what to train in an expanded model
