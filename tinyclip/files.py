"""Reading files that come from outside: regular files only, sizes capped, JSON nesting bounded.

Model folders and tokenizers are downloaded from a hub or received from
someone else, so every byte of them is untrusted. The rules here are the
ones the checkpoint and tokenizer loaders share:

* only a regular file is read: a FIFO would block ``open`` forever and a
  link to ``/dev/zero`` would be read until memory runs out, so the file is
  opened without blocking and its type checked on the open descriptor;
* a file is never read past a cap that its kind justifies (``MAX_JSON_BYTES``
  for a config), checked on its size before reading and again while reading;
* JSON nesting deeper than ``MAX_JSON_DEPTH`` is refused before it is parsed
  (Python's parser would otherwise recurse into a ``RecursionError``), and so
  are the non-standard constants ``NaN`` and ``Infinity``.

Every failure is a ``ValueError`` whose message names the file and what is
wrong with it (``FileNotFoundError`` when there is no file at all).

Writing: ``staged_file`` writes a file atomically (a hidden temporary beside
it, flushed, renamed over it), for every module that writes one (checkpoints,
tokenizers, run outputs); ``checkpoint`` builds its atomic folders on the same
hidden names, fault hook and folder sync.
"""

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import stat

import numpy

MAX_JSON_BYTES = 16 * 2**20   # a config.json is a few KiB, a tokenizer's merges about 1.5 MiB
MAX_JSON_DEPTH = 64           # configs and tokenizers nest 3 or 4 deep

_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def open_regular(path, what="file"):
    """A binary file object for ``path`` once it is known to be a regular file (symbolic links followed).

    Raises FileNotFoundError when nothing is there, ValueError naming ``what``
    and the file's kind when it is not a regular file (nothing is read from it).
    """
    path = os.fspath(path)
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer before returning
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except OSError as error:
        if error.errno == errno.ENXIO:   # a socket
            raise ValueError(f"{what} {path} is not a regular file (a socket); tinyclip reads regular files only")
        raise
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
            raise ValueError(f"{what} {path} is {kind}, not a regular file; tinyclip reads regular files only")
        fcntl.fcntl(descriptor, fcntl.F_SETFL, fcntl.fcntl(descriptor, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def check_regular(path, what="file"):
    """The size in bytes of the regular file ``path``; the errors of ``open_regular`` otherwise."""
    with open_regular(path, what) as file:
        return os.fstat(file.fileno()).st_size


def read_bytes(path, max_bytes, what="file"):
    """The bytes of the regular file ``path``, which must hold at most ``max_bytes`` (else a ValueError)."""
    path = os.fspath(path)
    with open_regular(path, what) as file:
        size = os.fstat(file.fileno()).st_size
        if size > max_bytes:
            raise ValueError(f"{what} {path} has {size:,} bytes, more than the {max_bytes:,} a {what} may have")
        data = read_capped(file, max_bytes)      # the file may have grown since fstat: never read past the cap
    if len(data) > max_bytes:
        raise ValueError(f"{what} {path} has more than the {max_bytes:,} bytes a {what} may have")
    return data


def read_capped(stream, max_bytes, chunk=1 << 20):
    """At most ``max_bytes + 1`` bytes of ``stream``, read ``chunk`` at a time (so a short file costs little).

    More than ``max_bytes`` bytes back means the stream holds more than the cap.
    """
    parts, total = [], 0
    while total <= max_bytes:
        part = stream.read(min(chunk, max_bytes + 1 - total))
        if not part:
            break
        parts.append(part)
        total += len(part)
    return b"".join(parts)


def read_json(path, what="JSON file", max_bytes=MAX_JSON_BYTES, max_depth=MAX_JSON_DEPTH):
    """The JSON document in the regular file ``path`` (UTF-8, at most ``max_bytes``, nested at most ``max_depth``).

    Raises FileNotFoundError when there is no file, ValueError naming the file
    and the fault otherwise (not a regular file, too large, not UTF-8, too
    deeply nested, not JSON, NaN or Infinity).
    """
    path = os.fspath(path)
    data = read_bytes(path, max_bytes, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} {path} is not UTF-8 text: {error}") from None
    depth = nesting_depth(text)
    if depth > max_depth:
        raise ValueError(f"{what} {path} nests {depth} levels deep; at most {max_depth} are read")
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except ValueError as error:   # JSONDecodeError, NaN / Infinity, an integer of more than 4300 digits
        raise ValueError(f"{what} {path} is not valid JSON: {error}") from None


def nesting_depth(text, chunk=1 << 16):
    """How deeply the arrays and objects of the JSON ``text`` nest (brackets inside strings do not count).

    Works on at most ``chunk`` brackets at a time, so the memory it needs does
    not grow with the file. A malformed text may give any depth; the parser
    refuses it afterwards.
    """
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).encode("ascii")
    deepest = level = 0
    for start in range(0, len(brackets), chunk):
        codes = numpy.frombuffer(brackets, numpy.uint8, count=min(chunk, len(brackets) - start), offset=start)
        steps = numpy.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(numpy.int32)
        levels = numpy.cumsum(steps, dtype=numpy.int64) + level
        deepest, level = max(deepest, int(levels.max())), int(levels[-1])
    return deepest


def _refuse_constant(name):
    raise ValueError(f"{name} is not a JSON value")


def current_umask():
    """The process's umask, read without changing it where the OS tells it (Linux: /proc/self/status).

    Elsewhere it is read by setting and restoring it, which another thread
    creating a file at that instant could notice.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Atomic writes. A file or folder is written under a hidden name beside its target (``.NAME.partial-PID-XXXX``)
# and renamed into place only when complete and flushed: a rename within one folder is atomic, so a reader
# (or a run resumed after a kill) sees the old target or the new one, never half of one. Hidden names are
# created with os.mkdir / open, never mkdtemp / mkstemp, so what is written gets the user's umask like any
# other file (mkdtemp's 0700 would hide a model from the other users of a shared machine).

fault_hook = None     # tests only: a callable(point, path) run at every step of every atomic write


def reached(point, path):
    """A named step of an atomic write of ``path``: where tests stop the writer, deterministically
    (tests/mpi/train_with_faults.py kills the process at each of them in turn)."""
    if fault_hook is not None:
        fault_hook(point, path)


def hidden_name(path, kind):
    """``.NAME.KIND-PID-XXXXXXXX`` beside ``path``: where an atomic write stages it (``is_leftover`` knows it)."""
    parent, name = os.path.split(path)
    return os.path.join(parent, f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def is_leftover(name):
    """Whether ``name`` (a file or folder name) is what an interrupted atomic write leaves behind."""
    return name.startswith(".") and (".partial-" in name or ".old-" in name)


def sync_folder(folder):
    """Make a rename inside ``folder`` durable (POSIX: fsync the folder); a no-op where folders cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def staged_file(path):
    """``with staged_file(path) as temporary:`` write the file ``temporary``; when the block ends without an
    error it is flushed and renamed over ``path``, on an error deleted (``path`` is left as it was).

    ``temporary`` ends with ``path``'s suffix, so writers that go by the suffix (matplotlib) still work.
    """
    path = os.path.abspath(os.fspath(path))
    temporary = hidden_name(path, "partial") + os.path.splitext(path)[1]
    try:
        yield temporary
        reached("staged_file:written", path)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
        reached("staged_file:replaced", path)
        sync_folder(os.path.dirname(path))
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError) and error.filename == temporary:      # name the file asked for, not ours
            raise type(error)(error.errno, error.strerror, path) from None
        raise
