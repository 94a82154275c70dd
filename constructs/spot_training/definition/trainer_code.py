"""The trainer code as the pipeline ships it: where it is, its archive, its metric definitions.

Free of CDK imports, so the command-line tool's local run uses exactly what synth uses without starting
the CDK's JavaScript runtime."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import tarfile
import tempfile
from pathlib import Path

ENTRY_POINT = "train.py"
# The training container's first process (container_entry.py), shipped in every code archive under this name:
# the pipeline's ContainerEntrypoint unpacks the archive and runs it before the image's own command.
CONTAINER_ENTRY = "spot_training_container_entry.py"
CONTAINER_ENTRY_SOURCE = Path(__file__).resolve().parent / "container_entry.py"
_EXCLUDED = {"__pycache__", ".pytest_cache", ".mypy_cache"}
# Files that make the image's launcher run pip when the job starts (sagemaker-training `entry_point.install`
# and `modules.py`): requirements.txt -> `pip install -r requirements.txt`, setup.py -> `pip install .`. The
# job's subnets have no route to a package index and network isolation removes the network altogether, so
# either one fails the job on every instance before step 1.
TOOLKIT_INSTALL_TRIGGERS = ("requirements.txt", "setup.py")


def check_trainer_dir(source_dir: Path) -> None:
    """Refuse, in one line, a trainer folder the image's launcher could not start offline."""
    if not source_dir.is_dir():
        raise ValueError(f"trainer_source_dir={source_dir}: not a folder")
    if not (source_dir / ENTRY_POINT).is_file():
        raise ValueError(f"trainer_source_dir={source_dir}: has no {ENTRY_POINT} (the entry point the pipeline runs)")
    if (source_dir / CONTAINER_ENTRY).exists():
        raise ValueError(f"trainer_source_dir={source_dir}: holds {CONTAINER_ENTRY}, the name the pipeline gives its "
                         "container entry point in the code archive; rename the file")
    for name in TOOLKIT_INSTALL_TRIGGERS:
        if (source_dir / name).exists():
            raise ValueError(f"trainer_source_dir={source_dir}: holds {name}, which the training image's launcher "
                             "pip-installs at job start; the job has no network to install from, so every package "
                             "must already be in the image (remove the file, or build an image_uri with them)")


def default_trainer_dir() -> Path:
    """The trainer shipped with this package (a link to the repository's `trainer/`)."""
    here = Path(__file__).resolve().parents[1]  # the spot_training package
    for candidate in (here / "trainer", here.parent.parent / "trainer"):
        if (candidate / ENTRY_POINT).is_file():
            return candidate
    raise FileNotFoundError(f"trainer_source_dir: no {ENTRY_POINT} found next to {here}; pass "
                            "trainer_source_dir=<folder holding train.py>")


def load_metric_definitions(source_dir: Path) -> list[dict[str, str]]:
    """`METRIC_DEFINITIONS` from the trainer's own `log_format.py`: the regexes live beside the code
    that prints the lines they parse."""
    path = source_dir / "log_format.py"
    if not path.is_file():
        raise FileNotFoundError(f"metric_definitions: {path} is missing; pass metric_definitions=[...]")
    spec = importlib.util.spec_from_file_location("spot_training_trainer_log_format", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [dict(m) for m in module.METRIC_DEFINITIONS]


def deterministic_tarball(source_dir: Path) -> Path:
    """`source_dir` and the container entry point as a `.tar.gz` whose bytes depend only on file names and
    contents (sorted entries, zero mtimes and owners), so the asset hash changes only when the code does."""
    check_trainer_dir(source_dir)
    files = sorted(p for p in source_dir.rglob("*")
                   if p.is_file() and not _EXCLUDED.intersection(p.relative_to(source_dir).parts)
                   and p.suffix != ".pyc")
    entries = sorted([(p.relative_to(source_dir).as_posix(), p) for p in files]
                     + [(CONTAINER_ENTRY, CONTAINER_ENTRY_SOURCE)])
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in entries:
            data = path.read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o755 if path.stat().st_mode & 0o111 else 0o644
            tar.addfile(info, io.BytesIO(data))
    packed = io.BytesIO()
    with gzip.GzipFile(fileobj=packed, mode="wb", mtime=0, filename="") as gz:
        gz.write(raw.getvalue())
    digest = hashlib.sha256(packed.getvalue()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / "spot-training-trainer" / f"trainer-{digest}.tar.gz"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{id(packed)}.tmp")
        tmp.write_bytes(packed.getvalue())
        tmp.replace(out)
    return out
