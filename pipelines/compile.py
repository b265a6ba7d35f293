"""Compile the pipelines to KFP IR YAML, and read IR YAML back into KFP's protobuf messages."""

import os
from pathlib import Path

from pipelines.merge import ClusterOptions

PIPELINES = ("merge", "promote")


def build(which: str, opts: ClusterOptions | None = None):
    """The pipeline ``which`` (``merge`` | ``promote``) built with ``opts``."""
    from seme.errors import PipelineError

    if which == "merge":
        from pipelines.merge import build_merge_pipeline

        return build_merge_pipeline(opts)
    if which == "promote":
        from pipelines.promote import build_promote_pipeline

        return build_promote_pipeline(opts)
    raise PipelineError(f"unknown pipeline {which!r}; choose one of {', '.join(PIPELINES)}")


def compile_pipeline(which: str, out: str | os.PathLike, opts: ClusterOptions | None = None) -> Path:
    """Write the IR YAML of pipeline ``which`` to ``out`` (atomically) and return its path."""
    from kfp import compiler

    from seme.errors import OutputError

    out = Path(out)
    if out.suffix not in (".yaml", ".yml", ".json"):
        raise OutputError(f"{out}: the pipeline package must end in .yaml, .yml or .json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}{out.suffix}")
    try:
        compiler.Compiler().compile(build(which, opts), str(tmp))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def load_ir(path: str | os.PathLike):
    """``(PipelineSpec, PlatformSpec | None)`` parsed from an IR YAML file written by :func:`compile_pipeline`."""
    import yaml
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())
    platform = None
    if len(docs) > 1:
        platform = json_format.ParseDict(docs[1], pipeline_spec_pb2.PlatformSpec())
    return spec, platform
