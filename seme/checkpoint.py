"""Checkpoint I/O: a lazy, memory-mapped reader and a streaming sharded writer.

The reader opens every safetensors file once (memory-mapped) and hands out one tensor at a time.
The writer knows every output tensor's shape and dtype up front (the merge plan), so it can write
each shard's header first and then stream tensor bytes into place as they are computed: peak memory
stays at one tensor, not one shard, and the files are written sequentially (and hashed on the way,
so the manifest's sha256 needs no second read of the output).

Reads are zero-copy where possible: ``Checkpoint.view`` returns a tensor over a copy-on-write memory
map of the file (no memcpy, page cache shared), and ``Checkpoint.release`` drops those pages from
the process again (``MADV_DONTNEED``) once the executor is done with a tensor, so resident memory
stays at the tensors in flight instead of growing to the size of the inputs.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seme.architectures import Architecture, resolve
from seme.errors import CheckpointError
from seme.fsutil import open_regular, sha256_file
from seme.lazy import torch

SAFE_INDEX = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)

#: config dtype name -> safetensors dtype code
DTYPE_CODES: dict[str, str] = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
DTYPES = tuple(DTYPE_CODES)
#: bytes per entry of every safetensors dtype
ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8,
}
FLOAT_CODES = frozenset({"F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3"})
#: numpy dtype holding a code's raw bits (what ``Checkpoint.array`` returns; bfloat16 as uint16)
_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_TORCH_NAMES = {
    "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def torch_dtype(code: str):
    """The torch dtype of a safetensors code (imports torch); float32 for codes torch lacks."""
    return getattr(torch, _TORCH_NAMES.get(code, "float32"))


def dtype_code(dtype) -> str:
    """The safetensors code of a torch dtype, or ``dtype`` itself when it is already a code."""
    if isinstance(dtype, str):
        if dtype not in ITEMSIZE:
            raise CheckpointError(f"unknown safetensors dtype {dtype!r}")
        return dtype
    name = str(dtype).replace("torch.", "")
    for code, tname in _TORCH_NAMES.items():
        if tname == name:
            return code
    raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors")


def parse_dtype_code(name: str | None) -> str | None:
    """``"bfloat16"`` -> ``"BF16"`` (no torch); None stays None."""
    if name is None:
        return None
    try:
        return DTYPE_CODES[str(name).replace("torch.", "")]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}") from None


def parse_dtype(name: str | None):
    """``"bfloat16"`` -> ``torch.bfloat16``; None stays None."""
    code = parse_dtype_code(name)
    return None if code is None else torch_dtype(code)


#: largest JSON side file read (config, index, tokenizer): bigger ones are refused, not parsed
MAX_JSON_BYTES = 256 << 20


def read_json(path: str | os.PathLike, error=CheckpointError, what: str = "JSON file") -> Any:
    """Parse a JSON side file safely: regular file only, at most MAX_JSON_BYTES, UTF-8; any defect
    raises ``error`` naming the file."""
    fd = open_regular(path, error)
    with os.fdopen(fd, "rb") as fh:
        if os.fstat(fd).st_size > MAX_JSON_BYTES:
            raise error(f"{path}: {what} larger than {MAX_JSON_BYTES >> 20} MiB; refused")
        raw = fh.read(MAX_JSON_BYTES + 1)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path}: {what} is not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid {what} ({e})") from None
    except RecursionError:
        raise error(f"{path}: {what} is nested too deeply") from None


def _safe_shard_name(name: Any, index: Path) -> str:
    """A shard name from an index: a plain relative path that stays inside the checkpoint directory."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{index}: weight_map values must be shard file names, got {name!r}")
    parts = Path(name).parts
    if os.path.isabs(name) or "\\" in name or ".." in parts or "\0" in name:
        raise CheckpointError(f"{index}: shard {name!r} is outside the checkpoint directory; refused")
    return name


def _read_header(fh, path: Path) -> tuple[dict[str, Any], int, int]:
    """A safetensors file's header, checked as the safetensors library checks it: a JSON object of
    known dtypes and shapes whose byte ranges tile the data section exactly. Returns (header, data
    start, file size); any defect raises CheckpointError naming the file."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt or truncated safetensors file ({why})")

    size = os.fstat(fh.fileno()).st_size
    head = fh.read(8)
    if len(head) < 8:
        raise bad("shorter than its 8-byte header length")
    n = struct.unpack("<Q", head)[0]
    if n > min(size - 8, 100 << 20):
        raise bad(f"header length {n} exceeds the file size {size}")
    try:
        header = json.loads(fh.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    spans = []
    for name, v in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (b, e) = v["dtype"], v["shape"], v["data_offsets"]
            ok = code in ITEMSIZE and all(isinstance(d, int) and d >= 0 for d in shape) \
                and isinstance(b, int) and isinstance(e, int)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise bad(f"invalid entry for tensor {name}")
        if e - b != _numel(shape) * ITEMSIZE[code] or b < 0:
            raise bad(f"tensor {name}: data_offsets {[b, e]} do not match shape {shape} {code}")
        spans.append((b, e, name))
    spans.sort()
    pos = 0
    for b, e, name in spans:
        if b != pos:
            raise bad(f"tensor {name}: data_offsets leave a gap or overlap at byte {pos}")
        pos = e
    if 8 + n + pos != size:
        raise bad(f"tensor data ends at byte {8 + n + pos}, the file has {size} bytes")
    return header, 8 + n, size


class _MappedFile:
    """One safetensors file mapped copy-on-write, with each tensor's absolute byte range.

    ``ACCESS_COPY`` makes the mapping writable (``torch.frombuffer`` wants that) while no write can
    ever reach the file: a stray in-place op would only touch private pages of this process.
    """

    def __init__(self, path: Path) -> None:
        with os.fdopen(open_regular(path, CheckpointError), "rb") as fh:
            header, start, size = _read_header(fh, path)
            self.mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size > start else None
        self.header = header
        self.ranges: dict[str, tuple[int, int]] = {
            k: (start + v["data_offsets"][0], start + v["data_offsets"][1])
            for k, v in header.items()
            if k != "__metadata__"
        }

    def release(self, begin: int, end: int) -> None:
        """Drop the pages of ``[begin, end)`` from this process (they stay in the page cache)."""
        if self.mm is None or end <= begin:
            return
        lo = begin - begin % mmap.PAGESIZE
        try:
            self.mm.madvise(mmap.MADV_DONTNEED, lo, end - lo)
        except (OSError, ValueError):  # pragma: no cover - madvise is advisory
            pass


class Checkpoint:
    """A Hugging Face checkpoint directory, read lazily tensor by tensor.

    ``get(name)`` returns an independent copy of one tensor; ``view(name)`` returns it without a
    copy, straight over the memory map (treat it as read-only), and ``release(name)`` gives its
    pages back once it is no longer needed (a later access just faults them in again). Pickle checkpoints
    (``pytorch_model.bin``) are refused unless ``allow_pickle``; when allowed they are loaded with
    ``torch.load(weights_only=True, mmap=True)``.
    """

    def __init__(self, path: str | os.PathLike, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such checkpoint directory")
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory (expected a Hugging Face checkpoint)")
        cfg_path = self.path / "config.json"
        if not os.path.lexists(cfg_path):
            raise CheckpointError(f"{cfg_path}: missing config.json")
        config = read_json(cfg_path, what="config.json")
        if not isinstance(config, dict):
            raise CheckpointError(f"{cfg_path}: config.json must be a JSON object, not {type(config).__name__}")
        self.config: dict[str, Any] = config
        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._handles: dict[Path, Any] = {}
        self._maps: dict[Path, _MappedFile] = {}
        self._pickle: dict[str, torch.Tensor] | None = None
        self.files: list[Path] = self._discover(allow_pickle)
        self.names: list[str] = list(self._where)
        self._arch: Architecture | None = None

    # -- discovery -------------------------------------------------------------------------------
    def _discover(self, allow_pickle: bool) -> list[Path]:
        index = self.path / SAFE_INDEX
        if os.path.lexists(index):
            data = read_json(index, what="index file")
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: invalid index file (no 'weight_map' object of tensor -> shard)")
            if not weight_map:
                raise CheckpointError(f"{index}: weight_map lists no tensors")
            files = sorted({self.path / _safe_shard_name(f, index) for f in weight_map.values()})
            for f in files:
                if not os.path.lexists(f):
                    raise CheckpointError(f"{f}: shard listed in {SAFE_INDEX} is missing")
            for f in files:
                self._scan(f)
            missing = [n for n in weight_map if n not in self._where]
            if missing:
                raise CheckpointError(f"{index}: tensor {missing[0]} listed but not found in its shard")
            return files
        single = self.path / "model.safetensors"
        if os.path.lexists(single):
            self._scan(single)
            return [single]
        shards = sorted(self.path.glob("*.safetensors"))
        if shards:
            for f in shards:
                self._scan(f)
            return shards
        pickles = [self.path / n for n in PICKLE_NAMES if (self.path / n).is_file()]
        pickles += sorted(self.path.glob("pytorch_model-*.bin"))
        if pickles:
            if not allow_pickle:
                raise CheckpointError(
                    f"{pickles[0]}: pickle checkpoint refused (pickle can run code); "
                    "convert it to safetensors or pass --allow-pickle if you trust it"
                )
            return self._load_pickles([p for p in pickles if p.suffix == ".bin"])
        raise CheckpointError(f"{self.path}: no model.safetensors, index or *.safetensors shards found")

    def _scan(self, f: Path) -> None:
        try:
            mapped = _MappedFile(f)  # checks the header and the offsets
        except OSError as e:
            raise CheckpointError(f"{f}: cannot read safetensors file ({e.strerror or e})") from None
        for name, v in mapped.header.items():
            if name != "__metadata__":
                if name in self._where:
                    raise CheckpointError(
                        f"tensor {name} is in both {self._where[name]} and {f}; "
                        f"which one is meant is ambiguous (an index file, {SAFE_INDEX}, would say)"
                    )
                self._meta[name] = (v["dtype"], tuple(v["shape"]))
                self._where[name] = f
        self._maps[f] = mapped

    def _load_pickles(self, files: list[Path]) -> list[Path]:
        self._pickle = {}
        for f in files:
            try:
                sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - unpickling errors have many types
                raise CheckpointError(f"{f}: cannot load pickle checkpoint ({e})") from None
            for name, t in sd.items():
                self._pickle[name] = t
                self._where[name] = f
                self._meta[name] = (dtype_code(t.dtype), tuple(t.shape))
        return files

    # -- access ----------------------------------------------------------------------------------
    @property
    def architecture(self) -> Architecture:
        if self._arch is None:
            arch = resolve(self.config, str(self.path / "config.json"))
            # the decoder layers the family's tables recognise (not a vision tower's, not unknown names)
            layers = {r.layer for r in map(arch.role, self.names) if r.kind != "other"} - {None}
            if arch.known and layers and max(layers) + 1 != arch.num_layers:  # type: ignore[operator]
                raise CheckpointError(
                    f"{self.path / 'config.json'}: num_hidden_layers is {arch.num_layers} but the weights "
                    f"have layers 0..{max(layers)}"  # type: ignore[type-var]
                )
            self._arch = arch
        return self._arch

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[self._check(name)][1]

    def dtype(self, name: str) -> torch.dtype:
        """The torch dtype of ``name`` (imports torch; ``st_dtype`` does not)."""
        return torch_dtype(self.st_dtype(name))

    def st_dtype(self, name: str) -> str:
        """The safetensors dtype code of ``name`` (``"BF16"``, ``"F32"`` …)."""
        return self._meta[self._check(name)][0]

    def nbytes(self, name: str) -> int:
        return _numel(self.shape(name)) * ITEMSIZE.get(self.st_dtype(name), 4)

    def _check(self, name: str) -> str:
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor {name} not found")
        return name

    def file_of(self, name: str) -> Path:
        return self._where[self._check(name)]

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (copied out of the memory map)."""
        self._check(name)
        if self._pickle is not None:
            return self._pickle[name]
        f = self._where[name]
        try:
            if f not in self._handles:
                from safetensors import safe_open  # the copying reader (imports torch)

                self._handles[f] = safe_open(str(f), framework="pt")
            return self._handles[f].get_tensor(name)
        except Exception as e:  # noqa: BLE001 - any read failure becomes one clear error
            raise CheckpointError(f"{f}: cannot read tensor {name} ({e})") from None

    def view(self, name: str) -> torch.Tensor:
        """One tensor without a copy, over the memory map. Do not modify it; see ``release``."""
        self._check(name)
        f = self._where[name]
        mapped = self._maps.get(f)
        code = self._meta[name][0]
        dtype = torch_dtype(code) if code in _TORCH_NAMES else None
        if mapped is None or mapped.mm is None or dtype is None:
            return self.get(name)  # pickle, or a dtype torch cannot view: the copying path
        begin, end = mapped.ranges[name]
        if end == begin or begin % dtype.itemsize:
            return self.get(name)
        t = torch.frombuffer(mapped.mm, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin)
        return t.view(self._meta[name][1])

    def array(self, name: str) -> np.ndarray | None:
        """The raw bits of ``name`` as a flat numpy array over the memory map, without a copy and
        without torch: unsigned integers of the dtype's width (bfloat16 as uint16, float32 as
        uint32). None for pickle checkpoints and misaligned tensors (use ``view``)."""
        self._check(name)
        mapped = self._maps.get(self._where[name])
        if mapped is None or name not in mapped.ranges:
            return None
        begin, end = mapped.ranges[name]
        size = ITEMSIZE[self._meta[name][0]]
        if end == begin:
            return np.empty(0, _RAW[size])
        if mapped.mm is None or begin % size:
            return None
        return np.frombuffer(mapped.mm, dtype=_RAW[size], count=(end - begin) // size, offset=begin)

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Give the pages of ``name`` (or of its rows ``[r0, r1)``) back to the OS; views stay valid.

        The pages stay in the page cache: touching the view again just maps them back in.
        """
        mapped = self._maps.get(self._where.get(name))  # type: ignore[arg-type]
        if mapped is None or name not in mapped.ranges:
            return
        begin, end = mapped.ranges[name]
        shape = self._meta[name][1]
        if rows is not None and shape and shape[0]:
            row_bytes = (end - begin) // shape[0]
            begin, end = begin + rows[0] * row_bytes, begin + min(rows[1], shape[0]) * row_bytes
        mapped.release(begin, end)

    def release_entries(self, name: str, lo: int, hi: int) -> None:
        """Give back the pages of the flat entries ``[lo, hi)`` of ``name`` (see ``release``)."""
        mapped = self._maps.get(self._where.get(name))  # type: ignore[arg-type]
        if mapped is None or name not in mapped.ranges:
            return
        begin, end = mapped.ranges[name]
        size = ITEMSIZE.get(self._meta[name][0], 1)
        mapped.release(begin + lo * size, min(end, begin + hi * size))

    def prefetch(self, name: str) -> None:
        """Ask the kernel to read ``name``'s pages ahead (asynchronous; a no-op when cached)."""
        mapped = self._maps.get(self._where.get(name))  # type: ignore[arg-type]
        if mapped is None or mapped.mm is None or name not in mapped.ranges:
            return
        begin, end = mapped.ranges[name]
        lo = begin - begin % mmap.PAGESIZE
        try:
            mapped.mm.madvise(mmap.MADV_WILLNEED, lo, end - lo)
        except (OSError, ValueError, AttributeError):  # pragma: no cover - madvise is advisory
            pass

    def close(self) -> None:
        self._handles.clear()
        self._maps.clear()  # the maps close once no view refers to them
        self._pickle = None


def open_checkpoint(path_or_uri: str | os.PathLike, allow_pickle: bool = False) -> Checkpoint:
    """Open any model reference (``seme.refs``): a local directory, an ``s3://`` URI (fetched,
    verified and cached first), a Hugging Face repo id, ``base+adapter`` or a PEFT adapter dir."""
    from seme.refs import open_ref

    return open_ref(str(path_or_uri), allow_pickle=allow_pickle)


def check_finite(name: str, t: torch.Tensor, where: str) -> None:
    """Raise if ``t`` holds NaN or Inf, naming the tensor and file.

    Fast path: one sum (a plain reduction, no n-byte mask; bf16 accumulates in float32 inside).
    A NaN or Inf anywhere makes the sum non-finite, so a finite sum proves the tensor finite; a
    non-finite sum (also possible from overflow of huge finite values) falls back to the exact test.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return
    total = t.sum(dtype=torch.float32) if t.dtype == torch.float16 else t.sum()  # fp16 overflows early
    if bool(torch.isfinite(total)):
        return
    if not bool(torch.isfinite(t).all()):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise CheckpointError(f"{where}: tensor {name} contains {bad} values")


# ------------------------------------------------------------------------------------------------
# Writer
# ------------------------------------------------------------------------------------------------


@dataclass
class _Slot:
    shard: int
    begin: int
    end: int


class CheckpointWriter:
    """Stream tensors into safetensors shards whose layout is planned up front.

    ``plan`` is an ordered list of ``(name, shape, dtype)`` (a torch dtype or a safetensors code such
    as ``"BF16"``). Tensors are assigned to shards of at
    most ``max_shard_bytes`` (a tensor larger than that gets its own shard). Each shard file is
    created with its header and the full size; ``write(name, tensor)`` puts the bytes at their
    offset. One shard gives ``model.safetensors``; several give ``model-0000i-of-0000N.safetensors``
    and the index file. While tensors arrive in plan order (the executor's order) each shard is
    hashed as it is written; ``sha256s()`` returns those digests.
    """

    def __init__(
        self,
        out_dir: Path,
        plan: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_bytes: int = 2 * 1024**3,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.plan = [(name, tuple(shape), dtype_code(dtype)) for name, shape, dtype in plan]
        groups: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
        size = 0
        for item in self.plan:
            nb = _numel(item[1]) * ITEMSIZE[item[2]]
            if groups[-1] and size + nb > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(item)
            size += nb
        n = len(groups)
        self.filenames = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.slots: dict[str, _Slot] = {}
        self._files = []
        self._hashes: list[Any] = []  # per shard: [sha256 object | None, next data offset, data size]
        self._expected: dict[str, tuple[tuple[int, ...], str]] = {}
        for i, group in enumerate(groups):
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            off = 0
            for name, shape, dtype in group:
                nb = _numel(shape) * ITEMSIZE[dtype]
                header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nb]}
                self._expected[name] = (tuple(shape), dtype)
                self.slots[name] = _Slot(i, off, off + nb)
                off += nb
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            path = self.out_dir / self.filenames[i]
            fh = open(path, "wb")  # noqa: SIM115 - kept open while tensors stream in; closed in close()/abort()
            self._files.append((fh, 0))
            try:
                fh.write(struct.pack("<Q", len(raw)))
                fh.write(raw)
                base = fh.tell()
                fh.truncate(base + off)
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(path)) from None
            self._files[-1] = (fh, base)
            self._hashes.append([hashlib.sha256(struct.pack("<Q", len(raw)) + raw), 0, off])
        self._written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor | np.ndarray, hash: bool = True) -> None:
        """Write one planned tensor: a torch tensor, or a numpy array of its raw bits (any shape,
        e.g. flat uint16 for bfloat16) whose byte size matches the plan. ``hash=False``: the caller
        hashes it with ``hash_update`` instead (e.g. on another thread, in plan order)."""
        shape, dtype = self._expected[name]
        slot = self.slots[name]
        if isinstance(tensor, np.ndarray):
            ok = tensor.nbytes == slot.end - slot.begin
            got = f"{tensor.nbytes} bytes"
        else:
            ok = tuple(tensor.shape) == shape and dtype_code(tensor.dtype) == dtype
            got = f"{tuple(tensor.shape)} {tensor.dtype}"
        if not ok:
            raise CheckpointError(f"internal: tensor {name} is {got}, planned {shape} {dtype}")
        fh, base = self._files[slot.shard]
        if isinstance(tensor, np.ndarray):
            data = np.ascontiguousarray(tensor).reshape(-1).view(np.uint8)
        else:
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        try:
            fh.seek(base + slot.begin)
            fh.write(memoryview(data))
        except OSError as e:  # disk full …: name the file (atomic_dir reports it under OUT_DIR)
            raise OSError(e.errno, e.strerror, str(self.out_dir / self.filenames[slot.shard])) from None
        self._written.add(name)
        if hash:
            self.hash_update(name, data)

    def hash_update(self, name: str, data: torch.Tensor | np.ndarray) -> None:
        """Feed one tensor's bytes to its shard's running sha256 (tensors must come in plan order;
        otherwise the shard is hashed by reading it back)."""
        if not isinstance(data, np.ndarray):
            data = data.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        slot = self.slots[name]
        hs = self._hashes[slot.shard]
        if hs[0] is not None and hs[1] == slot.begin:
            hs[0].update(memoryview(data))  # hashlib releases the GIL on large buffers
            hs[1] = slot.end
        else:
            hs[0] = None  # out of order: the file is hashed by reading it back

    def sha256s(self) -> dict[str, str]:
        """sha256 of every shard that was written in order from start to end."""
        return {
            self.filenames[i]: h.hexdigest()
            for i, (h, pos, size) in enumerate(self._hashes)
            if h is not None and pos == size
        }

    def close(self) -> list[str]:
        """Close the files; write the index for sharded output. Returns the file names."""
        for i, (fh, _) in enumerate(self._files):
            try:
                fh.close()  # flushes: may fail on a full disk
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(self.out_dir / self.filenames[i])) from None
        missing = [n for n, _, _ in self.plan if n not in self._written]
        if missing:
            raise CheckpointError(f"internal: tensor {missing[0]} was planned but never written")
        if len(self.filenames) > 1:
            total = sum(_numel(s) * ITEMSIZE[d] for _, s, d in self.plan)
            index = {
                "metadata": {"total_size": total},
                "weight_map": {n: self.filenames[self.slots[n].shard] for n, _, _ in self.plan},
            }
            (self.out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2))
            return [*self.filenames, SAFE_INDEX]
        return list(self.filenames)

    def abort(self) -> None:
        for fh, _ in self._files:
            try:
                fh.close()
            except OSError:  # already failing; the temp dir is removed
                pass


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def copy_side_files(src: Path, dst: Path, config: dict[str, Any] | None = None) -> list[str]:
    """Copy config.json (or write ``config``), tokenizer files and generation_config.json."""
    copied = []
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config, indent=2))
        copied.append("config.json")
    elif (src / "config.json").is_file():
        shutil.copyfile(src / "config.json", dst / "config.json")
        copied.append("config.json")
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def file_records(root: Path, names: Iterable[str], known: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """``[{"path", "sha256", "bytes"}]`` for files under ``root`` (the manifest's file list).

    ``known`` maps file names to digests already computed (the writer's streaming hashes).
    """
    known = known or {}
    out = []
    for n in sorted(names):
        p = root / n
        out.append({"path": n, "sha256": known.get(n) or sha256_file(p), "bytes": p.stat().st_size})
    return out
