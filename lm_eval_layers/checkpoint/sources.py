"""Read a checkpoint tensor by tensor, never the whole model: a folder of safetensors files
(one file or shards), a GGUF file (dequantised one tensor at a time), or a hub id.

A safetensors source also says where each tensor's bytes are, so tensors that are kept as they
are can be copied as raw bytes without being decoded.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from lm_eval_layers.arch import Layout, layout_for
from lm_eval_layers.default_model import ALIAS, gguf_path, smollm2_gguf
from lm_eval_layers.errors import UsageError
from lm_eval_layers.checkpoint.safetensors_io import DTYPES, RawBytes, nbytes, read_header, read_tensor
from lm_eval_layers.compat.gguf_names import GGUFNames

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


class Source(Protocol):
    name: str  # what the user gave (for messages and the model card)
    folder: Path | None  # where tokenizer and generation config files are, if any
    config: dict[str, Any]  # config.json contents
    hf_config: Any  # the same as a transformers config object
    infos: dict[str, TensorInfo]  # checkpoint tensor name -> dtype and shape, in storage order

    def tensor(self, name: str) -> torch.Tensor: ...

    def raw(self, name: str) -> RawBytes | None: ...


class SafetensorsFolder:
    """A Hugging Face model folder with `model.safetensors` or shards plus an index."""

    def __init__(self, folder: Path, name: str | None = None) -> None:
        self.name = name or str(folder)
        self.folder = folder
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise UsageError(f"{folder} has no config.json; point MODEL at a Hugging Face model folder")
        try:
            self.config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise UsageError(f"{config_path} is not valid JSON ({e.msg}); fix or re-download it") from None
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
            hint = (" (only pickle weights found: convert them to safetensors first; pickles are not loaded, "
                    "they can run code)") if pickles else ""
            raise UsageError(f"{folder} has no .safetensors weights{hint}")
        self._where: dict[str, tuple[Path, dict[str, Any], int]] = {}
        self.infos: dict[str, TensorInfo] = {}
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = [folder / f for f in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise UsageError(f"{folder} is missing shard(s) {', '.join(missing)} named in its index; re-download them")
        for path in files:
            header, start = read_header(path)
            for tensor, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                self._where[tensor] = (path, entry, start)
                self.infos[tensor] = TensorInfo(DTYPES[entry["dtype"]], tuple(entry["shape"]))

    @functools.cached_property
    def hf_config(self) -> Any:
        """transformers' config object (imported only when needed: it costs seconds)."""
        return _config_object(self.folder, self.config)

    def raw(self, name: str) -> RawBytes:
        path, entry, start = self._where[name]
        begin, end = entry["data_offsets"]
        return RawBytes(path, start + begin, end - begin)

    def tensor(self, name: str) -> torch.Tensor:
        return read_tensor(self._where[name][0], name)


class GGUFFile:
    """A GGUF file read with the `gguf` package and transformers' name mapping, tensor by tensor."""

    def __init__(self, path: Path, name: str | None = None) -> None:
        import transformers
        from gguf import GGUFReader

        self.name = name or str(path)
        self.folder = None
        self.path = path
        try:
            self.reader = GGUFReader(str(path))
            config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        except (ValueError, OSError, KeyError) as e:
            raise UsageError(f"{path} is not a readable GGUF file ({str(e).splitlines()[0]})") from None
        self.hf_config = config
        self.config = config.to_dict()
        arch_field = self.reader.fields["general.architecture"]
        architecture = bytes(arch_field.parts[arch_field.data[0]]).decode()
        meta = meta_model(config)
        self.names = GGUFNames(config, meta, architecture)
        shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
        self._tensors = {}
        self.infos = {}
        self.stored: dict[str, tuple[str, int]] = {}  # name -> the file's own type (Q4_1, F32, …) and bytes
        for t in self.reader.tensors:
            hf_name = self.names.hf_name(t.name)
            if hf_name is None or hf_name not in shapes:
                continue
            self._tensors[hf_name] = t
            self.infos[hf_name] = TensorInfo(torch.float32, shapes[hf_name])
            self.stored[hf_name] = (t.tensor_type.name, int(t.n_bytes))

    def raw(self, name: str) -> None:
        return None  # quantised bytes: always decoded

    def tensor(self, name: str) -> torch.Tensor:
        from gguf import dequantize

        t = self._tensors[name]
        weights = self.names.values(dequantize(t.data, t.tensor_type), t.name)
        tensor = torch.from_numpy(weights.copy()).to(torch.float32)
        expected = self.infos[name].shape
        return tensor.reshape(expected)


def _config_object(folder: Path, config: dict[str, Any]) -> Any:
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - whatever transformers refuses in a config is the user's input
        if config.get("model_type") in transformers.CONFIG_MAPPING:
            raise UsageError(f"transformers refuses {folder}/config.json: {str(e).strip().splitlines()[-1].strip()[:200]}") from None
        raise UsageError(
            f"unknown architecture {config.get('model_type')!r} in {folder}/config.json: transformers cannot build it "
            "(remote code is never run; upgrade transformers if the architecture is new)"
        ) from None


def source_layout(source: Source) -> Layout:
    """The layout of the source's weightless model (`arch.layout_for`: the table's facts, completed
    from the module tree)."""
    return layout_for(source_meta(source))


def source_meta(source: Source) -> torch.nn.Module:
    """The source's weightless model, built once per source."""
    meta = getattr(source, "_lm_eval_layers_meta", None)
    if meta is None:
        meta = meta_model(source.hf_config)
        source._lm_eval_layers_meta = meta  # type: ignore[attr-defined]
    return meta


def meta_model(config: Any) -> torch.nn.Module:
    """The model's module tree without weights (no memory): names, shapes and its layout."""
    import transformers

    try:
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise UsageError(
            f"unknown architecture {getattr(config, 'model_type', '?')!r}: transformers has no causal LM for it "
            f"({str(e).splitlines()[0][:120]})"
        ) from None


def open_model(model: str) -> Source:
    """MODEL as the user gave it: alias, .gguf file, local folder, or hub id."""
    if model.lower() == ALIAS:
        try:
            path = smollm2_gguf()
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
        return _gguf(path, ALIAS, path.stat().st_mtime_ns)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"no GGUF file at {path}; check the path")
        return _gguf(path.resolve(), str(path), path.stat().st_mtime_ns)
    if path.is_dir():
        return SafetensorsFolder(path)
    if path.exists():
        raise UsageError(f"{path} is a file, not a model folder or a .gguf file")
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise UsageError(f"no model folder at {model}; give a local folder, a .gguf file, a hub id or '{ALIAS}'")
    return SafetensorsFolder(_download(model), name=model)


def header_depth(model: str) -> int | None:
    """The block count of a GGUF model read from its header alone (milliseconds, where opening it
    through transformers takes seconds), so a plan out of range is refused first; None for other
    inputs, whose config is cheap to read anyway."""
    from lm_eval_layers.checkpoint.gguf_header import read_header

    path = gguf_path(model)
    if path is None:
        return None
    try:
        header = read_header(path)
        return int(header.get(f"{header.get('general.architecture')}.block_count"))
    except (KeyError, ValueError, OSError, struct.error):
        return None  # opening it properly says what is wrong


@functools.lru_cache(maxsize=2)
def _gguf(path: Path, name: str, mtime_ns: int) -> GGUFFile:
    """Opening a GGUF file costs seconds (its header, transformers' config and name mapping);
    it is read-only afterwards, so one process opens each file (at this modification time) once."""
    return GGUFFile(path, name=name)


def _download(repo_id: str) -> Path:
    """Fetch a hub model's safetensors, config and tokenizer (never pickles)."""
    from huggingface_hub import snapshot_download

    patterns = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, missing repo, gated model: all one clear line
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UsageError(f"cannot get {repo_id} from the hub ({first}); check the id, your network or HF_TOKEN") from None


def is_weight_file(path: Path) -> bool:
    return path.name.endswith(WEIGHT_SUFFIXES) or path.name.endswith(".index.json")


def free_bytes(folder: Path) -> int:
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize


def load_tokenizer(source: Source) -> Any:
    """The input's tokenizer (a GGUF file's embedded one), or one line saying it has none."""
    import transformers

    try:
        if source.folder is not None:
            return transformers.AutoTokenizer.from_pretrained(str(source.folder))
        return transformers.AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)  # type: ignore[attr-defined]
    except (OSError, ValueError) as e:
        raise UsageError(f"{source.name} has no usable tokenizer ({str(e).splitlines()[0][:120]}); add its tokenizer files") from None
