"""GGUF in → GGUF out (lm_eval_layers/checkpoint/gguf_out.py) on the embedded SmolLM2 GGUF (Q4_1
blocks, F32 norms): kept tensors are byte-identical, the metadata follows the plan, transformers'
GGUF loader computes exactly the in-memory variant of the dequantised source, llama.cpp loads the
file, and what cannot be written as GGUF is refused in one line with nothing written."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from typer.testing import CliRunner

from conftest import DATA, REPO
from lm_eval_layers.checkpoint.gguf_out import PLAN_KEY
from lm_eval_layers.default_model import smollm2_gguf
from lm_eval_layers.plan import PlanSpec
from lm_eval_layers.variant import apply_plan
from surgery.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_grad")]
LLAMA_CPP = REPO.parent / "shared" / "llama.cpp" / "bin"
IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 7042, 30, 378, 260, 2]])


def prune(*args: str) -> object:
    return CliRunner().invoke(app, ["prune", "smollm2", *args])


@pytest.fixture(scope="module")
def source_model():
    path = smollm2_gguf()
    return T.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _load(path: Path) -> T.PreTrainedModel:
    return T.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_a_pruned_gguf_keeps_its_bytes_and_metadata_and_computes_the_plan(tmp_path, source_model):
    out = tmp_path / "pruned.gguf"
    result = prune("--drop", "20-23", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert out.stat().st_size <= 90e6  # not ~480 MB of float32 safetensors
    src, got = GGUFReader(str(smollm2_gguf())), GGUFReader(str(out))
    assert int(got.fields["llama.block_count"].contents()) == 26
    assert json.loads(got.fields[PLAN_KEY].contents())["num_layers"] == 30
    source_tensors = {t.name: t for t in src.tensors}
    for t in got.tensors:  # blocks 24-29 became 20-25; everything else is where it was
        m = re.match(r"blk\.(\d+)\.(.+)", t.name)
        origin = f"blk.{int(m.group(1)) + (4 if int(m.group(1)) >= 20 else 0)}.{m.group(2)}" if m else t.name
        s = source_tensors[origin]
        assert t.tensor_type == s.tensor_type and bytes(t.data) == bytes(s.data), t.name
    for field in src.fields.values():  # every field but the block count carried over with its type
        if field.name.startswith("GGUF.") or field.name in ("llama.block_count",):
            continue
        assert got.fields[field.name].types == field.types and got.fields[field.name].contents() == field.contents(), field.name
    with apply_plan(source_model, PlanSpec.from_args(drop="20-23").resolve(30)):
        expected = source_model(IDS).logits
    assert torch.equal(_load(out)(IDS).logits, expected)  # exact: the same bytes through the same loader
    inspected = CliRunner().invoke(app, ["inspect", str(out), "--json"])
    assert json.loads(inspected.stdout)["gguf_plan"] == "30 -> 26 blocks: drop blocks 20-23"


def test_a_copy_zero_block_is_written_as_f32_zeros_and_is_the_identity(tmp_path, source_model):
    out = tmp_path / "grown.gguf"
    result = CliRunner().invoke(app, ["expand", "smollm2", "--insert", "5:copy-zero", "--out", str(out)])
    assert result.exit_code == 0, result.output
    got = {t.name: t for t in GGUFReader(str(out)).tensors}
    assert got["blk.6.attn_output.weight"].tensor_type.name == "F32" and not np.any(got["blk.6.attn_output.weight"].data)
    assert got["blk.6.ffn_down.weight"].tensor_type.name == "F32" and not np.any(got["blk.6.ffn_down.weight"].data)
    assert bytes(got["blk.6.attn_q.weight"].data) == bytes(got["blk.5.attn_q.weight"].data)  # copied as stored
    torch.testing.assert_close(_load(out)(IDS).logits, source_model(IDS).logits, rtol=0, atol=1e-4)


@pytest.mark.skipif(not (LLAMA_CPP / "llama-perplexity").is_file(), reason="../shared/llama.cpp/bin is absent")
def test_llama_cpp_loads_the_pruned_file_and_it_computes_something_else_than_the_full_one(tmp_path):
    out = tmp_path / "pruned.gguf"
    assert prune("--drop", "20-23", "--out", str(out)).exit_code == 0

    def perplexity(model: Path) -> float:
        proc = subprocess.run([str(LLAMA_CPP / "llama-perplexity"), "-m", str(model), "-f", str(DATA / "wikitext2" / "wiki.test.raw"),
                               "--chunks", "2", "-c", "128", "-t", "2"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return float(re.search(r"Final estimate: PPL = ([\d.]+)", proc.stderr + proc.stdout).group(1))

    pruned, full = perplexity(out), perplexity(smollm2_gguf())
    assert math.isfinite(pruned) and pruned > full  # four blocks gone: worse, and the file is not the full one


def _tiny_gguf(path: Path, arch: str) -> Path:
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_key_value(f"{arch}.embedding_length", 8, GGUFValueType.UINT32)
    for i in range(2):
        writer.add_tensor(f"blk.{i}.attn_output.weight", np.zeros((8, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("args, message", [
    (["prune", "smollm2", "--drop", "3", "--out", "{tmp}/a.gguf", "--dtype", "float16"], "GGUF output keeps the file's quantisation"),
    (["expand", "smollm2", "--insert", "3:avg", "--out", "{tmp}/a.gguf"], "avg blocks change values"),
    (["prune", "{tiny_gemma}", "--drop", "1", "--out", "{tmp}/a.gguf"], "gemma2 is not one of them"),
    (["prune", "{folder}", "--drop", "1", "--out", "{tmp}/a.gguf"], "converting safetensors to GGUF is llama.cpp's converter's job"),
    (["prune", "smollm2", "--drop", "30", "--out", "{tmp}/a.gguf"], "block 30 is out of range"),
    (["prune", "smollm2", "--drop", "3", "--out", "{tmp}/exists.gguf"], "exists; choose another name or pass --force"),
])
def test_what_gguf_output_cannot_write_is_one_error_line_and_nothing_written(tmp_path, tiny_llama_dir, args, message):
    (tmp_path / "exists.gguf").write_bytes(b"keep")
    tiny = _tiny_gguf(tmp_path / "tiny-gemma2.gguf", "gemma2")
    given = [a.format(tmp=tmp_path, tiny_gemma=tiny, folder=tiny_llama_dir) for a in args]
    result = CliRunner().invoke(app, given)
    assert result.exit_code == 2 and message in " ".join(result.stderr.split()), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.gguf", "tiny-gemma2.gguf"]
    assert (tmp_path / "exists.gguf").read_bytes() == b"keep"


def test_the_fast_header_reader_agrees_with_gguf_py():
    """`gguf_header.read_header` (byte spans) against gguf-py's reader on the embedded file: every
    field's key and scalar value, every tensor's name, dims, type, offset and size."""
    from lm_eval_layers.checkpoint.gguf_header import read_header

    path = smollm2_gguf()
    ours, theirs = read_header(path), GGUFReader(str(path))
    assert list(ours.fields) == [k for k in theirs.fields if not k.startswith("GGUF.")]
    for key, field in ours.fields.items():
        if field.kind != 9 or field.element != 8:  # arrays of strings are not decoded
            assert field.value() == theirs.fields[key].contents(), key
    assert ours.alignment == theirs.alignment and ours.data_start == theirs.data_offset
    assert [(t.name, t.dims, t.kind, t.nbytes) for t in ours.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.n_bytes)) for t in theirs.tensors]
    assert [ours.data_start + t.offset for t in ours.tensors] == [int(t.data_offset) for t in theirs.tensors]


def _tiny_qwen(path: Path, arch: str) -> Path:
    """A 4-block qwen2/qwen3-layout GGUF in several storage types (Q8_0, Q4_0, Q4_1, Q5_0, F16, F32)
    with a per-layer array, written with gguf-py."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(4)
    writer.add_key_value(f"{arch}.embedding_length", 64, GGUFValueType.UINT32)
    writer.add_key_value(f"{arch}.attention.head_count_kv", [1, 2, 3, 4], GGUFValueType.ARRAY, sub_type=GGUFValueType.UINT32)
    writer.add_key_value(f"{arch}.attention.sliding_window_pattern", [True, False, True, False], GGUFValueType.ARRAY,
                         sub_type=GGUFValueType.BOOL)
    writer.add_tensor("token_embd.weight", rng.standard_normal((16, 64)).astype(np.float16))
    kinds = {"attn_q.weight": Q.Q8_0, "attn_output.weight": Q.Q4_0, "ffn_up.weight": Q.Q4_1, "ffn_down.weight": Q.Q5_0}
    for i in range(4):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", rng.standard_normal(64).astype(np.float32))
        for name, kind in kinds.items():
            data = quants.quantize(rng.standard_normal((64, 64)).astype(np.float32), kind)
            writer.add_tensor(f"blk.{i}.{name}", data, raw_shape=data.shape, raw_dtype=kind)
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_quantised_blocks_keep_their_types_and_per_layer_arrays_follow_the_plan(tmp_path, arch):
    """A qwen2 / qwen3 file: drop 1 and copy block 0 after block 0; every stored type is copied
    byte for byte, every array as long as the depth follows the plan."""
    from lm_eval_layers.checkpoint.gguf_out import write_gguf

    source = _tiny_qwen(tmp_path / "tiny.gguf", arch)
    plan = PlanSpec.from_args(drop="1", insert="0:copy").resolve(4)  # blocks 0, copy of 0, 2, 3
    written = write_gguf(source, plan, tmp_path / "out.gguf")
    src, got = GGUFReader(str(source)), GGUFReader(str(written.out))
    assert int(got.fields[f"{arch}.block_count"].contents()) == 4
    assert got.fields[f"{arch}.attention.head_count_kv"].contents() == [1, 1, 3, 4]
    assert got.fields[f"{arch}.attention.sliding_window_pattern"].contents() == [True, True, True, False]
    by_name = {t.name: t for t in src.tensors}
    origin = {0: 0, 1: 0, 2: 2, 3: 3}
    for t in got.tensors:
        m = re.match(r"blk\.(\d+)\.(.+)", t.name)
        s = by_name[f"blk.{origin[int(m.group(1))]}.{m.group(2)}" if m else t.name]
        assert t.tensor_type == s.tensor_type and bytes(t.data) == bytes(s.data), t.name
    assert {t.tensor_type.name for t in got.tensors} == {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "F16", "F32"}
