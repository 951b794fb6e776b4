"""lm-evaluation-harness's `LM` over any expertkit composition (base, expert, merge, router, mixture, ...).

Requests are tokenized exactly as lm-eval's own `hf` model tokenizes them (the tokenizer's default special
tokens, trailing context spaces moved to the continuation, BOS or else EOS before an empty context, the
same left truncation), so the two agree request by request; scoring goes through `scoring.py`, the code
path of the scorecard, and generation through `decoding.py`, the one generation loop.
"""

from __future__ import annotations

import json
from pathlib import Path

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from expertkit.config import TASK_MODEL
from expertkit.errors import ExpertkitError
from expertkit.progress import progress_bar
from expertkit.runtime import Composition, SamplingParams, generate_ids
from expertkit.runtime.tokens import pad_id
from expertkit.scoring import continuation_log_probs, forward_key


class ExpertkitLM(TemplateLM):
    def __init__(self, composition: Composition, tokenizer, max_length: int, batch_size: int = TASK_MODEL.batch_size):
        super().__init__()
        if batch_size < 1:
            raise ExpertkitError(f"batch_size must be >= 1, got {batch_size}")
        self.composition, self.tokenizer = composition, tokenizer
        self._max_length, self.batch_size = max_length, batch_size

    @classmethod
    def from_library(cls, library: str | Path, model: str = "base", base: str | None = None,
                     device: str | None = None, batch_size: int = TASK_MODEL.batch_size) -> "ExpertkitLM":
        """The composition `model` of a library (an entry name or 'base') on its base model."""
        from expertkit.base import load_base
        from expertkit.compose import build_compositions
        from expertkit.library import Library
        from expertkit.runtime import ExpertPool

        library = Library(Path(library))
        base_path = base or library.base_identity()["name"]
        pool = ExpertPool(load_base(base_path, device), library, names=None if model == "base" else [model])
        (composition,) = build_compositions(pool, [model])
        return cls(composition, pool.tokenizer, pool.context_length or 2048, int(batch_size))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "ExpertkitLM":
        """`--model expertkit --model_args library=DIR,model=NAME[,base=DIR,device=cpu,batch_size=16]`."""
        args = lm_utils.simple_parse_args_string(arg_string)
        given = additional_config or {}  # lm-eval's own --device and --batch_size (model_args win over them)
        extra = {"device": given.get("device")}
        if isinstance(given.get("batch_size"), int):
            extra["batch_size"] = given["batch_size"]
        unknown = sorted(set(args) - {"library", "model", "base", "device", "batch_size"})
        if unknown or "library" not in args:
            raise ExpertkitError(f"expertkit model_args take library=DIR (required), model, base, device, "
                                 f"batch_size; got {sorted(args)}")
        return cls.from_library(**{**extra, **args})

    # ------------------------------------------------------------ tokenization, as lm-eval's hf model does it

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "expertkit").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:  # the tokenizer's default, unless the text already starts with BOS
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------ the three request types

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(request, context ids, continuation ids) -> (summed log-probability, greedy), longest first in batches."""
        rows = []
        for _, context, continuation in requests:  # the window lm-eval's hf model scores, left-truncated
            whole = (context + continuation)[-(self.max_length + 1):]
            split = max(1, len(whole) - len(continuation))  # a continuation longer than the window: its tail
            rows.append((whole[:split], whole[split:]))
        keys = [forward_key(row) for row in rows]
        order = sorted(range(len(rows)), key=lambda i: (-(len(rows[i][0]) + len(rows[i][1])), keys[i]))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        batches = _batches_of_forwards(order, keys, self.batch_size)
        with progress_bar(f"log-likelihoods ({self.composition.name})", len(batches),
                          disable=disable_tqdm) as advance:
            for batch in batches:
                scored = continuation_log_probs(self.composition, [rows[i] for i in batch], pad_id(self.tokenizer))
                for i, s in zip(batch, scored):
                    results[i] = (s.total, s.greedy)
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
                advance()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document in disjoint windows of the context length, as lm-eval's hf model scores it."""
        out = []
        for (text,) in [req.args for req in requests]:
            windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows], disable_tqdm=True)
            total = sum(score for score, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) continuations up to a stop string, EOS or max_gen_toks, batched per settings."""
        eos = self.tokenizer.decode([self.eot_token_id])
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        with progress_bar(f"generating ({self.composition.name})", len(requests), disable=disable_tqdm) as advance:
            for indices in groups.values():
                settings = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), TASK_MODEL.max_gen_toks)
                until = handle_stop_sequences(settings.get("until"), eos=eos)
                new_tokens = settings["max_gen_toks"]
                params = SamplingParams(max_new_tokens=new_tokens, temperature=float(settings.get("temperature") or 0),
                                        stop=tuple(until))
                room = self.max_length - new_tokens
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start:start + self.batch_size]
                    prompts = [self.tok_encode(requests[i].args[0])[-room:] for i in batch]
                    for i, text in zip(batch, generate_ids(self.composition, self.tokenizer, prompts, params)):
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    advance(len(batch))
        return out


def _batches_of_forwards(order: list[int], keys: list[tuple], size: int) -> list[list[int]]:
    """`order` cut into batches of at most `size` forwards: requests that share one (equal keys, adjacent in
    `order`) count once and stay in one batch."""
    batches: list[list[int]] = []
    forwards = size  # the first request opens a batch
    for i in order:
        if not batches or keys[i] != keys[batches[-1][-1]]:
            if forwards == size:
                batches.append([])
                forwards = 0
            forwards += 1
        batches[-1].append(i)
    return batches
