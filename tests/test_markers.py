"""The `slow` marker is enforced (tests/conftest.py): a test that starts Ray, DeepSpeed or the S3 server
without it does not pass quietly into `make test-fast`.

Each case runs pytest in a subprocess on a folder holding a copy of our conftest.py and a small test
file; Ray and torch.distributed are stand-ins there, so nothing heavy starts.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")


def _pytest(folder: Path, test_source: str, *args: str) -> subprocess.CompletedProcess:
    shutil.copy(CONFTEST, folder / "conftest.py")
    (folder / "test_case.py").write_text(test_source)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(folder),
               "-o", "markers=slow", *args, str(folder)]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=120)


def test_an_unmarked_test_using_a_heavy_fixture_stops_the_run_at_collection(tmp_path):
    source = ("import pytest\n\n"
              "@pytest.fixture\ndef data(s3_bucket):\n    return s3_bucket\n\n"
              "def test_unmarked(data):\n    pass\n\n"
              "@pytest.mark.slow\ndef test_marked(ray_local):\n    pass\n\n"
              "def test_light(tmp_path):\n    pass\n")
    for args in ((), ("-m", "not slow")):
        run = _pytest(tmp_path, source, *args)
        out = run.stdout + run.stderr
        assert run.returncode == 4, out  # a usage error: nothing ran
        error = out[out.index("must be marked @pytest.mark.slow"):]
        assert "test_case.py::test_unmarked (uses s3_bucket, s3_server)" in error, out  # through a fixture, too
        assert "test_marked" not in error and "test_light" not in error, out


def test_a_marked_module_collects(tmp_path):
    run = _pytest(tmp_path, "import pytest\n\npytestmark = pytest.mark.slow\n\n"
                            "def test_marked(s3_server, ray_local):\n    pass\n", "--collect-only")
    assert run.returncode == 0, run.stdout + run.stderr


STAND_INS = """
import sys, types

import pytest

state = {"ray": False, "dist": False}
sys.modules["ray"] = types.SimpleNamespace(is_initialized=lambda: state["ray"],
                                           shutdown=lambda: state.update(ray=False))
sys.modules["torch.distributed"] = types.SimpleNamespace(is_available=lambda: True,
                                                         is_initialized=lambda: state["dist"])


@pytest.fixture(autouse=True)
def stopped_after_each_test():
    yield
    state.update(ray=False, dist=False)

"""


def test_starting_ray_or_torch_distributed_needs_the_marker_and_ray_needs_ray_local(tmp_path):
    source = STAND_INS + (
        "def test_starts_ray_unmarked():\n    state['ray'] = True\n\n"
        "@pytest.mark.slow\ndef test_starts_its_own_ray_marked():\n    state['ray'] = True\n\n"
        "def test_starts_distributed_unmarked():\n    state['dist'] = True\n\n"
        "@pytest.mark.slow\ndef test_starts_distributed_marked():\n    state['dist'] = True\n\n"
        "def test_light():\n    pass\n")
    run = _pytest(tmp_path, source, "-rA")
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    for test in ("test_starts_ray_unmarked", "test_starts_its_own_ray_marked"):  # marked, but not ray_local's
        assert f"FAILED test_case.py::{test}" in out, out
        assert f"test_case.py::{test} started its own Ray instance: use the ray_local fixture" in out, out
    assert "FAILED test_case.py::test_starts_distributed_unmarked" in out, out
    assert ("test_case.py::test_starts_distributed_unmarked uses torch.distributed (DeepSpeed) but is not marked "
            "@pytest.mark.slow") in out, out
    for test in ("test_starts_distributed_marked", "test_light"):
        assert f"PASSED test_case.py::{test}" in out, out
    assert "3 failed, 2 passed" in out, out
