"""Files from outside are untrusted: every malformed file of the corpus is refused, cleanly and cheaply.

The corpus (``tests/malformed_files.py``) holds model folders, weights files
and tokenizers built by hand to be wrong in one way each. Every one, handed
to its loader, must raise a ValueError whose message names the file at
fault, while allocating little (``tracemalloc``, peak beyond the start) and
without hanging (each load runs in a thread that must finish within a bound;
a FIFO is unblocked by opening its other end if it does not). Where the file
at fault is a safetensors file, the ``safetensors`` package's own verdict is
taken too: tinyclip refuses every file the package refuses.
"""

import os
import threading
import tracemalloc

import pytest
import safetensors
import safetensors.numpy

from tinyclip import checkpoint
from tinyclip.tokenizer import MAX_MERGES_BYTES, Tokenizer

from . import malformed_files

HANG_BOUND_S = 60                  # a load that has not finished by then is hung (they take milliseconds)
ALLOCATION_BOUND = 4 * 2**20       # bytes; the largest file of the corpus a loader may read is ~0.4 MB
BOMB_ALLOCATION_BOUND = 3 * MAX_MERGES_BYTES   # a gzip bomb is inflated up to the cap, not beyond
LOADERS = {"load": checkpoint.load, "from_pretrained": checkpoint.from_pretrained,
           "read_safetensors": checkpoint.read_safetensors, "tokenizer": Tokenizer.load,
           "bpe": Tokenizer.from_bpe_file}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return malformed_files.build(str(tmp_path_factory.mktemp("corpus")))


def attempt(case):
    """Run the case's loader in a thread: (the exception or None, peak bytes allocated, whether it hung)."""
    outcome = {"error": None, "peak": None}

    def run():
        tracemalloc.start()
        tracemalloc.reset_peak()
        start, _ = tracemalloc.get_traced_memory()
        try:
            LOADERS[case.loader](case.target)
        except Exception as error:            # noqa: BLE001  (the test judges the kind)
            outcome["error"] = error
        finally:
            outcome["peak"] = tracemalloc.get_traced_memory()[1] - start
            tracemalloc.stop()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_BOUND_S)
    hung = thread.is_alive()
    if hung and case.pipe:                    # release a reader blocked in open() so the thread can end
        descriptor = os.open(case.at_fault, os.O_WRONLY | os.O_NONBLOCK)
        os.close(descriptor)
        thread.join(HANG_BOUND_S)
    return outcome["error"], outcome["peak"], hung


def test_every_malformed_file_is_refused_naming_it_cheaply_and_without_hanging(corpus):
    failures = []
    for case in corpus:
        error, peak, hung = attempt(case)
        bound = BOMB_ALLOCATION_BOUND if case.name == "bpe-bomb" else ALLOCATION_BOUND
        if hung:
            failures.append(f"{case.name}: hung")
        elif error is None:
            failures.append(f"{case.name}: loaded silently")
        elif not isinstance(error, ValueError):
            failures.append(f"{case.name}: {type(error).__name__} (not a ValueError): {error}"[:300])
        elif case.at_fault not in str(error):
            failures.append(f"{case.name}: the message does not name {case.at_fault}: {error}"[:300])
        if peak is not None and peak > bound:
            failures.append(f"{case.name}: allocated {peak:,} bytes (bound {bound:,})")
    assert not failures, f"{len(failures)} of {len(corpus)} cases:\n" + "\n".join(failures)


def package_refuses(path):
    """The safetensors package's verdict on a regular file: True when it refuses it."""
    try:
        if os.path.getsize(path) > 2**26:      # a sparse giant: the header verdict (reading it would take 30 GB)
            with safetensors.safe_open(path, framework="numpy") as handle:
                for name in handle.keys():
                    handle.get_slice(name).get_shape()
        else:
            safetensors.numpy.load_file(path)
    except Exception:                           # noqa: BLE001  (SafetensorError, or anything else: a refusal)
        return True
    return False


def test_tinyclip_refuses_every_weights_file_the_safetensors_package_refuses(corpus):
    weights = {case.at_fault for case in corpus if case.at_fault.endswith(".safetensors")
               and os.path.isfile(case.at_fault) and not os.path.islink(case.at_fault)}
    refused_by_package = {path for path in weights if package_refuses(path)}
    assert len(refused_by_package) >= 15          # the corpus is malformed by the package's own standard
    for path in sorted(refused_by_package):
        with pytest.raises(ValueError, match="is not a safetensors file"):
            checkpoint.read_safetensors(path)
    # the files the package accepts are refused by tinyclip for what they hold (a shape or dtype that does
    # not fit the config), before a weight is read
    for case in corpus:
        if case.at_fault in weights - refused_by_package and case.loader in ("load", "from_pretrained"):
            with pytest.raises(ValueError, match="do not fit"):
                LOADERS[case.loader](case.target)


def test_an_open_clip_folder_is_read_as_strictly_as_the_others(tmp_path):
    """hub.load_model's open_clip path reads its config and weights through the same checks."""
    from tinyclip import hub
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / hub.OPEN_CLIP_CONFIG).write_text("[" * 200_000 + "]" * 200_000, encoding="utf-8")
    with pytest.raises(ValueError, match=f"{nested / hub.OPEN_CLIP_CONFIG}.*nests"):
        hub.load_model(str(nested))
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / hub.OPEN_CLIP_CONFIG)
    with pytest.raises(ValueError, match=f"{fifo / hub.OPEN_CLIP_CONFIG}.*FIFO"):
        hub.from_open_clip(str(fifo))
    bad_weights = tmp_path / "weights"
    bad_weights.mkdir()
    (bad_weights / hub.OPEN_CLIP_WEIGHTS).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ValueError, match=str(bad_weights / hub.OPEN_CLIP_WEIGHTS)):
        hub.read_weights(str(bad_weights / hub.OPEN_CLIP_WEIGHTS))
