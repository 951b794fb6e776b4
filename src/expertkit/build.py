"""`expertkit base build`: a byte-level BPE tokenizer and a tiny Llama pretrained on a corpus mix.

The result is a standard HF model dir (config.json, model.safetensors,
tokenizer files) that AutoModelForCausalLM / AutoTokenizer load unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch

from expertkit.config import BuildConfig, ProjectConfig
from expertkit.data import TrainingStream, load_corpus, make_blocks
from expertkit.errors import ExpertkitError
from expertkit.fsutil import atomic_dir
from expertkit.optim import make_optimizer, train_step
from expertkit.progress import console, progress_bar

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


def train_tokenizer(texts, vocab_size: int):
    """Byte-level BPE (the `tokenizers` library): any UTF-8 text is encodable, no <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL_TOKENS[0], bos_token=SPECIAL_TOKENS[0],
                                   pad_token=SPECIAL_TOKENS[1], model_max_length=1_000_000)


def load_tokenizer(path: str):
    """An existing tokenizer, so two bases share one vocabulary (needed to combine their logits)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ExpertkitError(f"base.build.tokenizer: cannot load a tokenizer from {path} ({str(e).splitlines()[0]})") from None
    if tokenizer.eos_token is None:
        raise ExpertkitError(f"base.build.tokenizer: the tokenizer at {path} has no EOS token; pick one that has")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_llama(build: BuildConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    if build.hidden_size % build.num_heads:
        raise ExpertkitError(f"base.build.hidden_size={build.hidden_size} must be divisible by num_heads={build.num_heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=build.hidden_size, intermediate_size=build.intermediate_size,
        num_hidden_layers=build.num_layers, num_attention_heads=build.num_heads, num_key_value_heads=build.num_heads,
        max_position_embeddings=build.context_length, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def pretrain(model, stream: TrainingStream, steps: int, learning_rate: float, warmup_steps: int, device,
             what: str = "pretraining base") -> None:
    """Full-model training on a corpus stream (AdamW, cosine schedule): a base's pretraining, or more of it."""
    optimizer, scheduler = make_optimizer(model.parameters(), learning_rate, 0.1, "cosine", warmup_steps, steps)
    n_params = sum(p.numel() for p in model.parameters())
    with progress_bar(f"{what} ({n_params / 1e6:.2f}M params)", steps) as advance:
        for step in range(steps):
            loss = train_step(model, stream.batch(step), optimizer, scheduler, 1.0, device)
            advance(info=f"loss {loss:.3f}")
    model.eval()


def build_base(config: ProjectConfig, out_dir: str | None = None, device: str | None = None,
               force: bool = False) -> Path:
    """Train the tokenizer on every domain's train split (or reuse `build.tokenizer`), then pretrain on the mix."""
    build = config.base.build
    if build is None:
        raise ExpertkitError("the config has no base.build section; add one to build a tiny base")
    out = Path(out_dir or config.base.path)
    if (out / "config.json").exists() and not force:
        console.print(f"base already built at {out} (pass --force to rebuild)")
        return out
    torch.manual_seed(config.seed)
    all_corpora = {d.name: load_corpus(d) for d in config.all_domains()}
    if build.tokenizer:
        tokenizer = load_tokenizer(build.tokenizer)
    else:
        texts = [ex.full_text for c in all_corpora.values() for ex in c.splits["train"][: build.tokenizer_documents]]
        with console.status("training the byte-level BPE tokenizer"):
            tokenizer = train_tokenizer(texts, build.vocab_size)
    model = tiny_llama(build, tokenizer)
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(dev)
    mix = [(make_blocks(tokenizer, all_corpora[name], "train", build.context_length), share)
           for name, share in build.corpus.items()]
    pretrain(model, TrainingStream(mix, build.batch_size, seed=config.seed), build.steps, build.learning_rate,
             build.warmup_steps, dev)
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out
