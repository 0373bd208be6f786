"""ADMM pieces: Z has the planned ranks, U accumulates W - Z, the penalty pulls W onto the low-rank set."""

from __future__ import annotations

import torch

from cstar_dsl.model.decompose import unfold
from cstar_dsl.train.admm import admm_start, penalty, residuals, u_step, z_step


def _weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"conv": torch.randn(16, 8, 3, 3, generator=generator), "fc": torch.randn(10, 32, generator=generator)}


RANKS = {"conv": (4, 3), "fc": (5,)}


def _rank(matrix: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(matrix.double(), rtol=1e-6))


def test_z_has_the_planned_ranks():
    weights = _weights()
    state = admm_start(weights, RANKS)
    assert _rank(unfold(state.z["conv"], 0)) == 4 and _rank(unfold(state.z["conv"], 1)) == 3
    assert _rank(state.z["fc"]) == 5
    assert all(torch.count_nonzero(u) == 0 for u in state.u.values())


def test_u_accumulates_w_minus_z_and_z_projects_w_plus_u():
    weights = _weights()
    state = u_step(weights, admm_start(weights, RANKS))
    for name, w in weights.items():
        torch.testing.assert_close(state.u[name], w - state.z[name])
    moved = {name: w + 0.1 for name, w in weights.items()}
    again = z_step(moved, state, {"conv": (2, 2), "fc": (3,)})
    assert _rank(again.z["fc"]) == 3 and again.ranks["fc"] == (3,)
    assert again.u is state.u


def test_penalty_gradient_is_rho_times_the_gap():
    weights = {name: w.clone().requires_grad_(True) for name, w in _weights().items()}
    state = u_step(weights, admm_start(weights, RANKS))
    penalty(weights, state, rho=0.3).backward()
    for name, w in weights.items():
        torch.testing.assert_close(w.grad, 0.3 * (w.detach() - state.z[name] + state.u[name]))


def test_admm_drives_weights_onto_the_low_rank_set():
    weights = {name: w.clone().requires_grad_(True) for name, w in _weights().items()}
    optimizer = torch.optim.SGD(weights.values(), lr=0.1)
    state = admm_start(weights, RANKS)
    start = residuals(weights, state)
    for _ in range(30):
        for _ in range(5):  # W-steps on the penalty alone (the data loss would add its own pull)
            optimizer.zero_grad()
            penalty(weights, state, rho=1.0).backward()
            optimizer.step()
        state = u_step(weights, z_step(weights, state, RANKS))
    end = residuals(weights, state)
    assert all(end[name] < 0.05 * start[name] for name in weights), (start, end)
