"""Reading and writing safetensors weights, single-file or sharded, never unpickling.

`WeightFiles` opens a directory's `model.safetensors` or `model.safetensors.index.json` and
hands out tensors by name, turning every safetensors failure into a CheckpointError that
names the file. `write_shards` splits a state dict by a size bound exactly as transformers
lays it out (`model-00001-of-0000N.safetensors` + index), each file written atomically.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmstack.errors import CheckpointError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors$")


class WeightFiles:
    """Name -> tensor access over one or many safetensors files of a model directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.file_of: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        index = self.directory / INDEX
        single = self.directory / SINGLE
        if index.is_file():
            self._read_index(index)
        elif single.is_file():
            for name in self._open(single).keys():
                self.file_of[name] = single
        else:
            pickles = [p.name for p in self.directory.glob("*.bin")] + [p.name for p in self.directory.glob("*.pt")]
            hint = (f" It has {', '.join(sorted(pickles))}: lmstack never loads pickled weights; re-save them "
                    "as safetensors (transformers: save_pretrained(..., safe_serialization=True)).") if pickles else ""
            raise CheckpointError(f"no weights in {self.directory}: expected {SINGLE} or {INDEX}.{hint}")

    def _read_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index ({err!r}); re-save the model") from None
        # Checked here: a hand-edited or truncated index would otherwise fail as a bare
        # AttributeError/TypeError that names neither the file nor the field.
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: \"weight_map\" must be an object {{tensor name: shard file}}, got "
                                  f"{type(weight_map).__name__}; re-save the model")
        for name, filename in weight_map.items():
            if not isinstance(filename, str) or not filename:
                raise CheckpointError(f"{index}: \"weight_map\" entry {name!r} must name a shard file (a string "
                                      f"such as \"model-00001-of-00002.safetensors\"), got {filename!r}; "
                                      "re-save the model")
            path = self.directory / filename
            if not path.is_file():
                raise CheckpointError(f"{index} lists shard {filename} for tensor {name!r}, but the file is missing")
            self.file_of[name] = path
        for path in set(self.file_of.values()):
            present = set(self._open(path).keys())
            listed = {n for n, p in self.file_of.items() if p == path}
            missing = listed - present
            if missing:
                raise CheckpointError(
                    f"{path} does not hold tensor {sorted(missing)[0]!r} that {index.name} says it does; "
                    "the shard is from another save or corrupt"
                )

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as err:  # safetensors raises its own error types for bad headers / sizes
                raise CheckpointError(f"{path} is corrupt or truncated ({err}); re-download or re-save it") from None
        return self._handles[path]

    def names(self) -> set[str]:
        return set(self.file_of)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            raise CheckpointError(f"tensor {name!r} is missing from the weights in {self.directory}")
        path = self.file_of[name]
        try:
            return self._open(path).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"could not read tensor {name!r} from {path} ({err}); the file is corrupt") from None

    def floating_dtype(self) -> torch.dtype | None:
        """The floating dtype that holds most of the weights (by element count), None if none is floating.

        Read from the headers only; the most common, not the first by name, so that one odd tensor
        (a float64 `lm_head`, a float32 norm in a bf16 file) does not decide the dtype of the model."""
        counts: dict[torch.dtype, int] = {}
        for name in sorted(self.file_of):
            t = self._open(self.file_of[name]).get_slice(name)
            dtype = _SAFETENSORS_DTYPES.get(t.get_dtype())
            if dtype is not None and dtype.is_floating_point:
                numel = 1
                for n in t.get_shape():
                    numel *= n
                counts[dtype] = counts.get(dtype, 0) + numel
        return max(counts, key=counts.__getitem__) if counts else None


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8}


def parse_size(size: int | str) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20; ints pass through."""
    m = None if isinstance(size, (int, bool)) else re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?i?B)?\s*",
                                                                str(size), re.IGNORECASE)
    if isinstance(size, bool) or not (isinstance(size, int) or m):
        raise CheckpointError(f"max_shard_size {size!r} is not a size like '5GB', '500MB' or 1000000")
    if m:
        unit = (m.group(2) or "B").upper()
        base = 1024 if "I" in unit else 1000
        power = " KMGT".index(unit[0]) if unit[0] in "KMGT" else 0
        size = int(float(m.group(1)) * base**power)
    if size < 1:
        raise CheckpointError(f"max_shard_size {size!r} must be at least one byte, e.g. '5GB'")
    return size


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shards(tensors: dict[str, torch.Tensor], directory: Path, max_shard_size: int | str) -> list[Path]:
    """Write tensors as one file or as shards + index; removes stale weight files of older saves."""
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        names = [SINGLE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for old in directory.iterdir():
        if (old.name == SINGLE or old.name == INDEX or _SHARD.match(old.name)) and old.name not in names:
            old.unlink()
    written = []
    for filename, shard in zip(names, shards):
        path = directory / filename
        tmp = path.with_name(f".{filename}.tmp")
        save_file(shard, str(tmp), metadata={"format": "pt"})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        written.append(path)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {name: filename for filename, shard in zip(names, shards) for name in shard}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_bytes(directory / INDEX, (json.dumps(index, indent=2) + "\n").encode())
    return written
