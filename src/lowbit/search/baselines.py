"""Baselines for a per-layer bit search, all through the same :class:`BitEvaluator`.

* ``uniform``: every layer at the same bits, for each allowed width (through the budget wall).
* ``random``: assignments drawn uniformly from the allowed widths (through the wall), distinct.
* ``sensitivity``: each layer alone at each lower width (the others at the largest) gives a table of
  accuracy drops; a greedy walk then lowers, one step at a time, the layer whose next step costs the
  least accuracy per unit of cost saved (the budget's metric; model size without a budget), from the
  largest widths down to the smallest. The first point of the walk within the budget is the cheapest
  greedy assignment under it; the points after it are evaluated while evaluations remain.

Every method returns the list of assignments it evaluated, in order; the search picks among them
with one rule for all (the highest ReLeQ reward, :func:`select`).
"""

from __future__ import annotations

import numpy as np

from .env import releq_reward


def uniform_candidates(choices, n_layers: int, wall) -> list[tuple[int, ...]]:
    return list(dict.fromkeys(wall((b,) * n_layers) for b in sorted(choices)))


def random_candidates(n: int, choices, n_layers: int, wall, seed: int = 0, max_tries: int = 100_000) -> list[tuple]:
    rng = np.random.default_rng(seed)
    out: dict[tuple, None] = {}
    choices = sorted(choices)
    tries = 0
    while len(out) < n and tries < max_tries:
        out[wall(tuple(int(x) for x in rng.choice(choices, n_layers)))] = None
        tries += 1
    return list(out)


def sensitivity_table(evaluator, choices, n_layers: int) -> tuple[tuple, dict[tuple[int, int], float], list[tuple]]:
    """(reference assignment, {(layer, bits): accuracy drop vs the reference}, evaluated assignments)."""
    choices = sorted(choices)
    top = choices[-1]
    ref = (top,) * n_layers
    cands = [ref] + [tuple(b if i == l else top for i in range(n_layers)) for l in range(n_layers) for b in choices[:-1]]
    accs = evaluator.accuracies(cands)
    acc = dict(zip(cands, accs))
    drop = {(l, top): 0.0 for l in range(n_layers)}
    for l in range(n_layers):
        for b in choices[:-1]:
            drop[(l, b)] = acc[ref] - acc[tuple(b if i == l else top for i in range(n_layers))]
    return ref, drop, cands


def greedy_path(drop: dict[tuple[int, int], float], choices, coef) -> list[tuple[int, ...]]:
    """From the largest widths to the smallest, one step per point, cheapest accuracy per cost saved."""
    levels = sorted(choices)
    n = len(coef)
    cur = [levels[-1]] * n
    path = [tuple(cur)]
    while any(b > levels[0] for b in cur):
        best, best_score = None, None
        for l in range(n):
            k = levels.index(cur[l])
            if k == 0:
                continue
            nb = levels[k - 1]
            saved = max(coef[l] * (cur[l] - nb), 1e-12)
            score = (drop[(l, nb)] - drop[(l, cur[l])]) / saved
            if best_score is None or score < best_score - 1e-15:
                best, best_score = (l, nb), score
        cur[best[0]] = best[1]
        path.append(tuple(cur))
    return path


def sensitivity_candidates(evaluator, choices, n_layers: int, coef, n_evals: int, within) -> tuple[list[tuple], dict]:
    """The table's assignments, then the greedy walk from its first point within the budget on,
    until ``n_evals`` assignments are used (at least the table and the first point in budget)."""
    _, drop, table = sensitivity_table(evaluator, choices, n_layers)
    path = greedy_path(drop, choices, coef)
    start = next(i for i, p in enumerate(path) if within(p))
    extra = [p for p in path[start:] if p not in table]
    keep = max(n_evals - len(table), 1)
    return table + extra[:keep], drop


def select(records: list[dict], acc_fp: float, choices, within=lambda bits: True) -> dict | None:
    """The record (bits, acc) with the highest ReLeQ reward among those within the budget."""
    best = None
    for r in records:
        if not within(tuple(r["bits"])):
            continue
        rew = releq_reward(r["acc"], acc_fp, r["bits"], choices)
        if best is None or rew > best["reward"]:
            best = {**r, "reward": rew}
    return best
