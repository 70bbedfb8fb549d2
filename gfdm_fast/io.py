"""File output that never leaves half a file: one atomic-write helper for every writer."""
import contextlib
import os
import secrets


def temporary_name(path: str) -> str:
    """A temporary name beside ``path``, unique per process and call: ``.NAME.PID-RANDOM.tmp``."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}-{secrets.token_hex(3)}.tmp")


def atomic_write(path: str, write) -> str:
    """``write(tmp_path)`` to a temporary name beside ``path``, then rename it onto ``path``.

    The temporary file is removed on every exit path (errors and KeyboardInterrupt included), so a reader
    sees the old file or the new one, never a partial one, and no two processes share a temporary name.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path


def atomic_write_file(path: str, write) -> str:
    """``write(binary_file_object)`` through ``atomic_write`` (numpy then adds no ``.npz`` suffix)."""
    def to_file(tmp):
        with open(tmp, "wb") as f:   # open(), unlike mkstemp, honours the umask
            write(f)
    return atomic_write(path, to_file)


def atomic_save(obj, path: str) -> str:
    """``torch.save(obj)`` through ``atomic_write``."""
    import torch
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
