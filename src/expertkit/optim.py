"""The optimizer, schedule and single training step shared by base pretraining and expert training."""

from __future__ import annotations

import torch
from transformers import get_scheduler

from expertkit.data import Blocks


def make_optimizer(params, learning_rate: float, weight_decay: float, schedule: str, warmup_steps: int,
                   total_steps: int):
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=min(warmup_steps, total_steps),
                              num_training_steps=total_steps)
    return optimizer, scheduler


def train_step(model, batch: Blocks, optimizer, scheduler, max_grad_norm: float, device) -> float:
    """One forward/backward/update; returns the batch loss."""
    model.train()
    out = model(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        labels=batch.labels.to(device),
    )
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(out.loss.detach())
