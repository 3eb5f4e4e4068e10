"""What a run may write into: ``train.output_dir`` is new, empty, or (with ``--resume``) a run's own.

Before this check a fresh run into the folder of a run cut short before its first checkpoint appended its records
to that run's ``metrics.jsonl`` (a report then drew two runs as one curve); a folder of the user's own files got a
run written among them. (A finished run always holds its final checkpoint, which was refused already.)
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import list_checkpoints
from .errors import DistilleryError
from .locks import refuse_foreign

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "student", "checkpoints")  # what a run leaves
# also a run's own, but no run's record: the trained student tokenizer (student.tokenizer bpe:N, written when the
# run is set up and reused by it) and the file trackers' logs
RUN_AIDS = ("student_tokenizer", "logs")


def check_run_dir(out: Path, resume: bool) -> None:
    """No run writes over another: a fresh run needs a new or empty ``train.output_dir`` (an earlier run's
    ``metrics.jsonl`` would get its records appended, its student replaced); ``--resume`` needs one holding a run
    or nothing. A folder of other files is refused either way."""
    refuse_foreign(out, RUN_FILES + RUN_AIDS, "train.output_dir", "a run's")
    held = [n for n in RUN_FILES if (out / n).exists()]
    if resume or not held:
        return
    if list_checkpoints(out):
        raise DistilleryError(f"{out} already holds checkpoints: pass --resume to continue, or choose another train.output_dir")
    raise DistilleryError(f"{out} already holds a run ({', '.join(held)}) and no checkpoint to resume: choose another "
                          "train.output_dir, or pass --resume to run it again from step 0 in its place")
