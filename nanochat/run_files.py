"""A run folder's files (checkpoint, config.json, metrics JSONL), kept consistent with its checkpoint.

- One training process owns a folder at a time (nanochat.run_lock): rank 0 locks it before it reads
  or decides anything about the folder (`RunFolder.claim`, or `start` for a folder that does not
  exist yet, which then repeats the fresh-run check under the lock) and holds the lock until
  `release`. A second process stops in one line naming the holder; `--overwrite` never removes a
  locked run.
- A fresh run refuses a folder that already holds a run unless --overwrite=true, and that check runs
  before anything is written (`RunFolder.check_fresh`).
- Nothing is deleted, truncated or opened for writing until training really starts (`RunFolder.start`,
  called once data, tokenizer, model and resume checks have passed). Then: temp files left by a killed
  write are removed and reported; on --resume, config.json is rewritten from the checkpoint if a crash
  left it one save behind, and each metrics file drops the rows logged after the checkpoint's step, so
  that the folder looks as if the run had never been interrupted; on a fresh run the metrics files start empty.
- `JsonlLog`: one JSON object per line, written by rank 0 only, one row per (step[, layer]).
"""

import json
import os
import re

from nanochat.checkpoint_manager import CHECKPOINT_NAME, CONFIG_NAME, WriteFailed, atomic_write, config_text
from nanochat.common import UserError, print0
from nanochat.health import Diverged
from nanochat.run_lock import RunLock

TEMP_RE = re.compile(r"^.+\.tmp\.\d+$")  # atomic_write's temp files: <name>.tmp.<pid>


def row_key(record):
    """What makes a metrics row unique: its step, and its layer for per-layer records."""
    return record.get("step"), record.get("layer")


class JsonlLog:
    """Appends JSON rows to one file. Opened on the first write; a failed write raises WriteFailed,
    or what on_error(WriteFailed) returns."""

    def __init__(self, path, enabled=True, on_error=None):
        self.path, self.enabled, self.on_error = path, enabled, on_error
        self.file = None

    def write(self, record):
        if not self.enabled:
            return
        data = (json.dumps(record) + "\n").encode()
        try:
            if self.file is None:
                self.file = open(self.path, "ab", buffering=0)
            while data:  # unbuffered: a row is in the file (not in a buffer) before the next checkpoint
                data = data[self.file.write(data):]
        except OSError as e:
            self.close()
            failure = WriteFailed(self.path, e)
            raise (self.on_error(failure) if self.on_error else failure) from None

    def close(self):
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
            self.file = None

    def reset(self):
        """Start the file empty (a fresh run)."""
        self.close()
        if self.enabled:
            atomic_write(self.path, lambda f: None)

    def trim(self, keep_through):
        """Keep the rows with step <= keep_through, each row key once; drop torn or unreadable lines.
        Rewrites the file (atomically) only when something is dropped; returns a report line or None."""
        self.close()
        if not self.enabled or not os.path.exists(self.path):
            return None
        kept, seen, later, duplicate, broken = [], set(), 0, 0, 0
        try:
            with open(self.path, "rb") as f:
                lines = f.readlines()
        except OSError as e:
            raise WriteFailed(self.path, e, "read") from None
        for line in lines:
            try:
                record = json.loads(line) if line.endswith(b"\n") else None
            except ValueError:
                record = None
            if not isinstance(record, dict):
                broken += line.strip() != b""
            elif isinstance(record.get("step"), int) and record["step"] > keep_through:
                later += 1
            elif row_key(record) in seen:
                duplicate += 1
            else:
                seen.add(row_key(record))
                kept.append(line)
        if not (later or duplicate or broken):
            return None
        atomic_write(self.path, lambda f: f.writelines(kept))
        parts = [f"{later} row(s) after step {keep_through} (logged after the checkpoint; training repeats them)"] if later else []
        parts += [f"{duplicate} duplicate row(s)"] if duplicate else []
        parts += [f"{broken} torn or unreadable line(s)"] if broken else []
        return f"{os.path.basename(self.path)}: dropped " + ", ".join(parts)


class RunFolder:
    """One run folder, as seen by one rank (only rank 0 touches files). `saved_step` is the step of the
    checkpoint in it that this run wrote or resumed from (None before the first save)."""

    def __init__(self, path, rank=0):
        self.path, self.master = path, rank == 0
        self.logs = {}
        self.saved_step = None
        self.lock = RunLock(path)

    def claim(self):
        """Rank 0 locks the folder, if it exists, before anything reads or decides about it (a folder that does
        not exist yet is locked by `start`, once created). UserError naming the holder if another process has it."""
        if self.master and os.path.isdir(self.path):
            self.lock.acquire()

    def release(self):
        """Give the folder back (at the end of the run, after its last write)."""
        self.close()
        self.lock.release()

    def jsonl(self, name):
        """The metrics log `name` in this folder; the loop starts (empties or trims) it when training starts."""
        if name not in self.logs:
            self.logs[name] = JsonlLog(os.path.join(self.path, name), self.master, self.failed)
        return self.logs[name]

    def close(self):
        for log in self.logs.values():
            log.close()

    def kept(self, resume=True):
        """What a run stopped by an error or a forced stop leaves behind, in words (`resume`: with the hint to
        continue it; not for a run that diverged, which would only diverge again)."""
        if self.saved_step is None:
            return "no checkpoint of this run had been saved yet"
        return f"the last good checkpoint, at step {self.saved_step}, is intact" + (" (continue with --resume)" if resume else "")

    def failed(self, error):
        """The one-line error for a file of the run that could not be written, or for a save that was refused
        (Diverged, which keeps its class and exit status)."""
        if isinstance(error, Diverged):
            return Diverged(f"{error}; {self.kept(resume=False)}")
        return UserError(f"{error}; {self.kept()}")

    def _names(self):
        return sorted(os.listdir(self.path)) if os.path.isdir(self.path) else []

    def run_files(self):
        """The files that make this folder hold a run: checkpoint, config.json, non-empty metrics files."""
        return [n for n in self._names() if n in (CHECKPOINT_NAME, CONFIG_NAME)
                or (n.endswith(".jsonl") and os.path.getsize(os.path.join(self.path, n)) > 0)]

    def recorded_step(self):
        """(step, num_iterations) that config.json reports, or None."""
        try:
            with open(os.path.join(self.path, CONFIG_NAME)) as f:
                config = json.load(f)
            return config["step"], config["num_iterations"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def check_fresh(self, overwrite):
        """A fresh run: refuse a folder that holds a run, unless overwrite (which `start` carries out)."""
        files = self.run_files()
        if not files or overwrite:
            return
        if CHECKPOINT_NAME in files:
            saved = self.recorded_step()
            at = f" (checkpoint at step {saved[0]} of {saved[1]})" if saved else ""
            raise UserError(f"{self.path} already holds a run{at}; continue it with --resume, or replace it with "
                            f"--overwrite=true (deletes its checkpoint and metrics), or pick another --model_tag/--output_dir")
        raise UserError(f"{self.path} already holds files of a run that has no checkpoint ({', '.join(files)}); replace "
                        f"them with --overwrite=true, or pick another --model_tag/--output_dir")

    def start(self, checkpoint=None, overwrite=False, keep_through=None):
        """Training really starts: clean crash debris, then replace (overwrite), repair and trim (resume,
        `checkpoint` given) or empty (fresh) the run's files. `keep_through` overrides, per metrics file
        name, the last step whose rows are kept on resume (default: the checkpoint's step)."""
        if checkpoint is not None:
            self.saved_step = checkpoint["loop"]["step"]
        if not self.master:
            return
        try:
            self._start(checkpoint, overwrite, keep_through)
        except WriteFailed as e:
            raise self.failed(e) from None

    def _start(self, checkpoint, overwrite, keep_through):
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise WriteFailed(self.path, e) from None
        if not self.lock.held:  # the folder did not exist at claim(): another process may have started a run since
            self.lock.acquire()
            if checkpoint is None:
                self.check_fresh(overwrite)
        self._remove_debris()
        if checkpoint is None:
            if overwrite:
                self._remove_run()
            for log in self.logs.values():
                log.reset()
            return
        self._repair_config(checkpoint)
        for name, log in self.logs.items():
            report = log.trim((keep_through or {}).get(name, self.saved_step))
            if report:
                print0(report)

    def _remove(self, names, what):
        sizes = []
        for name in names:
            path = os.path.join(self.path, name)
            try:
                size = os.path.getsize(path)
                os.remove(path)
            except OSError as e:
                raise WriteFailed(path, e, "remove") from None
            sizes.append(f"{name} ({size / 1e6:.1f} MB)" if size >= 1e5 else name)
        if sizes:
            print0(f"Removed {len(sizes)} {what} in {self.path}: {', '.join(sizes)}")

    def _remove_debris(self):
        self._remove([n for n in self._names() if TEMP_RE.match(n) and os.path.isfile(os.path.join(self.path, n))],
                     "file(s) left by an interrupted write")

    def _remove_run(self):
        saved = self.recorded_step()
        self._remove([n for n in self._names() if n in (CHECKPOINT_NAME, CONFIG_NAME) or n.endswith(".jsonl")],
                     "file(s) of the replaced run" + (f" (it was at step {saved[0]})" if saved else "") + " (--overwrite)")

    def _repair_config(self, checkpoint):
        """config.json must describe the checkpoint: a crash between the two writes leaves it one save behind."""
        config = checkpoint.get("config")
        if config is None:  # written before checkpoints carried their config.json
            return
        path = os.path.join(self.path, CONFIG_NAME)
        text = config_text(config)
        try:
            with open(path, "rb") as f:
                if f.read() == text:
                    return
        except OSError:
            pass
        before = self.recorded_step()
        atomic_write(path, lambda f: f.write(text))
        was = f"it described step {before[0]}" if before else "it was missing or unreadable"
        print0(f"Rewrote {path} from the checkpoint ({was}; the checkpoint is at step {checkpoint['loop']['step']})")
