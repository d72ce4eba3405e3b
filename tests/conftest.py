"""Shared fixtures: tiny random models of several architecture families, a real tokenizer,
and the real evaluation data in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers as T

from lm_eval_layers.default_model import smollm2_gguf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tasks"
DATA = REPO.parent / "shared" / "data"
DEPTH = 6

_SMALL = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=DEPTH,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)
_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)

_EXPERTS = dict(num_experts=4, num_experts_per_tok=2)  # tiny mixtures: top-2 of 4 experts


# One entry per family: the config of a tiny random model. Qwen2 and Gemma 2 have per-layer
# `layer_types` (sliding vs full attention); GPT-2, GPT-NeoX and Falcon keep their blocks
# somewhere other than `model.layers`; Bloom adds residuals inside its branches; StarCoder2 has
# biased c_proj MLPs; Mixtral, Qwen2-MoE (with a shared expert), Qwen3-MoE and OLMoE route each
# token to 2 of 4 experts stored as fused 3-D parameters (router jitter acts only in training).
CONFIGS = {
    "llama": lambda: T.LlamaConfig(**_SMALL, **_IDS),
    "mistral": lambda: T.MistralConfig(**_SMALL, **_IDS, sliding_window=5),
    "qwen2": lambda: T.Qwen2Config(**_SMALL, **_IDS, use_sliding_window=True, sliding_window=5, max_window_layers=3),
    "gemma2": lambda: T.Gemma2Config(**_SMALL, **_IDS, head_dim=8, sliding_window=5),
    "phi3": lambda: T.Phi3Config(**{**_SMALL, "num_key_value_heads": 4}, **_IDS),
    "gpt2": lambda: T.GPT2Config(vocab_size=128, n_embd=32, n_layer=DEPTH, n_head=4, n_positions=128, **_IDS),
    "gpt_neox": lambda: T.GPTNeoXConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=DEPTH,
        num_attention_heads=4, max_position_embeddings=128, **_IDS,
    ),
    "falcon": lambda: T.FalconConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=4,
        new_decoder_architecture=False, **_IDS,
    ),
    "bloom": lambda: T.BloomConfig(vocab_size=128, hidden_size=32, n_layer=DEPTH, n_head=4, **_IDS),
    "starcoder2": lambda: T.Starcoder2Config(**_SMALL, **_IDS, sliding_window=5),
    "mixtral": lambda: T.MixtralConfig(**_SMALL, **_IDS, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(
        **_SMALL, **_IDS, **_EXPERTS, moe_intermediate_size=16, shared_expert_intermediate_size=24,
    ),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**_SMALL, **_IDS, **_EXPERTS, moe_intermediate_size=16, head_dim=8),
    "olmoe": lambda: T.OlmoeConfig(**_SMALL, **_IDS, **_EXPERTS),
}
ARCHS = list(CONFIGS)


def make_model(arch: str, seed: int = 0, **overrides) -> T.PreTrainedModel:
    """A tiny fp32 model with random weights, large enough that every layer changes the logits."""
    config = CONFIGS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init of norms is 1/0: perturb so block order matters everywhere
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def no_grad():
    """Inference-only test modules use this (`pytestmark = pytest.mark.usefixtures("no_grad")`):
    a module-level `torch.set_grad_enabled(False)` would switch autograd off for the whole
    session, training tests included, since pytest imports every module before running any."""
    with torch.no_grad():
        yield


# `make test-quick` runs the per-family tests on these; `make test` on every family.
QUICK_FAMILIES = ("llama", "gpt2", "mixtral")


@pytest.fixture(params=[pytest.param(a, marks=() if a in QUICK_FAMILIES else pytest.mark.slow) for a in ARCHS])
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's real tokenizer (from the embedded GGUF), saved as a normal tokenizer folder."""
    path = smollm2_gguf()
    out = tmp_path_factory.mktemp("tokenizer")
    T.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer, saved as safetensors."""
    tok = T.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = T.LlamaConfig(
        **{**_SMALL, "vocab_size": len(tok)}, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture()
def local_data(monkeypatch) -> Path:
    """Point the `*_local` tasks at the shared evaluation data."""
    if not DATA.is_dir():
        pytest.fail(f"the evaluation data folder {DATA} is missing (see ../shared/data/README.md)")
    monkeypatch.setenv("LM_EVAL_LAYERS_DATA", str(DATA))
    return DATA
