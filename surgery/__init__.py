"""`surgery`: write pruned and expanded checkpoints as safetensors, streaming, exactly as the
`layered` lm-eval model evaluates them."""

import os

# The commands draw their own rich progress bars; the tqdm bars of transformers' GGUF loading and
# lm-eval's request building would interleave with them. tqdm reads TQDM_* when it is imported,
# so this is set before anything imports it (a user's own TQDM_DISABLE wins).
os.environ.setdefault("TQDM_DISABLE", "1")
