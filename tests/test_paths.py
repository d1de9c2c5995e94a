"""Notebooks find the repository root from wherever their kernel starts."""

from pathlib import Path

import pytest

from bsbr.paths import find_repo_root

ROOT = Path(__file__).resolve().parents[1]


def test_repo_root_found_from_notebooks_folder_and_from_root():
    assert find_repo_root(ROOT / "notebooks") == ROOT
    assert find_repo_root(ROOT) == ROOT


def test_outside_a_repository_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc.yaml"):
        find_repo_root(tmp_path)
