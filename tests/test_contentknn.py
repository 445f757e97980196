"""ContentKNN: a training-free content baseline, checked against scores computed here from the feature file."""

import numpy as np
import pytest
import torch
from recbole.data.interaction import Interaction

import recbole_mm
from recbole_mm.testing import build_run

KNN = {"MAX_ITEM_LIST_LENGTH": 10, "text_max_length": 16, "metrics": ["Hit", "NDCG"], "topk": [10],
       "valid_metric": "Hit@10"}


def _build(cfg):
    config, dataset, train, valid, test, model, trainer = build_run("ContentKNN", "mm-tiny", cfg)
    return config, dataset, test, model


def _own_scores(raw, seq, length, k, decay, aggregate):
    unit = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
    hist = [int(x) for x in seq[:length]][-k:]
    weights = np.array([decay ** (len(hist) - 1 - j) for j in range(len(hist))])
    sims = unit[hist] @ unit.T  # [h, n]
    if aggregate == "mean":
        return (weights[:, None] * sims).sum(0) / weights.sum()
    return (weights[:, None] * sims).max(0)


@pytest.mark.parametrize("aggregate,k,decay", [("mean", 10, 1.0), ("mean", 3, 0.5), ("max", 4, 0.8)])
def test_scores_equal_a_loop_over_the_feature_file(tiny_config, tiny_bert, aggregate, k, decay):
    cfg = dict(tiny_config, **KNN, text_encoder=tiny_bert, knn_aggregate=aggregate, knn_history=k, knn_decay=decay)
    config, dataset, test, model = _build(cfg)
    from recbole_mm.extract import default_feature_path, spec_from_config

    path = default_feature_path(dataset.dataset_path, spec_from_config(config, "text"), config["features_dir"])
    raw = np.load(path).astype(np.float64)  # rows in the file's token order
    tokens = __import__("json").load(open(path[:-4] + ".json"))["tokens"]
    row_of = {t: i for i, t in enumerate(tokens)}
    id2tok = dataset.field2id_token[dataset.iid_field]
    raw = np.stack([np.zeros(raw.shape[1])] + [raw[row_of[str(t)]] for t in id2tok[1:]])  # by internal id
    model.eval()
    interaction = next(iter(test))[0]
    with torch.no_grad():
        full = model.full_sort_predict(interaction).numpy()
        items = torch.randint(1, model.n_items, (len(interaction),))
        interaction.update(Interaction({model.ITEM_ID: items}))
        single = model.predict(interaction).numpy()
    seqs, lengths = interaction[model.ITEM_SEQ].numpy(), interaction[model.ITEM_SEQ_LEN].numpy()
    for row in range(min(len(seqs), 12)):
        want = _own_scores(raw, seqs[row], lengths[row], k, decay, aggregate)
        np.testing.assert_allclose(full[row, 1:], want[1:], rtol=1e-4, atol=1e-5)
        assert single[row] == pytest.approx(full[row, items[row]], rel=1e-4, abs=1e-5)


def test_runs_by_name_without_training(tiny_config, tiny_bert):
    cfg = dict(tiny_config, **KNN, text_encoder=tiny_bert)
    result = recbole_mm.run_recbole(model="ContentKNN", dataset="mm-tiny", config_dict=cfg)
    assert 0.0 <= result["test_result"]["hit@10"] <= 1.0  # random tiny encoder: any value; scores are tested above
    assert result["new_test_result"]["rows"] + result["cold_test_result"]["rows"] <= 60
    config, dataset, test, model = _build(cfg)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fake_loss"]


def test_bad_keys_are_clear_errors(tiny_config, tiny_bert):
    for key, value in (("knn_aggregate", "median"), ("knn_modality", "audio"), ("knn_decay", 0.0),
                       ("knn_history", 50), ("similarity", "cosine")):
        with pytest.raises(ValueError, match=key):
            _build(dict(tiny_config, **KNN, text_encoder=tiny_bert, **{key: value}))
