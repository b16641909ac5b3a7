"""The committed stubs are what scripts/gen_protos.sh makes of worker.proto, and import on protobuf 7.36.0+."""

import filecmp
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STUBS = ["worker_pb2.py", "worker_pb2.pyi", "worker_pb2_grpc.py"]


def test_stubs_match_the_proto(tmp_path):
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)],
        check=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    for name in STUBS:
        fresh = tmp_path / "protos" / "sfllm" / "v1" / name
        committed = ROOT / "protos" / "sfllm" / "v1" / name
        assert filecmp.cmp(fresh, committed, shallow=False), f"{name} is stale: run `make proto`"


def test_gencode_runs_on_the_oldest_supported_protobuf():
    # The GPU image has protobuf 7.36.0; generated code refuses a runtime older than itself.
    text = (ROOT / "protos" / "sfllm" / "v1" / "worker_pb2.py").read_text()
    major, minor, patch = (int(x) for x in re.search(r"Protobuf Python Version: (\d+)\.(\d+)\.(\d+)", text).groups())
    assert major == 7 and (minor, patch) <= (36, 0)


def test_stubs_import_as_a_package():
    from protos.sfllm.v1 import worker_pb2, worker_pb2_grpc

    assert worker_pb2.DESCRIPTOR.package == "sfllm.v1"
    assert hasattr(worker_pb2_grpc, "WorkerStub")
