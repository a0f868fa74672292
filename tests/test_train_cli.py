"""train.py as a command: a bad config value fails fast with a message and exit status 1, nothing written."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_bad_config_exits_with_message(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny.py"),
                           "--workdir", str(tmp_path / "run"), "--config.mesh.data=3"],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)
    print(proc.stderr[-500:])
    assert proc.returncode == 1
    assert "error: mesh {'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 devices but there are 1" in proc.stderr
    assert not (tmp_path / "run").exists()


def _train(tmp_path, *flags):
    return subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny.py"),
                           "--workdir", str(tmp_path / "run"), *flags],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)


def test_data_sources_from_the_command_line(tmp_path):
    """`data.sources` is a tuple, so the command line can set it; a missing folder is named, with no traceback;
    a single dict without the trailing comma is explained."""
    missing = tmp_path / "no_such_folder"
    proc = _train(tmp_path, f"--config.data.sources=({{'kind': 'folder', 'path': '{missing}', 'weight': 1.0}},)")
    print(proc.stderr[-500:])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: image folder {missing} does not exist" in proc.stderr
    proc = _train(tmp_path, f"--config.data.sources={{'kind': 'folder', 'path': '{missing}', 'weight': 1.0}}")
    print(proc.stderr[-500:])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: data.sources must be a tuple of dicts" in proc.stderr and "trailing comma" in proc.stderr
