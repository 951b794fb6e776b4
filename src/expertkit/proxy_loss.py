"""Training a small expert through the proxy it will steer: the loss is the proxy's own, the large model frozen.

Why: proxy-tuning adds a small expert's shift (expert minus small-base log-probs) to a large model's
log-probs. A small expert trained on its own learns everything its *own* base lacks on the domain, and a small
base lacks far more than the large one does (SmolLM2's 23M companion: perplexity 86.6 against 32.6), so much of
the shift repeats what the large model already knows, and at full strength it overshoots. Trained through the
proxy instead, on softmax(large + α · (expert − small base)) over the domain text, with the large model run
frozen and without gradients, the expert learns what the large model is missing there: the supervised form of
an inference-time policy adapter (Lu et al., 2023). It costs one forward of the large model per batch, with no
gradient or optimizer state for it. Replay rows keep their own loss (KL to the small base), so the shift stays
near zero on general text.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from expertkit.base import Base, BaseSpec, load_base
from expertkit.data import Blocks
from expertkit.errors import ExpertkitError


@dataclass(frozen=True)
class ProxyLoss:
    """A picklable loss spec (train.LossSpec). In the driver's process the jobs use the large model the driver
    loaded to check it; a worker elsewhere loads its own copy from the path, checked hash for hash."""

    large: BaseSpec
    alpha: float = 1.0  # the shift's weight in the training proxy (use the same α when decoding)

    def describe(self) -> dict:
        return {"kind": "proxy (trained through the large model)", "large": self.large.identity, "alpha": self.alpha}

    def build(self, device):
        large = self.large.local or dataclasses.replace(self.large, device=str(device)).load_private()
        return ProxyObjective(large.model.eval().requires_grad_(False), self.alpha)


def proxy_loss_for(large_name: str, small: Base) -> ProxyLoss:
    """The spec that trains `small`'s experts through a proxy on `large_name` (loaded once, on the small base's
    device); a large model whose vocabulary differs from the small base's is refused (the proxy adds their
    log-probs token by token)."""
    large = load_base(large_name, str(small.device))
    same_tokenizer = large.identity()["tokenizer_hash"] == small.identity()["tokenizer_hash"]
    widths = large.model.get_output_embeddings().weight.shape[0], small.model.get_output_embeddings().weight.shape[0]
    if not same_tokenizer or widths[0] != widths[1]:
        raise ExpertkitError(f"training.proxy_for: {large_name} does not share the base's vocabulary (tokenizers "
                             f"{'equal' if same_tokenizer else 'differ'}, {widths[0]} vs {widths[1]} logits); train "
                             f"experts through a proxy on a companion of it: `expertkit base distill --teacher "
                             f"{large_name}`")
    return ProxyLoss(BaseSpec.of(large))


class ProxyObjective:
    """Next-token cross-entropy of log_softmax(large + α · (expert − base)); only the expert has gradients."""

    def __init__(self, large, alpha: float):
        self.large, self.alpha = large, alpha

    def __call__(self, model, batch: Blocks, device) -> torch.Tensor:
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        targets = batch.labels.to(device)[:, 1:]
        scored = targets != -100
        with torch.no_grad():
            large = F.log_softmax(self.large(input_ids=ids, attention_mask=mask).logits[:, :-1][scored].float(), -1)
            with model.disable_adapter():
                base = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1][scored].float(), -1)
        expert = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1][scored].float(), -1)
        return F.cross_entropy(large + self.alpha * (expert - base), targets[scored])
