"""Writing result files so that a failure never leaves half a file where a good one was.

    write_atomic(out / "results.json", json.dumps(results))
    with atomic(out / "curves.png") as tmp:
        fig.savefig(tmp)

The content goes to a temporary file beside the target, which then replaces it in one
rename (`os.replace` is atomic on POSIX): a reader sees the old file or the new one.
A write that fails for want of room or permission (a full disk, a read-only folder)
is a `WriteFailed` naming the file and the cause; the temporary file is removed and
the target is left as it was.
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator, Union

from cnn_jax.errors import BadInput

# what a user fixes by freeing space or permissions, not a bug
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


class WriteFailed(BadInput):
    """A file could not be written (a full disk, a read-only folder); what was
    written before is kept."""


def write_failed(path: Path, e: OSError) -> WriteFailed:
    return WriteFailed(f"cannot write {path}: {e.strerror or e}. Files written before are "
                       f"kept; free space (or make the folder writable), then re-run the "
                       f"same command (a training run resumes from its last checkpoint).")


@contextlib.contextmanager
def atomic(path: Union[str, Path]) -> Iterator[Path]:
    """A temporary path (with the target's suffix) to write; it replaces `path` when
    the block ends without an error, and is removed otherwise."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise (write_failed(path, e) if e.errno in DISK_ERRORS else e) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_atomic(path: Union[str, Path], content: Union[str, bytes]) -> None:
    """`path` holds `content` (text or bytes), or what it held before."""
    with atomic(path) as tmp:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content)
