"""The probes of the absorption measure: SAEBench's first-letter probes, in JAX and NumPy.

- :func:`train_probes`: one-vs-rest logistic regression probes trained together (SAEBench's
  ``train_multi_probe``): BCE with a per-class positive weight (negatives / positives), Adam with
  L2 weight decay, the learning rate decayed exponentially per epoch, shuffled minibatches;
  optionally an L1 penalty (its k-sparse selection probe on SAE codes).
- :func:`fit_logistic`: one binary L2 logistic regression with balanced class weights, solved
  exactly by Newton's method (the objective of scikit-learn's ``LogisticRegression(C=1,
  class_weight="balanced")`` that SAEBench fits on the k selected features).
- :func:`f1`: F1 of boolean predictions (0 where undefined, as scikit-learn's zero_division=0).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


def _bce_pos_weight(logits, y, pos_weight):
    """torch's BCEWithLogitsLoss(pos_weight) per element: -(pw*y*log s(z) + (1-y)*log(1-s(z)))."""
    return -(pos_weight * y * jax.nn.log_sigmoid(logits) + (1.0 - y) * jax.nn.log_sigmoid(-logits))


@partial(jax.jit, static_argnames=("epochs", "batch_size"))
def _train(key, x, y, pos_weight, *, epochs, batch_size, lr, end_lr, weight_decay, l1):
    n, d = x.shape
    c = y.shape[1]
    kw, kb, kp = jax.random.split(key, 3)
    bound = 1.0 / math.sqrt(d)  # nn.Linear's default init
    params = {"w": jax.random.uniform(kw, (c, d), jnp.float32, -bound, bound),
              "b": jax.random.uniform(kb, (c,), jnp.float32, -bound, bound)}
    n_batches = -(-n // batch_size)
    gamma = jnp.exp(jnp.log(end_lr / lr) / epochs)
    b1, b2, eps = 0.9, 0.999, 1e-8

    def loss_fn(p, xb, yb, mb):
        z = xb @ p["w"].T + p["b"]
        per = _bce_pos_weight(z, yb, pos_weight) * mb[:, None]
        loss = per.sum() / (mb.sum() * c)  # the mean over the real rows of the batch
        return loss + l1 * jnp.abs(p["w"]).sum(-1).mean()

    def step(carry, idx_mask):
        p, m, v, t, rate = carry
        idx, mb = idx_mask
        g = jax.grad(loss_fn)(p, x[idx], y[idx], mb)
        g = jax.tree.map(lambda gi, pi: gi + weight_decay * pi, g, p)  # torch Adam's L2 decay
        t = t + 1
        m = jax.tree.map(lambda mi, gi: b1 * mi + (1 - b1) * gi, m, g)
        v = jax.tree.map(lambda vi, gi: b2 * vi + (1 - b2) * gi * gi, v, g)
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        p = jax.tree.map(lambda pi, mi, vi: pi - rate * (mi / bc1) / (jnp.sqrt(vi / bc2) + eps), p, m, v)
        return (p, m, v, t, rate), None

    def epoch(carry, ek):
        p, m, v, t, e = carry
        perm = jax.random.permutation(ek, n)
        pad = n_batches * batch_size - n
        idx = jnp.concatenate([perm, jnp.zeros(pad, perm.dtype)]).reshape(n_batches, batch_size)
        mask = (jnp.arange(n_batches * batch_size) < n).astype(jnp.float32).reshape(n_batches, batch_size)
        rate = lr * gamma ** e  # ExponentialLR stepped once per epoch
        (p, m, v, t, _), _ = jax.lax.scan(step, (p, m, v, t, rate), (idx, mask))
        return (p, m, v, t, e + 1), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    carry = (params, zeros, zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (params, *_), _ = jax.lax.scan(epoch, carry, jax.random.split(kp, epochs))
    return params["w"], params["b"]


def train_probes(x: np.ndarray, labels: np.ndarray, n_classes: int, *, seed: int = 0, epochs: int = 50,
                 batch_size: int = 4096, lr: float = 1e-2, end_lr: float = 1e-5,
                 weight_decay: float = 1e-6, l1: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest probes of ``x [N, D]`` for ``labels [N]`` in ``0..n_classes-1``:
    ``(W [n_classes, D], b [n_classes])``; a row scores ``x @ W.T + b`` (> 0: in the class)."""
    x = np.asarray(x, np.float32)
    y = np.eye(n_classes, dtype=np.float32)[np.asarray(labels)]
    pos = y.sum(0)
    # a class without positives gets weight 1 (SAEBench's neg/pos would be infinite)
    pos_weight = np.where(pos > 0, (len(y) - pos) / np.maximum(pos, 1), 1.0).astype(np.float32)
    w, b = _train(jax.random.PRNGKey(seed), jnp.asarray(x), jnp.asarray(y), jnp.asarray(pos_weight),
                  epochs=int(epochs), batch_size=int(min(batch_size, len(x))), lr=float(lr),
                  end_lr=float(end_lr), weight_decay=float(weight_decay), l1=float(l1))
    return np.asarray(w, np.float64), np.asarray(b, np.float64)


def fit_logistic(x: np.ndarray, y: np.ndarray, *, C: float = 1.0, tol: float = 1e-10,
                 max_iter: int = 100) -> tuple[np.ndarray, float]:
    """Minimise ``0.5*|w|^2 + C * sum_i s_i * logloss(y_i, x_i @ w + b)`` with balanced sample
    weights ``s_i = N / (2 * N_{y_i})`` (the intercept is not penalised): ``(w [k], b)``."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, bool)
    n, k = x.shape
    n_pos = int(y.sum())
    if n_pos in (0, n):  # one class only: the intercept alone decides (scikit-learn refuses)
        return np.zeros(k), (30.0 if n_pos else -30.0)
    s = np.where(y, n / (2.0 * n_pos), n / (2.0 * (n - n_pos))) * C
    xa = np.hstack([x, np.ones((n, 1))])
    reg = np.ones(k + 1)
    reg[-1] = 0.0
    theta = np.zeros(k + 1)
    t = y.astype(np.float64)

    def objective(th):
        z = xa @ th
        return 0.5 * np.sum(reg * th * th) + np.sum(s * (np.logaddexp(0, z) - t * z))

    f = objective(theta)
    for _ in range(max_iter):
        z = xa @ theta
        p = 0.5 * (1 + np.tanh(0.5 * z))  # a sigmoid that never overflows
        grad = reg * theta + xa.T @ (s * (p - t))
        h = (xa * (s * p * (1 - p))[:, None]).T @ xa + np.diag(reg) + 1e-12 * np.eye(k + 1)
        step = np.linalg.solve(h, grad)
        a = 1.0
        while a > 1e-10:  # backtracking keeps every step a descent
            new = theta - a * step
            fn = objective(new)
            if fn <= f - 1e-4 * a * grad @ step:
                break
            a *= 0.5
        theta, done = new, f - fn < tol * max(1.0, abs(f))
        f = fn
        if done or np.abs(grad).max() < tol:
            break
    return theta[:k], float(theta[k])


def f1(pred: np.ndarray, y: np.ndarray) -> float:
    """F1 of boolean ``pred`` against ``y`` (0.0 where precision or recall is undefined)."""
    pred, y = np.asarray(pred, bool), np.asarray(y, bool)
    tp = int(np.sum(pred & y))
    denom = int(pred.sum()) + int(y.sum())
    return 2.0 * tp / denom if denom else 0.0
