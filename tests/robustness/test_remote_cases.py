"""Bad input and faults against the remote/governance surfaces: S3 fetch/publish, gate, registry, pipeline.

Every case runs a real ``python -m seme`` against the real moto S3 and MLflow servers of
``tests/services.py`` (a real TCP proxy in front of them where a connection must be cut or a server
must die mid-way) and checks the promise with :func:`assert_clean_failure`: exit ≠ 0, exactly one
``seme: error:`` line naming the object, no traceback, nothing complete-looking left, inputs and an
unrelated file byte-identical afterwards, and — for the registry — no alias moved, read back from
the real MLflow server. A few cases are attacks that must *succeed safely* (an injected shard that
is ignored, a corrupted cache that is re-fetched, a cut transfer that resumes); they assert that.

``CASES`` lists the corpus; ``pytest tests/robustness -q`` counts one test per case.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file
from services import DUMMY_AWS, CuttingProxy

from robustness.harness import assert_clean_failure, run_seme, run_seme_inproc, seme_env, snapshot

# ------------------------------------------------------------------------------------------------
# The shared world: one bucket, published checkpoints, a merged model with a bound gate result
# ------------------------------------------------------------------------------------------------

REGISTRY_ENV = {  # a down server fails in about a second; no hidden HTTP retries
    "SEME_REGISTRY_RETRIES": "1",
    "SEME_REGISTRY_BACKOFF": "0.05",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def checkpoint(root: Path, seed: int = 0, n: int = 64, manifest: bool = True) -> Path:
    """A checkpoint directory: config.json, model.safetensors and (as `seme merge` writes it) a manifest."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    save_file({"w": rng.standard_normal((n, 64)).astype(np.float32), "b": np.ones(64, np.float32)},
              str(root / "model.safetensors"))  # fmt: skip
    (root / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 64}))
    if manifest:
        files = [{"path": f.name, "sha256": sha(f), "bytes": f.stat().st_size} for f in sorted(root.iterdir())]
        (root / "seme_manifest.json").write_text(json.dumps({"method": "linear", "files": files}, indent=2))
    return root


@dataclass
class World:
    root: Path
    s3: str  # endpoint
    bucket: str
    mlflow: str
    model: Path  # a merged checkpoint (with manifest)
    other: Path  # another one
    gate: Path  # gate_result.json of a passed gate on `model`
    unrelated: Path

    def extra(self, **extra: str) -> dict[str, str]:
        """The variables a case sets on top of the test environment."""
        return {
            **DUMMY_AWS, "AWS_ENDPOINT_URL_S3": self.s3, "SEME_CACHE_DIR": str(self.root / "cache"),
            "MLFLOW_TRACKING_URI": self.mlflow, "AWS_EC2_METADATA_DISABLED": "true", **REGISTRY_ENV, **extra,
        }  # fmt: skip

    def env(self, **extra: str) -> dict[str, str]:
        return seme_env(**self.extra(**extra))

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.s3, region_name="us-east-1")

    def publish(self, src: Path, prefix: str | None = None) -> str:
        from seme.storage import publish

        uri = self.uri(prefix or f"p-{uuid.uuid4().hex[:8]}")
        publish(src, uri, endpoint_url=self.s3)
        return uri

    def keys(self, uri: str) -> list[str]:
        pfx = uri.split("/", 3)[3] + "/"
        return sorted(o["Key"] for o in self.client().list_objects_v2(Bucket=self.bucket, Prefix=pfx).get("Contents", []))

    def put(self, uri: str, rel: str, body: bytes) -> None:
        self.client().put_object(Bucket=self.bucket, Key=f"{uri.split('/', 3)[3]}/{rel}", Body=body)


POLICY_OK = "version: 1\ngeneral: {}\n"  # expert retention only (the bundles here report no general metric)


def good_bundle() -> dict:
    m = lambda v: {"tasks": {"arith": {"metric": "accuracy", "value": v}}, "general": {}}
    return {"merged": m(0.8), "parents": {"base": m(0.1), "math": m(0.8)}, "experts": {"arith": "math"}}


@pytest.fixture(scope="module")
def world(tmp_path_factory, s3_server, mlflow_server) -> Iterator[World]:
    from seme.gates import run_gate

    root = tmp_path_factory.mktemp("remote")
    bucket = f"rob-{uuid.uuid4().hex[:10]}"
    import boto3

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    model = checkpoint(root / "in" / "merged", seed=1)
    other = checkpoint(root / "in" / "other", seed=2)
    policy = root / "in" / "policy.yaml"
    policy.write_text(POLICY_OK)
    gate = run_gate(good_bundle(), policy, root / "in" / "gate", model_dir=model)
    assert gate.passed
    unrelated = root / "in" / "unrelated.txt"
    unrelated.write_text("not seme's\n")
    yield World(root, s3_server, bucket, mlflow_server, model, other, gate.result_path, unrelated)


@pytest.fixture
def case(world: World, tmp_path: Path) -> Iterator[Path]:
    """A directory for this case's files; the shared inputs must be byte-identical afterwards."""
    before = snapshot(world.root / "in")
    yield tmp_path
    assert snapshot(world.root / "in") == before, "a case changed the shared inputs"


def fail(world: World, argv: list, names: str | list[str], out: Path | None = None, proc: bool = False,
         **env: str) -> str:  # fmt: skip
    """Run seme, assert the promise (including the shared inputs and the unrelated file), return the line.

    ``proc``: a real ``python -m seme`` process (what it prints on stderr, logging included, is then
    exactly what a user sees); else ``seme.cli.main`` in this process with the same environment.
    """
    before = snapshot(world.root / "in")
    if proc:
        r = run_seme(argv, env=world.env(**env), timeout=120)
    else:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in world.extra(**env).items():
                mp.setenv(k, v)
            r = run_seme_inproc(argv)
    return assert_clean_failure(r, names=names, out=out, before=before, roots=(world.root / "in",))


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port nothing answers on, held (bound, never listening) so no other process can take it: a
    connection to it is refused, as to a server that is down."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def no_partials(parent: Path) -> None:
    left = [p.name for p in parent.iterdir() if ".partial-" in p.name] if parent.is_dir() else []
    assert not left, f"partial downloads left: {left}"


# ------------------------------------------------------------------------------------------------
# S3 fetch: missing, mismatched, malformed, unreachable
# ------------------------------------------------------------------------------------------------


def test_fetch_missing_prefix(world, case):
    uri = world.uri(f"nothing-{uuid.uuid4().hex[:6]}")
    fail(world, ["fetch", uri, case / "d"], [uri, "no objects"], out=case / "d")


def test_fetch_wrong_bucket(world, case):
    uri = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/m"
    fail(world, ["fetch", uri, case / "d"], ["no such bucket", uri.split("/")[2]], out=case / "d")


def test_fetch_dead_endpoint(world, case, dead_port):
    dead = f"http://127.0.0.1:{dead_port}"
    fail(world, ["fetch", world.uri("x"), case / "d", "--endpoint-url", dead], ["cannot reach", dead], out=case / "d")


def test_fetch_malformed_endpoint(world, case):
    fail(world, ["fetch", world.uri("x"), case / "d", "--endpoint-url", "not a url"], "not a url", out=case / "d")


def test_fetch_no_credentials(world, case):
    env = world.env(HOME=str(case), AWS_SHARED_CREDENTIALS_FILE=str(case / "none"), AWS_CONFIG_FILE=str(case / "none"))
    env.pop("AWS_ACCESS_KEY_ID")
    env.pop("AWS_SECRET_ACCESS_KEY")
    r = run_seme(["fetch", world.uri("x"), case / "d"], env=env)
    assert_clean_failure(r, names="no S3 credentials", out=case / "d")


def test_fetch_partial_credentials(world, case):
    env = world.env()
    env.pop("AWS_SECRET_ACCESS_KEY")
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(case / "none"), AWS_CONFIG_FILE=str(case / "none"))
    r = run_seme(["fetch", world.uri("x"), case / "d"], env=env)
    assert_clean_failure(r, names=["missing: AWS_SECRET_ACCESS_KEY", world.s3], out=case / "d")


def test_fetch_not_an_s3_uri(world, case):
    fail(world, ["fetch", "/local/path", case / "d"], "not an s3:// URI", out=case / "d")


def test_fetch_uri_without_bucket(world, case):
    fail(world, ["fetch", "s3://", case / "d"], "no bucket", out=case / "d")


def test_fetch_listed_object_missing(world, case):
    uri = world.publish(world.model)
    world.client().delete_object(Bucket=world.bucket, Key=f"{uri.split('/', 3)[3]}/config.json")
    fail(world, ["fetch", uri, case / "d"], [f"{uri}/config.json", "no such object"], out=case / "d")
    no_partials(case)


def test_fetch_checksum_mismatch(world, case):
    uri = world.publish(world.model)
    data = bytearray((world.model / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    world.put(uri, "model.safetensors", bytes(data))
    fail(world, ["fetch", uri, case / "d"], ["checksum mismatch", "model.safetensors"], out=case / "d")
    no_partials(case)


def test_fetch_size_mismatch(world, case):
    uri = world.publish(world.model)
    world.put(uri, "config.json", b"{}")
    fail(world, ["fetch", uri, case / "d"], ["size mismatch", "config.json"], out=case / "d")


def test_fetch_sha256sums_mismatch(world, case):
    src = checkpoint(case / "plain", manifest=False)
    uri = world.publish(src)  # publish computes SHA256SUMS
    world.put(uri, "config.json", b'{"model_type": "toy", "hidden_size": 65}')  # same size, other bytes
    fail(world, ["fetch", uri, case / "d"], ["checksum mismatch", "config.json"], out=case / "d")


def test_fetch_sha256sums_malformed(world, case):
    uri = world.publish(checkpoint(case / "plain", manifest=False))
    world.put(uri, "SHA256SUMS", b"xyz  model.safetensors\n")
    fail(world, ["fetch", uri, case / "d"], ["SHA256SUMS", "malformed line 1"], out=case / "d")


MANIFESTS = {  # id -> (manifest bytes, what the error line names)
    "manifest-not-json": (b"{not json", "not valid JSON"),
    "manifest-files-5": (b'{"files": 5}', "'files' must be a list"),
    "manifest-a-list": (b"[1, 2]", "must be a JSON object"),
    "manifest-no-files": (b'{"method": "linear"}', "no 'files' list"),
    "manifest-empty-files": (b'{"files": []}', "lists no files"),
    "manifest-bad-sha": (b'{"files": [{"path": "config.json", "sha256": "' + b"z" * 64 + b'"}]}', "without path/sha256"),
    "manifest-bytes-big": (b'{"files": [{"path": "config.json", "sha256": "' + b"a" * 64 + b'", "bytes": "big"}]}',
                           "'bytes' must be a size"),
    "manifest-path-escape": (b'{"files": [{"path": "../../escape.txt", "sha256": "' + b"a" * 64 + b'"}]}',
                             "refusing unsafe object key"),
    "manifest-absolute-path": (b'{"files": [{"path": "/etc/passwd", "sha256": "' + b"a" * 64 + b'"}]}',
                               "refusing unsafe object key"),
    "manifest-entry-int": (b'{"files": [7]}', "malformed manifest entry"),
}  # fmt: skip


@pytest.mark.parametrize("cid", sorted(MANIFESTS))
def test_fetch_malformed_manifest(world, case, cid):
    body, names = MANIFESTS[cid]
    uri = world.publish(world.model)
    world.put(uri, "seme_manifest.json", body)
    fail(world, ["fetch", uri, case / "d"], [names, "seme_manifest.json"], out=case / "d")
    assert not any(case.rglob("escape.txt")) and not any(world.root.rglob("escape.txt"))


def test_fetch_unsafe_key_in_listing(world, case):
    uri = world.uri(f"abs-{uuid.uuid4().hex[:6]}")
    world.put(uri, "/etc/evil", b"x")  # key "<prefix>//etc/evil": "/etc/evil" relative to the prefix
    fail(world, ["fetch", uri, case / "d"], "refusing unsafe object key", out=case / "d")


def test_fetch_endpoint_password_is_masked(world, case, dead_port):
    dead = f"http://AKIAUSER:s3cr3t-pw-771@127.0.0.1:{dead_port}"
    r = run_seme(["fetch", world.uri("x"), case / "d", "--endpoint-url", dead, "--debug"], env=world.env())
    assert r.rc != 0 and "s3cr3t-pw-771" not in r.stderr + r.stdout  # not even with --debug's logs
    line = fail(world, ["fetch", world.uri("x"), case / "d", "--endpoint-url", dead], "cannot reach", proc=True)
    assert "***@127.0.0.1" in line and "s3cr3t-pw-771" not in line and "AKIAUSER" not in line


def test_fetch_endpoint_password_in_env_is_masked(world, case):
    ep = world.s3.replace("http://", "http://u:env-pw-9931@")
    uri = world.uri(f"nothing-{uuid.uuid4().hex[:6]}")
    r = run_seme(["fetch", uri, case / "d"], env=seme_env(**{**world.extra(), "AWS_ENDPOINT_URL_S3": ep}))
    assert r.rc != 0 and "env-pw-9931" not in r.stderr + r.stdout, r


def test_fetch_bad_worker_count(world, case):
    fail(world, ["fetch", world.uri("x"), case / "d", "--workers", "0"], "--workers", out=case / "d")


# ------------------------------------------------------------------------------------------------
# S3 integrity: injection, trust on first use, corrupted caches, a cut connection
# ------------------------------------------------------------------------------------------------


def test_injected_index_and_shard_are_never_fetched(world, case):
    uri = world.publish(world.model)
    evil = case / "evil.safetensors"
    save_file({"w": np.zeros((64, 64), np.float32), "b": np.zeros(64, np.float32)}, str(evil))
    world.put(uri, "model-00001-of-00001.safetensors", evil.read_bytes())
    world.put(uri, "model.safetensors.index.json",
              json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}).encode())  # fmt: skip
    r = run_seme(["fetch", uri, case / "d"], env=world.env())
    assert r.rc == 0, r
    warnings = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(warnings) == 1 and "not listed in seme_manifest.json" in warnings[0], r
    assert "model.safetensors.index.json" in warnings[0] and "model-00001-of-00001" in warnings[0]
    got = sorted(p.name for p in (case / "d").iterdir())
    assert got == [".seme_fetch.json", "config.json", "model.safetensors", "seme_manifest.json"]
    np.testing.assert_array_equal(load_file(str(case / "d" / "model.safetensors"))["w"],
                                  load_file(str(world.model / "model.safetensors"))["w"])  # fmt: skip


def test_first_fetch_records_sha256_and_later_changes_are_refused(world, case):
    src = checkpoint(case / "raw", manifest=False)
    uri = world.uri(f"raw-{uuid.uuid4().hex[:6]}")
    for f in src.iterdir():  # uploaded by someone else: no manifest, no SHA256SUMS
        world.put(uri, f.name, f.read_bytes())
    assert run_seme(["fetch", uri, case / "first"], env=world.env()).rc == 0
    # an object added afterwards is ignored (one warning), an object changed afterwards is refused
    world.put(uri, "extra.bin", b"added later")
    r = run_seme(["fetch", uri, case / "second"], env=world.env())
    assert r.rc == 0 and "extra.bin" in r.stderr and not (case / "second" / "extra.bin").exists(), r
    data = bytearray((src / "model.safetensors").read_bytes())
    data[100] ^= 1
    world.put(uri, "model.safetensors", bytes(data))
    fail(world, ["fetch", uri, case / "third"], ["checksum mismatch", "model.safetensors"], out=case / "third")


def test_corrupted_cached_fetch_is_fetched_again(world, case):
    uri = world.publish(world.model)
    r = run_seme(["fetch", uri], env=world.env())
    assert r.rc == 0, r
    cached = Path(r.stdout.strip())
    f = cached / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    st = f.stat()
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only the content changed
    r = run_seme(["fetch", uri], env=world.env())
    assert r.rc == 0 and Path(r.stdout.strip()) == cached, r
    assert sha(f) == sha(world.model / "model.safetensors")
    assert "damaged" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r


def test_corrupted_dest_fetch_is_refused_and_kept(world, case):
    uri = world.publish(world.model)
    assert run_seme(["fetch", uri, case / "d"], env=world.env()).rc == 0
    f = case / "d" / "config.json"
    f.write_text(f.read_text().replace("64", "65"))
    before = snapshot(case / "d")
    r = run_seme(["fetch", uri, case / "d"], env=world.env())
    assert_clean_failure(r, names=[str(f), "sha256 mismatch"], before=before, roots=(case / "d",))


def test_file_planted_in_a_fetched_dest_is_refused(world, case):
    uri = world.publish(world.model)
    assert run_seme(["fetch", uri, case / "d"], env=world.env()).rc == 0
    (case / "d" / "model.safetensors.index.json").write_text("{}")
    fail(world, ["fetch", uri, case / "d"], ["model.safetensors.index.json", "was not fetched"])


def test_merge_uses_only_the_published_weights_and_records_their_digest(world, case):
    """The issue's attack end to end: injected index + shard on S3 and a corrupted cached copy; the merge
    reads the published weights and its manifest records their true sha256."""
    from conftest import make_tiny_model

    src = make_tiny_model(case / "tiny")
    uri = world.publish(src)  # no manifest: publish writes SHA256SUMS
    r = run_seme(["fetch", uri], env=world.env())
    assert r.rc == 0, r
    cached = Path(r.stdout.strip()) / "model.safetensors"
    data = bytearray(cached.read_bytes())
    data[-3] ^= 0xFF
    cached.write_bytes(bytes(data))
    zeros = {k: np.zeros_like(v) for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(zeros, str(case / "evil.safetensors"))
    world.put(uri, "model-evil.safetensors", (case / "evil.safetensors").read_bytes())
    world.put(uri, "model.safetensors.index.json", json.dumps({"weight_map": dict.fromkeys(zeros, "model-evil.safetensors")}).encode())
    cfg = case / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": uri, "parameters": {"weight": 1.0}}],
                                   "dtype": "float32"}))  # fmt: skip
    r = run_seme(["merge", cfg, case / "out"], env=world.env())
    assert r.rc == 0, r
    want = load_file(str(src / "model.safetensors"))
    got = load_file(str(case / "out" / "model.safetensors"))
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    inputs = json.loads((case / "out" / "seme_manifest.json").read_text())["inputs"]
    recorded = {f["path"]: f["sha256"] for f in inputs[0]["files"]}
    assert recorded["model.safetensors"] == sha(src / "model.safetensors")
    assert "model-evil.safetensors" not in recorded


def test_connection_cut_mid_fetch_then_resume(world, case):
    src = checkpoint(case / "big", n=4096)  # ~1 MiB of weights
    uri = world.publish(src)
    proxy = CuttingProxy(world.s3)
    try:
        proxy.cut_after(300_000)
        line = fail(world, ["fetch", uri, case / "d", "--endpoint-url", proxy.url, "--retries", "0", "--workers", "1"],
                    ["model.safetensors", "run the fetch again to resume"], out=case / "d", proc=True)  # fmt: skip
        assert proxy.cuts == 1 and "interrupted at byte" in line
        partial = list(case.glob(".d.partial-*/model.safetensors.part"))
        assert len(partial) == 1 and 0 < partial[0].stat().st_size < (src / "model.safetensors").stat().st_size
        have = partial[0].stat().st_size
        proxy.requests.clear()
        r = run_seme(["fetch", uri, case / "d", "--endpoint-url", proxy.url, "--retries", "0"], env=world.env())
        assert r.rc == 0, r
        ranges = [rng for req, rng in proxy.requests if req.startswith("GET") and "model.safetensors" in req]
        assert ranges == [f"bytes={have}-"]  # resumed, not restarted
        assert sha(case / "d" / "model.safetensors") == sha(src / "model.safetensors")
        no_partials(case)
    finally:
        proxy.close()


# ------------------------------------------------------------------------------------------------
# publish
# ------------------------------------------------------------------------------------------------


def test_publish_symlink_out_of_the_directory(world, case):
    src = checkpoint(case / "src")
    secret = case / "credentials"
    secret.write_text("[default]\naws_secret_access_key = never-upload-me\n")
    (src / "notes.txt").symlink_to(secret)
    uri = world.uri(f"pub-{uuid.uuid4().hex[:6]}")
    fail(world, ["publish", src, uri], [str(src / "notes.txt"), "outside"])
    assert world.keys(uri) == []


def test_publish_symlinked_directory(world, case):
    src = checkpoint(case / "src")
    (case / "elsewhere").mkdir()
    (src / "sub").symlink_to(case / "elsewhere")
    uri = world.uri(f"pub-{uuid.uuid4().hex[:6]}")
    fail(world, ["publish", src, uri], str(src / "sub"))
    assert world.keys(uri) == []


def test_publish_fifo_is_refused_without_hanging(world, case):
    src = checkpoint(case / "src")
    os.mkfifo(src / "model-00002.safetensors")
    uri = world.uri(f"pub-{uuid.uuid4().hex[:6]}")
    fail(world, ["publish", src, uri], ["model-00002.safetensors", "not a regular file"], proc=True)
    assert world.keys(uri) == []


def test_publish_file_not_matching_its_manifest(world, case):
    src = checkpoint(case / "src")
    (src / "config.json").write_text('{"model_type": "toy", "hidden_size": 99}')
    uri = world.uri(f"pub-{uuid.uuid4().hex[:6]}")
    fail(world, ["publish", src, uri], [str(src / "config.json"), "does not match"])
    assert world.keys(uri) == []


def test_publish_missing_directory(world, case):
    fail(world, ["publish", case / "absent", world.uri("x")], [str(case / "absent"), "not a directory"])


# ------------------------------------------------------------------------------------------------
# gate: malformed policies and metrics, signed metrics
# ------------------------------------------------------------------------------------------------

POLICIES = {  # id -> (policy text, what the error line names)
    "policy-version-9": ("version: 9\n", "version 9 is not supported"),
    "policy-version-string": ("version: '1'\n", "is not supported"),
    "policy-tasks-string": ("tasks: arithmetic\n", "tasks must be a list"),
    "policy-lower-is-better-string": ("lower_is_better: perplexity\n", "lower_is_better must be a list"),
    "policy-not-yaml": ("tasks: [a\n", "not valid YAML"),
    "policy-a-list": ("- 1\n- 2\n", "expected a mapping"),
    "policy-unknown-key": ("thresholds: 1\n", "unknown key(s) thresholds"),
    "policy-min-ratio-2": ("expert_retention: {min_ratio: 2}\n", "min_ratio = 2 is outside"),
    "policy-min-ratio-negative": ("expert_retention: {min_ratio: -0.5}\n", "min_ratio = -0.5 is outside"),
    "policy-min-ratio-string": ("expert_retention: {min_ratio: high}\n", "must be a number"),
    "policy-min-ratio-nan": ("expert_retention: {min_ratio: .nan}\n", "must be a number"),
    "policy-retention-scalar": ("expert_retention: 0.9\n", "expert_retention must be a mapping"),
    "policy-per-task-list": ("expert_retention: {per_task: [a]}\n", "per_task must be a mapping"),
    "policy-general-no-bound": ("general: {perplexity: {}}\n", "needs max_increase"),
    "policy-general-negative": ("general: {perplexity: {max_increase: -1}}\n", "is outside"),
    "policy-general-list": ("general: [perplexity]\n", "general must be a mapping"),
    "policy-require-finite-string": ("require_finite: 'yes'\n", "require_finite must be true or false"),
    "policy-weights-unknown": ("weights: {rank: 3}\n", "unknown weight check(s) rank"),
    "policy-weights-max-abs-negative": ("weights: {max_abs: -1}\n", "max_abs = -1"),
}


@pytest.mark.parametrize("cid", sorted(POLICIES))
def test_gate_malformed_policy(world, case, cid):
    text, names = POLICIES[cid]
    (case / "b.json").write_text(json.dumps(good_bundle()))
    (case / "p.yaml").write_text(text)
    fail(world, ["gate", case / "b.json", "--policy", case / "p.yaml", "--out", case / "out"],
         [names, str(case / "p.yaml")])  # fmt: skip
    assert not (case / "out" / "gate_result.json").exists()


def test_gate_policy_not_utf8(world, case):
    (case / "b.json").write_text(json.dumps(good_bundle()))
    (case / "p.yaml").write_bytes(b"version: 1\ntasks: [\xff\xfe]\n")
    fail(world, ["gate", case / "b.json", "--policy", case / "p.yaml", "--out", case / "out"], "not UTF-8")


def test_gate_policy_missing(world, case):
    (case / "b.json").write_text(json.dumps(good_bundle()))
    fail(world, ["gate", case / "b.json", "--policy", case / "nope.yaml", "--out", case / "out"], str(case / "nope.yaml"))


BUNDLES = {  # id -> (bundle text, what the error line names)
    "metrics-not-json": ("{", "not valid JSON"),
    "metrics-a-list": ("[]", "needs a 'merged' metrics object"),
    "metrics-no-merged": (json.dumps({"parents": {}}), "needs a 'merged' metrics object"),
    "metrics-expert-a-list": (json.dumps({**good_bundle(), "experts": {"arith": ["math"]}}), "must be a name"),
    "metrics-expert-unknown": (json.dumps({**good_bundle(), "experts": {"arith": "geo"}}), "'geo' of task 'arith'"),
    "metrics-parents-list": (json.dumps({**good_bundle(), "parents": [1]}), "'parents' must map"),
    "metrics-tasks-list": (json.dumps({**good_bundle(), "merged": {"tasks": [1], "general": {}}}), "need 'tasks'"),
    "metrics-base-list": (json.dumps({**good_bundle(), "base": ["base"]}), "'base' and 'model_dir' must be strings"),
    "metrics-deep-nesting": ("[" * 100000 + "]" * 100000, "metrics bundle"),
}


@pytest.mark.parametrize("cid", sorted(BUNDLES))
def test_gate_malformed_metrics(world, case, cid):
    text, names = BUNDLES[cid]
    (case / "b.json").write_text(text)
    fail(world, ["gate", case / "b.json", "--out", case / "out"], [names, str(case / "b.json")])
    assert not (case / "out" / "gate_result.json").exists()


def test_gate_metrics_missing(world, case):
    fail(world, ["gate", case / "none.json", "--out", case / "out"], str(case / "none.json"))


def test_gate_model_dir_missing(world, case):
    (case / "b.json").write_text(json.dumps(good_bundle()))
    fail(world, ["gate", case / "b.json", "--out", case / "out", "--model-dir", case / "absent"],
         [str(case / "absent"), "no such model directory"])  # fmt: skip


def test_gate_signed_metrics_checked_relative_to_their_magnitude(world, case):
    """log-prob (higher is better, negative). 'story': merged -9 vs expert -1 is far worse, though a
    ratio would say 9 >= 0.9; 'poem': merged -1.05 vs -1 is within 10 %. One real gate run."""
    m = lambda s, p: {"tasks": {"story": {"metric": "logprob", "value": s},
                                "poem": {"metric": "logprob", "value": p}}, "general": {}}
    bundle = {"merged": m(-9.0, -1.05), "parents": {"base": m(-20.0, -20.0), "writer": m(-1.0, -1.0)},
              "experts": {"story": "writer", "poem": "writer"}}  # fmt: skip
    (case / "b.json").write_text(json.dumps(bundle))
    (case / "p.yaml").write_text(POLICY_OK)
    r = run_seme(["gate", case / "b.json", "--policy", case / "p.yaml", "--out", case / "out", "--model-dir", world.model],
                 env=world.env())  # fmt: skip
    assert r.rc == 3, r  # the verdict "failed", not an error
    assert r.stderr.strip() == "", f"no noise (Great Expectations INFO lines) on stderr\n{r}"
    res = json.loads((case / "out" / "gate_result.json").read_text())
    checks = {c["check"]: c["passed"] for c in res["checks"]}
    assert res["passed"] is False and checks["expert:story"] is False and checks["expert:poem"] is True
    rows = {t["check"]: t for t in res["table"]}
    assert rows["expert:story"]["ratio"] == pytest.approx(-7.0)  # 1 + (m - r) / |r|
    assert rows["expert:poem"]["ratio"] == pytest.approx(0.95)
    assert res["model"]["digest"] == "sha256:" + sha(world.model / "seme_manifest.json")


# ------------------------------------------------------------------------------------------------
# register: forged / mismatched gate results, MLflow down
# ------------------------------------------------------------------------------------------------


def _registry_state(world: World, name: str) -> tuple[dict[str, str], int]:
    """(aliases, number of versions) of ``name`` as the real MLflow server has it."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    c = MlflowClient(tracking_uri=world.mlflow, registry_uri=world.mlflow)
    try:
        rm = c.get_registered_model(name)
    except MlflowException:
        return {}, 0
    return {k: str(v) for k, v in (rm.aliases or {}).items()}, len(c.search_model_versions(f"name = '{name}'"))


def _name() -> str:
    return f"rob-{uuid.uuid4().hex[:8]}"


GATES = {  # id -> (gate_result.json text (None: the real one, edited below), what the error line names)
    "gate-forged-passed-only": ('{"passed": true}', "does not record which checkpoint"),
    "gate-digest-of-another-model": (None, "judged another checkpoint"),
    "gate-digest-not-sha256": ('{"passed": true, "model": {"digest": "md5:0"}}', "does not record which checkpoint"),
    "gate-not-json": ("{passed: yes", "is not valid JSON"),
    "gate-a-list": ('[{"passed": true}]', "not a gate result"),
    "gate-passed-string": ('{"passed": "true", "model": {"digest": "sha256:0"}}', "not a gate result"),
}


@pytest.mark.parametrize("cid", sorted(GATES))
def test_register_refuses_a_gate_result_not_bound_to_the_model(world, case, cid):
    text, names = GATES[cid]
    g = case / "gate_result.json"
    if text is None:  # a genuine passed gate result, but for another checkpoint
        doc = json.loads(world.gate.read_text())
        doc["model"]["digest"] = "sha256:" + sha(world.other / "seme_manifest.json")
        text = json.dumps(doc)
    g.write_text(text)
    name = _name()
    fail(world, ["register", world.model, "--name", name, "--gate", g], [names, str(g)])
    assert _registry_state(world, name) == ({}, 0), "nothing logged, no version, no alias"


def test_register_gate_file_missing(world, case):
    name = _name()
    fail(world, ["register", world.model, "--name", name, "--gate", case / "none.json"], str(case / "none.json"))
    assert _registry_state(world, name) == ({}, 0)


def test_register_model_dir_missing(world, case):
    name = _name()
    fail(world, ["register", case / "absent", "--name", name, "--gate", world.gate], str(case / "absent"))
    assert _registry_state(world, name) == ({}, 0)


def test_register_bad_tag(world, case):
    name = _name()
    fail(world, ["register", world.model, "--name", name, "--tag", "novalue"], "--tag 'novalue'")
    assert _registry_state(world, name) == ({}, 0)


def test_register_with_mlflow_down_is_one_line(world, case, dead_port):
    name = _name()
    dead = f"http://127.0.0.1:{dead_port}"
    r = run_seme(["register", world.model, "--name", name, "--gate", world.gate, "--tracking-uri", dead], env=world.env())
    assert_clean_failure(r, names=[dead, "unreachable"])
    assert len(r.stderr.strip().splitlines()) == 1, f"MLflow down must print one line\n{r}"


def test_register_with_mlflow_failing_mid_way(world, case):
    """The version creation fails for good (the run was already logged): no version, no pilot alias."""
    name = _name()
    proxy = CuttingProxy(world.mlflow)
    try:
        proxy.fail_requests("model-versions/create", count=1000)
        r = run_seme(["register", world.model, "--name", name, "--gate", world.gate, "--tracking-uri", proxy.url],
                     env=world.env())  # fmt: skip
        assert_clean_failure(r, names=[f"create a version of {name}", "unreachable"])
        assert proxy.dropped >= 1
    finally:
        proxy.close()
    aliases, versions = _registry_state(world, name)
    assert aliases == {} and versions == 0


# ------------------------------------------------------------------------------------------------
# promote / rollback: MLflow down before and in the middle, refused moves
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promoted_model(world) -> str:
    """A model with v1 in production and v2 (gate passed) holding pilot, shared by the promote cases:
    each one must leave it exactly so (they assert it), so sharing it costs nothing in rigour."""
    from seme.registry import promote, register_model

    name = _name()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in world.extra().items():
            mp.setenv(k, v)
        register_model(world.model, name, gate_passed=True, tracking_uri=world.mlflow)
        promote(name, tracking_uri=world.mlflow)
        register_model(world.other, name, gate_passed=True, tracking_uri=world.mlflow)
    return name


@pytest.fixture
def promoted(world, promoted_model) -> tuple[str, dict[str, str]]:
    """(name, aliases) of the shared promoted model, checked to be v1 in production and v2 in pilot."""
    state = _registry_state(world, promoted_model)[0]
    assert state == {"pilot": "2", "production": "1"}
    return promoted_model, state


def test_promote_with_mlflow_down_is_one_line_and_moves_nothing(world, case, promoted):
    name, before = promoted
    proxy = CuttingProxy(world.mlflow)
    try:
        proxy.set_down()
        r = run_seme(["promote", name, "--tracking-uri", proxy.url, "--skip-evidence"], env=world.env())
        assert_clean_failure(r, names=[proxy.url, "unreachable"])
        assert len(r.stderr.strip().splitlines()) == 1, r
    finally:
        proxy.close()
    assert _registry_state(world, name)[0] == before


def test_promote_failing_in_the_middle_is_undone(world, case, promoted):
    """previous-production is set, then setting production fails on every try: the first move is undone."""
    name, before = promoted
    proxy = CuttingProxy(world.mlflow)
    try:
        proxy.fail_requests("registered-models/alias", skip=1, count=2)  # both tries of step 2
        r = run_seme(["promote", name, "--tracking-uri", proxy.url, "--skip-evidence"], env=world.env())
        line = assert_clean_failure(r, names=["set alias production", "undid previous-production"])
        assert proxy.dropped == 2 and "could not undo" not in line
    finally:
        proxy.close()
    assert _registry_state(world, name)[0] == before  # read back from the real server


def test_promote_server_down_for_a_while_mid_way_is_undone_when_it_returns(world, case, promoted):
    """After step 1 the alias endpoint fails for 5 requests: step 2's two tries and the first three
    tries of the undo. The undo retries longer than a forward move (5 tries here), so the registry
    ends exactly as it was."""
    name, before = promoted
    proxy = CuttingProxy(world.mlflow)
    try:
        proxy.fail_requests("registered-models/alias", skip=1, count=5)
        r = run_seme(["promote", name, "--tracking-uri", proxy.url, "--skip-evidence"], env=world.env())
        assert_clean_failure(r, names=["set alias production", "undid previous-production"])
        assert proxy.dropped == 5
    finally:
        proxy.close()
    assert _registry_state(world, name)[0] == before


def test_rollback_with_mlflow_down_moves_nothing(world, case, promoted, dead_port):
    name, before = promoted
    dead = f"http://127.0.0.1:{dead_port}"
    fail(world, ["rollback", name, "--tracking-uri", dead], [dead, "unreachable"])
    assert _registry_state(world, name)[0] == before


def test_promote_tracking_password_is_masked(world, case, promoted, dead_port):
    name, before = promoted
    dead = f"http://admin:mlflow-pw-4471@127.0.0.1:{dead_port}"
    r = run_seme(["promote", name, "--tracking-uri", dead], env=world.env())
    assert_clean_failure(r, names="***@127.0.0.1")
    assert "mlflow-pw-4471" not in r.stderr + r.stdout
    assert _registry_state(world, name)[0] == before


def test_promote_to_previous_production_refused(world, case, promoted):
    name, before = promoted
    fail(world, ["promote", name, "--to", "previous-production", "--version", "1"], "previous-production")
    assert _registry_state(world, name)[0] == before


def test_promote_current_production_again_refused(world, case, promoted):
    name, before = promoted
    fail(world, ["promote", name, "--version", before["production"], "--skip-evidence"], "already holds 'production'")
    assert _registry_state(world, name)[0] == before


def test_rollback_without_previous_refused(world, case, promoted):
    name, before = promoted
    fail(world, ["rollback", name], "no version holds 'previous-production'")
    assert _registry_state(world, name)[0] == before


def test_promote_unknown_model(world, case):
    name = _name()
    fail(world, ["promote", name], name)
    assert _registry_state(world, name) == ({}, 0)


# ------------------------------------------------------------------------------------------------
# pipeline: names and run options validated before the first step
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def run_cfg(world, case) -> Path:
    cfg = case / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(world.model)}, {"model": str(world.other)}]}))
    return cfg


COMPILE = {  # id -> (extra argv, what the error line names)
    "compile-config-map-bad-name": (["--config-map", "Bad Name!"], "--config-map 'Bad Name!'"),
    "compile-s3-secret-empty": (["--s3-secret", ""], "--s3-secret ''"),
    "compile-s3-secret-uppercase": (["--s3-secret", "Seme-S3"], "--s3-secret 'Seme-S3'"),
    "compile-config-map-too-long": (["--config-map", "a" * 254], "--config-map"),
}


@pytest.mark.parametrize("cid", sorted(COMPILE))
def test_pipeline_compile_refuses_bad_kubernetes_names(world, case, cid):
    extra, names = COMPILE[cid]
    fail(world, ["pipeline", "compile", "-o", case / "p.yaml", *extra], names)
    assert not (case / "p.yaml").exists()


RUN_LOCAL = {  # id -> (extra argv, what the error line names)
    "run-local-suite-nope": (["--suite", "nope"], "unknown suite 'nope'"),
    "run-local-limit-negative": (["--limit", "-1"], "--limit -1"),
    "run-local-policy-version-9": (None, "version 9 is not supported"),
    "run-local-output-uri-not-s3": (["--output-uri", "/tmp/out"], "not an s3:// URI"),
    "run-local-expert-malformed": (["--expert", "arith"], "--expert 'arith'"),
    "run-local-name-empty": (["--name", " "], "--name"),
}


@pytest.mark.parametrize("cid", sorted(RUN_LOCAL))
def test_pipeline_run_local_validates_before_the_first_step(world, case, run_cfg, cid):
    extra, names = RUN_LOCAL[cid]
    if extra is None:
        (case / "p.yaml").write_text("version: 9\n")
        extra = ["--policy", case / "p.yaml"]
    work = case / "work"
    fail(world, ["pipeline", "run-local", run_cfg, "--workdir", work, *extra], names)
    assert not work.exists(), "nothing ran: no pipeline root, no published inputs"


def test_pipeline_schedule_refuses_a_bad_service_account(world, case, run_cfg, dead_port):
    cfg = case / "s3cfg.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": world.uri("a")}, {"model": world.uri("b")}]}))
    dead = f"http://127.0.0.1:{dead_port}"
    fail(world, ["pipeline", "schedule", cfg, "--cron", "0 0 3 * * *", "--host", dead, "--service-account", "Bad_SA"],
         "--service-account 'Bad_SA'")  # fmt: skip


CASES = sorted(
    [n.removeprefix("test_") for n, f in dict(globals()).items() if n.startswith("test_") and callable(f)
     and not hasattr(f, "pytestmark")]
    + list(MANIFESTS) + list(POLICIES) + list(BUNDLES) + list(GATES) + list(COMPILE) + list(RUN_LOCAL)
)  # fmt: skip
