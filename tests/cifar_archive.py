"""A small archive in the exact CIFAR-100 format, served over HTTP on 127.0.0.1,
so that the workflow's real pull (download, checksum, extraction) runs without internet."""

from __future__ import annotations

import atexit
import functools
import http.server
import shutil
import tempfile
import threading
from pathlib import Path

from privbench.data import cifar100

TRAIN_EXAMPLES, TEST_EXAMPLES = 256, 64


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


def serve(directory: Path) -> str:
    """Serve ``directory`` on a free port of 127.0.0.1 from a daemon thread; return its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    atexit.register(server.shutdown)
    return f"http://127.0.0.1:{server.server_address[1]}"


@functools.lru_cache(maxsize=None)
def session_archive() -> tuple[str, str]:
    """URL and MD5 of a generated archive, served for the rest of the test session."""
    folder = Path(tempfile.mkdtemp(prefix="privbench-cifar100-"))
    atexit.register(shutil.rmtree, folder, True)
    md5 = cifar100.write_archive(folder / cifar100.ARCHIVE_NAME, TRAIN_EXAMPLES, TEST_EXAMPLES)
    return f"{serve(folder)}/{cifar100.ARCHIVE_NAME}", md5


def data_override(out_dir: Path) -> str:
    """The ``--config`` item pointing a workflow run's data section at the served archive."""
    url, md5 = session_archive()
    return f"data={{'dir': '{out_dir}/data', 'cifar100': {{'url': '{url}', 'md5': '{md5}'}}}}"
