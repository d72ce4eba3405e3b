"""`surgery train`: fine-tune chosen blocks of a causal LM (full weights or LoRA, optionally by
distillation) with transformers' Trainer and PEFT.

`data` turns records into response-labelled examples, `selection` decides what trains (by block
index through the architecture layouts), `distill` is the teacher loss, `run` drives a run
and writes its output folder.
"""
