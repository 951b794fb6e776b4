"""The task files of ../shared as lm-eval tasks: six general benchmarks and the labeled domain tasks.

The lm-eval YAML of each ships in `configs/`; its `data_files` names a file, which is looked up under a
data root (`../shared` beside the project, or `--tasks-data`) and checked line by line before lm-eval
sees it, so a broken file is one clear error rather than a traceback from inside lm-eval.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections import Counter
from pathlib import Path

import yaml

from expertkit.errors import ExpertkitError

CONFIGS = Path(__file__).parent / "configs"
SUFFIX = "_local"  # lm-eval names of the shipped tasks: arc_easy_local ...
GENERAL = "general"
SPLIT_FIELD = "split"  # a labeled domain file's rows name the corpus split of their text: valid or test
FIELD = re.compile(r"{{\s*(\w+)\s*}}")


def local_tasks() -> dict[str, dict]:
    """{short name: lm-eval config} of the shipped tasks (arc_easy, ..., pubmedqa, agnews)."""
    out = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        out[config["task"].removesuffix(SUFFIX)] = config
    return out


def task_kind(config: dict) -> str:
    """'general', or the domain whose skill the task measures (medical, news)."""
    return config["metadata"]["expertkit_kind"]


def task_kinds() -> dict[str, str]:
    """{short name: kind} of the shipped tasks: which are general, and which domain each other one measures."""
    return {name: task_kind(config) for name, config in local_tasks().items()}


def domain_tasks(domains: set[str]) -> dict[str, str]:
    """domain -> the shipped labeled task that measures it (medical: pubmedqa, news: agnews)."""
    return {task_kind(config): name for name, config in local_tasks().items()
            if task_kind(config) != GENERAL and task_kind(config) in domains}


def default_data_root() -> Path | None:
    """$EXPERTKIT_SHARED, else the `shared` folder beside this checkout, when there is one."""
    if os.environ.get("EXPERTKIT_SHARED"):
        return Path(os.environ["EXPERTKIT_SHARED"]).expanduser()
    beside = Path(__file__).resolve().parents[4] / "shared"
    return beside if beside.is_dir() else None


def data_file(config: dict, root: Path) -> Path:
    name = config["dataset_kwargs"]["data_files"]["test"]
    kind = task_kind(config)
    return root / "tasks" / name if kind == GENERAL else root / "corpora" / kind / name


def resolve(names: list[str], root: Path | None, split: str | None = None) -> list[str | dict]:
    """Task names -> lm-eval task specs: shipped ones (and the groups general, domain, all) as configs over
    the checked local files; any other name is passed to lm-eval as it is (its data must be reachable).
    `split`: a shipped file whose rows name their split keeps only that split's rows (see rows_of_split)."""
    shipped = local_tasks()
    groups = {"general": [n for n, c in shipped.items() if task_kind(c) == GENERAL],
              "domain": [n for n, c in shipped.items() if task_kind(c) != GENERAL], "all": list(shipped)}
    wanted = list(dict.fromkeys(n for name in names for n in groups.get(name, [name])))
    specs: list[str | dict] = []
    for name in wanted:
        if name not in shipped:
            specs.append(name)
            continue
        if root is None:
            raise ExpertkitError(f"task '{name}' reads its data from a 'shared' folder, and none was found; pass "
                                 "--tasks-data DIR (the folder holding tasks/ and corpora/)")
        config = json.loads(json.dumps(shipped[name]))
        path = data_file(config, root)
        check_task_file(path, config)
        config["dataset_kwargs"]["data_files"]["test"] = str(path)
        if split is not None:
            config["process_docs"] = functools.partial(rows_of_split, split=split)
        specs.append(config)
    return specs


def rows_of_split(docs, split: str):
    """The rows of `docs` (a datasets.Dataset) whose SPLIT_FIELD is `split`: a labeled file that spans the
    valid and test text keeps one part for what is tuned on it and the other for measuring. A file without
    that field is all one split: every row."""
    if SPLIT_FIELD not in docs.column_names:
        return docs
    return docs.filter(lambda row: row[SPLIT_FIELD] == split)


def check_task_file(path: Path, config: dict) -> None:
    """Every line a JSON object with the fields the prompt uses and a label that names one of the choices."""
    if not path.is_file():
        raise ExpertkitError(f"task file {path} not found; pass --tasks-data DIR (the folder holding tasks/ and "
                             "corpora/)")
    fields = set(FIELD.findall(config["doc_to_text"]))
    fixed = config["doc_to_choice"] if isinstance(config["doc_to_choice"], list) else None
    lines = path.read_text(encoding="utf-8").splitlines()
    if not any(line.strip() for line in lines):
        raise ExpertkitError(f"task file {path} is empty")
    for number, line in enumerate(lines, 1):
        if line.strip():
            _check_row(f"{path}:{number}", line, fields, fixed)


def _check_row(where: str, line: str, fields: set[str], fixed: list[str] | None) -> None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ExpertkitError(f"{where}: invalid JSON ({e.msg}); one JSON object per line") from None
    if not isinstance(row, dict):
        raise ExpertkitError(f"{where}: expected a JSON object")
    missing = sorted((fields | {"label"} | (set() if fixed else {"choices"})) - set(row))
    if missing:
        raise ExpertkitError(f"{where}: missing field(s) {missing}")
    label = row["label"]
    if fixed is not None:
        if label not in fixed:
            raise ExpertkitError(f"{where}: label {label!r} is not one of {fixed}")
        return
    choices = row["choices"]
    if not isinstance(choices, list) or not choices:
        raise ExpertkitError(f"{where}: 'choices' must be a non-empty list")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise ExpertkitError(f"{where}: label {label!r} is out of range for {len(choices)} choices (0.."
                             f"{len(choices) - 1})")


def reference_scores(specs: list, limit: int | None = None) -> dict[str, dict]:
    """{task: {"chance", "most_frequent", "most_frequent_answer"}} for the shipped tasks among `specs`, over the
    examples lm-eval scores (the first `limit`): what guessing, and always giving the one most frequent answer,
    would score. A labeled task whose classes are uneven (PubMedQA's "yes") is read against the second."""
    out = {}
    for spec in specs:
        if not isinstance(spec, dict):
            continue  # a task lm-eval names: its data is lm-eval's own
        path = Path(spec["dataset_kwargs"]["data_files"]["test"])
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:limit]
        fixed = spec["doc_to_choice"] if isinstance(spec["doc_to_choice"], list) else None
        answer, count = Counter(row["label"] for row in rows).most_common(1)[0]
        out[spec["task"].removesuffix(SUFFIX)] = {
            "chance": sum(1 / len(fixed or row["choices"]) for row in rows) / len(rows),
            "most_frequent": count / len(rows),
            "most_frequent_answer": answer if fixed else f"choice index {answer}"}
    return out
