"""``MMGeneralRecommender``: the base of the general (user-item, graph) multimodal recommenders (FREEDOM, LATTICE,
FMMRec), beside :class:`~recbole_mm.model.abstract.MMSequentialRecommender`.

- frozen item features read by item token (:class:`~recbole_mm.model.content.ContentMixin`: extracted on first use,
  fingerprinted in checkpoints);
- pairwise input: RecBole's uniform negative sampler gives one negative per positive outside the user's training
  items (``train_neg_sample_args``), the BPR loss is :func:`bpr_loss`;
- the training interactions as index tensors (:meth:`MMGeneralRecommender.training_edges`) for the sparse graphs of
  :mod:`recbole_mm.layers.graph`;
- full sort over all items: the user and item matrices are computed once per evaluation pass (``user_item_matrices``
  of the subclass, cached until training resumes or weights are loaded).
"""

from __future__ import annotations

import torch
from recbole.model.abstract_recommender import GeneralRecommender
from torch import nn
from recbole.utils import InputType
from torch.nn import functional as F

from recbole_mm.data.dataset import MMDataset
from recbole_mm.model.content import ContentMixin
from recbole_mm.trainer import MMTrainer
from recbole_mm.utils import cfg_get

def parse_modalities(modality: str, supported, model: str) -> list:
    """``"text+image"`` -> ``["text", "image"]``, each part one of ``supported`` and named once."""
    parts = [p.strip() for p in str(modality).split("+")]
    if not parts or len(set(parts)) != len(parts) or any(p not in supported for p in parts):
        raise ValueError(f"{model} modality must be '+'-joined names among {list(supported)} (each once), "
                         f"got {modality!r}")
    return parts


def bpr_loss(users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """``-mean log sigmoid(u.p - u.n)`` over rows of ``[B, D]``."""
    return -F.logsigmoid((users * pos).sum(-1) - (users * neg).sum(-1)).mean()


class MMGeneralRecommender(ContentMixin, GeneralRecommender):
    """Base class (module docstring). Subclasses implement ``user_item_matrices(training) -> (users [n_users, D],
    items [n_items, D])`` and ``calculate_loss``."""

    input_type = InputType.PAIRWISE
    supported_modalities = ("text", "image")  # audio (and other names) come from <modality>_feature_file
    dataset_class = MMDataset
    trainer_class = MMTrainer

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.init_content(config, dataset)
        self.modality = cfg_get(config, "modality", "text+image")
        self.modalities = parse_modalities(self.modality, self.supported_modalities, type(self).__name__)
        self._matrices = None
        self._register_load_state_dict_pre_hook(lambda *args, **kwargs: self.invalidate_matrices())

    def init_id_and_feature_layers(self, features: dict, d: int, feat_d: int) -> None:
        """The layers MMRec's graph models share: user and item ID embeddings (Xavier-uniform, ``d``), a trainable
        copy of each modality's frozen features (``feature_tables``) and its projection to ``feat_d``
        (``feature_proj``)."""
        self.user_embedding = nn.Embedding(self.n_users, d)
        self.item_id_embedding = nn.Embedding(self.n_items, d)
        nn.init.xavier_uniform_(self.user_embedding.weight)
        nn.init.xavier_uniform_(self.item_id_embedding.weight)
        self.feature_tables = nn.ModuleDict({m: nn.Embedding.from_pretrained(f, freeze=False) for m, f in features.items()})
        self.feature_proj = nn.ModuleDict({m: nn.Linear(f.shape[1], feat_d) for m, f in features.items()})

    def lightgcn(self, adj: torch.Tensor, n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        """LightGCN over the ID embeddings: ``n_layers`` propagations by the sparse ``adj`` (users then items), the
        mean over the layers (layer 0 included), split into ``(users, items)``."""
        ego = torch.cat([self.user_embedding.weight, self.item_id_embedding.weight], 0)
        layers = [ego]
        for _ in range(n_layers):
            ego = torch.sparse.mm(adj, ego)
            layers.append(ego)
        return torch.stack(layers, 1).mean(1).split([self.n_users, self.n_items], 0)

    def training_edges(self, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """``(users, items)`` int64 tensors of the training interactions (internal ids)."""
        coo = dataset.inter_matrix(form="coo")
        return torch.as_tensor(coo.row, dtype=torch.int64), torch.as_tensor(coo.col, dtype=torch.int64)

    # ------------------------------------------------------------- inference
    def user_item_matrices(self, training: bool):
        raise NotImplementedError

    def invalidate_matrices(self) -> None:
        self._matrices = None

    def invalidate_item_matrix(self) -> None:  # MMTrainer calls this at the start of every evaluation pass
        self.invalidate_matrices()

    def train(self, mode: bool = True):
        if mode:
            self.invalidate_matrices()
        return super().train(mode)

    def _eval_matrices(self):
        if self._matrices is None or self.training:
            with torch.no_grad():
                self._matrices = self.user_item_matrices(training=False)
        return self._matrices

    def predict(self, interaction):
        users, items = self._eval_matrices()
        return (users[interaction[self.USER_ID]] * items[interaction[self.ITEM_ID]]).sum(-1)

    def full_sort_predict(self, interaction):
        users, items = self._eval_matrices()
        return users[interaction[self.USER_ID]] @ items.t()


def user_item_representations(model) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(users [n_users, D], items [n_items, D], where they came from)`` of a general model, the vectors it scores
    with: the plugin's models' matrices (``"user_item_matrices"``), the propagated vectors of RecBole's graph models
    whose ``forward()`` returns ``(users, items, ...)`` (LightGCN, NGCF, NCL: ``"forward"``), else the
    ``user_embedding`` / ``item_embedding`` tables (BPR, ...: ``"user_embedding"``; for a graph model whose
    ``forward`` needs arguments, e.g. SGL, these are its layer-0 vectors, not the propagated ones it scores with).
    Used by the fairness audit and as FMMRec's stage-0 input."""
    model.eval()
    with torch.no_grad():
        if isinstance(model, MMGeneralRecommender):
            return (*model.user_item_matrices(training=False), "user_item_matrices")
        try:
            out = model.forward()
        except TypeError:
            out = None
        if (isinstance(out, tuple) and len(out) >= 2 and isinstance(out[0], torch.Tensor) and out[0].dim() == 2
                and out[0].shape[0] == model.n_users and out[1].shape[0] == model.n_items):
            return out[0], out[1], "forward"
        users, items = getattr(model, "user_embedding", None), getattr(model, "item_embedding", None)
        if isinstance(users, torch.nn.Embedding) and isinstance(items, torch.nn.Embedding):
            return users.weight, items.weight, "user_embedding"
    raise ValueError(f"cannot find user / item representations in {type(model).__name__} (no user / item matrices, "
                     "no forward() -> (users, items), no user_embedding / item_embedding tables); audit its vectors "
                     "with recbole_mm.fairness.audit directly")


def user_representations(model) -> tuple[torch.Tensor, str]:
    """``([n_users, D] user vectors, where they came from)``: :func:`user_item_representations` without the items."""
    users, _, source = user_item_representations(model)
    return users, source
