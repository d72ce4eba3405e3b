"""The folders of a `surgery train` run: the output `--out DIR` and the work folder
`DIR.partial/` beside it, which holds everything in progress: `checkpoints/` (the Trainer's,
which `--resume` continues from), `base/` and `teacher/` (plain fp32 safetensors of GGUF inputs:
transformers can neither train nor save a GGUF-loaded model), `run.json` (the options, so a
resume with other options is refused) and `final/`, put in place as DIR at the end, after which
`DIR.partial/` is removed. Only the main process writes."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


from lm_eval_layers.checkpoint import sources
from lm_eval_layers.errors import UsageError
from lm_eval_layers.outputs import check_folder, swap_into_place, write_json
from lm_eval_layers.training.train_settings import TrainSettings

RUN_FILE = "run.json"


@dataclass(frozen=True)
class Work:
    """The output folder and the work folder beside it."""

    out: Path

    @classmethod
    def check(cls, settings: TrainSettings) -> Work:
        """Never overwrite without --force, resume only what exists and with the same options."""
        model_dir = Path(settings.model).expanduser()
        work = cls(check_folder(settings.out, settings.force, inside=model_dir if model_dir.is_dir() else None))
        saved_file = work.root / RUN_FILE
        if settings.resume:
            if not work.root.is_dir():
                raise UsageError(f"--resume: there is no interrupted run at {work.root}; start without --resume")
            saved = json.loads(saved_file.read_text()) if saved_file.is_file() else None
            recorded = settings.recorded()
            if saved is not None and saved != recorded:
                changed = sorted(k for k in saved if saved[k] != recorded.get(k))
                raise UsageError(f"--resume with other options than the interrupted run ({', '.join(changed)}); "
                                 "use the same ones, or start over with --force and without --resume")
        elif work.root.exists() and not settings.force:
            raise UsageError(f"{work.root} holds an interrupted run; continue it with --resume or start over with --force")
        return work

    @property
    def root(self) -> Path:
        return self.out.with_name(self.out.name + ".partial")

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:
        return self.root / "final"

    def last_checkpoint(self) -> str | None:
        """The newest complete checkpoint: the Trainer writes `trainer_state.json` last, so a
        run killed while saving leaves a folder without it, and the one before is used."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        if not self.checkpoints.is_dir():
            return None
        complete = [(int(p.name.rsplit("-", 1)[1]), p) for p in self.checkpoints.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                    if p.name.rsplit("-", 1)[1].isdigit() and (p / "trainer_state.json").is_file()]
        return str(max(complete)[1]) if complete else None

    def check_disk(self, settings: TrainSettings, source: sources.Source, teacher: sources.Source | None) -> None:
        """Refuse a run that cannot finish writing: the output, dequantised GGUF inputs (model and
        teacher), and the Trainer's checkpoints (two at a time while one replaces the other; full
        fine-tuning keeps weights plus Adam's two moments, LoRA only the adapter)."""

        def fp32(s: sources.Source) -> int:
            return 4 * sum(info.nbytes // info.dtype.itemsize for info in s.infos.values())

        model = sum(info.nbytes for info in source.infos.values())
        checkpoints = 0.1 * fp32(source) if settings.lora else 3 * fp32(source)
        dequantised = sum(fp32(s) for s in (source, teacher) if s is not None and s.folder is None)
        needed = model + dequantised + 2 * checkpoints
        folder = self.root.parent
        while not folder.exists():
            folder = folder.parent
        free = sources.free_bytes(folder)
        if free < needed:
            raise UsageError(
                f"not enough free disk space in {folder}: this run needs about {needed / 1e9:.1f} GB (output and checkpoints), "
                f"{free / 1e9:.1f} GB are free; free some space or choose another --out"
            )

    def start(self, settings: TrainSettings) -> None:
        """A fresh work folder (--force discards an interrupted one), or the interrupted one on --resume."""
        if not settings.resume:
            shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.root / RUN_FILE, settings.recorded())

    def abandon(self, resume: bool, say: Callable[[str], None]) -> None:
        """After a failure or Ctrl-C: keep a run that has a checkpoint to resume from, remove the rest."""
        if not resume and self.last_checkpoint() is None:
            shutil.rmtree(self.root, ignore_errors=True)
        elif self.root.exists():
            say(f"kept {self.root}: continue this run with --resume")

    def finish(self) -> None:
        """Put `final/` in place as the output and remove the work folder."""
        swap_into_place(self.final, self.out)
        shutil.rmtree(self.root, ignore_errors=True)
