"""`surgery`: write pruned and expanded checkpoints as safetensors, streaming, exactly as the
`layered` lm-eval model evaluates them."""
