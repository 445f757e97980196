"""FMMRec's trainable fairness pieces (specs/models.md section 7): the stage-1 modal disentangler (BMMF), the
shared sensitive filter with prompts of stage 2, and the attacker terms both stages share.

- :func:`frozen_call`: an attacker's forward with its parameters detached, so that a loss of the recommender side
  sends gradients *through* the attacker to its input but never *into* the attacker;
- :func:`attacker_loss`: an attacker's loss over the rows that have a label (``-1`` = no value);
- :class:`ModalDisentangler`: per modality, a biased and a filtered Linear transform of user-level features with a
  biased and a filtered attacker per sensitive attribute, and :func:`train_disentangler`, its training loop;
- :class:`SensitiveFilter`: one filter per sensitive attribute, shared by users and items, told apart by a
  learned prompt.

The attacker network is :class:`recbole_mm.fairness.Attacker` (the one the post-hoc audit uses).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
from torch import nn
from torch.nn import functional as F

from recbole_mm.fairness import Attacker


def frozen_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with the module's parameters detached: the output has a gradient with respect to ``x`` only."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, params, (x,))


def attacker_loss(attacker: Attacker, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The attacker's loss (BCE or NLL, :meth:`Attacker.loss`) over the rows with a label (``labels >= 0``);
    a zero that keeps the graph when no row has one."""
    keep = labels >= 0
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return attacker.loss(logits[keep], labels[keep])


def random_labels(labels: torch.Tensor, n_classes: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A uniform random class in ``[0, n_classes)`` for every row with a label, ``-1`` elsewhere."""
    draw = torch.randint(0, n_classes, labels.shape, generator=generator).to(labels.device)
    return torch.where(labels >= 0, draw, labels)


class ModalDisentangler(nn.Module):
    r"""Stage 1 of FMMRec (BMMF) for one modality: a *biased* transform ``B`` and a *filtered* transform ``G``
    (``Linear(d -> d)`` each) of user-level features ``u`` (the mean of the user's items' frozen features), with a
    biased attacker ``D^b_k`` and a filtered attacker ``D^f_k`` per sensitive attribute ``k``.

    Transform loss (minimised by ``B`` and ``G``; the attackers are held fixed by :func:`frozen_call`)::

        CosEmb(G(u), u, +1) + separation * CosEmb(B(u), G(u), -1)
            + sum_k [ w_b * l(D^b_k(B(u)), s_k) - w_f * l(D^f_k(G(u)), t_k) ]

    with ``t_k = s_k`` for a binary attribute and a uniform random class for a multi-class one (the original's
    rule). Attacker loss (minimised by the attackers on detached ``B(u)``, ``G(u)``):
    ``sum_k [ l(D^b_k(B(u)), s_k) + l(D^f_k(G(u)), t_k) ]``.
    """

    def __init__(self, dim: int, n_classes: Mapping[str, int], separation: float = 0.1, dropout: float = 0.2):
        super().__init__()
        self.biased = nn.Linear(dim, dim)
        self.filtered = nn.Linear(dim, dim)
        self.n_classes = dict(n_classes)
        self.separation = float(separation)
        self.biased_attackers = nn.ModuleDict({f: Attacker(dim, c, dropout=dropout) for f, c in self.n_classes.items()})
        self.filtered_attackers = nn.ModuleDict({f: Attacker(dim, c, dropout=dropout) for f, c in self.n_classes.items()})

    def transform_parameters(self):
        return list(self.biased.parameters()) + list(self.filtered.parameters())

    def attacker_parameters(self):
        return list(self.biased_attackers.parameters()) + list(self.filtered_attackers.parameters())

    def _targets(self, labels: Mapping[str, torch.Tensor], generator) -> Dict[str, torch.Tensor]:
        return {f: (y if self.n_classes[f] == 2 else random_labels(y, self.n_classes[f], generator))
                for f, y in labels.items()}

    def transform_loss(self, u: torch.Tensor, labels: Mapping[str, torch.Tensor], w_biased: float, w_filtered: float,
                       generator: Optional[torch.Generator] = None, rows: Optional[torch.Tensor] = None):
        """``(loss, B(u), G(u))`` for user-level features ``u [n, d]`` and labels ``{field: [m]}`` (-1: none) of the
        loss's rows; ``rows [m]`` maps each loss row to its row of ``u`` (the same user may fill several rows of a
        batch: the networks run once per distinct user, the losses average over the rows; default: one row each)."""
        b, g = self.biased(u), self.filtered(u)
        pick = (lambda x: x) if rows is None else (lambda x: x[rows])  # noqa: E731
        cos_gu = F.cosine_similarity(g, u, dim=-1, eps=1e-8)
        cos_bg = F.cosine_similarity(b, g, dim=-1, eps=1e-8)
        loss = (1.0 - pick(cos_gu)).mean() + self.separation * pick(cos_bg).clamp(min=0.0).mean()
        for f, t in self._targets(labels, generator).items():
            att_b, att_f = self.biased_attackers[f], self.filtered_attackers[f]
            loss = loss + w_biased * attacker_loss(att_b, pick(frozen_call(att_b, b)), labels[f]) \
                - w_filtered * attacker_loss(att_f, pick(frozen_call(att_f, g)), t)
        return loss, b, g

    def attackers_loss(self, b: torch.Tensor, g: torch.Tensor, labels: Mapping[str, torch.Tensor],
                       generator: Optional[torch.Generator] = None, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The attackers' own loss on detached transforms (``rows`` as in :meth:`transform_loss`)."""
        b, g = b.detach(), g.detach()
        pick = (lambda x: x) if rows is None else (lambda x: x[rows])  # noqa: E731
        loss = b.new_zeros(())
        for f, t in self._targets(labels, generator).items():
            att_b, att_f = self.biased_attackers[f], self.filtered_attackers[f]
            loss = loss + attacker_loss(att_b, pick(att_b(b)), labels[f]) + attacker_loss(att_f, pick(att_f(g)), t)
        return loss


def train_disentangler(module: ModalDisentangler, user_feats: torch.Tensor, batch_users: torch.Tensor,
                       labels: Mapping[str, torch.Tensor], epochs: int, batch_size: int, lr: float, d_steps: int,
                       w_biased: float, w_filtered: float, seed: int, progress=None) -> list:
    """Train a :class:`ModalDisentangler` as the original's BMMF trainer: batches of ``batch_users`` (the user of
    every training interaction, shuffled each epoch, so users weigh by their interaction count), one Adam step of
    the transforms, then ``d_steps`` Adam steps of the attackers on the detached transforms of that batch (both at
    ``lr``). ``labels`` are per user id. The networks run once per distinct user of a batch and the losses average
    over the batch's rows, which gives the original's per-interaction values at a fraction of the cost. Returns
    the mean transform loss of each epoch."""
    gen = torch.Generator().manual_seed(int(seed))
    opt_t = torch.optim.Adam(module.transform_parameters(), lr=lr)
    opt_a = torch.optim.Adam(module.attacker_parameters(), lr=lr)
    module.train()
    history = []
    for epoch in range(int(epochs)):
        order = batch_users[torch.randperm(batch_users.numel(), generator=gen)]
        total, steps = 0.0, 0
        for start in range(0, order.numel(), int(batch_size)):
            users = order[start:start + int(batch_size)]
            distinct, rows = torch.unique(users, return_inverse=True)
            u = user_feats[distinct]
            y = {f: lab[users] for f, lab in labels.items()}
            opt_t.zero_grad(set_to_none=True)
            loss, b, g = module.transform_loss(u, y, w_biased, w_filtered, generator=gen, rows=rows)
            loss.backward()
            opt_t.step()
            for _ in range(int(d_steps)):
                opt_a.zero_grad(set_to_none=True)
                module.attackers_loss(b, g, y, generator=gen, rows=rows).backward()
                opt_a.step()
            total, steps = total + float(loss.detach()), steps + 1
        history.append(total / max(steps, 1))
        if progress is not None:
            progress(epoch, history[-1])
    return history


class SensitiveFilter(nn.Module):
    r"""FMMRec's shared sensitive filter (``filter_mode: shared``): per sensitive attribute ``k`` a filter
    ``f_k = Linear(d_in -> d) - LeakyReLU(0.2) - Linear(d -> d)`` (Xavier-uniform weights), the same filters for
    users and items; a 2-row prompt table tells them apart (row 1 users, row 0 items, as the original):
    ``prompt_mode`` ``concat`` (``d_in = 2d``: ``[prompt ; x]``), ``add`` (``x + prompt``) or ``none``. The output is
    the mean of the filters."""

    PROMPT_MODES = ("concat", "add", "none")

    def __init__(self, dim: int, fields, prompt_mode: str = "concat", negative_slope: float = 0.2):
        super().__init__()
        if prompt_mode not in self.PROMPT_MODES:
            raise ValueError(f"prompt_mode must be one of {self.PROMPT_MODES}, got {prompt_mode!r}")
        self.prompt_mode = prompt_mode
        self.prompt = nn.Embedding(2, dim)
        d_in = 2 * dim if prompt_mode == "concat" else dim
        self.filters = nn.ModuleDict({
            f: nn.Sequential(nn.Linear(d_in, dim), nn.LeakyReLU(negative_slope), nn.Linear(dim, dim)) for f in fields})
        for m in self.filters.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)

    def forward(self, x: torch.Tensor, users: bool) -> torch.Tensor:
        p = self.prompt.weight[1 if users else 0].expand(x.shape[0], -1)
        if self.prompt_mode == "concat":
            x = torch.cat([p, x], dim=-1)
        elif self.prompt_mode == "add":
            x = x + p
        return torch.stack([f(x) for f in self.filters.values()]).mean(0)
