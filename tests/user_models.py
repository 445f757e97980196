"""Models defined outside the package, as a user would write them (registered in tests)."""

import os

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.trainer import Trainer
from recbole.utils import InputType

from recbole_mm.data.dataset import MMSequentialDataset

HERE = os.path.dirname(os.path.abspath(__file__))


class CountingDataset(MMSequentialDataset):
    """A user dataset class, chosen through the model's ``dataset_class`` attribute."""

    built = 0

    def __init__(self, config):
        type(self).built += 1
        super().__init__(config)


class CountingTrainer(Trainer):
    """A user trainer class, chosen through the model's ``trainer_class`` attribute."""

    epochs_run = 0

    def _train_epoch(self, *args, **kwargs):
        type(self).epochs_run += 1
        return super()._train_epoch(*args, **kwargs)


class UserSeqRec(SequentialRecommender):
    """Mean of the history's item embeddings, scored against all items (full softmax)."""

    input_type = InputType.POINTWISE
    config_file = os.path.join(HERE, "fixtures", "models", "UserSeqRec.yaml")
    dataset_class = CountingDataset
    trainer_class = CountingTrainer

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.dim = config["user_dim"]
        self.item_embedding = torch.nn.Embedding(self.n_items, self.dim, padding_idx=0)
        self.loss_fct = torch.nn.CrossEntropyLoss()

    def forward(self, item_seq, item_seq_len):
        emb = self.item_embedding(item_seq)
        return emb.sum(1) / item_seq_len.clamp(min=1).unsqueeze(1).float()

    def calculate_loss(self, interaction):
        user = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        logits = user @ self.item_embedding.weight.t()
        return self.loss_fct(logits, interaction[self.POS_ITEM_ID])

    def predict(self, interaction):
        user = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return (user * self.item_embedding(interaction[self.ITEM_ID])).sum(-1)

    def full_sort_predict(self, interaction):
        user = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return user @ self.item_embedding.weight.t()
