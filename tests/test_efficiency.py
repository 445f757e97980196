"""The efficiency record of every run (MMTrainer.efficiency), in the result dict and the CLI table; recbole-mm tpme."""

import json
import logging
import time

import pytest
import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

import recbole_mm
from recbole_mm.cli import main as cli
from recbole_mm.testing import build_run
from tests.conftest import TINY_SEQ
from tests.test_morec import MOREC_TINY, encoder_module_params

TINY_ARGS = [f"{k}={v}" for k, v in TINY_SEQ.items()]
KEYS = {"seconds_per_epoch", "train_epochs", "seconds_per_eval", "fit_seconds", "peak_memory_mib",
        "peak_memory_increase_mib", "memory_kind", "max_rss_mib", "trainable_params", "total_params", "device"}


def fit_once(model, cfg):
    config, dataset, train, valid, test, net, trainer = build_run(model, "mm-tiny", cfg)
    assert trainer.efficiency is None  # nothing measured before fit
    trainer.fit(train, valid, saved=False)
    return net, trainer


def check_sane(eff):
    assert set(eff) == KEYS
    assert eff["train_epochs"] == 1 and eff["seconds_per_epoch"] > 0 and eff["seconds_per_eval"] > 0
    assert eff["fit_seconds"] >= eff["seconds_per_epoch"]
    assert eff["memory_kind"] == "cpu_rss" and eff["device"] == "cpu"
    assert 50 < eff["peak_memory_mib"] < 100_000 and 0 <= eff["peak_memory_increase_mib"] <= eff["peak_memory_mib"]
    assert eff["max_rss_mib"] >= eff["peak_memory_mib"] - 5  # the process's high-water mark (page-count lag aside)
    assert 0 < eff["trainable_params"] <= eff["total_params"]


def test_sasrec_record_logged_and_its_parameter_count_by_hand(tiny_config, caplog):
    caplog.set_level(logging.INFO)
    net, trainer = fit_once("SASRec", tiny_config)
    eff = trainer.efficiency
    check_sane(eff)
    logged = [r.getMessage() for r in caplog.records if "efficiency" in r.getMessage()]
    assert len(logged) == 1 and "s / epoch" in logged[0] and f"{eff['trainable_params']:,} trainable" in logged[0]
    d, inner, n_pos = 16, 32, TINY_SEQ["MAX_ITEM_LIST_LENGTH"]
    layer = 4 * (d * d + d) + 2 * d + (d * inner + inner) + (inner * d + d) + 2 * d  # attention, LN, FFN, LN
    expected = net.n_items * d + n_pos * d + layer + 2 * d  # item and position tables, one layer, the input LN
    assert eff["trainable_params"] == eff["total_params"] == expected


def test_morec_frozen_encoder_counts_trainable_apart(tiny_config, tiny_bert):
    cfg = dict(tiny_config, **MOREC_TINY, text_encoder=tiny_bert, mode="end2end", finetune="frozen", loss="inbatch")
    net, trainer = fit_once("MoRec", cfg)
    eff = trainer.efficiency
    check_sane(eff)
    encoder = encoder_module_params(net)
    named = dict(net.named_parameters())
    assert encoder and eff["total_params"] == sum(p.numel() for p in named.values())
    assert eff["trainable_params"] == sum(p.numel() for n, p in named.items() if n not in encoder)
    assert eff["trainable_params"] < eff["total_params"]


class BigActivationRec(SequentialRecommender):
    """Mean of the history's item embeddings; its first training step holds a 200 MiB tensor for a moment."""

    input_type = InputType.POINTWISE
    big_mib = 200

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.item_embedding = torch.nn.Embedding(self.n_items, 8, padding_idx=0)
        self.loss_fct = torch.nn.CrossEntropyLoss()
        self.allocated = False

    def forward(self, item_seq, item_seq_len):
        return self.item_embedding(item_seq).sum(1) / item_seq_len.clamp(min=1).unsqueeze(1).float()

    def calculate_loss(self, interaction):
        user = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        loss = self.loss_fct(user @ self.item_embedding.weight.t(), interaction[self.POS_ITEM_ID])
        if not self.allocated:
            self.allocated = True
            big = torch.ones(self.big_mib * 2 ** 18)  # float32: 200 MiB, every page written
            time.sleep(0.05)
            loss = loss + big[-1] * 0
            del big
        return loss

    def predict(self, interaction):
        user = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return (user * self.item_embedding(interaction[self.ITEM_ID])).sum(-1)

    def full_sort_predict(self, interaction):
        return self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]) @ self.item_embedding.weight.t()


def test_peak_memory_sees_a_large_allocation_during_training(tiny_config):
    net, trainer = fit_once(BigActivationRec, dict(tiny_config, loss_type="CE"))
    eff = trainer.efficiency
    assert net.allocated and eff["memory_kind"] == "cpu_rss"
    assert eff["peak_memory_increase_mib"] >= 150, eff
    assert eff["trainable_params"] == eff["total_params"] == net.n_items * 8


def test_result_dict_cli_table_and_log(tiny_root, tmp_path, capsys):
    out = tmp_path / "res.json"
    assert cli(["run", "--model", "SASRec", "--dataset", "mm-tiny", "-o", str(out), "--data-path", tiny_root,
                "--no-save"] + TINY_ARGS) == 0
    text = capsys.readouterr().out
    for column in ("s / epoch", "s / evaluation", "peak memory MiB (cpu_rss)", "trainable params", "total params"):
        assert column in text, text
    eff = json.loads(out.read_text())["efficiency"]
    assert set(eff) == KEYS and eff["seconds_per_epoch"] > 0


def test_objective_function_carries_the_record(tiny_config):
    result = recbole_mm.objective_function(dict(tiny_config, model="SASRec", dataset="mm-tiny"), saved=False)
    assert set(result["efficiency"]) == KEYS and result["efficiency"]["train_epochs"] == 1


# ------------------------------------------------------------------------ tpme
def write_run(path, model, spe, params, mem, ndcg, **extra):
    eff = {"seconds_per_epoch": spe, "seconds_per_eval": 0.1, "peak_memory_mib": mem,
           "peak_memory_increase_mib": mem / 4, "memory_kind": "cpu_rss", "trainable_params": params,
           "total_params": 2 * params}
    eff.update(extra)
    path.write_text(json.dumps({"model": model, "best_valid_result": {"ndcg@10": ndcg},
                                "test_result": {"ndcg@10": ndcg, "hit@10": 0.2}, "efficiency": eff}))
    return str(path)


def rows_of(text):
    return {r[0]: r for r in ([c.strip() for c in line.strip("|").split("|")]
                              for line in text.splitlines() if line.startswith("| ") and "---" not in line)}


def test_tpme_by_hand(tmp_path, capsys):
    fft = write_run(tmp_path / "fft.json", "MoRec", 443.0, 200_000_000, 47_000.0, 0.05)
    iisan = write_run(tmp_path / "iisan.json", "IISAN", 22.0, 4_000_000, 3_000.0, 0.051)
    lora = write_run(tmp_path / "lora.json", "MoRec", 360.0, 1_000_000, 38_000.0, 0.049)
    assert cli(["tpme", fft, iisan, lora]) == 0
    rows = rows_of(capsys.readouterr().out)
    # 5e: min-max per figure over the three runs, then 0.45 t + 0.1 p + 0.45 m
    t = {"fft": 1.0, "iisan": 0.0, "lora": (360 - 22) / (443 - 22)}
    p = {"fft": 1.0, "iisan": (4e6 - 1e6) / (200e6 - 1e6), "lora": 0.0}
    m = {"fft": 1.0, "iisan": 0.0, "lora": (38e3 - 3e3) / (47e3 - 3e3)}
    for name in t:
        assert float(rows[name][-1]) == pytest.approx(0.45 * t[name] + 0.1 * p[name] + 0.45 * m[name], abs=1e-4)
    assert rows["iisan"][1] == "IISAN" and rows["iisan"][4] == "4,000,000" and rows["iisan"][5] == "0.0510"
    # other weights, the memory increase and another metric
    assert cli(["tpme", fft, iisan, "--time-weight", "0.2", "--params-weight", "0.6", "--memory-weight", "0.2",
                "--memory", "increase", "--metric", "hit@10"]) == 0
    rows = rows_of(capsys.readouterr().out)
    assert float(rows["fft"][-1]) == pytest.approx(1.0) and float(rows["iisan"][-1]) == pytest.approx(0.0)
    assert rows["fft"][3] == "11750.0" and rows["fft"][5] == "0.2000" and "hit@10 (test)" in rows["run"][5]


@pytest.mark.parametrize("content, needle", [
    ("not json", "is not a run result (not JSON"),
    ('{"a": 1}', "is not a run result (no 'model' / 'test_result')"),
    ('{"model": "SASRec", "test_result": {}}', "lacks the efficiency keys seconds_per_epoch, trainable_params"),
    ('{"model": "SASRec", "test_result": {}, "efficiency": {"seconds_per_epoch": null, "trainable_params": 1, '
     '"peak_memory_mib": 1}}', "lacks the efficiency keys seconds_per_epoch"),
])
def test_tpme_bad_file_is_one_line_error(tmp_path, capsys, content, needle):
    good = write_run(tmp_path / "good.json", "SASRec", 1.0, 10, 100.0, 0.1)
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert cli(["tpme", good, str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recbole-mm tpme: error: ") and needle in err[0], err
    assert "bad.json" in err[0]


def test_tpme_argument_errors(tmp_path, capsys):
    a = write_run(tmp_path / "a.json", "SASRec", 1.0, 10, 100.0, 0.1)
    b = write_run(tmp_path / "b.json", "SASRec", 2.0, 20, 200.0, 0.1)
    for argv, needle in ((["tpme", a], "at least two"), (["tpme", a, b, "--time-weight", "0.5"], "sum to 1"),
                         (["tpme", a, str(tmp_path / "none.json")], "does not exist")):
        assert cli(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_tpme_help_and_weights_defaults():
    from recbole_mm.cli import TPME_WEIGHTS, build_parser, tpme

    assert TPME_WEIGHTS == (0.45, 0.1, 0.45)
    assert "tpme" in build_parser().format_help()
    assert tpme([(1, 1, 1), (1, 1, 1)]) == [0.0, 0.0]  # no spread: every figure normalises to 0
