"""Training on transformers' Trainer and PEFT: `surgery train` (fine-tune chosen blocks, full
weights or LoRA, optionally by distillation) and `surgery ila` (which matrices a fine-tune needs).

Modules in dependency order (each imports only those before it):
- `units`, `train_settings`, `ila_settings`: what ILA's gates cover and each command's settings
  (no torch: the CLI builds its options from them);
- `data`: records to response-labelled examples; `gates`: ILA's gates on LoRA updates;
- `ila_file`: the ila.json format (schema, reading and checking, top-K);
- `selection`: what trains (blocks by index through the architecture layouts, or an ila.json's
  top units), full weights or LoRA;
- `trainer`: the Trainer plumbing both commands share (arguments, precision, float32 masters,
  the optimizer check, progress, tokenizer and plain-folder inputs); `distill`: the teacher loss;
- `work`: a train run's output and work folders; `fine_tune`: the train run; `ila`: the ILA method;
- `report` (train's log, plot, card), `ila_report` (ila.json built, table, heat map),
  `ila_compare` (rankings side by side) and `ila_command` (one `surgery ila` run from paths).
"""
