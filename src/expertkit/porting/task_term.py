"""The compatible refresh's term on a domain's labeled task: keep the old expert's right answers.

The token term (compatible_loss) keeps the old expert's right next-token guesses on domain text, yet what a
user checks is answers, and an answer is a choice among a few continuations, scored by their summed
log-probability (lm-eval's acc). This term matches the new expert's distribution over the choices to the old
expert's, KL(old || new), on the task's validation examples where the old expert chose the gold answer
(MUSCLE's mask, at the level of answers). The port report counts flips on the test examples only, which this
term never sees (tasks.local.rows_of_split).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from expertkit.progress import console
from expertkit.runtime.hf_cache import cache_keyword, returned_cache
from expertkit.tasks.local import SPLIT_FIELD

TUNE_SPLIT, MEASURE_SPLIT = "valid", "test"  # the labeled rows the term trains on; the rows the report counts on


@dataclass(frozen=True)
class ChoiceExample:
    """One labeled question as token ids: the context, each choice's continuation, the gold choice."""

    context: tuple[int, ...]
    choices: tuple[tuple[int, ...], ...]
    gold: int


def validation_choices(domain: str, tokenizer, max_length: int, tasks_data: Path | None) -> tuple[str | None, list]:
    """(task, its validation examples) of the shipped labeled task that measures `domain`: (None, []) when the
    domain has none or no data folder is found; (task, []) when its file does not split its rows into valid and
    test."""
    from expertkit.tasks.local import default_data_root, domain_tasks, resolve

    task = domain_tasks({domain}).get(domain)
    root = tasks_data or default_data_root()
    if task is None or root is None:
        return None, []
    (spec,) = resolve([task], root)
    return task, choice_examples(spec, tokenizer, max_length, TUNE_SPLIT)


def choice_examples(spec: dict, tokenizer, max_length: int, split: str) -> list[ChoiceExample]:
    """The task's rows of `split`, tokenized as the evaluation tokenizes them (tasks.lm, lm-eval's own rules);
    none when its rows do not name their split (then they may be the very rows the report measures on)."""
    from expertkit.tasks.lm import ExpertkitLM
    from expertkit.tasks.local import rows_of_split
    from expertkit.tasks.run import task_manager

    (task,) = task_manager([spec]).load([spec])["tasks"].values()
    docs = task.dataset[task.config.test_split]
    if SPLIT_FIELD not in docs.column_names:
        return []
    encoder = ExpertkitLM(None, tokenizer, max_length)  # only its tokenization is used
    examples = []
    for doc in rows_of_split(docs, split):
        pairs = [encoder._encode_pair(task.doc_to_text(doc), f"{task.config.target_delimiter}{choice}")
                 for choice in task.doc_to_choice(doc)]
        choices = tuple(tuple(continuation) for _, continuation in pairs)
        room = max_length + 1 - max(map(len, choices))  # the window the evaluation scores, left-truncated
        examples.append(ChoiceExample(tuple(pairs[0][0][-room:]), choices, int(task.doc_to_target(doc))))
    return examples


def choice_log_probs(model, example: ChoiceExample, device) -> torch.Tensor:
    """Each choice's summed log-probability after the context (what acc compares), differentiable: one forward
    of the shared context, then one of every choice's tokens but the last, on a copy of its cache per choice."""
    context = torch.tensor([example.context], device=device)
    out = model(input_ids=context, use_cache=True)
    first = out.logits[0, -1].float().log_softmax(-1)
    scores = torch.stack([first[choice[0]] for choice in example.choices])
    longest = max(map(len, example.choices))
    if longest == 1:
        return scores
    n = len(example.choices)
    cache = returned_cache(out)
    cache.batch_repeat_interleave(n)
    inputs = torch.zeros(n, longest - 1, dtype=torch.long, device=device)
    mask = torch.zeros(n, context.shape[1] + longest - 1, dtype=torch.long, device=device)
    mask[:, :context.shape[1]] = 1
    for i, choice in enumerate(example.choices):
        inputs[i, :len(choice) - 1] = torch.tensor(choice[:-1], device=device)
        mask[i, context.shape[1]:context.shape[1] + len(choice) - 1] = 1
    positions = torch.arange(context.shape[1], context.shape[1] + longest - 1, device=device).expand(n, -1)
    logits = model(input_ids=inputs, attention_mask=mask, position_ids=positions,
                   **{cache_keyword(model): cache}).logits
    later = logits.float().log_softmax(-1)
    rest = [later[i, torch.arange(len(choice) - 1, device=device), torch.tensor(choice[1:], device=device)].sum()
            if len(choice) > 1 else later.new_zeros(()) for i, choice in enumerate(example.choices)]
    return scores + torch.stack(rest)


class ChoiceDistillation:
    """Mean KL(old || new) over the choices of `per_step` examples a call, taken in a seeded order that cycles
    through the examples the old expert (`teacher`) answered right; its choice distributions are computed once."""

    def __init__(self, teacher, examples: list[ChoiceExample], device, per_step: int, seed: int):
        with torch.no_grad():
            old = [choice_log_probs(teacher, example, device).log_softmax(-1) for example in examples]
        self.kept = [(example, o) for example, o in zip(examples, old) if int(o.argmax()) == example.gold]
        self.per_step = per_step
        self.order = torch.randperm(len(self.kept), generator=torch.Generator().manual_seed(seed)).tolist()
        self.position = 0
        console.print(f"compatible refresh: the old expert answers {len(self.kept)} of {len(examples)} validation "
                      "questions right; the refresh keeps those answers", highlight=False)

    def __call__(self, model, device) -> torch.Tensor | None:
        if not self.kept:
            return None
        terms = []
        for _ in range(self.per_step):
            example, old = self.kept[self.order[self.position % len(self.order)]]
            self.position += 1
            new = choice_log_probs(model, example, device).log_softmax(-1)
            terms.append(F.kl_div(new, old, log_target=True, reduction="sum"))
        return torch.stack(terms).mean()
