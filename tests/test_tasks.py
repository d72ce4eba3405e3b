"""Our `*_local` tasks build exactly the requests of lm-eval's built-in tasks for the same
documents: same prompts, choices, targets, metrics. The built-in task is built from its own YAML
with only its data source swapped for ours, so any difference in prompts shows up here."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from conftest import TASKS
from lm_eval_layers.task_data import wikitext_pages

# (ours, built-in, split both evaluate). sciq: the built-in scores test, which is not local.
PAIRS = [
    ("arc_easy_local", "arc_easy", "test"),
    ("arc_challenge_local", "arc_challenge", "test"),
    ("piqa_local", "piqa", "validation"),
    ("boolq_local", "boolq", "validation"),
    ("winogrande_local", "winogrande", "validation"),
    ("openbookqa_local", "openbookqa", "test"),
    ("sciq_local", "sciq", "validation"),
    ("copa_local", "copa", "validation"),
    ("lambada_openai_local", "lambada_openai", "test"),
    ("wikitext_local", "wikitext", "test"),
    ("hellaswag_local", "hellaswag", "validation"),
    ("mmlu_local_anatomy", "mmlu_anatomy", "test"),
    ("mmlu_local_high_school_physics", "mmlu_high_school_physics", "test"),
    ("nq_open_local", "nq_open", "validation"),  # generate_until: its requests carry the generation kwargs
]
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
DATA_KEYS = {"custom_dataset", "dataset_kwargs", "dataset_path", "dataset_name", "task", "tag", "metadata", *SPLIT_KEYS}


@pytest.fixture(scope="module")
def manager() -> TaskManager:
    return TaskManager(include_path=str(TASKS))


def _config(manager: TaskManager, name: str) -> dict:
    entry = manager.task_index[name]
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    cfg.pop("tag", None)
    return cfg


def _requests(cfg: dict, num_fewshot: int = 0, limit: int = 12) -> list:
    task = ConfigurableTask(config={**cfg, "num_fewshot": num_fewshot})
    task.build_all_requests(limit=limit)
    return [(i.doc_id, i.idx, i.request_type, i.arguments) for i in task.instances]


def _pair_configs(manager: TaskManager, ours: str, builtin: str, split: str) -> tuple[dict, dict]:
    mine = _config(manager, ours)
    theirs = _config(manager, builtin)
    # Swap only the data source (and the split, where ours documents a different one).
    for key in SPLIT_KEYS:
        theirs.pop(key, None)
    theirs.update({k: mine[k] for k in SPLIT_KEYS if k in mine})
    theirs.update(custom_dataset=mine["custom_dataset"], dataset_kwargs=mine["dataset_kwargs"], task=ours)
    return mine, theirs


@pytest.fixture()
def extra_data(tmp_path, monkeypatch, local_data) -> Path:
    """The shared data plus small hub-schema files for hellaswag and MMLU (not in shared/)."""
    for child in local_data.iterdir():
        if child.is_dir():
            (tmp_path / child.name).symlink_to(child)
    rows = [
        {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
         "ctx": "A man is sitting on a roof. he", "endings": ["is using wrap to wrap a pair of skis.",
         "is ripping level tiles off.", "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
         "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val", "split_type": "indomain", "label": "3"},
        {"ind": 92, "activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.",
         "ctx_b": "the lady", "ctx": "...", "endings": ["swings and lands in her arms.", "pulls the barbell forward.",
         "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."],
         "source_id": "activitynet~v_-lJS58hyo1c", "split": "val", "split_type": "zeroshot", "label": "3"},
        {"ind": 5, "activity_label": "Home and Garden", "ctx_a": "[header] How to grow tomatoes [title] Choose a sunny spot.",
         "ctx_b": "", "ctx": "...", "endings": ["[step] Water daily.", "Plant them.", "Dig [substeps] deep.", "Wait."],
         "source_id": "wikihow~1", "split": "val", "split_type": "indomain", "label": "0"},
    ]
    _write(tmp_path / "hellaswag" / "validation.jsonl", rows)
    for subject in ("anatomy", "high_school_physics"):
        for split, n in (("test", 4), ("dev", 5)):
            _write(tmp_path / "mmlu" / subject / f"{split}.jsonl", [
                {"question": f" {subject} {split} question {i}? ", "subject": subject,
                 "choices": [f"option {c}{i}" for c in "abcd"], "answer": i % 4}
                for i in range(n)
            ])
    monkeypatch.setenv("LM_EVAL_LAYERS_DATA", str(tmp_path))
    return tmp_path


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("ours,builtin,split", PAIRS, ids=[p[0] for p in PAIRS])
def test_local_task_builds_the_builtin_requests(manager, extra_data, ours, builtin, split):
    mine, theirs = _pair_configs(manager, ours, builtin, split)
    assert mine.get("test_split", mine.get("validation_split")) == split
    assert mine["output_type"] == theirs["output_type"]
    assert mine.get("metric_list") == theirs.get("metric_list")
    got, expected = _requests(mine), _requests(theirs)
    assert got and got == expected


@pytest.mark.parametrize("ours,builtin", [p[:2] for p in PAIRS], ids=[p[0] for p in PAIRS])
def test_local_task_config_is_the_builtin_but_for_its_data(manager, ours, builtin):
    """Every key but the data source and splits is the built-in's: filters, stop sequences,
    metric options and delimiters too, which the requests alone do not show. Functions count as
    equal when their source is (ours import lm-eval's; the built-in YAML loads its own copy)."""
    def comparable(name: str) -> dict:
        cfg = _config(manager, name)
        return {k: inspect.getsource(v) if callable(v) else v for k, v in cfg.items() if k not in DATA_KEYS}

    assert comparable(ours) == comparable(builtin)


def test_nq_open_local_reads_the_local_questions_and_all_their_answers(manager, local_data):
    task = manager.load(["nq_open_local"])["tasks"]["nq_open_local"]
    (doc, *_) = task.validation_docs()
    assert doc["question"] == "when was the last time anyone was on the moon"
    assert task.doc_to_target(doc) == ["14 December 1972 UTC", "December 1972"]  # any accepted answer scores
    assert task.process_results(doc, ["December 1972"])["exact_match"] == 1.0
    assert task.process_results(doc, ["1969"])["exact_match"] == 0.0


def test_mmlu_few_shot_requests_match_the_builtin(manager, extra_data):
    mine, theirs = _pair_configs(manager, "mmlu_local_anatomy", "mmlu_anatomy", "test")
    assert mine["description"] == theirs["description"]
    got, expected = _requests(mine, num_fewshot=3), _requests(theirs, num_fewshot=3)
    assert got == expected
    assert "The following are multiple choice questions (with answers) about anatomy." in got[0][3][0]


def test_mmlu_local_group_has_all_57_subjects(manager):
    subjects = [t for t in manager.all_subtasks if t.startswith("mmlu_local_")]
    assert len(subjects) == 57
    for group in ("mmlu_local", "mmlu_local_stem", "mmlu_local_humanities", "mmlu_local_other", "mmlu_local_social_sciences"):
        assert group in manager.all_groups


def test_task_names_do_not_collide_with_builtins():
    ours = {p.stem for p in TASKS.glob("*.yaml")}
    builtin = set(TaskManager().all_tasks)
    assert ours and not ours & builtin


def test_boolq_local_rows_take_the_super_glue_schema(local_data):
    from lm_eval_layers.task_data import load

    ds = load("boolq", "aps/super_glue", "boolq")
    row = ds["validation"][0]
    assert set(row) == {"question", "passage", "idx", "label"} and row["label"] in (0, 1)


def test_wikitext_pages_split_at_first_level_headings():
    raw = " \n = A = \n \n text a \n = = Sub = = \n more \n = B = \n \n text b \n"
    pages = [p["page"] for p in wikitext_pages(raw)]
    assert len(pages) == 2
    assert pages[0].startswith(" = A = ") and "= = Sub = =" in pages[0] and "text b" not in pages[0]
    assert pages[1].startswith(" = B = ")


def test_local_wikitext_has_the_62_test_articles(local_data):
    pages = wikitext_pages((local_data / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8"))
    assert len(pages) == 62  # wikitext-2 test has 62 articles (EleutherAI/wikitext_document_level)


def test_missing_local_folder_is_a_clear_error(monkeypatch, tmp_path):
    from lm_eval_layers.task_data import load
    from lm_eval_layers.errors import DataError

    monkeypatch.setenv("LM_EVAL_LAYERS_DATA", str(tmp_path))
    with pytest.raises(DataError, match="has no folder 'piqa'"):
        load("piqa", "baber/piqa")


def test_unreachable_hub_is_a_clear_error(monkeypatch):
    """No local data and no network (the tests run with the hub offline): one line naming the fix."""
    from lm_eval_layers.task_data import ENV, load
    from lm_eval_layers.errors import DataError

    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(DataError, match=f"cannot reach the hub for baber/piqa; set {ENV}"):
        load("piqa", "baber/piqa")


def test_a_task_named_beside_its_group_is_one_clear_error(tmp_path, local_data):
    from lm_eval_layers.errors import TaskError
    from lm_eval_layers.task_suite import load_tasks, task_manager

    (tmp_path / "group.yaml").write_text("group: my_arc_group\ntask:\n  - arc_easy_local\n")
    manager = task_manager(tmp_path)
    with pytest.raises(TaskError, match="Duplicate task 'arc_easy_local'.*name each task once"):
        load_tasks(manager, ["arc_easy_local", "my_arc_group"])
    assert list(load_tasks(manager, ["my_arc_group"])) == ["arc_easy_local"]


def test_the_shipped_tasks_data_is_checked_before_any_model_loads(monkeypatch, tmp_path):
    """Each shipped task or group names its data folder; a missing folder, or no folder with the
    hub switched off, is one DataError naming the fix. Tasks that are not shipped are not judged."""
    from lm_eval_layers.errors import DataError
    from lm_eval_layers.task_data import ENV, check_sources
    from lm_eval_layers.task_suite import shipped_data_names

    assert shipped_data_names(["arc_easy_local", "mmlu_local", "mmlu_local_anatomy", "arc_easy", "nq_open_local"]) == [
        "arc_easy", "mmlu", "nq_open"]
    monkeypatch.setenv(ENV, str(tmp_path))
    (tmp_path / "arc_easy").mkdir()
    check_sources(["arc_easy"])
    with pytest.raises(DataError, match=f"{ENV}={tmp_path} has no folder 'mmlu'"):
        check_sources(["arc_easy", "mmlu"])
    monkeypatch.delenv(ENV)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=f"the arc_easy data needs {ENV}"):
        check_sources(["arc_easy"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    check_sources(["arc_easy"])  # the hub is allowed: nothing to refuse before trying it


@pytest.mark.slow
def test_stock_lm_eval_refuses_missing_task_data_before_loading_the_model(tiny_llama_dir, tmp_path):
    """`lm_eval --model layered` without the data variable and offline: one error line, exit 2,
    before any weight is read (it was a DataError traceback after loading and 5 hub retries)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "LM_EVAL_LAYERS_DATA"} | {"HF_HUB_OFFLINE": "1"}
    lm_eval = Path(sys.executable).with_name("lm_eval")
    proc = subprocess.run([str(lm_eval), "--model", "layered", "--model_args", f"pretrained={tiny_llama_dir},drop=1",
                           "--tasks", "arc_easy_local", "--include_path", str(TASKS), "--limit", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "LM_EVAL_LAYERS_DATA" in errors[0] and "Traceback" not in proc.stderr
    assert "Loading weights" not in proc.stderr
