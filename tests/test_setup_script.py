"""scripts/setup.sh decides what gets compiled: on a machine without a GPU, the C++ CPU kernels only
unless MMFAST_BUILD_CUDA=1 (CI sets it in .ci/run). Run against a stub Python that records the
environment the build would see, so nothing is installed or compiled."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STUB_PYTHON = """#!/usr/bin/env bash
# a stand-in for .venv/bin/python: no GPU, every import works, `pip install -e .` records the build mode
if [ "$1" = "-c" ]; then
  case "$2" in *cuda.is_available*) exit 1 ;; *) exit 0 ;; esac
fi
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  case " $* " in *" show "*) exit 1 ;; *" -e "*) echo "$MMFAST_BUILD_CUDA" > build_mode ;; esac
fi
exit 0
"""


def _setup_sees(tmp_path, **env) -> str:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", repo / "scripts" / "setup.sh")
    for name in ("csrc", "mmfast"):
        (repo / name).mkdir()
    (repo / "setup.py").write_text("")
    (repo / "pyproject.toml").write_text("")
    stub = repo / ".venv" / "bin" / "python"
    stub.parent.mkdir(parents=True)
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    run_env = {k: v for k, v in os.environ.items() if k != "MMFAST_BUILD_CUDA"}
    run_env.update(MMFAST_OFFLINE="1", **env)
    r = subprocess.run(["bash", "scripts/setup.sh"], cwd=repo, env=run_env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return (repo / "build_mode").read_text().strip()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_setup_builds_cpu_kernels_only_without_a_gpu_unless_asked(tmp_path):
    assert _setup_sees(tmp_path) == "0"
    assert _setup_sees(tmp_path / "b", MMFAST_BUILD_CUDA="1") == "1"


def test_ci_compiles_the_cuda_sources():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "export MMFAST_BUILD_CUDA=1" in ci
    assert ci.index("export MMFAST_BUILD_CUDA=1") < ci.index("scripts/test.sh")


def test_models_extra_installs_accelerate_for_hf_trainer():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.split(">")[0].split("=")[0].strip() == "accelerate" for dep in extras["models"])
