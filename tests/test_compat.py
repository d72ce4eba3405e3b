"""The upstream internals fenced in lm_eval_layers/compat/: each test fails when an upgrade
changes what the fence relies on."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from conftest import REPO, make_model
from lm_eval_layers.compat.gguf_names import GGUFNames
from lm_eval_layers.compat.harness import CLI_ENTRY, ScoringSeam, encoded_requests, set_replica, use_cache_table
from lm_eval_layers.compat.loading import NEWER, POPPED_OPTIONS, loading_options
from lm_eval_layers.compat.offload import offloaded_values
from lm_eval_layers.compat.stored_names import loaded_name
from lm_eval_layers.compat.trainer_state import session_tokens
from lm_eval_layers.default_model import smollm2_gguf


def test_stored_names_map_to_the_loaded_models_parameter_names():
    # transformers' conversion mapping: renamings (regex) and converters (per-expert `*` -> fused)
    assert loaded_name("granitemoe", "block_sparse_moe.output_linear.weight") == "block_sparse_moe.experts.down_proj"
    assert loaded_name("hy_v3", "mlp.shared_mlp.down_proj.weight") == "mlp.shared_experts.down_proj.weight"
    assert loaded_name("mixtral", "block_sparse_moe.experts.3.w2.weight") == "mlp.experts.down_proj"
    assert loaded_name("qwen2_moe", "mlp.experts.7.down_proj.weight") == "mlp.experts.down_proj"


def test_families_without_a_mapping_keep_their_names():
    assert loaded_name("llama", "mlp.down_proj.weight") == "mlp.down_proj.weight"
    assert loaded_name("no_such_family", "self_attn.o_proj.weight") == "self_attn.o_proj.weight"


# -- the fence itself: no private upstream name anywhere else --------------------------------

PACKAGES = [REPO / "lm_eval_layers", REPO / "surgery"]
FENCE = REPO / "lm_eval_layers" / "compat"
PRIVATE_MODULES = ("modeling_gguf_pytorch_utils", "conversion_mapping")  # version-specific, unexported
OWN_PREFIX = "_lm_eval_layers"  # markers this project sets on objects it does not own (a block list, a source)


def _sources() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for pkg in PACKAGES for p in sorted(pkg.rglob("*.py"))]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own_names(trees: list[tuple[Path, ast.Module]]) -> set[str]:
    """Every name this project defines: functions, classes, assigned names and attributes, modules."""
    names = {p.stem for p, _ in trees}
    for _, tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and (
                    getattr(node.value, "id", None) in ("self", "cls") or node.attr.startswith(OWN_PREFIX)):
                names.add(node.attr)  # our own fields; `lm._rank = 0` on someone else's object is not
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and len(node.args) > 1 \
                    and isinstance(node.args[1], ast.Constant):
                names.add(node.args[1].value)
            elif isinstance(node, ast.alias):
                names.add((node.asname or node.name).split(".")[0])
    return names


def test_no_private_upstream_name_outside_the_compat_module():
    """A private attribute, module or source text of lm-eval, transformers, accelerate, PEFT or
    torch used anywhere but lm_eval_layers/compat/ is named here with its file and line."""
    trees = _sources()
    own = _own_names([(p, t) for p, t in trees if FENCE not in p.parents])
    found = []
    for path, tree in trees:
        if FENCE in path.parents:
            continue
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
                found.append(f"{where} .{node.attr}")
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr", "delattr") \
                    and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) \
                    and _private(str(node.args[1].value)) and node.args[1].value not in own:
                found.append(f"{where} {node.func.id}(…, {node.args[1].value!r})")
            elif isinstance(node, ast.ImportFrom) and node.module and not node.module.startswith("lm_eval_layers"):
                parts = node.module.split(".")
                if any(_private(p) or p in PRIVATE_MODULES for p in parts) or any(_private(a.name) for a in node.names):
                    found.append(f"{where} from {node.module} import …")
            elif isinstance(node, ast.Attribute) and node.attr == "getsource":
                found.append(f"{where} inspect.getsource")
    assert not found, "private upstream names outside lm_eval_layers/compat/:\n" + "\n".join(found)


def test_the_grep_finds_a_private_upstream_name():
    """The check above can fail: a private HFLM field, read or written, or a private module import is found."""
    code = "lm._rank = 0\nx = lm._world_size\nfrom transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS\n"
    tree = ast.parse(code)
    own = _own_names([(REPO / "x.py", ast.parse(code))])  # writing `lm._rank` does not make it ours
    attrs = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and _private(n.attr) and n.attr not in own]
    modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
               if any(p in PRIVATE_MODULES for p in n.module.split("."))]
    assert attrs == ["_rank", "_world_size"] and modules == ["transformers.modeling_gguf_pytorch_utils"]


# -- transformers' from_pretrained options --------------------------------------------------

def test_declared_loading_options_match_transformers():
    """The plugin checks model_args against a declared list; transformers' own source says which
    options `from_pretrained` pops from **kwargs. An upgrade that adds or removes one fails here."""
    import transformers

    source = inspect.getsource(transformers.PreTrainedModel.from_pretrained)
    popped = {name for name in re.findall(r"""kwargs\.pop\(\s*["'](\w+)["']""", source) if not name.startswith("_")}
    from packaging.version import Version

    expected = {o for o in POPPED_OPTIONS if Version(transformers.__version__) >= Version(NEWER.get(o, "0"))}
    assert popped == expected, f"added upstream: {sorted(popped - expected)}, gone: {sorted(expected - popped)}"
    assert {"revision", "attn_implementation", "device_map"} <= loading_options()


# -- lm-eval's HFLM, its response cache and its console script --------------------------------

@pytest.fixture(scope="module")
def hflm(tiny_llama_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny_llama_dir), device="cpu", batch_size=2)


def test_replica_fields_are_the_ones_hflm_reads(hflm):
    """`set_replica` must change what HFLM splits requests by (its `rank`/`world_size`)."""
    set_replica(hflm, 1, 3)
    assert (hflm.rank, hflm.world_size) == (1, 3)
    set_replica(hflm, 0, 1)
    assert (hflm.rank, hflm.world_size) == (0, 1)


def test_scoring_seam_is_the_step_loglikelihood_calls(tiny_llama_dir):
    """`ScoringSeam.score_tokens` receives HFLM's tokenised requests from `loglikelihood`, and the
    recorder of `encoded_requests` sees the same tokens."""
    from lm_eval.api.instance import Instance

    seen: list = []

    class Recording(ScoringSeam):
        def score_tokens(self, requests, disable_tqdm=False, override_bs=None):
            seen.extend(requests)
            return self.hf_score_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    lm = Recording(pretrained=str(tiny_llama_dir), device="cpu", batch_size=2)
    instances = [Instance("loglikelihood", {}, ("The sky is", " blue"), idx=0),
                 Instance("loglikelihood", {}, ("One, two,", " three"), idx=1)]
    answers = lm.loglikelihood(instances, disable_tqdm=True)
    assert len(seen) == 2 and all(isinstance(a[0], float) for a in answers)
    assert sorted(encoded_requests(lm, instances)) == sorted((ctx, cont) for _, ctx, cont in seen)


def test_cache_table_is_where_cachinglm_reads_and_writes(hflm, tmp_path):
    """lm-eval's CachingLM shares its SqliteDict with the hook it hands the model; after
    `use_cache_table` an answer written through the wrapper lands in the chosen table only."""
    from lm_eval.api.model import CachingLM
    from sqlitedict import SqliteDict

    caching = CachingLM(hflm, str(tmp_path / "cache.db"))
    assert hflm.cache_hook.dbdict is caching.dbdict
    use_cache_table(hflm.cache_hook, "variant-a")
    hflm.cache_hook.add_partial("loglikelihood", ("ctx", " cont"), (-1.5, True))
    caching.dbdict.commit()
    with SqliteDict(str(tmp_path / "cache.db"), tablename="variant-a") as table:
        assert list(table.values()) == [(-1.5, True)]
    with SqliteDict(str(tmp_path / "cache.db")) as default:
        assert len(default) == 0


def test_lm_eval_console_script_is_the_entry_point_we_recognise():
    from importlib.metadata import entry_points

    import lm_eval.__main__ as main

    assert callable(getattr(main, CLI_ENTRY))
    scripts = {e.name: e.value for e in entry_points(group="console_scripts") if e.name == "lm_eval"}
    assert scripts["lm_eval"].endswith(f":{CLI_ENTRY}")


# -- accelerate's offload hooks -----------------------------------------------------------

def test_offloaded_values_are_the_real_weights(tmp_path):
    """A block dispatched with its weights on disk holds meta tensors; the fence reads the real
    values back from accelerate's hooks."""
    from accelerate import dispatch_model
    from accelerate.utils import offload_state_dict

    model = make_model("llama")
    block = model.model.layers[1]
    expected = {name: p.detach().clone() for name, p in block.named_parameters()}
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "cpu" if i != 1 else "disk" for i in range(len(model.model.layers))}}
    offload_state_dict(str(tmp_path), {k: v for k, v in model.state_dict().items() if k.startswith("model.layers.1.")})
    dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path))
    params = dict(block.named_parameters())
    assert all(p.device.type == "meta" for p in params.values())
    values = offloaded_values(block)
    assert set(values) == {id(p) for p in params.values()}
    for name, p in params.items():
        assert torch.equal(values[id(p)].cpu(), expected[name])


# -- transformers' GGUF names and the Trainer's session tokens ----------------------------------

def test_gguf_names_cover_every_parameter_of_the_embedded_model():
    """Every parameter of SmolLM2 built from its GGUF config has a GGUF tensor, and the Q/K
    processor changes the layout (Llama's rows are permuted in GGUF)."""
    from gguf import GGUFReader, dequantize

    from lm_eval_layers.checkpoint.sources import meta_model

    path = smollm2_gguf()
    config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    meta = meta_model(config)
    names = GGUFNames(config, meta, "llama")
    reader = GGUFReader(str(path))
    mapped = {names.hf_name(t.name) for t in reader.tensors} - {None}
    assert {n for n, _ in meta.named_parameters() if n != "lm_head.weight"} <= mapped
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    raw = dequantize(q.data, q.tensor_type)
    assert not np.array_equal(names.values(raw, q.name), raw)


def test_session_tokens_leave_out_a_resumed_runs_earlier_sessions(tmp_path):
    """`session_tokens` is the Trainer's own count for this `train()` call: 0 tokens before it
    trains a step from a resumed state, the batch's tokens after."""
    model = make_model("llama")
    batch = {"input_ids": torch.randint(3, 128, (4, 8)), "labels": torch.randint(3, 128, (4, 8))}
    data = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    args = transformers.TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[],
                                          include_num_input_tokens_seen="all", use_cpu=True, save_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.state.num_input_tokens_seen = 1000  # as a resumed state would hold
    trainer.train()
    assert session_tokens(trainer) == 32
