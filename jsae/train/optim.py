"""Optimizer and schedules (optax): Adam, LR warmup + decay, sparsity-coefficient warmup."""

from __future__ import annotations

import optax

from jsae.config import RunConfig


def lr_schedule(cfg: RunConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``train.lr``, constant, then decay to 0 from ``lr_decay_start``."""
    t = cfg.train
    warm = min(t.lr_warmup_steps, max(total_steps - 1, 0))
    decay_from = max(int(t.lr_decay_start * total_steps), warm)
    decay_len = max(total_steps - decay_from, 1)
    parts = [optax.linear_schedule(0.0, t.lr, warm)] if warm > 0 else []
    if t.lr_decay == "constant":
        parts.append(optax.constant_schedule(t.lr))
        bounds = [warm] if warm > 0 else []
    else:
        hold = decay_from - warm
        decay = (
            optax.cosine_decay_schedule(t.lr, decay_len)
            if t.lr_decay == "cosine"
            else optax.linear_schedule(t.lr, 0.0, decay_len)
        )
        parts += [optax.constant_schedule(t.lr), decay]
        bounds = ([warm] if warm > 0 else []) + [warm + hold]
    return optax.join_schedules(parts, bounds) if bounds else parts[0]


def sparsity_schedule(coef: float, warmup_steps: int) -> optax.Schedule:
    """Sparsity coefficient ramped linearly from 0 over ``warmup_steps``."""
    if warmup_steps <= 0:
        return optax.constant_schedule(coef)
    return optax.linear_schedule(0.0, coef, warmup_steps)


def make_optimizer(cfg: RunConfig, total_steps: int) -> optax.GradientTransformation:
    t = cfg.train
    chain = []
    if t.grad_clip is not None:
        chain.append(optax.clip_by_global_norm(t.grad_clip))
    chain.append(
        optax.adam(lr_schedule(cfg, total_steps), b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps)
    )
    return optax.chain(*chain)
