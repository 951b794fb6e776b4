"""The optimizer, schedule and single training step shared by base pretraining and expert training."""

from __future__ import annotations

from typing import Callable

import torch
from transformers import get_scheduler

from expertkit.data import Blocks


def make_optimizer(params, learning_rate: float, weight_decay: float, schedule: str, warmup_steps: int,
                   total_steps: int):
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=min(warmup_steps, total_steps),
                              num_training_steps=total_steps)
    return optimizer, scheduler


def language_model_loss(model, batch: Blocks, device) -> torch.Tensor:
    """Next-token cross-entropy of the batch (labels -100 ignored): the loss every training step uses by default."""
    return model(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        labels=batch.labels.to(device),
    ).loss


def train_step(model, batch: Blocks, optimizer, scheduler, max_grad_norm: float, device,
               loss_fn: Callable = language_model_loss) -> float:
    """One forward/backward/update with `loss_fn(model, batch, device)`; returns the batch loss."""
    model.train()
    loss = loss_fn(model, batch, device)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())
