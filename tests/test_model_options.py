"""Options of the multimodal sequential base and MoRec: cosine scoring, the ID tower, the logQ switch, and
checkpoints that record the frozen features they were trained on."""

import json
import os

import numpy as np
import pytest
import torch

import recbole_mm
from recbole_mm.config import Config
from recbole_mm.model.abstract import FeatureMismatchError
from recbole_mm.testing import build_run

TINY = {"embedding_size": 16, "n_layers": 1, "n_heads": 1, "dnn_layers": 1, "MAX_ITEM_LIST_LENGTH": 10,
        "text_max_length": 16, "text_pooling": "mean", "train_batch_size": 64, "learning_rate": 0.005,
        "mode": "two_stage", "modality": "text", "loss": "inbatch"}


@pytest.fixture
def cfg(tiny_config, tiny_bert):
    return dict(tiny_config, **TINY, text_encoder=tiny_bert)


def _build(cfg, **over):
    config, dataset, train, valid, test, model, trainer = build_run("MoRec", "mm-tiny", dict(cfg, **over))
    return config, train, test, model


def test_cosine_scores_are_cosines_over_the_temperature(cfg):
    config, train, test, model = _build(cfg, similarity="cosine", temperature=0.2)
    model.eval()
    interaction = next(iter(test))[0]
    with torch.no_grad():
        scores = model.full_sort_predict(interaction)
        user = model.user_vector(interaction).numpy()
        items = model.item_matrix().numpy()
    unit_u = user / np.linalg.norm(user, axis=1, keepdims=True)
    unit_i = items[1:] / np.linalg.norm(items[1:], axis=1, keepdims=True)
    np.testing.assert_allclose(scores[:, 1:].numpy(), unit_u @ unit_i.T / 0.2, rtol=1e-4, atol=1e-4)
    model.train()
    assert torch.isfinite(model.calculate_loss(next(iter(train))))
    with pytest.raises(ValueError, match="similarity"):
        _build(cfg, similarity="euclid")


def test_id_tower_adds_a_zero_initialised_id_vector_that_untrained_items_keep(cfg):
    config, train, test, model = _build(cfg, id_tower=True)
    ids = model.item_tower.towers["id"].embedding.weight
    assert torch.count_nonzero(ids) == 0
    content = model.item_tower.towers["content"]
    probe = torch.arange(1, 9)
    model.eval()  # no dropout
    torch.testing.assert_close(model.item_tower(probe), content(probe) + ids[probe])
    batch = next(iter(train))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    opt.zero_grad()
    model.calculate_loss(batch).backward()
    opt.step()
    in_batch = torch.unique(torch.cat([batch[model.ITEM_SEQ].flatten(), batch[model.POS_ITEM_ID]]))
    touched = torch.zeros(model.n_items, dtype=torch.bool)
    touched[in_batch] = True
    assert torch.count_nonzero(ids[touched][1:]) > 0  # items of the batch moved
    assert torch.count_nonzero(ids[~touched]) == 0  # every other item keeps a zero ID part: content only


def test_logq_correction_switch(cfg):
    losses = {}
    for logq in (True, False):
        config, train, test, model = _build(cfg, logq_correction=logq)
        model.train()
        batch = next(iter(train))
        torch.manual_seed(0)
        before = model.calculate_loss(batch).item()
        model.log_pop.copy_(torch.randn_like(model.log_pop) * 3)  # another popularity
        torch.manual_seed(0)
        after = model.calculate_loss(batch).item()
        losses[logq] = (before, after)
    assert losses[True][0] != pytest.approx(losses[True][1])  # the correction reads the popularity
    assert losses[False][0] == pytest.approx(losses[False][1])  # switched off: popularity plays no part


def test_checkpoint_refuses_other_features(cfg, tmp_path):
    result = recbole_mm.run_recbole(model="MoRec", dataset="mm-tiny", config_dict=dict(cfg, epochs=1))
    checkpoint = torch.load(result["checkpoint_file"], map_location="cpu", weights_only=False)
    recorded = checkpoint["other_parameter"]["recbole_mm_features"]
    assert len(recorded) == 1
    (name, fingerprint), = recorded.items()
    config, train, test, model = _build(cfg)
    path = next(iter(model.content.loaded_feature_fingerprints))
    assert name.endswith(os.path.basename(path)) and len(fingerprint["sha256"]) == 64
    model.load_other_parameter(checkpoint["other_parameter"])  # the same file: fine

    # a re-extraction that orders the rows differently: a valid file, but not the one the model was trained on
    from recbole_mm.data import features as ff

    side = json.load(open(ff.sidecar_path(path)))
    array = np.load(path)
    order = np.random.default_rng(0).permutation(len(array))
    meta = {k: side[k] for k in ("modality", "kind", "encoder", "pooling", "settings") if k in side}
    ff.write_features(path, array[order], [side["tokens"][i] for i in order], **meta)
    config, train, test, model = _build(cfg)
    with pytest.raises(FeatureMismatchError, match=os.path.basename(path)):
        model.load_other_parameter(checkpoint["other_parameter"])


def test_fingerprints_are_per_model_when_models_share_a_dataset(cfg):
    config, train, test, first = _build(cfg)
    other_config = Config(model="MoRec", dataset="mm-tiny", config_dict=dict(cfg, text_max_length=12))
    second = recbole_mm.get_model("MoRec")(other_config, train._dataset)  # same dataset, another feature file
    assert len(first.content.loaded_feature_fingerprints) == 2  # the shared content object saw both
    one, two = first.feature_fingerprints(), second.feature_fingerprints()
    assert len(one) == 1 and len(two) == 1 and one.keys() != two.keys()
    first.load_other_parameter(first.other_parameter())  # its own record loads onto itself
