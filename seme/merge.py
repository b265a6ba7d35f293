"""The merge executor: streams tensors from the inputs, through a method, into the output.

Called as a function, this module is the API's ``seme.merge(config, out_dir, *, alignment=None,
device="cpu", overwrite=False, allow_pickle=False, progress=False) -> MergeResult`` (``seme.api.merge``).

It does all the I/O and knows nothing of methods: for each output tensor it maps that tensor from
every input without a copy (a prefetch thread checks the next one for NaN/Inf, which also faults
its pages in, while the current one is computed), calls the method's pure function, casts to the
output dtype and hands the result to a writer thread, which writes (and hashes) it into the
pre-planned shard and then releases the inputs' pages. Three stages overlap: read, compute, write.
Peak memory stays near (K + 1) tensors plus the prefetch, whatever the model size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import platform
import resource
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from seme import __version__, methods
from seme.checkpoint import (
    FLOAT_CODES,
    ITEMSIZE,
    Checkpoint,
    CheckpointWriter,
    check_finite,
    copy_side_files,
    file_records,
    open_checkpoint,
    parse_dtype_code,
    torch_dtype,
)
from seme.config import MergeConfig, ParamResolver
from seme.errors import CheckpointError, ConfigError
from seme.fsutil import atomic_dir, check_out_dir, clean_stale_temps, sha256_file
from seme.layout import same_source
from seme.lazy import torch
from seme.methods import gta

HASH_CACHE_ENV = "SEME_HASH_CACHE"  # directory of cached input digests; "off" disables the cache
#: Methods whose output entry depends only on the same entry of the inputs. Their tensors are merged
#: in row blocks of about CHUNK_BYTES per input, so temporaries (e.g. a float32 accumulator) stay
#: small and every pass over a block runs in the CPU cache: 256 KiB blocks made linear 3.8x and task
#: arithmetic 2.4x faster than whole 32 MiB tensors (bf16, one thread), with bit-identical results.
ELEMENTWISE = frozenset({"linear", "task_arithmetic", "nearswap"})
CHUNK_BYTES = 256 << 10
#: "off": never use the fused CPU kernels (seme.methods.fused); "torch": use them only on torch
#: tensors (not the torch-free path); unset: wherever they apply
KERNELS_ENV = "SEME_KERNELS"
FUSED_CODES = ("BF16", "F32")  # compute and output dtypes the fused kernels take
_RAW_BITS = {2: np.uint16, 4: np.uint32}
#: methods the torch-free path can run (``seme.methods.fused.BIT_METHODS``, from the same table,
#: so that deciding needs no numba import)
BIT_METHODS = frozenset({"linear", *gta.VARIANTS})

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    out_dir: Path
    manifest: dict[str, Any]
    seconds: float
    peak_rss_bytes: int
    tensors: int
    bytes_written: int
    extra: dict[str, Any] = field(default_factory=dict)


def tensor_seed(seed: int, name: str) -> int:
    """Per-tensor RNG seed from (seed, tensor name): independent of order and threads."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def _no_gpu_here() -> bool:
    """True when this machine has no NVIDIA device nodes, so ``--device auto`` means the CPU
    without importing torch to ask."""
    return not (os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0"))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but no CUDA device is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or auto")
    return torch.device(device)


def limit_heap_retention(threshold: int = 1 << 20) -> None:
    """Serve allocations of ``threshold`` bytes and more with mmap, so freed tensors leave RSS.

    glibc raises its mmap threshold dynamically (up to 32 MiB) after large frees and then keeps
    freed tensor buffers in per-thread heaps; with three threads (prefetch, compute, write) that
    retained memory alone was ~150 MB. Fixing the threshold turns that off. No-op off glibc.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _same_path(a: str, b: str) -> bool:
    return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))


def open_inputs(cfg: MergeConfig, allow_pickle: bool = False) -> tuple[list[Checkpoint], Checkpoint | None]:
    """Open every source (and the base) of a ``models:`` config and check that they are one
    architecture."""
    get = _opener(allow_pickle)
    base = get(cfg.base_model) if cfg.base_model else None
    sources = [get(m.model) for m in cfg.models]
    check_compatible(([base] if base else []) + sources)
    return sources, base


def _opener(allow_pickle: bool):
    """``get(reference) -> Checkpoint``, opening each distinct input once."""
    cache: dict[str, Checkpoint] = {}

    def get(p: str) -> Checkpoint:
        for k, v in cache.items():
            if k == p or _same_path(k, p):
                return v
        cache[p] = open_checkpoint(p, allow_pickle=allow_pickle)
        return cache[p]

    return get


def open_layout(cfg: MergeConfig, spec: methods.MethodSpec, allow_pickle: bool = False):
    """The executor's inputs (``seme.layout.Layout``): the plain checkpoints of a ``models:``
    config, or the per-position views of a ``slices:`` one; vocabularies aligned when a tokenizer
    source asks for it."""
    from seme import layout as lay

    if cfg.output_slices():
        get = _opener(allow_pickle)
        out = lay.plan_slices(cfg, spec, get)
        check_compatible([ck for _, ck in out.refs], same_layers=False)
    else:
        sources, base = open_inputs(cfg, allow_pickle=allow_pickle)
        anchor = base or sources[0]
        resolver = ParamResolver(cfg, spec.global_params, spec.model_params, anchor.architecture)
        refs = ([(cfg.base_model, base)] if base else []) + [(m.model, s) for m, s in zip(cfg.models, sources)]
        out = lay.Layout(sources, base, refs, resolver, dict(anchor.config))
        ts = cfg.token_source()
        if ts not in (None, "base", "union") and not any(r == ts or _same_path(r, ts) for r, _ in refs):
            out.refs.append((ts, _opener(allow_pickle)(ts)))
    if cfg.token_source() is not None:
        from seme.vocab import align_vocabularies

        align_vocabularies(cfg, out)
    return out


def check_compatible(cks: list[Checkpoint], same_layers: bool = True) -> None:
    """Same model type, same hidden size, same tensor names and shapes, else a clear error
    (``same_layers=False``: only type and hidden size; slices check their layers themselves)."""
    ref = cks[0]
    ref_type = ref.config.get("model_type")
    ref_arch = ref.architecture
    for ck in cks[1:]:
        if ck.config.get("model_type") != ref_type:
            raise CheckpointError(
                f"{ck.path}: architecture {ck.config.get('model_type')!r} differs from "
                f"{ref.path} ({ref_type!r}); all inputs must be one architecture"
            )
        if ck.architecture.hidden_size != ref_arch.hidden_size:
            raise CheckpointError(
                f"{ck.path}: hidden size {ck.architecture.hidden_size} differs from {ref.path} "
                f"({ref_arch.hidden_size})"
            )
        if not same_layers:
            continue
        names = set(ck.names)
        for n in ref.names:
            if n not in names:
                raise CheckpointError(f"{ck.path}: tensor {n} is missing (present in {ref.path})")
            if ck.shape(n) != ref.shape(n):
                raise CheckpointError(
                    f"tensor {n}: shape {list(ck.shape(n))} in {ck.path} does not match "
                    f"{list(ref.shape(n))} in {ref.path}"
                )
            a, b = ck.st_dtype(n), ref.st_dtype(n)
            if a != b and (a not in FLOAT_CODES or b not in FLOAT_CODES):
                raise CheckpointError(f"tensor {n}: dtype {a} in {ck.path} does not match {b} in {ref.path}")
        extra = names.difference(ref.names)
        if extra:
            raise CheckpointError(f"{ck.path}: tensor {min(extra)} is not present in {ref.path}")


def cached_sha256(f: Path) -> str:
    """sha256 of an input file, cached by (path, size, mtime, ctime, inode) like git's stat cache.

    Inputs are often merged many times (parameter sweeps); re-hashing gigabytes each time would cost
    more CPU than the merge itself. Any change to the file changes its ctime, so a stale digest is
    never reused. ``$SEME_HASH_CACHE`` sets the cache directory (``off`` disables it).
    """
    where = os.environ.get(HASH_CACHE_ENV, "")
    if where.lower() in ("off", "0", "false", "no"):
        return sha256_file(f)
    st = f.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    real = str(f.resolve())
    cache_dir = Path(where or Path.home() / ".cache" / "seme" / "sha256").expanduser()
    entry = cache_dir / (hashlib.sha256(real.encode()).hexdigest()[:32] + ".json")
    try:
        rec = json.loads(entry.read_text())
        if rec.get("path") == real and rec.get("stamp") == stamp:
            return str(rec["sha256"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    digest = sha256_file(f)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"path": real, "stamp": stamp, "sha256": digest}))
        os.replace(tmp, entry)
    except OSError:  # an unwritable cache only costs time
        pass
    return digest


class _InputHasher:
    """Hashes input files on a background thread (hashlib releases the GIL) during the merge."""

    def __init__(self, cks: list[tuple[str, Checkpoint]]):
        self.cks = cks
        self.result: list[dict[str, Any]] = []
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        seen = set()
        for uri, ck in self.cks:
            where = str(getattr(ck, "hashed_path", ck.path))  # an adapter view: the adapter's dir
            if where in seen:
                continue
            seen.add(where)
            files = [{"path": f.name, "sha256": cached_sha256(f), "bytes": f.stat().st_size} for f in ck.files]
            self.result.append({"uri": uri, "local_path": where, "files": files})

    def join(self) -> list[dict[str, Any]]:
        self._t.join()
        return self.result


def run_merge(
    cfg: MergeConfig,
    out_dir: str | os.PathLike,
    *,
    alignment: str | os.PathLike | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    config_path: str | None = None,
) -> MergeResult:
    """Merge per ``cfg`` into the Hugging Face checkpoint directory ``out_dir``."""
    t0 = time.perf_counter()
    limit_heap_retention()
    run = _MergeRun(cfg, out_dir, alignment, device, overwrite, allow_pickle, config_path)  # inputs, engine, …
    with atomic_dir(out_dir, overwrite=overwrite, protect=run.protect) as tmp:
        files, written = run.stream_tensors(tmp, progress)  # read → merge → write, overlapped
        files += run.write_side_files(tmp)  # config, tokenizer, SeMe's alignment as used
        seconds = time.perf_counter() - t0
        manifest = run.manifest(seconds, written, config_path)
        _write_card_and_manifest(tmp, manifest, files, run.writer.sha256s(), config_path)
    run.close()
    return MergeResult(Path(out_dir), manifest, seconds, manifest["peak_rss_bytes"], len(run.plan), written,
                       run.seme_extra)


class _MergeRun:
    """One merge's inputs, plan and engine, and the per-tensor steps of the streaming loop.

    Engines, chosen once: SeMe's merger; the fused kernels on raw bits without torch (the
    torch-free path); the fused kernels on torch tensors; the torch methods. Every tensor goes
    load (prefetch thread) → merge → write and hash (one thread each), one tensor in flight per stage.
    """

    def __init__(self, cfg: MergeConfig, out_dir: str | os.PathLike, alignment: str | os.PathLike | None,
                 device: str, overwrite: bool, allow_pickle: bool, config_path: str | None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.spec = spec = methods.configured(cfg)  # the method, plus svc when asked
        self.compute_code = parse_dtype_code(cfg.dtype)
        self.out_code = parse_dtype_code(cfg.out_dtype)
        if spec.name != "seme" and alignment is not None:
            raise ConfigError("--alignment is only used with merge_method: seme")
        #: paths the output must never replace: the inputs, the alignment, the config
        self.protect = [*cfg.referenced_models(), alignment, config_path]
        out_path = check_out_dir(out_dir, overwrite, protect=self.protect)  # fail fast, before any work
        clean_stale_temps(out_path.parent)
        self.layout = layout = open_layout(cfg, spec, allow_pickle=allow_pickle)
        self.sources, self.base, self.anchor = sources, base, anchor = layout.sources, layout.base, layout.anchor
        self.arch = anchor.architecture
        self.plan = _output_plan(anchor, self.out_code)
        self.inputs = list({id(c): c for c in ([base] if base else []) + sources}.values())  # distinct
        self.bit_path = _bits_path(spec.name, device, self.compute_code, self.plan, self.inputs, sources, base)
        self.dev = "cpu" if self.bit_path else resolve_device(device)
        self.hasher = _InputHasher(layout.refs)
        self.seme_merger = None
        if spec.name == "seme":
            from seme.semantic.merger import SemeMerger  # heavy: only for SeMe

            try:
                self.seme_merger = SemeMerger.prepare(cfg, sources, base, Path(alignment) if alignment else None,
                                                      str(self.dev))
            except ConfigError as e:
                raise (ConfigError(f"{e} (config {config_path})") if config_path and config_path not in str(e)
                       else e) from None
        self.resolver = layout.resolver
        self.compute_dtype = None
        self.fused = None
        if not self.bit_path:
            self.compute_dtype = torch_dtype(self.compute_code)
            if self.seme_merger is None:
                self.fused = fused_method(spec.name, self.dev, self.compute_code, len(sources))
        self.kernels = _fused_module() if self.bit_path else None
        self.nxt: Future | None = None  # the prefetch thread's load (or pass 1) of the next tensor
        self.outputs = _OutputPool(max((math.prod(s) * ITEMSIZE[d] for _, s, d in self.plan), default=0))
        self.writer: CheckpointWriter | None = None
        self.seme_extra: dict[str, Any] = {}
        self.protect += [ck.path for _, ck in layout.refs]  # s3:// and Hub inputs: their local copies

    # -- the streaming loop ----------------------------------------------------------------------
    def stream_tensors(self, tmp: Path, progress: bool) -> tuple[list[str], int]:
        """Merge and write every planned tensor into ``tmp``; returns (shard files, bytes written)."""
        self.writer = writer = CheckpointWriter(tmp, self.plan, self.cfg.shard_bytes())
        produce = self._bits_tensor if self.bit_path else self._torch_tensor
        written = 0
        try:
            bar = _progress(len(self.plan), progress)
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="seme-prefetch") as self.prefetch, \
                    ThreadPoolExecutor(max_workers=1, thread_name_prefix="seme-write") as wpool, \
                    ThreadPoolExecutor(max_workers=1, thread_name_prefix="seme-hash") as hpool:
                if self.bit_path:
                    self.nxt = self.prefetch.submit(self._bits_prepare, 0)
                elif self.seme_merger is None:
                    self.nxt = self.prefetch.submit(self._load, self.plan[0][0], self.plan[0][2])
                pending: list[Future] = []
                for i, (name, _shape, odc) in enumerate(self.plan):
                    try:
                        merged = produce(i, name, odc)
                    except ConfigError as e:  # a parameter that is bad for this tensor: say where
                        raise ConfigError(f"{e} (tensor {name}, config {self.config_path or 'given'})") from None
                    for f in pending:  # at most one tensor being written: bounded memory
                        f.result()
                    # the write (a memcpy into the page cache) and the sha256 of the same bytes,
                    # each on its own core: one after the other they were the slowest stage
                    pending = [wpool.submit(self._store, name, merged),
                               hpool.submit(writer.hash_update, name, merged)]
                    written += _nbytes(merged)
                    del merged
                    bar.update(1)
                for f in pending:
                    f.result()
            bar.close()
            return writer.close(), written
        except BaseException:
            writer.abort()
            raise

    def _store(self, name: str, merged: torch.Tensor | np.ndarray) -> None:
        self.writer.write(name, merged, hash=False)  # hashed on its own thread, at the same time
        for ck in self.inputs:  # done with this tensor: its input pages leave our RSS
            ck.release(name)

    # -- the torch engines (torch methods, fused kernels on torch tensors, SeMe) ----------------------
    def _load(self, name: str, odc: str) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Tensor ``name`` of the base and every source, zero-copy where possible, checked for NaN/Inf
        (or left to the fused kernel to check as it reads). Runs on the prefetch thread."""
        base, fused, dev, compute_dtype = self.base, self.fused, self.dev, self.compute_dtype

        def one(ck: Checkpoint) -> torch.Tensor:
            t = ck.view(name)  # zero-copy; methods never modify their inputs
            if fused is not None and t.dtype in (torch.bfloat16, torch.float32) and odc in FUSED_CODES:
                ck.prefetch(name)  # the kernel checks for NaN/Inf as it reads
            else:
                check_finite(name, t, str(ck.file_of(name)))  # reads every page: warms the page cache
                ck.release(name)  # ...but the pages join our RSS only while the tensor is computed
            if t.is_floating_point():
                t = t.to(device=dev, dtype=compute_dtype)
            return t

        # a source view without ``name``: a slice with fewer sources than others (slices: only)
        b = one(base) if base is not None and name in base else None
        return b, [b if (b is not None and same_source(s, base, name)) else one(s) for s in self.sources if name in s]

    def _torch_tensor(self, i: int, name: str, odc: str) -> torch.Tensor:
        """Tensor ``i`` of the plan, merged by the torch methods (or SeMe, or the fused kernels on
        torch tensors), in the output dtype and checked for NaN/Inf."""
        od = torch_dtype(odc)
        kernel_checked = False  # the fused kernel counted the output's NaN/Inf
        if self.seme_merger is not None:
            merged = self.seme_merger.merge_tensor(name)
        else:
            b, ts = self.nxt.result()
            plan = self.plan
            self.nxt = self.prefetch.submit(self._load, plan[i + 1][0], plan[i + 1][2]) if i + 1 < len(plan) else None
            if not ts[0].is_floating_point():  # integer buffers: keep the anchor's
                merged = (b if b is not None else ts[0])
            else:
                merged, kernel_checked = self._method_tensor(name, odc, od, b, ts)
            del b, ts
        merged = merged.to(dtype=od)
        if not kernel_checked:
            check_finite(name, merged, "merge result")
        return merged

    def _method_tensor(self, name: str, odc: str, od: torch.dtype, b: torch.Tensor | None,
                       ts: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """A classic method on one floating-point tensor: the fused kernel, row blocks (element-wise
        and two-pass methods on big tensors) or the method's function. Returns (tensor, whether the
        kernel already checked it for NaN/Inf)."""
        spec, resolver, sources = self.spec, self.resolver, self.sources
        t = resolver.t_of(name)
        gp = resolver.global_params(name, t)
        active = [k for k, s in enumerate(sources) if name in s]
        mp = [resolver.model_params(k, name, t) for k in active]
        rng = torch.Generator(device=self.dev).manual_seed(tensor_seed(self.cfg.seed, name))
        big = _nbytes(ts[0]) > CHUNK_BYTES and ts[0].dim() > 1
        use_fused = (self.fused is not None and ts[0].dtype in (torch.bfloat16, torch.float32)
                     and odc in FUSED_CODES)
        state = spec.prepare(b, ts, mp, gp, rng) if big and spec.fn_block and not use_fused else None
        if use_fused:
            merged, bad = self.fused(b, ts, mp, gp, rng, od, out=self.outputs.take(ts[0].shape, od),
                                     release=partial(_release_entries, self.inputs, name))
            _raise_non_finite(name, bad, self.base, [sources[k] for k in active])
            return merged, True
        if spec.name in ELEMENTWISE and big:
            return _merge_rows(spec.fn, b, ts, mp, gp, rng, od, name, self.inputs), False
        if state is not None:  # two-pass method: statistics, then row blocks
            return _merge_rows(spec.fn, b, ts, mp, gp, rng, od, name, self.inputs,
                               block=partial(spec.fn_block, state)), False
        if spec.out_in and self.arch.role(name).transposed and ts[0].dim() == 2:
            return _call_out_in(spec.fn, b, ts, mp, gp, rng), False
        return spec.fn(b, ts, mp, gp, rng), False

    # -- the torch-free engine (fused kernels on the memory-mapped bits) -------------------------------
    def _bits_prepare(self, i: int):
        """Everything tensor ``i`` needs before its output is computed: its arrays over the
        memory maps, its parameters, and pass 1 of two-pass methods (TIES's thresholds, L1
        norms). Runs on the prefetch thread while the previous tensor's pass 2 runs. Returns
        ``finish(o, release) -> bad``, or the anchor's bits for integer buffers."""
        spec, resolver, sources, base, inputs, kernels = (self.spec, self.resolver, self.sources, self.base,
                                                          self.inputs, self.kernels)
        name = self.plan[i][0]
        for ck in inputs:  # asynchronous read-ahead of this tensor
            ck.prefetch(name)
        arrays = {id(ck): ck.array(name) for ck in inputs}
        if self.anchor.st_dtype(name) not in FLOAT_CODES:  # integer buffers: keep the anchor's
            return arrays[id(self.anchor)]
        t = resolver.t_of(name)
        gp = resolver.global_params(name, t)
        mp = [resolver.model_params(k, name, t) for k in range(len(sources))]
        xs = [arrays[id(s)] for s in sources]
        half = self.compute_code == "BF16"
        if spec.name == "linear":
            return partial(kernels.linear_bits, xs, half, mp, gp)
        if base is None:
            raise ConfigError(f"{spec.name} needs a base_model")
        idx = [k for k, s in enumerate(sources) if not same_source(s, base, name)]
        return kernels.gta_prepare(arrays[id(base)], xs, idx, half, mp, gp, tensor_seed(self.cfg.seed, name),
                                   partial(_release_entries, inputs, name), method=spec.name,
                                   **kernels.BIT_METHODS[spec.name])

    def _bits_tensor(self, i: int, name: str, odc: str) -> np.ndarray:
        """Tensor ``i`` of the plan, merged by the fused kernels straight from the memory-mapped
        files (no torch): the output's raw bits, checked for NaN/Inf by the kernel."""
        finish = self.nxt.result()
        self.nxt = self.prefetch.submit(self._bits_prepare, i + 1) if i + 1 < len(self.plan) else None
        if isinstance(finish, np.ndarray):
            return finish
        o = self.outputs.take_bits(math.prod(self.anchor.shape(name)), odc)
        bad = finish(o, partial(_release_entries, self.inputs, name))
        _raise_non_finite(name, bad, self.base, self.sources)
        return o

    # -- after the tensors -----------------------------------------------------------------------------
    def write_side_files(self, tmp: Path) -> list[str]:
        """config.json (with the output dtype), tokenizer files, chat template, and SeMe's alignment
        as used."""
        out_config = dict(self.layout.config)
        if self.out_code is not None:
            out_config["dtype"] = self.cfg.out_dtype  # transformers' current key (mergekit's torch_dtype)
            out_config.pop("torch_dtype", None)
        side = write_side_files(self.cfg, self.layout, tmp, out_config)
        if self.seme_merger is None:
            return side
        self.seme_extra = self.seme_merger.manifest_extra()
        self.seme_merger.write_artifacts(tmp)
        return [*side, *sorted(str(p.relative_to(tmp)) for p in (tmp / "seme_alignment").rglob("*") if p.is_file())]

    def manifest(self, seconds: float, written: int, config_path: str | None) -> dict[str, Any]:
        """seme_manifest.json (less its file records): inputs, parameters, engine, resources."""
        cfg, spec = self.cfg, self.spec
        engine = ("seme" if self.seme_merger else "kernels, torch-free" if self.bit_path
                  else "kernels" if self.fused else "torch")
        return {
            "seme_version": __version__,
            "method": spec.name,
            "parameters": _describe_params(cfg, spec),
            "config": cfg.model_dump(mode="json"),
            "config_path": config_path,
            "config_sha256": cfg.sha256(),
            "inputs": self.hasher.join(),
            "seed": cfg.seed,
            "dtype": cfg.dtype,
            "out_dtype": cfg.out_dtype or "as input",
            "architecture": self.arch.family,
            "device": str(self.dev),
            "engine": engine,
            "host": platform.node(),
            "torch_version": _torch_version(),
            "wall_seconds": round(seconds, 3),
            "peak_rss_bytes": peak_rss_bytes(),
            "tensors": len(self.plan),
            "bytes_written": written,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **({"seme": self.seme_extra} if self.seme_extra else {}),
        }

    def close(self) -> None:
        for ck in self.layout.opened.values() or self.inputs:
            ck.close()


def _output_plan(anchor: Checkpoint, out_code: str | None) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, output dtype code) per tensor, in the anchor's order; floating-point tensors
    take ``out_dtype`` when set, everything else keeps its own dtype."""
    plan = []
    for n in anchor.names:
        src = anchor.st_dtype(n)
        plan.append((n, anchor.shape(n), (out_code or src) if src in FLOAT_CODES else src))
    return plan


def _write_card_and_manifest(tmp: Path, manifest: dict[str, Any], files: list[str], known: dict[str, str],
                             config_path: str | None) -> None:
    """README.md (the model card, with the config as given) and seme_manifest.json with every output
    file's sha256."""
    given = Path(config_path).read_text() if config_path and Path(config_path).is_file() else None
    (tmp / "README.md").write_text(model_card(manifest, given))
    manifest["files"] = file_records(tmp, [*files, "README.md"], known=known)
    (tmp / "seme_manifest.json").write_text(json.dumps(manifest, indent=2))


def _kernels_off() -> bool:
    return os.environ.get(KERNELS_ENV, "").lower() in ("off", "0", "false", "no")


def _fused_module():
    """``seme.methods.fused`` (numba), or None when it cannot be loaded."""
    try:
        from seme.methods import fused
    except Exception as e:  # noqa: BLE001 - numba missing or unusable: the torch implementations still work
        log.warning("fused CPU kernels unavailable (%s); using the torch implementations", e)
        return None
    return fused


def fused_method(name: str, dev: torch.device, compute_code: str | None, n_sources: int):
    """The fused CPU kernel version of method ``name`` (``seme.methods.fused``), when it applies:
    on the CPU, for a bfloat16/float32 compute dtype, at most ``fused.MAXK`` sources, unless
    ``SEME_KERNELS=off``; else None."""
    if dev.type != "cpu" or compute_code not in FUSED_CODES or _kernels_off():
        return None
    fused = _fused_module()
    return fused.get(name) if fused is not None and n_sources <= fused.MAXK else None


def _bits_path(method: str, device: str, compute_code: str | None, plan: list, inputs: list[Checkpoint],
               sources: list[Checkpoint], base: Checkpoint | None) -> bool:
    """Whether this merge runs on the fused kernels straight from the memory-mapped files, without
    torch (``import torch`` alone costs more than a 135M-parameter merge): a classic method the
    kernels implement bit for bit (not SLERP, whose coefficients are torch's sums), on the CPU,
    every floating-point tensor of every input in the compute dtype (bfloat16 or float32) or in
    bfloat16 under a float32 compute dtype,
    a bfloat16/float32 output, at most ``fused.MAXK`` sources, safetensors inputs, and not
    ``SEME_KERNELS=off``. Otherwise the torch executor runs, with the same results."""
    if method not in BIT_METHODS or device not in ("cpu", "auto") or (device == "auto" and not _no_gpu_here()):
        return False
    if compute_code not in FUSED_CODES or _kernels_off() or os.environ.get(KERNELS_ENV, "").lower() == "torch":
        return False
    if method != "linear" and base is not None and all(s is base for s in sources):
        return False
    if any(hasattr(ck, "computed") for ck in inputs):  # views (slices, vocabularies): the torch path
        return False  # nothing but the base to merge: the torch path handles that corner
    for name, _shape, odc in plan:
        if inputs[0].st_dtype(name) not in FLOAT_CODES:
            continue
        if odc not in FUSED_CODES:
            return False
        codes = {ck.st_dtype(name) for ck in inputs}  # one dtype (one kernel type) per tensor;
        if codes not in ({compute_code}, {"BF16"}):  # bfloat16 widens to float32 exactly, nothing else converts
            return False
        if any(ck.array(name) is None for ck in inputs):
            return False
    fused = _fused_module()
    return fused is not None and len(sources) <= fused.MAXK


def _torch_version() -> str | None:
    """torch's version, without importing it when this process has not."""
    if "torch" in sys.modules:
        return str(torch.__version__)
    # torch/version.py holds the full version with its local tag (2.13.0+cpu, 2.13.0+cu130); the
    # distribution metadata may drop the tag (CUDA wheels do), and the manifest must say the same
    # thing on both paths.
    import importlib.util
    import re

    spec = importlib.util.find_spec("torch")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        try:
            text = (Path(loc) / "version.py").read_text()
        except OSError:
            continue
        if m := re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", text, re.M):
            return m.group(1)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:  # pragma: no cover - torch is a dependency
        return None


class _OutputPool:
    """Two reusable output buffers for the fused kernels: one being computed, one being written.

    The executor keeps at most one write in flight, so the buffer taken for tensor n + 2 is the
    one tensor n was written from, and that write has finished. Reusing them (on transparent huge
    pages where the kernel allows) saves a page fault and a zeroed page per 4 KiB of output.
    """

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(nbytes, 1)
        self.bufs: list[mmap.mmap] = []
        self.i = 0

    def _next(self) -> mmap.mmap:
        if len(self.bufs) < 2:
            mm = mmap.mmap(-1, self.nbytes)
            try:
                mm.madvise(mmap.MADV_HUGEPAGE)
            except (AttributeError, OSError, ValueError):  # pragma: no cover - advisory
                pass
            self.bufs.append(mm)
        buf = self.bufs[self.i % 2]
        self.i += 1
        return buf

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        buf = self._next()
        n = math.prod(shape)
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype, count=n).view(shape)

    def take_bits(self, n: int, code: str) -> np.ndarray:
        """A flat array of ``n`` raw entries of the safetensors dtype ``code`` (uint16 for BF16)."""
        return np.frombuffer(self._next(), dtype=_RAW_BITS[ITEMSIZE[code]], count=n)


def _release_entries(inputs: list[Checkpoint], name: str, lo: int, hi: int) -> None:
    for ck in inputs:
        ck.release_entries(name, lo, hi)


def _raise_non_finite(name: str, bad: dict, base: Checkpoint | None, sources: list[Checkpoint]) -> None:
    """Turn the kernel's non-finite counts into the same one-line error as ``check_finite``."""
    culprits = ([base] if bad["base"] and base is not None else []) + [
        ck for ck, c in zip(sources, bad["sources"]) if c
    ]
    for ck in culprits:
        check_finite(name, ck.view(name), str(ck.file_of(name)))  # raises, naming NaN or Inf
    if culprits:  # a finite input made non-finite by the compute dtype (e.g. float32 → bfloat16 overflow)
        raise CheckpointError(f"{culprits[0].file_of(name)}: tensor {name} overflows the compute dtype")
    if bad["out"]:
        raise CheckpointError(f"merge result: tensor {name} contains NaN or Inf values")


def _nbytes(t: torch.Tensor | np.ndarray) -> int:
    return t.nbytes if isinstance(t, np.ndarray) else t.numel() * t.element_size()


def _merge_rows(fn, b, ts, mp, gp, rng, od: torch.dtype, name: str, inputs: list[Checkpoint],
                block=None) -> torch.Tensor:
    """An element-wise method ``fn`` (or, given ``block(base_rows, rows, row0)``, pass 2 of a
    two-pass method) applied block of rows by block of rows into one output tensor.

    Each block's input pages are released as soon as it is done, so resident memory is the output
    plus one block's worth of inputs and temporaries, not K whole tensors and a float32 copy.
    """
    rows = ts[0].shape[0]
    cols = ts[0].numel() // rows
    # blocks of a multiple of 64 elements: vector loops and thread splits see the same boundaries
    # as on the whole tensor, so results are bit-identical
    align = 64 // math.gcd(cols, 64)
    step = max(align, CHUNK_BYTES // max(1, cols * ts[0].element_size()) // align * align)
    out = torch.empty(ts[0].shape, dtype=od, device=ts[0].device)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        bb = b[r0:r1] if b is not None else None
        rs = [bb if t is b else t[r0:r1] for t in ts]
        out[r0:r1] = fn(bb, rs, mp, gp, rng) if block is None else block(bb, rs, r0)
        for ck in inputs:
            ck.release(name, (r0, r1))
    return out


def write_side_files(cfg: MergeConfig, layout: Any, out: Path, out_config: dict[str, Any]) -> list[str]:
    """config.json, generation config and tokenizer files of the output, and its chat template.

    The tokenizer comes from the vocabulary alignment when one ran (``seme.vocab``), else it is
    copied from the tokenizer source (``tokenizer_source: <model>``), the base model, or the first
    model, as mergekit's donor."""
    opened = dict(layout.refs)
    donor_ref = cfg.referenced_models()[0]
    ts = cfg.token_source()
    if ts not in (None, "base", "union"):
        donor_ref = ts
    donor = opened.get(donor_ref) or next(ck for ref, ck in layout.refs if _same_path(ref, donor_ref))
    vocab = getattr(layout, "vocab", None)
    if vocab is not None:
        out_config = vocab.update_config(out_config)
    side = copy_side_files(donor.path, out, config=out_config)
    if vocab is not None:
        side = sorted({*side, *vocab.save_tokenizer(out)})
    if cfg.chat_template:
        from seme.vocab import set_chat_template

        side = sorted({*side, *set_chat_template(cfg, out, layout.refs)})
    return side


def _call_out_in(fn, b, ts, mp, gp, rng) -> torch.Tensor:
    """``fn`` on a GPT-2 Conv1D weight (stored (in, out)) shown as (out, in), the result stored back.
    The base stays one object, so methods still recognise it among the models."""
    bt = b.T if b is not None else None
    return fn(bt, [bt if t is b else t.T for t in ts], mp, gp, rng).T.contiguous()


def _describe_params(cfg: MergeConfig, spec: methods.MethodSpec) -> dict[str, Any]:
    """Parameters as resolved before per-tensor evaluation: defaults filled in."""
    return {
        "global": {k: cfg.parameters.get(k, v) for k, v in spec.global_params.items()},
        "models": [
            {"model": m.model, **{k: m.parameters.get(k, cfg.parameters.get(k, v)) for k, v in spec.model_params.items()}}
            for m in cfg.models
        ],
    }


def card_name(ref: str) -> str:
    """How the model card names a model reference: Hub ids and ``s3://`` URIs as given, a local
    directory by its name (never an absolute local path), ``base+adapter`` part by part."""
    if "+" in ref and not Path(ref).expanduser().exists():
        return "+".join(card_name(p) for p in ref.split("+"))
    if ref.startswith("s3://"):
        return ref
    from seme.refs import is_hub_id

    if is_hub_id(ref):
        return ref
    return Path(ref.rstrip("/")).name or ref


def model_card(manifest: dict[str, Any], config_text: str | None = None) -> str:
    """README.md with the Hugging Face Hub's front matter for merges (``base_model``: every input
    by its reference, ``library_name``, ``tags``) and a body with the method, the models and the
    config as given."""
    from seme.config import MergeConfig

    cfg = MergeConfig.model_validate(manifest["config"])
    method = manifest["method"]
    refs = list(dict.fromkeys(card_name(r) for r in cfg.referenced_models()))
    # the Hub's base_model metadata takes repo ids: adapters listed apart, revisions dropped
    hub_refs = list(dict.fromkeys(p.split("@")[0] if "/" in p and not p.startswith("s3://") else p
                                  for r in refs for p in r.split("+")))
    if config_text is None:
        config_text = yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
    base = card_name(cfg.base_model) if cfg.base_model else None
    front = {"base_model": hub_refs, "library_name": "transformers", "tags": ["merge", "seme", method]}
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        f"# Merged model ({method})",
        "",
        f"This model is a merge of pre-trained language models made with seme {manifest['seme_version']}.",
        "",
        "## Merge details",
        "",
        "### Method",
        "",
        f"Merged with the `{method}` method" + (f", with `{base}` as the base." if base else "."),
        "",
        "### Models merged",
        "",
        *[f"- {r}" for r in refs if r != base],
        "",
        "### Configuration",
        "",
        "```yaml",
        config_text.rstrip(),
        "```",
        "",
        (
            f"Produced on {manifest['created']} ({manifest['device']}, {manifest['wall_seconds']} s); compute "
            f"dtype {manifest['dtype']}, output dtype {manifest['out_dtype']}, seed {manifest['seed']}, config "
            f"sha256 `{manifest['config_sha256']}`. Inputs, resolved parameters and output checksums are in "
            "`seme_manifest.json`."
        ),
        "",
    ]
    return "\n".join(lines)


class _NoBar:
    """A disabled progress bar that does not import tqdm (40 ms of a one-second merge)."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    """A tqdm bar on a terminal; nothing when ``enabled`` is False or stderr is a file or pipe (logs
    of scheduled runs would fill with carriage-return redraws)."""
    if not enabled or not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="tensor", desc="merge", leave=False)


class _CallableModule(type(sys)):
    """``seme.merge`` names both this module and the API function ``seme.merge(config, out_dir, …)``;
    importing this module rebinds the package attribute to it, so the module itself is callable."""

    def __call__(self, config: Any, out_dir: str | os.PathLike, **kwargs: Any) -> MergeResult:
        from seme.api import merge as api_merge

        return api_merge(config, out_dir, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
