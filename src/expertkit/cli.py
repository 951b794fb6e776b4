"""The `expertkit` command: thin wrappers over the library functions.

A user error (ExpertkitError) prints one line and exits 1; no traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from expertkit.compose.collaborate import STRATEGIES
from expertkit.config import GenerateOptions, ServeOptions
from expertkit.errors import ExpertkitError
from expertkit.executors.base import EXECUTORS
from expertkit.merging.methods import METHODS
from expertkit.progress import console
from expertkit.routing.base import ROUTERS

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Turn one causal LM into a library of LoRA domain experts; compose, measure and serve them.")
base_app = typer.Typer(no_args_is_help=True, help="Build or inspect the base model.")
library_app = typer.Typer(no_args_is_help=True, help="Inspect an expert library.")
app.add_typer(base_app, name="base")
app.add_typer(library_app, name="library")

ConfigArg = typer.Argument(..., help="project YAML (base, domains, training, library)")
ExecutorOpt = typer.Option("local", "--executor", help=f"where the jobs run: {EXECUTORS.listing()} (local: here, "
                                                       "one after another)")
AddressOpt = typer.Option(None, "--address", help="Ray cluster address (host:6379, ray://host:10001, auto); "
                                                  "default: start Ray on this machine")
CpusOpt = typer.Option(None, "--cpus-per-job", help="Ray: CPUs (= torch threads) per job (default 1)")
GpusOpt = typer.Option(None, "--gpus-per-job", help="Ray: GPUs per job (default 0)")
TokenMapOpt = typer.Option(None, help="with --small, when the two vocabularies differ: 'text' (the default: the "
                                      "small model reads the large one's text), 'vocab' (map shared token strings) "
                                      "or a JSON file {large id: small id}")


def _setup():
    from expertkit.quiet import quiet_libraries

    quiet_libraries()


def _executor(name: str, address: Optional[str], cpus: Optional[float], gpus: Optional[float]):
    """The chosen executor, connected and checked before any model is loaded."""
    from expertkit.executors import get_executor

    return get_executor(name, address=address, cpus_per_job=cpus, gpus_per_job=gpus)


@base_app.command("build")
def base_build(config: Path = ConfigArg, force: bool = typer.Option(False, help="rebuild even if it exists"),
               device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ...")):
    """Train a byte-level BPE tokenizer and pretrain the tiny Llama base described in base.build."""
    _setup()
    from expertkit.build import build_base
    from expertkit.config import load_config

    out = build_base(load_config(config), device=device, force=force)
    console.print(f"base model: {out}")


@base_app.command("import")
def base_import(gguf: Path = typer.Argument(..., help="a llama.cpp .gguf model file"),
                out_dir: Path = typer.Argument(..., help="the Hugging Face model dir to write"),
                dtype: str = typer.Option("float32", help="weight dtype: float32, bfloat16 or float16"),
                force: bool = typer.Option(False, help="replace OUT_DIR if it exists and is not empty")):
    """Convert a GGUF file into a standard HF model dir (safetensors, config, tokenizer, chat template)."""
    _setup()
    from expertkit.gguf_import import import_gguf

    out = import_gguf(gguf, out_dir, dtype=dtype, force=force)
    console.print(f"base model: {out}")


def _distill_option(field: str, what: str):
    """An optional `base distill` option whose help shows config.DistillConfig's default."""
    from expertkit.config import DistillConfig

    return typer.Option(None, help=f"{what} (default {DistillConfig.model_fields[field].default})")


@base_app.command("distill")
def base_distill(teacher: str = typer.Option(..., help="the large model: its HF model dir"),
                 out: Path = typer.Option(..., help="the companion's model dir to write"),
                 text: Path = typer.Option(..., help="text to distill on: a text file, or a folder of them (files "
                                                     "named train/valid/test are used as given)"),
                 init: Optional[str] = _distill_option("init", "how the companion starts: teacher (a cut of the "
                                                       "teacher) or embedding (random layers)"),
                 layers: Optional[int] = _distill_option("num_layers", "companion layers"),
                 hidden: Optional[int] = _distill_option("hidden_size", "companion width"),
                 intermediate: Optional[int] = _distill_option("intermediate_size", "companion MLP width"),
                 heads: Optional[int] = _distill_option("num_heads", "attention heads with --init embedding"),
                 steps: Optional[int] = _distill_option("steps", "training steps"),
                 batch_size: Optional[int] = _distill_option("batch_size", "blocks per step"),
                 block_size: Optional[int] = _distill_option("block_size", "tokens per block"),
                 learning_rate: Optional[float] = _distill_option("learning_rate", "peak learning rate"),
                 top_k: Optional[int] = _distill_option("top_k", "teacher tokens per position in the loss"),
                 device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ..."),
                 force: bool = typer.Option(False, help="replace OUT if it already holds a model")):
    """Distill a small companion with the teacher's tokenizer (for proxy-tuning and the other collaborations)."""
    _setup()
    from expertkit.config import DistillConfig, format_validation_error
    from expertkit.distill import distill
    from pydantic import ValidationError

    given = {"init": init, "num_layers": layers, "hidden_size": hidden, "intermediate_size": intermediate,
             "num_heads": heads,
             "steps": steps, "batch_size": batch_size, "block_size": block_size, "learning_rate": learning_rate,
             "top_k": top_k}
    try:
        config = DistillConfig(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        raise ExpertkitError(format_validation_error(e, "base distill options")) from None
    report = distill(teacher, text, out, config, device=device, force=force)
    console.print(f"companion: {out} ({report['companion_params'] / 1e6:.1f}M parameters, "
                  f"{report['param_ratio']:.1%} of the teacher); perplexity on the text's test split: companion "
                  f"{report['companion_ppl']:.2f}, teacher {report['teacher_ppl']:.2f}")


@app.command()
def train(config: Path = ConfigArg,
          only: Optional[list[str]] = typer.Option(None, help="train just these domains (repeatable)"),
          force: bool = typer.Option(False, help="retrain experts that are already in the library"),
          device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ..."),
          executor: str = ExecutorOpt, address: Optional[str] = AddressOpt,
          cpus_per_job: Optional[float] = CpusOpt, gpus_per_job: Optional[float] = GpusOpt,
          federated: bool = typer.Option(False, help="train the domains that list silos, each across its silos "
                                                     "(Flower; only LoRA updates leave a silo)"),
          engine: str = typer.Option("flower", help="--federated: 'flower' (Flower's Simulation Runtime on Ray, one "
                                                    "virtual SuperNode per silo) or 'local' (this process)")):
    """Train one LoRA expert per domain (skipping finished ones; resuming interrupted ones)."""
    _setup()
    from expertkit.train import train_all
    from expertkit.workflow import load_project_base, run_federated

    if federated:
        if executor != "local" or address is not None:
            raise ExpertkitError("--federated runs the silos with --engine (flower or local); "
                                 "drop --executor/--address")
        cfg, base = load_project_base(config, device)
        for entry in run_federated(cfg, base, only=only, force=force, engine=engine):
            console.print(f"federated expert '{entry.name}' -> {entry.path}")
        return
    with _executor(executor, address, cpus_per_job, gpus_per_job) as runner:
        cfg, base = load_project_base(config, device)
        for entry in train_all(cfg, base, only=only, force=force, executor=runner):
            console.print(f"expert '{entry.name}' -> {entry.path}")


@app.command("eval")
def evaluate(config: Path = ConfigArg,
             out: Optional[Path] = typer.Option(None, help="report folder (default: beside the library)"),
             tasks: Optional[str] = typer.Option(None, help="task accuracy instead of perplexity: comma-separated "
                                                            "lm-eval tasks; shipped: general, domain, all, arc_easy, "
                                                            "..., pubmedqa, agnews"),
             model: Optional[list[str]] = typer.Option(None, help="just these compositions (repeatable; "
                                                                  "default: base and every library entry)"),
             limit: Optional[int] = typer.Option(None, min=1, help="--tasks: at most this many examples per task"),
             tasks_data: Optional[Path] = typer.Option(None, help="--tasks: the folder holding tasks/ and corpora/ "
                                                                  "(default: ../shared beside the project)"),
             small: Optional[Path] = typer.Option(None, help="a small model steering this one (its project YAML or "
                                                              "library): score its collaborations too, e.g. "
                                                              "proxy:EXPERT, fusion"),
             token_map: Optional[str] = TokenMapOpt,
             device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ..."),
             executor: str = ExecutorOpt, address: Optional[str] = AddressOpt,
             cpus_per_job: Optional[float] = CpusOpt, gpus_per_job: Optional[float] = GpusOpt):
    """Perplexity of the base and every library entry on every domain's test split (or, with --tasks, accuracy)."""
    _setup()
    from expertkit.workflow import load_project_base, run_scorecard, run_task_scorecard

    if tasks is not None:
        if small is not None:
            raise ExpertkitError("--small scores collaborations by perplexity; task accuracy of a collaboration "
                                 "is not wired yet: drop --tasks or --small")
        cfg, base = load_project_base(config, device, build_missing=False)
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        if not names:
            raise ExpertkitError("--tasks names no task; give e.g. --tasks general,domain")
        run_task_scorecard(cfg, base, names, out, names=model, limit=limit, data_root=tasks_data)
        return
    if token_map is not None and small is None:
        raise ExpertkitError("--token-map aligns a small model's vocabulary with this one; add --small SMALL")
    with _executor(executor, address, cpus_per_job, gpus_per_job) as runner:
        cfg, base = load_project_base(config, device, build_missing=False)
        run_scorecard(cfg, base, out, names=model, executor=runner, small=small, token_map=token_map)


def _option_from(options, name: str, **limits):
    """A CLI option whose default and help come from a config.py options model (defaults live there only)."""
    field = options.model_fields[name]
    return typer.Option(field.default, help=field.description, **limits)


@app.command()
def generate(config: Path = ConfigArg, prompt: str = typer.Argument(..., help="text to continue"),
             model: str = typer.Option("base", help="'base' or a library entry name; with --small, a collaboration "
                                                    f"spec, STRATEGY:EXPERT or fusion ({STRATEGIES.listing()})"),
             max_tokens: int = _option_from(GenerateOptions, "max_tokens", min=0),
             temperature: float = _option_from(GenerateOptions, "temperature", min=0.0),
             top_p: float = _option_from(GenerateOptions, "top_p"), seed: int = _option_from(GenerateOptions, "seed"),
             stop: Optional[list[str]] = typer.Option(None, help="stop string (repeatable)"),
             small: Optional[Path] = typer.Option(None, help="a small model steering this one: its project YAML "
                                                              "or its library folder"),
             alpha: Optional[float] = typer.Option(None, help="proxy/fusion: strength of the small expert's shift"),
             threshold: Optional[float] = typer.Option(None, help="defer: entropy (nats) above which a token goes "
                                                                  "to the large model; card: relevance gate"),
             token_map: Optional[str] = TokenMapOpt,
             device: Optional[str] = typer.Option(None)):
    """Continue a prompt with one composition (or a small expert steering this model, with --small)."""
    _setup()
    from expertkit.compose import build_compositions
    from expertkit.library import Library
    from expertkit.runtime import ExpertPool, SamplingParams, decoding
    from expertkit.workflow import load_project_base

    params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                            stop=tuple(stop or ()))
    cfg, base = load_project_base(config, device, build_missing=False)
    if small is None:
        if alpha is not None or threshold is not None or token_map is not None:
            raise ExpertkitError("--alpha, --threshold and --token-map steer a collaboration; add --small SMALL")
        pool = ExpertPool(base, Library(cfg.library), names=None if model == "base" else [model])
        (composition,) = build_compositions(pool, [model])
        context = pool.context_length
    else:
        from expertkit.compose.collaborate import build_collaboration, load_small_pool

        large, small_pool = ExpertPool(base), load_small_pool(small, device)
        composition = build_collaboration(model, large, small_pool, alpha=alpha, threshold=threshold,
                                          token_map=token_map)
        context = min(filter(None, [large.context_length, small_pool.context_length]), default=None)
    text = decoding.generate(composition, base.tokenizer, [prompt], params, context_length=context)[0]
    typer.echo(prompt + text)
    for key, value in composition.stats().items():
        console.print(f"{key}: {value:.3g}" if isinstance(value, float) else f"{key}: {value}", highlight=False)


@app.command()
def merge(config: Path = ConfigArg,
          expert: Optional[list[str]] = typer.Option(None, help="expert to merge (repeatable; default: all experts)"),
          method: Optional[str] = typer.Option(None, help=f"{METHODS.listing()} (default: linear)"),
          weight: Optional[list[float]] = typer.Option(None, help="one per --expert, in order (default: equal)"),
          lam: Optional[float] = typer.Option(None, "--lambda", help="scale of the merged task vector"),
          density: Optional[float] = typer.Option(None, help="share of each ΔW kept (TIES, DARE, pruning, "
                                                             "breadcrumbs)"),
          gamma: Optional[float] = typer.Option(None, help="breadcrumbs: share of the largest entries removed"),
          normalize: Optional[bool] = typer.Option(None, "--normalize/--no-normalize",
                                                   help="divide by the sum of the weights (default: mergekit's "
                                                        "for the method)"),
          seed: Optional[int] = typer.Option(None, help="DARE's random drop (and --search's)"),
          rank: Optional[int] = typer.Option(None, help="rank of the merged adapter (default: the smallest "
                                                        "within --max-error)"),
          max_error: Optional[float] = typer.Option(None, help="largest relative reconstruction error of the "
                                                               "stored adapter; beyond full rank, a full model"),
          output: str = typer.Option("adapter", help="adapter (LoRA) or model (full HF model)"),
          name: Optional[str] = typer.Option(None, help="library entry name (default: merge-<method>)"),
          search: bool = typer.Option(False, "--search", help="choose method and parameters on validation data"),
          budget: float = typer.Option(300.0, help="--search time budget in seconds"),
          force: bool = typer.Option(False, help="overwrite an entry of the same name"),
          device: Optional[str] = typer.Option(None),
          executor: str = typer.Option("local", "--executor", help=f"where --search trials run: "
                                                                    f"{EXECUTORS.listing()}"),
          address: Optional[str] = AddressOpt, cpus_per_job: Optional[float] = CpusOpt,
          gpus_per_job: Optional[float] = GpusOpt):
    """Merge experts into one LoRA adapter or one full model (exact ΔW-space merges)."""
    _setup()
    from expertkit.library import Library
    from expertkit.merging import describe_storage, make_recipe, merge_experts
    from expertkit.runtime import ExpertPool
    from expertkit.workflow import expert_names, load_project_base, run_merge_search

    chosen = {"method": method, "weight": weight, "lambda": lam, "density": density, "gamma": gamma,
              "normalize": normalize}
    storage = {"rank": rank, "max_error": max_error}
    if search:
        given = [f"--{k}" for k, v in chosen.items() if v is not None]
        if given:
            raise ExpertkitError(f"--search chooses the method and its parameters itself; drop {', '.join(given)} "
                                 "(or merge without --search)")
        with _executor(executor, address, cpus_per_job, gpus_per_job) as runner:
            cfg, base = load_project_base(config, device, build_missing=False)
            run_merge_search(cfg, base, expert, name or "merge-searched", budget, output,
                             **({"seed": seed} if seed is not None else {}), overwrite=force, executor=runner,
                             **storage)
        return
    if executor != "local" or address:
        raise ExpertkitError("--executor and --address apply to `merge --search` only (one merge is one job)")
    cfg, base = load_project_base(config, device, build_missing=False)
    library = Library(cfg.library)
    pool = ExpertPool(base, library)
    given = {"method": method, "weights": weight or None, "lambda": lam, "density": density, "gamma": gamma,
             "normalize": normalize, "seed": seed, **storage}
    recipe = make_recipe(experts=expert_names(pool, expert), output=output,
                         **{k: v for k, v in given.items() if v is not None})
    entry, report = merge_experts(pool, library, recipe, name or f"merge-{recipe.method}", overwrite=force)
    console.print(describe_storage(report, report["modules"]), highlight=False)
    console.print(f"{entry.kind} '{entry.name}' -> {entry.path}")


@library_app.command("list")
def library_list(library: Path = typer.Argument(..., help="library folder")):
    """Show the base the library belongs to and every entry with its metrics."""
    from rich.table import Table

    from expertkit.library import Library

    lib = Library(library)
    ident = lib.base_identity()
    console.print(f"library {lib.root}  base '{ident['name']}' (weights {ident['weights_hash']}, "
                  f"tokenizer {ident['tokenizer_hash']})")
    table = Table("name", "kind", "domain", "steps", "valid ppl", "path")
    for e in lib.entries():
        valid = e.manifest.get("metrics", {}).get("valid_ppl")
        table.add_row(e.name, e.kind, e.domain or "-", str(e.manifest.get("steps", "-")),
                      f"{valid:.2f}" if valid else "-", str(e.path))
    console.print(table)


@app.command()
def demo(workdir: Path = typer.Option(Path("expertkit-demo"), help="where data, base, library and report go"),
         tiny: bool = typer.Option(False, help="a tiny base pretrained here instead of SmolLM2-135M-Instruct"),
         device: Optional[str] = typer.Option(None)):
    """End-to-end run on text that ships with Python: SmolLM2 -> 2 experts -> scorecard -> answers side by side."""
    _setup()
    from expertkit.demo import run_demo

    run_demo(workdir, device, tiny=tiny)


router_app = typer.Typer(no_args_is_help=True, help="Routers: pick one expert (or the base) per prompt.")
mixture_app = typer.Typer(no_args_is_help=True, help="Token-level mixtures of experts (BTM/DEMix ensembles).")
app.add_typer(router_app, name="router")
app.add_typer(mixture_app, name="mixture")


@router_app.command("train")
def router_train(config: Path = ConfigArg,
                 kind: str = typer.Option(..., help=ROUTERS.listing()),
                 name: Optional[str] = typer.Option(None, help="library entry name (default: router-<kind>)"),
                 abstain_rate: Optional[float] = typer.Option(
                     None, min=0.0, max=0.99, help="share of validation prompts sent to the base (default: config)"),
                 force: bool = typer.Option(False, help="overwrite a router of the same name"),
                 device: Optional[str] = typer.Option(None)):
    """Train a router on the library's domain data and calibrate when it abstains to the base."""
    _setup()
    from expertkit.workflow import load_project_base, run_router_train

    cfg, base = load_project_base(config, device, build_missing=False)
    run_router_train(cfg, base, kind, name or f"router-{kind}", abstain_rate, overwrite=force)


@app.command()
def route(config: Path = ConfigArg, text: str = typer.Argument(..., help="the prompt to route"),
          router: Optional[str] = typer.Option(None, help="router name (default: the library's only router)"),
          device: Optional[str] = typer.Option(None)):
    """Print which expert (or the base) a router picks for a prompt, and its probabilities."""
    _setup()
    from expertkit.workflow import load_project_base, route_text

    cfg, base = load_project_base(config, device, build_missing=False)
    calibrated, routing = route_text(cfg, base, text, router)
    typer.echo(f"choice: {routing.chosen[0]}")
    for label, p in zip(routing.labels, routing.probabilities[0].tolist()):
        typer.echo(f"  {label:<20} {p:.4f}")
    typer.echo(f"(router '{calibrated.name}', abstains to base when no expert reaches {calibrated.threshold:.3f})")


@mixture_app.command("add")
def mixture_add(config: Path = ConfigArg, name: str = typer.Option("mixture", help="library entry name"),
                expert: Optional[list[str]] = typer.Option(None, help="expert to mix (repeatable; default: all)"),
                top_k: Optional[int] = typer.Option(None, min=1, help="components mixed per token (default: all)"),
                base: bool = typer.Option(True, "--base/--no-base", help="the base is a component too"),
                force: bool = typer.Option(False, help="overwrite a mixture of the same name")):
    """Add a token-level mixture to the library; the scorecard and `generate --model NAME` then use it."""
    from expertkit.compose.mix import add_mixture
    from expertkit.config import MixtureConfig, load_config
    from expertkit.library import Library

    spec = MixtureConfig(experts=expert or None, include_base=base, top_k=top_k)
    entry = add_mixture(Library(load_config(config).library), name, spec, overwrite=force)
    console.print(f"mixture '{entry.name}' of {entry.manifest['experts']}"
                  + (" + base" if base else "") + f" -> {entry.path}", highlight=False)


@app.command()
def port(source: Path = typer.Argument(..., help="the project YAML whose library to carry (its data refreshes the "
                                                 "experts, retrains routers and measures the report), or a "
                                                 "library folder (training-free port only)"),
         to: str = typer.Option(..., "--to", help="the updated base: a HF model dir (or a hub id while online)"),
         out: Path = typer.Option(..., "--out", help="the new library folder to write (must not exist)"),
         refresh: int = typer.Option(0, help="continue training each ported expert this many steps on the new "
                                             "base, with replay (0: training-free port only)"),
         compatible: bool = typer.Option(False, help="with --refresh: also match the old expert where it was "
                                                     "right (MUSCLE), to cut negative flips"),
         answers: bool = typer.Option(True, "--answers/--tokens-only", help="with --compatible: also keep the old "
                                      "expert's right answers on the validation questions of the domain's labeled "
                                      "task, or match its next-token guesses only"),
         retrained: Optional[Path] = typer.Option(None, help="a library of the same experts trained from scratch "
                                                             "on the new base, compared against in the report"),
         task_examples: Optional[int] = typer.Option(None, min=0, help="examples of each domain's labeled task "
                                                                       "for the flip rates (0: none)"),
         tasks_data: Optional[Path] = typer.Option(None, help="the folder holding tasks/ and corpora/ (default: "
                                                              "../shared beside the project)"),
         device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ...")):
    """Carry a library's experts to an updated base (PortLLM), optionally refresh them, and report what changed."""
    _setup()
    from expertkit.config import port_options
    from expertkit.workflow import run_port

    options = port_options(refresh=refresh, compatible=compatible, compatible_task=answers,
                           **({"task_examples": task_examples} if task_examples is not None else {}))
    run_port(source, to, out, options, retrained, tasks_data, device)
    console.print(f"new library: {out}")


export_app = typer.Typer(no_args_is_help=True, help="Hand the library to other serving stacks.")
app.add_typer(export_app, name="export")


@app.command()
def serve(library: Path = typer.Argument(..., help="library folder"),
          host: str = typer.Option("127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)"),
          port: int = typer.Option(8000, min=0, max=65535),
          base: Optional[str] = typer.Option(None, help="base model dir (default: the one the library records)"),
          model: Optional[list[str]] = typer.Option(None, help="serve just these library entries (repeatable)"),
          router: Optional[str] = typer.Option(None, help="router entry that model 'auto' uses (default: the "
                                                          "library's most accurate one)"),
          small: Optional[Path] = typer.Option(None, help="a small model's project YAML or library: also serve "
                                                          "collaborations such as proxy:EXPERT"),
          token_map: Optional[str] = TokenMapOpt,
          backend: Optional[str] = typer.Option(None, help="URL of an OpenAI-compatible server (vLLM, LoRAX) that "
                                                           "decodes; this process then only routes and forwards"),
          backend_base_model: str = typer.Option("base", help="the backend's name for the bare base model"),
          max_batch: int = _option_from(ServeOptions, "max_batch", min=1),
          max_queue: int = _option_from(ServeOptions, "max_queue", min=1),
          max_prompt_tokens: Optional[int] = _option_from(ServeOptions, "max_prompt_tokens", min=1),
          max_tokens: int = _option_from(ServeOptions, "max_tokens", min=1),
          api_key: Optional[str] = typer.Option(None, envvar="EXPERTKIT_API_KEY",
                                                help="require 'Authorization: Bearer KEY' (or set "
                                                     "EXPERTKIT_API_KEY)"),
          admin_key: Optional[str] = typer.Option(None, envvar="EXPERTKIT_ADMIN_KEY",
                                                  help="allow POST /v1/library/reload with 'Authorization: Bearer "
                                                       "KEY' (or set EXPERTKIT_ADMIN_KEY)"),
          watch_s: Optional[float] = _option_from(ServeOptions, "watch_s", min=0.1),
          device: Optional[str] = typer.Option(None)):
    """Serve the library behind an OpenAI-compatible API (completions, chat, streaming, model 'auto')."""
    _setup()
    import os

    from expertkit.serve.app import create_app
    from expertkit.serve.server import build_local_service, run

    if backend:
        from expertkit.serve.forward import build_forwarding_service

        if small or watch_s or token_map:
            raise ExpertkitError("--small, --token-map and --watch-s work on expertkit's own engine; they cannot be "
                                 "combined with --backend")
        service = build_forwarding_service(library, backend, router, base, device, backend_base_model,
                                           os.environ.get("EXPERTKIT_BACKEND_API_KEY"))
    else:
        options = ServeOptions(base=base, device=device, models=tuple(model) if model else None, router=router,
                               small=str(small) if small else None, token_map=token_map,
                               max_batch=max_batch, max_queue=max_queue,
                               max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, watch_s=watch_s)
        service = build_local_service(library, options)
    console.print(f"serving {service.model_names()} on http://{host}:{port}/v1"
                  + (" (API key required)" if api_key else ""), highlight=False)
    run(create_app(service, api_key=api_key, admin_key=admin_key), host, port)


@export_app.command("vllm")
def export_vllm(library: Path = typer.Argument(..., help="library folder"),
                base: Optional[str] = typer.Option(None, help="base model dir or hub id (default: the library's)"),
                port: int = typer.Option(8000, help="port for vLLM to listen on")):
    """Print the `vllm serve` command that serves every adapter of the library under its library name."""
    from expertkit.serve.vllm_export import vllm_command

    typer.echo(vllm_command(library, base=base, port=port))


@export_app.command("gguf")
def export_gguf(library: Path = typer.Argument(..., help="library folder"),
                out_dir: Path = typer.Argument(..., help="folder to write base.gguf and one <expert>.gguf per adapter"),
                base: Optional[Path] = typer.Option(None, help="the library's base model dir (default: the library's)"),
                base_gguf: Optional[Path] = typer.Option(None, help="the base's GGUF file (default: the file the base "
                                                                    "was imported from)"),
                with_base: bool = typer.Option(True, "--with-base/--no-base", help="also write base.gguf"),
                dtype: str = typer.Option("f32", help="adapter tensor type: f32 or f16"),
                base_type: str = typer.Option("source", help="base.gguf: 'source' (the GGUF itself) or 'f32' "
                                                             "(dequantized: llama.cpp computes what expertkit does)"),
                force: bool = typer.Option(False, help="replace OUT_DIR if it exists and is not empty")):
    """Write each adapter of the library as a llama.cpp LoRA GGUF (`llama-server -m base.gguf --lora X.gguf`)."""
    _setup()
    from expertkit.gguf_export import export_gguf as write_export

    result = write_export(library, out_dir, base=base, base_gguf=base_gguf, with_base=with_base, dtype=dtype,
                          base_type=base_type, force=force)
    console.print(f"wrote {len(result.adapters)} adapters to {result.out_dir}; base: {result.base_note}",
                  highlight=False, soft_wrap=True)


def main() -> None:
    try:
        app()
    except ExpertkitError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True, highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red] (finished experts and the last checkpoint are kept)")
        sys.exit(130)


if __name__ == "__main__":
    main()
