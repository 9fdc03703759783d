"""Around the training loop: the run folder and its lock, progress lines, the metrics log, pictures, signals.

``tinyclip.train`` holds the loop and its configuration; this module holds
what a run needs from its surroundings, none of which changes what a step
computes:

* the run folder (``train_config.json``, ``metrics.jsonl``, ``summary.json``,
  ``.lock``): made and locked by rank 0 once every check has passed, so a
  second run into the same folder is refused at once, naming the holder's
  PID (``RunLock``, an flock the operating system releases however the
  process ends); leftovers of interrupted writes are cleaned on the next start;
* ``writing``: an OSError while writing names what was written and where;
* ``Progress`` (one line per logged step on rank 0), ``MetricsLog`` (JSON
  lines, cut back to the checkpoint's step on resume) and ``DataSpeed``
  (images/s and the share of the step spent waiting for the loader);
* the validation metrics and pictures of a run on the user's own data;
* ``stop_on_signals``: SIGINT and SIGTERM ask the loop to stop after the
  step in flight (docs/faults.md); a second signal stops at once.

Raises are named in each function's docstring.
"""

import contextlib
import dataclasses
import datetime
import json
import os
import re
import signal
import sys

import numpy

from . import checkpoint, evaluate, files, plots
from .data.transforms import preprocess

try:
    import fcntl                   # POSIX; where it is missing (Windows) run folders are not locked
except ImportError:
    fcntl = None

LOCK_FILE = ".lock"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "train_config.json"


@contextlib.contextmanager
def writing(what, where):
    """Inside the block an OSError (a full disk, a read-only folder) is raised again naming ``what`` was being
    written and ``where``: "writing the final model to runs/x/model: [Errno 28] No space left on device"."""
    try:
        yield
    except OSError as error:
        reason = error.strerror or str(error)
        raise OSError(error.errno, f"writing {what} to {where}: {reason}") from None


class Progress:
    """Plain progress lines (or one line rewritten with \\r on a terminal), from rank 0 only."""

    def __init__(self, total_steps, enabled, stream=None):
        self.total_steps, self.enabled = total_steps, enabled
        self.stream = sys.stdout if stream is None else stream
        self.rewrite = enabled and self.stream.isatty()

    def step(self, step, loss, lr, seconds_per_step, speed=None):
        if not self.enabled:
            return
        left = (self.total_steps - step) * seconds_per_step
        line = (f"step {step:>6}/{self.total_steps}  loss {loss:.4f}  lr {lr:.2e}  "
                f"{seconds_per_step:.2f} s/step  ~{left / 60:.1f} min left")
        if speed:
            line += f"  {speed['images_per_second']:.0f} images/s  {speed['data_wait_fraction']:.0%} waiting for data"
        self.stream.write(f"\r{line}" if self.rewrite else f"{line}\n")
        self.stream.flush()

    def say(self, message):
        if self.enabled:
            self.stream.write(f"\n{message}\n" if self.rewrite else f"{message}\n")
            self.stream.flush()


class MetricsLog:
    """metrics.jsonl, appended to by rank 0.

    A resumed run first drops what came after its checkpoint: records past
    its step, and when it resumes a run's last step, the final evaluation of
    an interrupted finish (``finish`` runs it again). A last line cut short
    (a kill or a full disk while appending) is dropped too.
    """

    def __init__(self, path, enabled, resume_step=None, total_steps=None):
        self.path, self.enabled = path, enabled
        self.records = []
        if not enabled:
            return
        if resume_step is not None and os.path.isfile(path):
            self.records = [record for record in self._read(path)
                            if record.get("step", 0) < resume_step
                            or (record.get("step") == resume_step and ("loss" in record or resume_step < total_steps))]
        with writing("the metrics", path), files.staged_file(path) as temporary:
            with open(temporary, "w", encoding="utf-8") as file:
                file.writelines(json.dumps(record) + "\n" for record in self.records)

    @staticmethod
    def _read(path):
        records = []
        with open(path, encoding="utf-8", errors="replace") as file:
            for line in filter(str.strip, file):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break                        # a record cut short: it and anything after it are dropped
                if isinstance(record, dict):
                    records.append(record)
        return records

    def write(self, record):
        if self.enabled:
            self.records.append(record)
            with writing("the metrics", self.path), open(self.path, "a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")


class DataSpeed:
    """Images per second and the fraction of step time spent waiting for the loader, since the last report.

    The wait is the time ``next(loader)`` blocks: near 0 when the loader
    keeps ahead of the step, near 1 when the step starves (more --workers).
    """

    def __init__(self):
        self.images, self.waiting, self.total = 0, 0.0, 0.0

    def add(self, images, waiting, total):
        self.images, self.waiting, self.total = self.images + images, self.waiting + waiting, self.total + total

    def report(self):
        """{"images_per_second", "data_wait_fraction"} over the steps added since the last report; {} if none."""
        if self.total <= 0:
            return {}
        speed = {"images_per_second": round(self.images / self.total, 1),
                 "data_wait_fraction": round(self.waiting / self.total, 4)}
        self.images, self.waiting, self.total = 0, 0.0, 0.0
        return speed


def validate(model, tokenizer, val_pairs, config):
    """Loss and recall@1/5/10 on the held-out pairs, keys prefixed ``val_`` (``evaluate.caption_validation``)."""
    return evaluate.caption_validation(model, tokenizer, val_pairs, loss=config.loss,
                                       batch_size=config.batch_size)


def validation_pictures(val_pairs, image_size, family):
    """The first held-out images (preprocessed) and their first captions, for similarity.png: a RetrievalSet."""
    _, text_to_image = val_pairs.grouped_by_image()
    first_pair = numpy.unique(text_to_image, return_index=True)[1][:plots.MAX_SIMILARITY_PAIRS]
    images = numpy.stack([preprocess(val_pairs.read_image(int(i)), image_size, family) for i in first_pair])
    return evaluate.RetrievalSet(images, [val_pairs.caption(int(i)) for i in first_pair])     # (n, H, W, 3), n


def draw_pictures(out, records, model, tokenizer, retrieval):
    """loss.png and similarity.png (the first retrieval pairs), each written whole; one warning without
    matplotlib."""
    if not plots.available():
        print(f"warning: no pictures: {plots.MISSING_MATPLOTLIB}", file=sys.stderr)
        return
    path = os.path.join(out, "loss.png")
    with writing("the loss picture", path), files.staged_file(path) as temporary:
        plots.plot_training(records, temporary)
    if retrieval is not None:
        count = plots.MAX_SIMILARITY_PAIRS
        images, captions = retrieval.images[:count], retrieval.captions[:count]
        path = os.path.join(out, "similarity.png")
        with writing("the similarity picture", path), files.staged_file(path) as temporary:
            plots.plot_similarity(evaluate.encode_images(model, images),
                                  evaluate.encode_texts(model, tokenizer, captions),
                                  images, captions, temporary)


STOP_SIGNALS = ("SIGINT", "SIGTERM")


@contextlib.contextmanager
def stop_on_signals():
    """Inside the block the first SIGINT or SIGTERM only sets ``flag["signal"]`` (its name); a second one
    stops at once: SIGINT raises KeyboardInterrupt, SIGTERM ends the process as it would have without the
    block. Files being written are then left out whole (staged writes), so the last checkpoint is intact."""
    flag = {"signal": None}
    numbers = [getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)]

    def request_stop(signum, frame):
        if flag["signal"] is None:
            flag["signal"] = signal.Signals(signum).name
            return
        for number in numbers:
            signal.signal(number, signal.SIG_DFL if number != signal.SIGINT else signal.default_int_handler)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)            # the default action now: the process ends by this signal

    try:
        previous = {number: signal.signal(number, request_stop) for number in numbers}
    except ValueError:              # not the main thread: no handlers, signals behave as usual
        yield flag
        return
    try:
        yield flag
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def default_out():
    return os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


def run_folder_of(step_folder):
    """The run folder that holds the checkpoint folder ``step_folder`` (RUN/checkpoint/step-N -> RUN)."""
    root = os.path.dirname(os.path.abspath(step_folder))
    if os.path.basename(root) == checkpoint.TRAINING_CHECKPOINT_DIR:
        return os.path.dirname(root)
    return root


def holds_a_run(folder):
    """Whether ``folder`` holds a run to keep: a finished one, or one with a checkpoint to resume. A run that
    ended before its first checkpoint (train_config.json and metrics only) has nothing to resume: a new run
    may start there, instead of being sent to a --resume that would find nothing."""
    if os.path.exists(os.path.join(folder, SUMMARY_FILE)):
        return True
    try:
        checkpoint.latest_training_checkpoint(folder)
    except ValueError:
        return False
    return True


def busy(folder, holder):
    return (f"{folder} is in use by another training run (PID {holder}, in {os.path.join(folder, LOCK_FILE)}); "
            f"wait for it to end, or choose another --out")


class RunLock:
    """The lock on a run folder, held while a run trains into it: ``.lock`` holds the holder's PID.

    An flock, so the operating system releases it when the process ends
    however it ends; a second run into the folder is refused at once.
    """

    def __init__(self, folder):
        self.file = None
        if fcntl is None:
            return
        path = os.path.join(folder, LOCK_FILE)
        file = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            file.close()
            raise ValueError(busy(folder, holder)) from None
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        self.file = file

    @staticmethod
    def holder(folder):
        """The PID (a string) of the run that holds ``folder``'s lock now, or None when none does."""
        path = os.path.join(folder, LOCK_FILE)
        if fcntl is None or not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as file:
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return file.read().strip() or "unknown"
        return None

    def release(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def open_run_folder(config, comm):
    """Rank 0: make and lock the run folder, clean what interrupted writes left, write train_config.json.
    Returns the lock (None on the other ranks)."""
    if comm.rank != 0:
        return None
    with writing("the run folder", config.out):
        os.makedirs(config.out, exist_ok=True)
    lock = RunLock(config.out)
    try:
        for name in os.listdir(config.out):          # staged files and folders of a process that was killed
            if files.is_leftover(name):
                target = re.split(r"\.(?:partial|old)-", name[1:])[0]
                checkpoint.recover_folder(os.path.join(config.out, target))
        checkpoint.clean_training_checkpoints(os.path.join(config.out, checkpoint.TRAINING_CHECKPOINT_DIR))
        path = os.path.join(config.out, CONFIG_FILE)
        with writing("the configuration", path):
            checkpoint.write_json(path, dataclasses.asdict(config))
    except BaseException:
        lock.release()
        raise
    return lock
