"""Resume state that differs between processes, saved for each of them.

accelerate writes a registered object's `state_dict()` from the main process only and loads that one
file on every rank, so state each process keeps for itself (running loss averages, a stream position)
would come back as rank 0's on every rank. `PerRankState` gathers every rank's state when saving and
gives each rank its own back on resume.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist


class ResumeStateError(ValueError):
    """A saved state cannot resume this run (another process count)."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class PerRankState:
    def __init__(self, inner: Stateful, what: str) -> None:
        self.inner, self.what = inner, what

    def state_dict(self) -> dict[str, Any]:
        mine = self.inner.state_dict()
        _, world = _rank_and_world()
        if world == 1:
            return {"ranks": [mine]}
        ranks: list[Any] = [None] * world
        dist.all_gather_object(ranks, mine)  # a collective: every rank saves together (accelerate's save_state)
        return {"ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ranks" not in state:  # saved before states were kept per rank: rank 0's, as it was then
            self.inner.load_state_dict(state)
            return
        rank, world = _rank_and_world()
        if world != len(state["ranks"]):
            if _as_fresh(state["ranks"], self.inner.state_dict()):
                return  # nothing was kept (the loss averages of a loss balance that is off): any count resumes
            # more processes have no state; fewer would drop the other ranks' states silently
            raise ResumeStateError(f"the saved {self.what} is for {len(state['ranks'])} process(es); this run has "
                                   f"{world}: resume with the process count it was started with")
        self.inner.load_state_dict(state["ranks"][rank])


def _as_fresh(saved: list[Any], fresh: dict[str, Any]) -> bool:
    """Every saved rank's state equals a fresh object's: there is nothing a change of process count loses."""
    try:
        return all(bool(state == fresh) for state in saved)
    except (ValueError, TypeError):  # arrays inside compare element-wise: not a plain fresh state
        return False


def take_main_process_copy(tensors: list[torch.Tensor]) -> None:
    """Overwrite `tensors` on every rank with rank 0's, in place (a collective). DDP keeps the weights equal
    but each rank updates its batch-norm statistics (and its weight average of them) from its own rows, so
    after training the ranks would evaluate slightly different models, none of them quite the one rank 0
    saves."""
    _, world = _rank_and_world()
    if world == 1:
        return
    for tensor in tensors:
        dist.broadcast(tensor, src=0)
