"""Training on transformers' Trainer and PEFT: `surgery train` (fine-tune chosen blocks, full
weights or LoRA, optionally by distillation) and `surgery ila` (which matrices a fine-tune needs).

`data` turns records into response-labelled examples, `selection` decides what trains (by block
index through the architecture layouts, or an ILA run's top units), `distill` is the teacher
loss, `run` drives a run and writes its output folder, `report` is its progress bar, log, plot
and model card; `gates`, `ila`, `ila_run`, `ila_report` and `ila_compare` are ILA's gates, stages, command body,
output file and comparisons.
"""
