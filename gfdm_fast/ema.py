"""Exponential moving average of the weights, as the official training keeps it (ema_pytorch 0.7)."""
import copy

import torch


class EMA:
    """Exponential moving average of the weights, the official (ema_pytorch) way.

    Updated every ``update_every`` optimizer steps; a copy of the online weights
    until ``update_after_step``, then decay ``1 - (1 + e)^-power`` (e = updates
    past the warm-up, inv_gamma = 1) capped at ``beta``. ``official_state_dict``
    writes ema_pytorch's layout: ``initted``, ``step``, ``ema_model.*``.
    """

    def __init__(self, model, beta, *, update_every=10, update_after_step=100, power=2 / 3):
        self.ema_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.beta, self.update_every, self.update_after_step, self.power = beta, update_every, update_after_step, power
        self.step, self.initted = 0, False

    def decay(self):
        epoch = max(self.step - self.update_after_step - 1, 0)
        if epoch <= 0:
            return 0.0
        return min(1.0 - (1.0 + epoch) ** -self.power, self.beta)

    @torch.no_grad()
    def update(self, model):
        self.step += 1
        if self.step % self.update_every:
            return
        ema_p = list(self.ema_model.state_dict().values())
        online = list(model.state_dict().values())
        if self.step <= self.update_after_step or not self.initted:
            for e, o in zip(ema_p, online):
                e.copy_(o)
            self.initted = self.step > self.update_after_step
            return
        d = self.decay()
        for e, o in zip(ema_p, online):
            if e.is_floating_point():
                e.lerp_(o, 1.0 - d)
            else:
                e.copy_(o)

    def official_state_dict(self):
        sd = {"initted": torch.tensor(self.initted), "step": torch.tensor(self.step)}
        sd.update({f"ema_model.{k}": v.detach().cpu() for k, v in self.ema_model.state_dict().items()})
        return sd
