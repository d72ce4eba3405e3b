"""One training run: check everything, prepare plain weights, train with transformers' Trainer
(and PEFT for LoRA), write the output folder atomically.

Why the plain `Trainer` and not trl's `SFTTrainer`: response-only loss is a labelling question,
answered once in `data.py` for all four record formats (conversations rendered to
prompt/response spans by the model's own chat template). trl's `assistant_only_loss` needs
`{% generation %}` markers that most chat templates (SmolLM2's included) lack, and trl adds
dependencies without adding anything else this command uses. The Trainer still does all the
training: optimizer, schedule, gradient accumulation, checkpoints and resuming, data
parallelism under `torchrun` / `accelerate launch`.

Folders: everything in progress lives in `DIR.partial/` beside `--out DIR`: `checkpoints/`
(the Trainer's, which `--resume` continues from), `base/` and `teacher/` (plain fp32
safetensors of GGUF inputs: transformers can neither train nor save a GGUF-loaded model),
`run.json` (the options, so a resume with other options is refused) and `final/`, renamed to
DIR at the end, after which `DIR.partial/` is removed. Only the main process writes.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from transformers import TrainerCallback

from lm_eval_layers.arch import num_layers
from lm_eval_layers.checkpoint import PLAN_FILE
from lm_eval_layers.checkpoint.sources import Source, free_bytes, open_model
from lm_eval_layers.checkpoint.writer import base_model, write_variant
from lm_eval_layers.plan import LayerPlan
from lm_eval_layers.errors import UsageError
from lm_eval_layers.outputs import check_folder, swap_into_place
from lm_eval_layers.training import data as D
from lm_eval_layers.training import report
from lm_eval_layers.training.selection import Selection, freeze_all_but, lora_config, select_blocks, trainable, with_head

HEAL = {"lora": 8, "lora_alpha": 16.0, "lora_dropout": 0.05, "lr": 2e-4}  # --heal: LoRA on all blocks, merged
DEFAULT_LR = {"lora": 2e-4, "full": 1e-4}
RUN_FILE = "run.json"


@dataclass
class TrainOptions:
    """Everything `surgery train` takes; defaults are the command's defaults."""

    model: str
    data: str
    out: Path
    layers: str | None = None
    freeze_bottom: str | None = None
    new_blocks: bool = False
    head: bool = False  # also the output head, full weights
    layers_from: Path | None = None  # ila.json of `surgery ila`
    top: str | None = None  # share of its units, e.g. "30%"
    lora: int | None = None
    lora_alpha: float | None = None  # default: 2 × rank
    lora_dropout: float = 0.05
    heal: bool = False
    adapter_only: bool = False
    distill_from: str | None = None
    temperature: float = 2.0
    distill_weight: float = 1.0  # share of the KL term; the rest is the LM loss
    max_length: int = 512
    max_steps: int | None = None
    epochs: float | None = None
    lr: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    eval_fraction: float = 0.0
    dtype: str = "float32"
    save_steps: int = 50
    resume: bool = False
    force: bool = False
    callbacks: list[Any] = field(default_factory=list)  # extra TrainerCallbacks (tests, benchmarks)

    def check(self) -> None:
        """Option mistakes, caught before anything is read."""
        if self.head and (self.lora or self.heal):
            raise UsageError("--head trains the output head's full weights; it does not combine with --lora or --heal, drop one")
        if self.heal:
            if self.layers or self.freeze_bottom or self.new_blocks or self.layers_from:
                raise UsageError("--heal trains LoRA on all blocks; drop the selection or use --lora R with it instead")
            self.lora = self.lora or HEAL["lora"]
            self.lora_alpha = self.lora_alpha or HEAL["lora_alpha"]
        if self.adapter_only and not self.lora:
            raise UsageError("--adapter-only writes a LoRA adapter; add --lora R (or --heal)")
        checks = [
            (self.lora is not None and self.lora < 1, f"--lora {self.lora}: the rank must be a positive whole number, e.g. 8"),
            (self.max_steps is not None and self.epochs is not None, "--max-steps and --epochs are exclusive; give one"),
            (self.max_steps is not None and self.max_steps < 1, "--max-steps must be at least 1"),
            (self.epochs is not None and self.epochs <= 0, "--epochs must be positive"),
            (self.max_length < 2, "--max-length must be at least 2 tokens"),
            (self.batch_size < 1 or self.grad_accum < 1, "--batch-size and --grad-accum must be at least 1"),
            (not 0 <= self.eval_fraction < 1, f"--eval-fraction {self.eval_fraction} must be in [0, 1), e.g. 0.1"),
            (self.temperature <= 0, "--temperature must be positive, e.g. 2"),
            (not 0 <= self.distill_weight <= 1, "--distill-weight must be in [0, 1] (1: KL only, 0: LM loss only)"),
            (self.lr is not None and self.lr <= 0, "--lr must be positive"),
            (self.save_steps < 1, "--save-steps must be at least 1"),
            (self.dtype not in ("float32", "bfloat16", "float16"), f"--dtype {self.dtype}: use float32, bfloat16 or float16"),
            (self.dtype == "float16" and not torch.cuda.is_available(), "--dtype float16 trains with loss scaling on a GPU only; use float32 (or bfloat16) here"),
        ]
        for bad, message in checks:
            if bad:
                raise UsageError(message)

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return HEAL["lr"] if self.heal else DEFAULT_LR["lora" if self.lora else "full"]

    def recorded(self) -> dict[str, Any]:
        """The options that define a run (a resumed run must match them)."""
        skip = {"resume", "force", "callbacks"}
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k not in skip}


@dataclass(frozen=True)
class Work:
    """The work folder beside the output."""

    out: Path

    @property
    def root(self) -> Path:
        return self.out.with_name(self.out.name + ".partial")

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def last_checkpoint(self) -> str | None:
        """The newest complete checkpoint: the Trainer writes `trainer_state.json` last, so a
        run killed while saving leaves a folder without it, and the one before is used."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        if not self.checkpoints.is_dir():
            return None
        complete = [(int(p.name.rsplit("-", 1)[1]), p) for p in self.checkpoints.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                    if p.name.rsplit("-", 1)[1].isdigit() and (p / "trainer_state.json").is_file()]
        return str(max(complete)[1]) if complete else None


def check_paths(options: TrainOptions) -> Work:
    """The output and work folders: never overwrite without --force, resume only what exists."""
    model_dir = Path(options.model).expanduser()
    out = check_folder(options.out, options.force, inside=model_dir if model_dir.is_dir() else None)
    options.out = out
    work = Work(out)
    if options.resume:
        if not work.root.is_dir():
            raise UsageError(f"--resume: there is no interrupted run at {work.root}; start without --resume")
        saved = json.loads((work.root / RUN_FILE).read_text()) if (work.root / RUN_FILE).is_file() else None
        if saved is not None and saved != options.recorded():
            changed = sorted(k for k in saved if saved[k] != options.recorded().get(k))
            raise UsageError(f"--resume with other options than the interrupted run ({', '.join(changed)}); "
                             "use the same ones, or start over with --force and without --resume")
    elif work.root.exists() and not options.force:
        raise UsageError(f"{work.root} holds an interrupted run; continue it with --resume or start over with --force")
    return work


def plain_folder(source: Source, dest: Path) -> Path:
    """A folder transformers can train and save: the input's own, or GGUF dequantised to fp32
    safetensors by the writer `surgery prune` uses (the identity plan, tensor by tensor)."""
    if source.folder is not None:
        return Path(source.folder)
    if not (dest / "config.json").is_file():
        write_variant(source, LayerPlan.identity(num_layers(source.config)), dest, dtype=torch.float32, force=True,
                      metadata=False)
    return dest


def check_disk(options: TrainOptions, work: Work, source: Any, teacher: Any | None) -> None:
    """Refuse a run that cannot finish writing: the output, dequantised GGUF inputs (model and
    teacher), and the Trainer's checkpoints (two at a time while one replaces the other; full
    fine-tuning keeps weights plus Adam's two moments, LoRA only the adapter)."""
    from lm_eval_layers.checkpoint.sources import free_bytes

    def fp32(s: Any) -> int:
        return 4 * sum(info.nbytes // info.dtype.itemsize for info in s.infos.values())

    model = sum(info.nbytes for info in source.infos.values())
    checkpoints = 0.1 * fp32(source) if options.lora else 3 * fp32(source)
    dequantised = sum(fp32(s) for s in (source, teacher) if s is not None and s.folder is None)
    needed = model + dequantised + 2 * checkpoints
    folder = work.root.parent
    while not folder.exists():
        folder = folder.parent
    if free_bytes(folder) < needed:
        raise UsageError(
            f"not enough free disk space in {folder}: this run needs about {needed / 1e9:.1f} GB (output and checkpoints), "
            f"{free_bytes(folder) / 1e9:.1f} GB are free; free some space or choose another --out"
        )


def load_tokenizer(source: Any) -> Any:
    import transformers

    try:
        if source.folder is not None:
            return transformers.AutoTokenizer.from_pretrained(str(source.folder))
        return transformers.AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    except (OSError, ValueError) as e:
        raise UsageError(f"{source.name} has no usable tokenizer ({str(e).splitlines()[0][:120]}); add its tokenizer files") from None


def check_teacher_vocabulary(teacher: Any, student: Any, name: str) -> None:
    """KL between next-token distributions compares token ids, so both must mean the same tokens."""
    if teacher.get_vocab() != student.get_vocab():
        raise UsageError(f"--distill-from {name} has another tokenizer than the model; use a teacher with the same vocabulary")


def source_dtype(source: Any) -> torch.dtype:
    """The input's floating dtype (GGUF: float32): the output keeps it, so frozen tensors stay byte-identical."""
    floats = [info.dtype for info in source.infos.values() if info.dtype.is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


@torch.enable_grad()  # also when called from an inference (no-grad) context
def train(options: TrainOptions, console: Console) -> dict[str, Any] | None:
    """Run `surgery train`; returns the training log (None on processes other than the main one)."""
    from lm_eval_layers.checkpoint.sources import open_model

    options.check()
    work = check_paths(options)
    source = open_model(options.model)
    depth = num_layers(source.config)
    selection = select_blocks(depth, options.layers, options.freeze_bottom, options.new_blocks, source.folder,
                              options.layers_from, options.top, source.config.get("model_type"))
    if options.head:
        selection = with_head(selection)
    teacher_source = open_model(options.distill_from) if options.distill_from else None
    tokenizer = load_tokenizer(source)
    prepared = D.prepare(options.data, tokenizer, options.max_length)
    train_set, eval_set = D.split(prepared.examples, options.eval_fraction, options.seed)
    if len(train_set) < options.batch_size:
        raise UsageError(f"{len(train_set)} training examples are fewer than --batch-size {options.batch_size}; lower it")

    if teacher_source is not None:
        check_teacher_vocabulary(load_tokenizer(teacher_source), tokenizer, options.distill_from)
    check_disk(options, work, source, teacher_source)

    args = training_arguments(work.checkpoints, batch_size=options.batch_size, learning_rate=options.learning_rate,
                              seed=options.seed, max_steps=options.max_steps, epochs=options.epochs,
                              grad_accum=options.grad_accum, save_steps=options.save_steps, **mixed_precision(options.dtype))
    main = args.process_index == 0
    say = console.print if main else (lambda *a, **k: None)
    say(f"data: {prepared.describe()}; {len(train_set):,} for training, {len(eval_set):,} held out")
    say(f"training {selection.description} of {depth} ({'LoRA r=' + str(options.lora) if options.lora else 'full weights'})"
        + (f", distilling from {options.distill_from}" if options.distill_from else ""))
    _hint_s_strategy(source, options, say)

    try:
        with args.main_process_first(local=False):
            if main:
                if not options.resume:
                    shutil.rmtree(work.root, ignore_errors=True)  # --force: start over
                work.root.mkdir(parents=True, exist_ok=True)
                (work.root / RUN_FILE).write_text(json.dumps(options.recorded(), indent=2) + "\n")
            base = plain_folder(source, work.root / "base")
            teacher_dir = plain_folder(teacher_source, work.root / "teacher") if teacher_source else None
        log = _run(options, args, work, source, base, teacher_dir, tokenizer, selection, prepared.format, train_set, eval_set, console)
    except BaseException:
        if main and not options.resume and work.last_checkpoint() is None:
            shutil.rmtree(work.root, ignore_errors=True)
        elif main and work.root.exists():
            console.print(f"kept {work.root}: continue this run with --resume")
        raise
    return log


def _hint_s_strategy(source: Any, options: TrainOptions, say: Any) -> None:
    """Llama SLayer's S strategy also trains the new last block; say how when the plan suggests it."""
    plan_file = Path(source.folder) / PLAN_FILE if source.folder is not None else None
    if not (options.new_blocks and options.layers is None and plan_file and plan_file.is_file()):
        return
    plan = LayerPlan.from_dict(json.loads(plan_file.read_text())["plan"])
    if plan.num_layers - 1 in plan.dropped:
        say("note: the deepest blocks were dropped (S strategy); to train the new last block too, add --layers -1")


def training_arguments(output_dir: Path, *, batch_size: int, learning_rate: float, seed: int, max_steps: int | None = None,
                       epochs: float | None = None, grad_accum: int = 1, save_steps: int | None = None, **overrides: Any) -> Any:
    """The Trainer settings every run here shares (`surgery train`, both ILA stages): per-step
    logging for the progress bar and loss curves, no evaluation loop, CPU-aware process groups;
    `save_steps` None saves no checkpoints."""
    import transformers

    return transformers.TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=learning_rate,
        weight_decay=0.0,
        max_steps=max_steps or -1,
        num_train_epochs=epochs or 1.0,
        seed=seed,
        data_seed=seed,
        logging_steps=1,
        **({"save_strategy": "steps", "save_steps": save_steps, "save_total_limit": 1} if save_steps else {"save_strategy": "no"}),
        eval_strategy="no",
        use_cpu=not torch.cuda.is_available(),  # on CPU, also what makes torchrun form a gloo group
        report_to="none",
        disable_tqdm=True,
        log_level="warning",
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        **overrides,
    )


def mixed_precision(dtype: str) -> dict[str, bool]:
    """bfloat16/float16 runs compute under the Trainer's autocast while the trained tensors stay
    float32 (`float32_masters`): an optimizer stepping bf16 weights rounds small updates away,
    and fp16 ones overflow without loss scaling."""
    return {"bf16": dtype == "bfloat16", "fp16": dtype == "float16"}


def float32_masters(model: torch.nn.Module) -> None:
    """Trainable tensors in float32, frozen ones in the training dtype (a tied tensor stays tied:
    the parameter object is kept, only its data changes)."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def _run(options: TrainOptions, args: Any, work: Work, source: Any, base: Path, teacher_dir: Path | None, tokenizer: Any,
         selection: Selection, fmt: D.RecordFormat, train_set: list, eval_set: list, console: Console) -> dict[str, Any] | None:
    import transformers
    from transformers.trainer_callback import PrinterCallback

    from lm_eval_layers.arch import layout_for

    dtype = getattr(torch, options.dtype)
    transformers.set_seed(options.seed)  # LoRA's initialisation draws from it
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    layout = layout_for(model)
    lora = None
    if options.lora:
        from peft import get_peft_model

        config = lora_config(model, layout, selection, options.lora, options.lora_alpha or 2.0 * options.lora, options.lora_dropout)
        model = get_peft_model(model, config)
        lora = {"r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
                "target_modules": sorted(config.target_modules), "layers_to_transform": config.layers_to_transform}
    else:
        freeze_all_but(model, layout, selection)
    float32_masters(model)
    count, total, names = trainable(model)

    kwargs: dict[str, Any] = dict(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set or None,
        data_collator=D.Collator(D.pad_id(tokenizer)), callbacks=[OptimizerHoldsSelection(), *options.callbacks],
    )
    if teacher_dir is not None:
        from lm_eval_layers.training.distill import DistillTrainer

        teacher = transformers.AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=dtype)
        trainer = DistillTrainer(**kwargs, teacher=teacher, temperature=options.temperature, weight=options.distill_weight)
    else:
        trainer = transformers.Trainer(**kwargs)
    trainer.remove_callback(PrinterCallback)
    main = trainer.is_world_process_zero()
    if main:
        trainer.add_callback(report.ProgressBar(console))

    resume_from = work.last_checkpoint() if options.resume else None
    if options.resume and resume_from is None and main:
        console.print(f"no checkpoint in {work.checkpoints} yet: starting from step 0")
    before = trainer.evaluate()["eval_loss"] if eval_set else None
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    after = trainer.evaluate()["eval_loss"] if eval_set else None
    if not main:
        return None

    state = trainer.state
    tokens = state.num_input_tokens_seen
    session_tokens = tokens - getattr(trainer, "_initial_num_input_tokens_seen", 0)  # tokens of earlier sessions (resume)
    log = {
        "model": options.model, "data": options.data, "format": fmt.value, "out": str(options.out),
        "selection": selection.description, "blocks": list(selection.blocks), "head": selection.head,
        "matrices": [f"{b}.{rel}" for b, rel in selection.matrices],
        "method": ("LoRA" if lora else "full") + (" + distillation" if teacher_dir else ""),
        "adapter_only": options.adapter_only, "lora": lora,
        "distill": {"teacher": options.distill_from, "temperature": options.temperature, "weight": options.distill_weight}
        if teacher_dir else None,
        "trainable_parameters": count, "total_parameters": total, "trainable_names": names,
        "train_examples": len(train_set), "eval_examples": len(eval_set),
        "steps": state.global_step, "epochs": state.epoch, "tokens": tokens, "world_size": args.world_size,
        "wall_seconds": seconds, "tokens_per_second": session_tokens / max(seconds, 1e-9),
        "seconds_per_step": seconds / max(state.global_step - _start_step(resume_from), 1),
        "resumed_from_step": _start_step(resume_from), "train_loss": result.training_loss,
        "eval_loss_before": before, "eval_loss": after, "learning_rate": options.learning_rate, "dtype": options.dtype,
        "loss_curve": report.loss_curve(state.log_history), "options": options.recorded(),
    }
    write_output(options, work, trainer.model, base, tokenizer, source, log)
    console.print(report.summary(log, options.out))
    return log


def _start_step(checkpoint: str | None) -> int:
    return int(checkpoint.rsplit("-", 1)[1]) if checkpoint else 0


class OptimizerHoldsSelection(TrainerCallback):
    """Re-checks, once the optimizer exists, that it holds exactly the trainable parameters
    (frameworks that freeze after building it silently train frozen ones)."""

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        wanted = {id(p) for p in model.parameters() if p.requires_grad}
        if held != wanted:
            raise RuntimeError(f"the optimizer holds {len(held)} tensors but {len(wanted)} are trainable")


def output_model(trained: Any, base: Path, dtype: torch.dtype, lora: bool) -> Any:
    """The input model with what trained put in: a fresh load of the input in its own dtype, so
    every tensor that did not train keeps its exact bytes whatever dtype training ran in, and a
    LoRA adapter is merged into the input's own weights."""
    import copy

    import transformers

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


def write_output(options: TrainOptions, work: Work, model: Any, base: Path, tokenizer: Any, source: Any, log: dict[str, Any]) -> None:
    """The final folder, written inside the work folder and then renamed to --out."""
    from lm_eval_layers.checkpoint.writer import base_model

    final = work.root / "final"
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir()
    if options.adapter_only:
        adapter = model.peft_config["default"]
        local = source.folder is not None and source.name == str(source.folder)  # a hub id or alias stays as given
        adapter.base_model_name_or_path = str(Path(source.folder).resolve()) if local else source.name
        model.save_pretrained(str(final))
    else:
        output_model(model, base, source_dtype(source), bool(log["lora"])).save_pretrained(str(final))
    tokenizer.save_pretrained(str(final))
    report.write_log(final, log)
    report.plot(final, log)
    report.model_card(final, log, base_model(source))
    swap_into_place(final, options.out)
    shutil.rmtree(work.root, ignore_errors=True)
