"""vLLM's tokenizer endpoints (/tokenize, /detokenize, /tokenizer_info), so that clients such as lm-eval's
`local-completions` use the served model's own tokenizer and chat template without configuration."""

from __future__ import annotations

from expertkit.encoding import encode_texts
from expertkit.serve.protocol import DetokenizeRequest, OpenAIError, TokenizeRequest
from expertkit.serve.text import chat_prompt

PATH_FIELDS = ("vocab_file", "merges_file", "tokenizer_file", "name_or_path")


def tokenize(tokenizer, max_model_len: int | None, req: TokenizeRequest) -> dict:
    if req.messages is not None:
        text, _ = chat_prompt(tokenizer, [{"role": m.role, "content": m.text()} for m in req.messages],
                              req.add_generation_prompt, req.continue_final_message)
        special = bool(req.add_special_tokens)
    else:
        text, special = req.prompt, req.add_special_tokens is not False
    ids = encode_texts(tokenizer, [text])[0] if special else tokenizer(text, add_special_tokens=False)["input_ids"]
    out = {"count": len(ids), "max_model_len": max_model_len, "tokens": list(ids)}
    if req.return_token_strs:
        out["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
    return out


def detokenize(tokenizer, req: DetokenizeRequest) -> dict:
    bad = [t for t in req.tokens if not 0 <= t < len(tokenizer)]
    if bad:
        raise OpenAIError(400, f"token id {bad[0]} is outside the vocabulary (0..{len(tokenizer) - 1})", param="tokens")
    return {"prompt": tokenizer.decode(req.tokens)}


def tokenizer_info(tokenizer) -> dict:
    """The tokenizer's own settings (as vLLM returns them): init arguments without file paths, its class, and
    the chat template."""
    config = {k: _plain(v) for k, v in (getattr(tokenizer, "init_kwargs", None) or {}).items() if k not in PATH_FIELDS}
    config["tokenizer_class"] = type(tokenizer).__name__
    if getattr(tokenizer, "chat_template", None):
        config["chat_template"] = tokenizer.chat_template
    return config


def _plain(value):
    """JSON-able: special tokens as their text, containers element by element, anything else as text."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
