"""Exponential moving average of the weights, as in the EfficientNet / Noisy Student code.

The official training code evaluates and exports the moving average of the
variables (decay 0.9999 there, with TensorFlow's `num_updates` warm-up:
decay_t = min(decay, (1 + t) / (10 + t))). Short CPU schedules want a smaller
decay (0.99-0.999). Floating tensors (weights and batch-norm statistics) are
averaged, integer buffers copied. Saved with the training state, so resume is exact.
"""

from __future__ import annotations

from typing import Any

import torch


class WeightEma:
    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.float_keys = [k for k, v in self.shadow.items() if v.is_floating_point()]
        self.other_keys = [k for k, v in self.shadow.items() if not v.is_floating_point()]

    def decay_at(self, updates: int) -> float:
        return min(self.decay, (1.0 + updates) / (10.0 + updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        weight = 1.0 - self.decay_at(self.updates)
        state = model.state_dict()
        torch._foreach_lerp_([self.shadow[k] for k in self.float_keys],
                             [state[k].detach() for k in self.float_keys], weight)
        for key in self.other_keys:
            self.shadow[key].copy_(state[key])

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.shadow)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        for key, value in state["shadow"].items():
            self.shadow[key].copy_(value)
