"""No model files, anywhere: training and scoring leave nothing on disk but the database."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.simulated import simulated_database

ROOT = Path(__file__).resolve().parents[1]
MODEL_SUFFIXES = (".pkl", ".pickle", ".joblib", ".keras", ".h5", ".hdf5", ".ubj", ".pb",
                  ".ckpt", ".index", ".model", ".npz", ".npy", ".safetensors")
SKIPPED_DIRS = {".venv", ".git", "node_modules", "__pycache__"}
ALLOWED = {
    # SQLite's write-ahead log and shared-memory index belong to the database itself.
    "db": {"churn.db-wal", "churn.db-shm"},
    # Keras writes its settings (float type, backend name) to ~/.keras/keras.json when it is
    # first imported; no weights are in it.
    "home": {".keras", ".keras/keras.json"},
}


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def repo_model_files() -> set[str]:
    """Files in the repository whose names look like saved models or arrays."""
    found = set()
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in SKIPPED_DIRS]
        found.update(os.path.join(folder, f) for f in files if f.endswith(MODEL_SUFFIXES))
    return found


@pytest.mark.timeout(900)
def test_training_and_scoring_write_no_file(tmp_path: Path) -> None:
    folders = {name: tmp_path / name for name in ("cwd", "home", "tmp", "db")}
    for folder in folders.values():
        folder.mkdir()
    source = sa.engine.make_url(simulated_database()).database
    shutil.copy(source, folders["db"] / "churn.db")
    before = {name: listing(folder) for name, folder in folders.items()}
    repo_before = repo_model_files()
    env = {**os.environ, "HOME": str(folders["home"]), "TMPDIR": str(folders["tmp"]),
           "TMP": str(folders["tmp"]), "TEMP": str(folders["tmp"]),
           "DATABASE_URL": f"sqlite:///{folders['db'] / 'churn.db'}",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("XDG_CACHE_HOME", None)
    done = subprocess.run([sys.executable, str(ROOT / "train_model.py")], cwd=folders["cwd"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "holdout quality" in done.stdout and "µs per row" in done.stdout
    for name, folder in folders.items():
        appeared = listing(folder) - before[name] - ALLOWED.get(name, set())
        assert not appeared, f"{name} gained {sorted(appeared)}"
    assert repo_model_files() == repo_before
