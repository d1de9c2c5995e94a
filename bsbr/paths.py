"""Where the repository is, so notebooks find ``data/`` whether papermill (run from the repository root) or
JupyterLab (kernel started in ``notebooks/``) runs them."""

from __future__ import annotations

from pathlib import Path

__all__ = ["find_repo_root"]


def find_repo_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the working directory) that holds ``dvc.yaml``.

    Raises:
        FileNotFoundError: no such folder up to the file-system root.
    """
    here = Path.cwd() if start is None else Path(start)
    for folder in (here.resolve(), *here.resolve().parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    raise FileNotFoundError(f"no dvc.yaml at or above {here}: run the notebook inside the BSBR repository")
