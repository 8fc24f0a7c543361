"""Writing files so that a crash never leaves one that looks complete."""
import contextlib
import os


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs):
    """Write to PATH.partial; rename it over PATH only when the block ends without error."""
    temp = path + ".partial"
    try:
        with open(temp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
    os.replace(temp, path)


def make_writable_dir(path: str) -> str:
    """Create path if needed and prove a file can be written there; returns "" or why not."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        return e.strerror or str(e)
    return ""
