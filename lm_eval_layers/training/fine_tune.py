"""`surgery train` as a library call: check everything, prepare plain weights, train with
transformers' Trainer (and PEFT for LoRA), write the output folder atomically (`work`).

    from lm_eval_layers.training.fine_tune import fine_tune
    from lm_eval_layers.training.train_settings import TrainSettings
    log = fine_tune(TrainSettings(model="pruned", data="sft.jsonl", out=Path("healed"), heal=True), Reporter(print))
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from transformers.trainer_callback import PrinterCallback

from lm_eval_layers.arch import layout_for, num_layers
from lm_eval_layers.checkpoint import PLAN_FILE
from lm_eval_layers.checkpoint.sources import Source, load_tokenizer, open_model
from lm_eval_layers.checkpoint.writer import base_model
from lm_eval_layers.compat.trainer_state import session_tokens
from lm_eval_layers.errors import UsageError
from lm_eval_layers.plan import LayerPlan
from lm_eval_layers.training import examples as D
from lm_eval_layers.training import run_report
from lm_eval_layers.training.selection import Selection, freeze_all_but, lora_config, select_blocks, trainable, with_head
from lm_eval_layers.training.train_settings import TrainSettings
from lm_eval_layers.training.trainer import (
    OptimizerHoldsSelection, float32_masters, loss_curve, plain_folder, training_arguments,
)
from lm_eval_layers.training.reporter import Reporter
from lm_eval_layers.training.work import Work


@torch.enable_grad()  # also when called from an inference (no-grad) context
def fine_tune(settings: TrainSettings, reporter: Reporter = Reporter()) -> dict[str, Any] | None:
    """Train what `settings` selects and write the output folder; returns the training log
    (None on processes other than the main one, which alone writes). `reporter` hears what
    happens (the main process only)."""
    settings = settings.resolved()
    work = Work.check(settings)
    source = open_model(settings.model)
    depth = num_layers(source.config)
    selection = select_blocks(depth, settings.layers, settings.freeze_bottom, settings.new_blocks, source.folder,
                              settings.layers_from, settings.top, source.config.get("model_type"))
    if settings.head:
        selection = with_head(selection)
    teacher_source = open_model(settings.distill_from) if settings.distill_from else None
    tokenizer = load_tokenizer(source)
    prepared = D.prepare(settings.data, tokenizer, settings.max_length)
    train_set, eval_set = D.split(prepared.examples, settings.eval_fraction, settings.seed)
    if len(train_set) < settings.batch_size:
        raise UsageError(f"{len(train_set)} training examples are fewer than --batch-size {settings.batch_size}; lower it")
    if teacher_source is not None:
        check_teacher_vocabulary(load_tokenizer(teacher_source), tokenizer, settings.distill_from)
    work.check_disk(settings, source, teacher_source)

    args = training_arguments(work.checkpoints, batch_size=settings.batch_size, learning_rate=settings.lr, seed=settings.seed,
                              dtype=settings.dtype, max_steps=settings.max_steps, epochs=settings.epochs,
                              grad_accum=settings.grad_accum, save_steps=settings.save_steps)
    main = args.process_index == 0
    reporter = reporter if main else Reporter()
    say = reporter.say
    say(f"data: {prepared.describe()}; {len(train_set):,} for training, {len(eval_set):,} held out")
    say(f"training {selection.description} of {depth} ({'LoRA r=' + str(settings.lora) if settings.lora else 'full weights'})"
        + (f", distilling from {settings.distill_from}" if settings.distill_from else ""))
    _hint_s_strategy(source, settings, say)

    try:
        with args.main_process_first(local=False):
            if main:
                work.start(settings)
            base = plain_folder(source, work.root / "base")
            teacher_dir = plain_folder(teacher_source, work.root / "teacher") if teacher_source else None
        log = _train_and_write(settings, args, work, source, base, teacher_dir, tokenizer, selection, prepared.format,
                               train_set, eval_set, reporter)
    except BaseException:
        if main:
            work.abandon(settings.resume, say)
        raise
    return log


def check_teacher_vocabulary(teacher: Any, student: Any, name: str) -> None:
    """KL between next-token distributions compares token ids, so both must mean the same tokens."""
    if teacher.get_vocab() != student.get_vocab():
        raise UsageError(f"--distill-from {name} has another tokenizer than the model; use a teacher with the same vocabulary")


def _hint_s_strategy(source: Source, settings: TrainSettings, say: Callable[..., None]) -> None:
    """Llama SLayer's S strategy also trains the new last block; say how when the plan suggests it."""
    plan_file = Path(source.folder) / PLAN_FILE if source.folder is not None else None
    if not (settings.new_blocks and settings.layers is None and plan_file and plan_file.is_file()):
        return
    plan = LayerPlan.from_dict(json.loads(plan_file.read_text())["plan"])
    if plan.num_layers - 1 in plan.dropped:
        say("note: the deepest blocks were dropped (S strategy); to train the new last block too, add --layers -1")


def _trainable_model(settings: TrainSettings, base: Path, selection: Selection) -> tuple[Any, dict[str, Any] | None]:
    """The plain input loaded with only the selection trainable: LoRA adapters on it (and their
    settings, for the log) or every other tensor frozen; trained tensors kept in float32."""
    transformers.set_seed(settings.seed)  # LoRA's initialisation draws from it
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=settings.dtype.torch)
    layout = layout_for(model)
    lora = None
    if settings.lora:
        from peft import get_peft_model

        config = lora_config(model, layout, selection, settings.lora, settings.lora_alpha, settings.lora_dropout)
        model = get_peft_model(model, config)
        lora = {"r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
                "target_modules": sorted(config.target_modules), "layers_to_transform": config.layers_to_transform}
    else:
        freeze_all_but(model, layout, selection)
    float32_masters(model)
    return model, lora


def _trainer(settings: TrainSettings, args: Any, model: Any, teacher_dir: Path | None, tokenizer: Any, train_set: list,
             eval_set: list) -> transformers.Trainer:
    """transformers' Trainer, or with a teacher the distilling one, without its printed log (the
    reporter's callbacks say what it would)."""
    kwargs: dict[str, Any] = dict(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set or None,
        data_collator=D.Collator(D.pad_id(tokenizer)), callbacks=[OptimizerHoldsSelection(), *settings.callbacks],
    )
    if teacher_dir is not None:
        from lm_eval_layers.training.distill import DistillTrainer

        teacher = transformers.AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=settings.dtype.torch)
        trainer = DistillTrainer(**kwargs, teacher=teacher, temperature=settings.temperature, weight=settings.distill_weight)
    else:
        trainer = transformers.Trainer(**kwargs)
    trainer.remove_callback(PrinterCallback)
    return trainer


def _train_and_write(settings: TrainSettings, args: Any, work: Work, source: Source, base: Path, teacher_dir: Path | None,
                     tokenizer: Any, selection: Selection, fmt: D.RecordFormat, train_set: list, eval_set: list,
                     reporter: Reporter) -> dict[str, Any] | None:
    """Load, train, and (main process) write the output; returns the log."""
    model, lora = _trainable_model(settings, base, selection)
    count, total, names = trainable(model)
    trainer = _trainer(settings, args, model, teacher_dir, tokenizer, train_set, eval_set)
    main = trainer.is_world_process_zero()
    if main:
        for callback in reporter.callbacks():
            trainer.add_callback(callback)

    resume_from = work.last_checkpoint() if settings.resume else None
    if settings.resume and resume_from is None and main:
        reporter.say(f"no checkpoint in {work.checkpoints} yet: starting from step 0")
    before = trainer.evaluate()["eval_loss"] if eval_set else None
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    after = trainer.evaluate()["eval_loss"] if eval_set else None
    if not main:
        return None

    state = trainer.state
    tokens = state.num_input_tokens_seen
    session = session_tokens(trainer)  # without earlier sessions of a resumed run
    log = {
        "model": settings.model, "data": settings.data, "format": fmt.value, "out": str(settings.out),
        "selection": selection.description, "blocks": list(selection.blocks), "head": selection.head,
        "matrices": [f"{b}.{rel}" for b, rel in selection.matrices],
        "method": ("LoRA" if lora else "full") + (" + distillation" if teacher_dir else ""),
        "adapter_only": settings.adapter_only, "lora": lora,
        "distill": {"teacher": settings.distill_from, "temperature": settings.temperature, "weight": settings.distill_weight}
        if teacher_dir else None,
        "trainable_parameters": count, "total_parameters": total, "trainable_names": names,
        "train_examples": len(train_set), "eval_examples": len(eval_set),
        "steps": state.global_step, "epochs": state.epoch, "tokens": tokens, "world_size": args.world_size,
        "wall_seconds": seconds, "tokens_per_second": session / max(seconds, 1e-9),
        "seconds_per_step": seconds / max(state.global_step - _start_step(resume_from), 1),
        "resumed_from_step": _start_step(resume_from), "train_loss": result.training_loss,
        "eval_loss_before": before, "eval_loss": after, "learning_rate": settings.lr, "dtype": settings.dtype.value,
        "loss_curve": loss_curve(state.log_history), "options": settings.recorded(),
    }
    write_output(settings, work, trainer.model, base, tokenizer, source, log)
    reporter.say(run_report.summary(log, settings.out))
    return log


def _start_step(checkpoint: str | None) -> int:
    return int(checkpoint.rsplit("-", 1)[1]) if checkpoint else 0


def source_dtype(source: Source) -> torch.dtype:
    """The input's floating dtype (GGUF: float32): the output keeps it, so frozen tensors stay byte-identical."""
    floats = [info.dtype for info in source.infos.values() if info.dtype.is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


def output_model(trained: Any, base: Path, dtype: torch.dtype, lora: bool) -> Any:
    """The input model with what trained put in: a fresh load of the input in its own dtype, so
    every tensor that did not train keeps its exact bytes whatever dtype training ran in, and a
    LoRA adapter is merged into the input's own weights."""
    fresh = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    if lora:
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        adapted = get_peft_model(fresh, copy.deepcopy(trained.peft_config["default"]))
        set_peft_model_state_dict(adapted, get_peft_model_state_dict(trained))
        return adapted.merge_and_unload()
    params = dict(fresh.named_parameters())
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if p.requires_grad:
                params[name].copy_(p.detach())  # to the input's device and dtype
    return fresh


def write_output(settings: TrainSettings, work: Work, model: Any, base: Path, tokenizer: Any, source: Source,
                 log: dict[str, Any]) -> None:
    """The final folder, written inside the work folder and then put in place as --out."""
    final = work.final
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir()
    if settings.adapter_only:
        adapter = model.peft_config["default"]
        local = source.folder is not None and source.name == str(source.folder)  # a hub id or alias stays as given
        adapter.base_model_name_or_path = str(Path(source.folder).resolve()) if local else source.name
        model.save_pretrained(str(final))
    else:
        output_model(model, base, source_dtype(source), bool(log["lora"])).save_pretrained(str(final))
    tokenizer.save_pretrained(str(final))
    run_report.write_log(final, log)
    run_report.plot(final, log)
    run_report.model_card(final, log, base_model(source))
    _usual_modes(final, run_report.LOG_FILE)
    work.finish()


def _usual_modes(folder: Path, reference: str) -> None:
    """transformers writes the weights through a private temporary file (mode 0600); give every
    file the mode a plain write gets here (0666 less the umask, as `surgery prune` writes)."""
    mode = (folder / reference).stat().st_mode & 0o777
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(mode)
