"""The serve suite's llama.cpp rows: the library exported with `expertkit export gguf`, run by llama-cpp-python.

- agreement: each (expert, prompt) is continued greedily for NEW_TOKENS tokens by PEFT alone (the served
  answers equal these: the suite's exactness check); llama.cpp, given the base GGUF and the expert's
  exported adapter, reads prompt + continuation and we count the positions where its top-1 next token is
  the one expertkit chose (teacher-forced, so one early difference does not cascade). Twice: on the base
  dequantized to F32 (the weights expertkit runs: any difference is the export's), and on the base's own
  quantized GGUF (where llama.cpp also quantizes activations to 8 bits for its matmuls).
- throughput, greedy NEW_TOKENS tokens, 2 threads each, one side at a time: 1 request, and MIXED requests
  spread over the 4 experts. llama.cpp cannot batch requests whose adapters differ; its fastest fair set-up
  here is one model per adapter (the base file is mapped once, shared by the OS), requests one after
  another (two at once would only split the 2 cores), weight repacking off (see `_no_repack`).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

MIXED = 16
AGREEMENT_PROMPTS = 16
AGREEMENT_TARGET = 0.99
THREADS = 2


def available() -> str | None:
    """None when the rows can run, else why not (said in the table)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (pip install -e '.[llamacpp]')"
    return None


@contextmanager
def _no_repack():
    """llama.cpp's `--no-repack` (model param use_extra_bufts=false), which llama-cpp-python does not expose.

    On these machines llama.cpp repacks the quantized base for AMX and then segfaults in the first decode
    (the CPU has AMX; the sandbox's kernel does not let it be used); without repacking it runs.
    """
    import llama_cpp.llama as module

    default = module.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    module.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        module.llama_cpp.llama_model_default_params = default


def _llama(export: Path, expert: str, logits_all: bool = False):
    import llama_cpp

    with _no_repack():
        return llama_cpp.Llama(str(export / "base.gguf"), lora_path=str(export / f"{expert}.gguf"), n_ctx=512,
                               n_threads=THREADS, n_threads_batch=THREADS, logits_all=logits_all, verbose=False)


def agreement(export: Path, continuations: list[tuple[str, list[int], list[int]]]) -> dict:
    """Share of positions where llama.cpp's top-1 equals expertkit's greedy token."""
    import numpy as np

    matched = total = 0
    models = {}
    for expert, prompt_ids, generated in continuations:
        llm = models.setdefault(expert, _llama(export, expert, logits_all=True))
        llm.reset()
        ids = prompt_ids + generated[:-1]
        llm.eval(ids)
        predicted = np.asarray(llm.scores[len(prompt_ids) - 1:len(ids)]).argmax(-1)
        matched += int((predicted == np.asarray(generated)).sum())
        total += len(generated)
    for llm in models.values():
        llm.close()
    return {"positions": total, "agreeing": matched, "agreement": round(matched / total, 4)}


def llamacpp_tok_s(export: Path, requests: list[tuple[str, list[int]]], new_tokens: int) -> dict:
    """Greedy `new_tokens` per request (EOS not a stop), one request after another, one model per adapter."""
    models = {expert: _llama(export, expert) for expert in dict.fromkeys(e for e, _ in requests)}
    models[requests[0][0]].generate(requests[0][1][:4], temp=0.0).__next__()  # warm-up: pages the weights in
    start = time.perf_counter()
    for expert, prompt_ids in requests:
        for produced, _ in enumerate(models[expert].generate(prompt_ids, temp=0.0), start=1):
            if produced == new_tokens:
                break
    wall = time.perf_counter() - start
    for llm in models.values():
        llm.close()
    return {"requests": len(requests), "wall_s": round(wall, 2),
            "tok_s": round(len(requests) * new_tokens / wall, 1)}


def llamacpp_rows(library, url: str, requests: list[tuple[str, str]], new_tokens: int, solo_ids) -> dict:
    """The llama.cpp side by side against the running expertkit server at `url`."""
    from serve import _load
    from transformers import AutoTokenizer

    from expertkit.encoding import encode_texts
    from expertkit.gguf_export import BASE_TYPES, export_gguf

    tokenizer = AutoTokenizer.from_pretrained(library.base_identity()["name"])
    checked = requests[:AGREEMENT_PROMPTS]
    continuations = [(e, p, g) for (e, _), (p, g) in zip(checked, solo_ids(library, checked))]
    with tempfile.TemporaryDirectory(prefix="expertkit-gguf-export-") as tmp:
        exports = {kind: export_gguf(library.root, Path(tmp) / kind, base_type=kind).out_dir for kind in BASE_TYPES}
        agree = {kind: agreement(export, continuations) for kind, export in exports.items()}
        ids = [(e, encode_texts(tokenizer, [p])[0]) for e, p in requests[:MIXED]]
        theirs = {"single": llamacpp_tok_s(exports["source"], ids[:1], new_tokens),
                  "mixed16": llamacpp_tok_s(exports["source"], ids, new_tokens)}
    ours = {"single": asyncio.run(_load(url, requests[:1])), "mixed16": asyncio.run(_load(url, requests[:MIXED]))}
    for row in ours.values():
        row.pop("texts")
    return {"agreement": agree, "expertkit": ours, "llamacpp": theirs,
            "llamacpp_agreement": agree["f32"]["agreement"],
            "llamacpp_agreement_quantized_base": agree["source"]["agreement"],
            "single_ratio": round(ours["single"]["tok_s"] / theirs["single"]["tok_s"], 3),
            "mixed16_ratio": round(ours["mixed16"]["tok_s"] / theirs["mixed16"]["tok_s"], 3),
            "setup": "llama.cpp: the base's own quantized GGUF, one model per adapter, requests one after "
                     f"another, {THREADS} threads; expertkit: one server, continuous batching"}
