"""CIFAR-100 (python version): pulled once, checksum verified, read with torchvision.

``fetch`` downloads the archive named in the config (``data.cifar100.url``, a
mirror may replace the official site), checks its MD5 (``data.cifar100.md5``)
and extracts it into the data cache (``data.dir``), where every framework
reads it. The data's identity is its MD5, never its URL: the extracted folder
records the MD5 it was verified against (``archive.json``), and ``fetch`` of
that MD5 then downloads nothing, wherever the URL points now. Nothing
half-done is ever left and nothing verified is lost: the download goes to a
``.part`` file that is removed on any failure, and the extraction goes to a
temporary folder that replaces the old one only once it is complete.

The workflow's rule declares one small file per MD5 as its output
(``verified_marker``), not the extracted files: Snakemake deletes a job's
outputs before it reruns the job, and that must never be the data.

``write_archive`` makes a small archive in the exact CIFAR-100 format, for
tests and for machines without internet access.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

ARCHIVE_NAME = "cifar-100-python.tar.gz"
FOLDER = "cifar-100-python"
FILES = ("train", "test", "meta")
TRAIN_EXAMPLES = 50_000
NUM_CLASSES = 100
_CHUNK = 1 << 20
PROGRESS_EVERY_S = 5.0  # a download reports its bytes and rate at most this often
RECORD_NAME = "archive.json"  # in the extracted folder: the MD5 (and URL) it was verified against


class DataError(ValueError):
    """The data set could not be pulled; the message says why and what to change."""


def folder(data_dir: str | Path) -> Path:
    return Path(data_dir) / FOLDER


def is_extracted(data_dir: str | Path) -> bool:
    return all((folder(data_dir) / name).is_file() for name in FILES)


def verified_marker(data_dir: str | Path, md5: str) -> Path:
    """The workflow rule's output: a copy of the folder's ``archive.json`` (MD5, URL, size),
    written once the cache holds the archive of ``md5``."""
    return Path(data_dir) / f"{FOLDER}.{md5.lower()}.verified"


def verified_md5(data_dir: str | Path) -> str | None:
    """The MD5 the extracted data was verified against, or None (nothing, or not recorded)."""
    try:
        record = json.loads((folder(data_dir) / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    return record.get("md5") if is_extracted(data_dir) else None


# The MD5 of the official archive (www.cs.toronto.edu/~kriz): pages say when
# a run used anything else (a generated test archive, a modified copy).
OFFICIAL_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"


def fetch(url: str, md5: str, data_dir: str | Path, progress=print) -> Path:
    """Download, verify and extract the archive; return the extracted folder.

    Data already verified against ``md5`` is kept as it is, without network.
    """
    data_dir, md5 = Path(data_dir), md5.lower()
    data_dir.mkdir(parents=True, exist_ok=True)
    if verified_md5(data_dir) == md5:
        progress(f"{folder(data_dir)} holds the archive with MD5 {md5} already; nothing to download")
    else:
        partial = data_dir / f"{ARCHIVE_NAME}.part"
        try:
            progress(f"downloading {url}")
            digest, size = _download(url, partial, progress)
            if digest != md5:
                raise DataError(
                    f"the archive from {url} has MD5 {digest} ({size:,} bytes) but data.cifar100.md5 is {md5}: "
                    "the download is corrupted or truncated, or the URL does not serve the CIFAR-100 python "
                    "archive. Retry, or point data.cifar100.url at a good mirror (and data.cifar100.md5 at its "
                    "checksum)")
            progress(f"checksum {digest} verified ({size:,} bytes); extracting into {data_dir}")
            _extract(partial, data_dir, {"md5": md5, "url": url, "bytes": size})
        finally:
            partial.unlink(missing_ok=True)
    # one marker, of the MD5 the data now holds: a marker of any other MD5 would be stale
    for stale in data_dir.glob(f"{FOLDER}.*.verified"):
        stale.unlink()
    shutil.copyfile(folder(data_dir) / RECORD_NAME, verified_marker(data_dir, md5))
    return folder(data_dir)


def _download(url: str, target: Path, progress=print) -> tuple[str, int]:
    """Stream ``url`` into ``target``; return its MD5 and size. Short reads are errors."""
    digest, size = hashlib.md5(), 0
    started = last_report = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
            expected = response.headers.get("Content-Length")
            of_total = f" of {int(expected) / 1e6:.1f}" if expected else ""
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                now = time.monotonic()
                if now - last_report >= PROGRESS_EVERY_S:
                    progress(f"downloaded {size / 1e6:.1f}{of_total} MB ({size / 1e6 / (now - started):.1f} MB/s)")
                    last_report = now
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(f"could not download {url}: {reason}; check data.cifar100.url "
                        "(a mirror of the official archive can replace it) and the network") from None
    if expected is not None and int(expected) != size:
        raise DataError(f"the download of {url} stopped after {size:,} of {int(expected):,} bytes; retry")
    elapsed = max(time.monotonic() - started, 1e-9)
    progress(f"downloaded {size / 1e6:.1f} MB in {elapsed:.0f} s ({size / 1e6 / elapsed:.1f} MB/s)")
    return digest.hexdigest(), size


def _extract(archive: Path, data_dir: Path, record: dict) -> None:
    """Extract into a temporary folder, check the three files, record ``record`` (its MD5
    and URL) there, then swap it with the folder in place (the old one only then goes)."""
    staging = Path(tempfile.mkdtemp(prefix=".cifar100-", dir=data_dir))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(staging, filter="data")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"the archive matches its checksum but cannot be extracted ({exc}); "
                            "check data.cifar100.url and data.cifar100.md5") from None
        missing = [name for name in FILES if not (staging / FOLDER / name).is_file()]
        if missing:
            raise DataError(f"the archive has no {FOLDER}/{', '.join(missing)}: it is not the CIFAR-100 "
                            "python version; check data.cifar100.url")
        (staging / FOLDER / RECORD_NAME).write_text(json.dumps(record, sort_keys=True) + "\n")
        if folder(data_dir).exists():
            os.replace(folder(data_dir), staging / "replaced")  # removed with the staging folder
        os.replace(staging / FOLDER, folder(data_dir))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- reading

def _reader_class():
    from torchvision.datasets import CIFAR100

    class VerifiedCIFAR100(CIFAR100):
        """torchvision's reader, without its per-file checksums: those are the
        official archive's, while the archive actually pulled (official, mirror
        or test) was verified against data.cifar100.md5 when it was fetched."""

        train_list = [["train", None]]
        test_list = [["test", None]]
        meta = {**CIFAR100.meta, "md5": None}

    return VerifiedCIFAR100


def load(data_dir: str | Path, train: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) uint8 and fine labels (N,) int64 of one split."""
    if not is_extracted(data_dir):
        raise DataError(f"CIFAR-100 is not in {folder(data_dir)}: run the workflow's cifar100 rule "
                        "(snakemake cifar100) or check data.dir")
    dataset = _reader_class()(root=str(data_dir), train=train, download=False)
    return np.asarray(dataset.data), np.asarray(dataset.targets, dtype=np.int64)


# --------------------------------------------------------------------------- test archives

class _Py2Str(bytes):
    """A Python 2 ``str``, as in the official pickles: read back as ``str`` with
    encoding="latin1" (torchvision) and as ``bytes`` with encoding="bytes"."""


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table is extensible
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: _Py2Str) -> None:
        data = bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2_str


def _py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _split(name: str, count: int, rng: np.random.Generator) -> dict:
    fine = rng.integers(0, NUM_CLASSES, count)
    return {
        _Py2Str(b"batch_label"): _Py2Str(f"{name} batch 1 of 1".encode()),
        _Py2Str(b"filenames"): [_Py2Str(f"generated_{name}_{i}.png".encode()) for i in range(count)],
        _Py2Str(b"fine_labels"): [int(x) for x in fine],
        _Py2Str(b"coarse_labels"): [int(x) // 5 for x in fine],
        _Py2Str(b"data"): rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8),
    }


def write_archive(path: str | Path, train_examples: int, test_examples: int, seed: int = 0) -> str:
    """Write a random archive in the CIFAR-100 python format; return its MD5."""
    rng = np.random.default_rng(seed)
    meta = {
        _Py2Str(b"fine_label_names"): [_Py2Str(f"class_{i}".encode()) for i in range(NUM_CLASSES)],
        _Py2Str(b"coarse_label_names"): [_Py2Str(f"superclass_{i}".encode()) for i in range(NUM_CLASSES // 5)],
    }
    members = {"train": _split("training", train_examples, rng), "test": _split("testing", test_examples, rng),
               "meta": meta}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # fixed gzip and tar timestamps: the same arguments give the same bytes, hence the same MD5
    with open(path, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=1,
                                                mtime=0) as zipped, tarfile.open(fileobj=zipped, mode="w") as tar:
        for name, content in members.items():
            data = _py2_pickle(content)
            info = tarfile.TarInfo(f"{FOLDER}/{name}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()
