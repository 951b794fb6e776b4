"""The prompt a chat request becomes: the model's own chat template, else a documented plain one."""

from __future__ import annotations

from expertkit.serve.protocol import OpenAIError

PLAIN_CHAT_STOP = "\nUser:"


def chat_prompt(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                continue_final_message: bool = False) -> tuple[str, tuple[str, ...]]:
    """The prompt for a chat request, and the stop strings the template implies.

    With a chat template in the tokenizer, that template (with the generation prompt) is used.
    Otherwise the documented plain template: one "Role: content" line per message, then
    "Assistant:"; generation stops where the model starts a new "User:" turn.
    """
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError

        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                 continue_final_message=continue_final_message)
        except (TemplateError, ValueError) as e:  # templates raise on conversations they do not accept
            raise OpenAIError(400, f"the model's chat template refused these messages: {e}",
                              param="messages") from None
        return text, ()
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + ("\nAssistant:" if add_generation_prompt else ""), (PLAIN_CHAT_STOP,)
