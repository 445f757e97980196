"""Distributed runs (``recbole-mm run --nproc N``, ``run(..., nproc=N)``, ``evaluate_checkpoint(..., nproc=N)``) on the
CPU with gloo, in real processes (``torch.multiprocessing.spawn``, as users run them).

What is checked against an independent computation (one process, the ordinary path):

1. evaluating one checkpoint with 2 processes gives the 1-process metrics (1e-6; 63 evaluation rows, which do not
   split evenly; accuracy metrics and a non-additive one, ShannonEntropy; cold / new item groups);
2. ``recbole-mm run --nproc 2`` trains, reports, writes one log and one checkpoint, which ``recbole-mm evaluate``
   reloads in one process with the same figures; the training follows the 1-process run (see the test for why it
   can and within which tolerance);
3. an end-to-end MoRec (text encoder in its item tower) encodes each catalogue item once per evaluation summed
   over the ranks;
4. history masking holds on every rank: no item of a user's history (but the target) in its top-k.
"""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

import recbole_mm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(recbole_mm.__file__)))

N_USERS = 63  # 63 evaluation rows (odd: the ranks get 32 and 31) and 11,328 training sequences (even, see test 2)
SMALL = {
    "hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1, "MAX_ITEM_LIST_LENGTH": 20,
    "show_progress": False, "count_flops": False, "state": "WARNING", "learning_rate": 0.01,
    "metric_decimal_place": 12, "topk": [5, 10], "valid_metric": "ndcg@10",
    # ShannonEntropy (of the items over all top-k lists) is not a mean over rows: a per-rank average would be wrong.
    # (ItemCoverage, GiniIndex, AveragePopularity, TailPercentage fail in RecBole 1.2.1's Collector.get_data_struct
    # itself, one process included: it calls .cpu() on the int / Counter they read.)
    "metrics": ["Recall", "MRR", "NDCG", "Hit", "Precision", "MAP", "ShannonEntropy"],
}
TOL = 1e-6


@pytest.fixture(scope="module")
def odd_root(ml100k_mm, tmp_path_factory):
    from recbole_mm.testing import make_subset_dataset

    root = tmp_path_factory.mktemp("data-odd")
    make_subset_dataset(ml100k_mm, "ml-100k-mm", str(root), "mm-odd", n_users=N_USERS)
    with open(os.path.join(root, "mm-odd", "mm-odd.yaml"), "w", encoding="utf-8") as f:
        f.write("load_col:\n  inter: [user_id, item_id, rating, timestamp]\ntext_fields: [title, genres]\n")
    return str(root)


def _train(model, config_dict, workdir) -> dict:
    """One single-process run (in this process, RecBole's files under ``workdir``)."""
    here = os.getcwd()
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)
    try:
        return recbole_mm.run_recbole(model=model, dataset="mm-odd", config_dict=config_dict)
    finally:
        os.chdir(here)


@pytest.fixture(scope="module")
def checkpoints(odd_root, tmp_path_factory):
    """Checkpoints of a sequential (SASRec) and a general (BPR) model trained for one epoch in one process."""
    work = tmp_path_factory.mktemp("train")
    out = {}
    for model in ("SASRec", "BPR"):
        cfg = dict(SMALL, data_path=odd_root, checkpoint_dir=str(work / "saved"), epochs=1, train_batch_size=512)
        out[model] = _train(model, cfg, str(work / model))["checkpoint_file"]
    return out


def _close(a: dict, b: dict, tol: float = TOL) -> None:
    assert set(a) == set(b)
    for key in a:
        if a[key] is None or b[key] is None:
            assert a[key] is None and b[key] is None, key
        else:
            assert abs(float(a[key]) - float(b[key])) <= tol, (key, a[key], b[key])


# ------------------------------------------------------------------------------- 1. honest metrics
@pytest.mark.parametrize("model, split", [("SASRec", "test"), ("SASRec", "valid"), ("BPR", "test")])
def test_two_process_evaluation_equals_one_process(checkpoints, model, split):
    from recbole_mm.quick_start import evaluate_checkpoint

    key = "test_result" if split == "test" else "best_valid_result"
    one = evaluate_checkpoint(checkpoints[model], split=split)
    two = evaluate_checkpoint(checkpoints[model], split=split, nproc=2)
    assert one[f"{split}_rows"] == two[f"{split}_rows"] == N_USERS  # every row once (no padding repeat)
    _close(one[key], two[key])
    assert one[key]["shannonentropy@10"] > 0 and one[key]["hit@10"] > 0  # not a trivially equal all-zero result
    for group in ("cold", "new"):
        _close(one[f"{group}_{split}_result"], two[f"{group}_{split}_result"])


# ------------------------------------------------------------------------------- 2. the CLI trains
def _cli(args, cwd, env_extra=None):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-m", "recbole_mm.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_cli_nproc2_trains_saves_and_reloads_in_one_process(odd_root, tmp_path):
    """Why the 2-process run can be compared with the 1-process run at all: no shuffling (``shuffle: False``), no
    dropout, a loss that is a mean over the batch (SASRec's CE: no sampled negatives) and 11,328 training sequences in
    4 batches of 2,832. Each rank then gets 1,416 rows per step, and the two shares of a step are exactly the
    1-process batch (RecBole's DistributedSampler deals rows round-robin); DDP averages the two half-batch gradients,
    which is the full-batch gradient; rank 0 initialises the weights as the 1-process run (same seed). So both runs
    take the same optimizer steps, up to float rounding (the gradient is summed in another order): asserted, the
    losses to 1e-4 relative and the metrics to 0.02 (margin for a rank flip between two near-tied items, which moves
    a metric by about 1/63); measured on this machine: losses equal to 2e-8 relative, metrics identical."""
    cfg = dict(SMALL, epochs=2, train_batch_size=2832, shuffle=False, hidden_dropout_prob=0.0, attn_dropout_prob=0.0,
               loss_type="CE")
    overrides = [f"{k}={json.dumps(v)}" for k, v in cfg.items()] + [f"checkpoint_dir={tmp_path / 'saved2'}"]
    _cli(["run", "--nproc", "2", "--model", "SASRec", "--dataset", "mm-odd", "--data-path", odd_root,
          "-o", str(tmp_path / "two.json"), *overrides], cwd=str(tmp_path))
    with open(tmp_path / "two.json", encoding="utf-8") as f:
        two = json.load(f)
    # only rank 0 wrote: one checkpoint, one log, one tensorboard folder
    saved = glob.glob(str(tmp_path / "saved2" / "*.pth"))
    assert saved == [two["checkpoint_file"]]
    assert len(glob.glob(str(tmp_path / "log" / "SASRec" / "*.log"))) == 1
    assert len(os.listdir(tmp_path / "log_tensorboard")) == 1
    assert two["test_rows"] == two["valid_rows"] == N_USERS

    # the checkpoint reloads in one process (recbole-mm evaluate) with the run's own figures
    _cli(["evaluate", saved[0], "-o", str(tmp_path / "again.json")], cwd=str(tmp_path))
    with open(tmp_path / "again.json", encoding="utf-8") as f:
        again = json.load(f)
    _close(two["test_result"], again["test_result"])

    # the same run in one process
    one = _train("SASRec", dict(cfg, data_path=odd_root, checkpoint_dir=str(tmp_path / "saved1")),
                 str(tmp_path / "one"))
    assert len(one["train_loss_history"]) == len(two["train_loss_history"]) == 2
    for a, b in zip(one["train_loss_history"], two["train_loss_history"]):  # the mean over the ranks (MMTrainer)
        assert abs(a - b) <= 1e-4 * abs(a), (one["train_loss_history"], two["train_loss_history"])
    _close(one["best_valid_result"], two["best_valid_result"], tol=0.02)
    _close(one["test_result"], two["test_result"], tol=0.02)


def test_cli_two_nodes_recipe_on_one_machine(odd_root, tmp_path):
    """The multi-node recipe (the same command on every node, --node-rank apart), with two "nodes" of one process
    each on this machine: node 0 reports and alone writes the checkpoint and the log, node 1 only says it is done;
    the figures are those of the checkpoint evaluated in one process."""
    from recbole_mm import distributed

    common = ["run", "--model", "BPR", "--dataset", "mm-odd", "--data-path", odd_root, "--nproc", "1", "--nnodes", "2",
              "--master-addr", "127.0.0.1", "--master-port", str(distributed.free_port()), "epochs=1",
              "show_progress=false", f"checkpoint_dir={tmp_path / 'saved'}", "metric_decimal_place=12"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    node1 = subprocess.Popen([sys.executable, "-m", "recbole_mm.cli", *common, "--node-rank", "1"], cwd=str(tmp_path),
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _cli([*common, "--node-rank", "0", "-o", str(tmp_path / "node0.json")], cwd=str(tmp_path))
        out, err = node1.communicate(timeout=300)
    finally:
        if node1.poll() is None:
            node1.kill()
    assert node1.returncode == 0, err[-4000:]
    assert "node 1: done" in out
    with open(tmp_path / "node0.json", encoding="utf-8") as f:
        result = json.load(f)
    assert glob.glob(str(tmp_path / "saved" / "*.pth")) == [result["checkpoint_file"]]
    assert len(glob.glob(str(tmp_path / "log" / "BPR" / "*.log"))) == 1
    assert result["test_rows"] == N_USERS
    from recbole_mm.quick_start import evaluate_checkpoint

    _close(evaluate_checkpoint(result["checkpoint_file"])["test_result"], result["test_result"])


# ------------------------------------------------------------------------------- 3. item tower once
def test_end2end_item_tower_encodes_each_item_once_across_ranks(odd_root, tiny_bert, tmp_path):
    from recbole_mm.quick_start import evaluate_checkpoint

    cfg = dict(SMALL, data_path=odd_root, checkpoint_dir=str(tmp_path / "saved"), epochs=0, embedding_size=16,
               MAX_ITEM_LIST_LENGTH=10, text_max_length=16, text_pooling="mean", text_encoder=tiny_bert,
               mode="end2end", modality="text", finetune="full", loss="inbatch", item_matrix_batch_size=128,
               eval_batch_size=16)
    run = _train("MoRec", cfg, str(tmp_path / "run"))
    one = evaluate_checkpoint(run["checkpoint_file"])
    two = evaluate_checkpoint(run["checkpoint_file"], nproc=2)
    import recbole_mm.quick_start as qs

    config, model = qs.load_data_and_model(run["checkpoint_file"])[:2]
    assert model.expensive_item_tower
    n_items = model.n_items  # ids 0 .. n_items - 1, the padding row included, in 11 chunks of 128
    assert one["items_encoded"] == n_items
    assert two["items_encoded"] == n_items  # summed over the 2 ranks: each item once, not once per rank
    _close(one["test_result"], two["test_result"])  # the gathered matrix is the 1-process matrix


# ------------------------------------------------------------------------------- 4. history masking
def _history_worker(rank, checkpoint, keys, mask_history):
    """One rank: evaluate the test split and, for every row this rank ranks, how many of the user's history items
    (its target apart) are in its top 10. Rank 0 returns every rank's rows."""
    import torch.distributed as dist

    from recbole_mm import quick_start
    from recbole_mm.registry import model_class_of
    from recbole_mm.trainer.utils import get_trainer

    torch.set_num_threads(1)
    config, model, dataset, train, valid, test = quick_start.load_data_and_model(
        checkpoint, dict(keys, local_rank=rank, mask_history=mask_history))
    trainer = get_trainer(config["MODEL_TYPE"], model_class_of(config))(config, model)
    history = test._dataset.history_index
    rows = []
    original = trainer._full_sort_batch_eval

    def spy(batched):
        interaction, scores, positive_u, positive_i = original(batched)
        top = torch.topk(scores, 10, dim=-1).indices.cpu()
        for r, user in enumerate(interaction[model.USER_ID].tolist()):
            known = set(history.items_of(user).tolist()) - {int(positive_i[r])}
            rows.append((user, len(known), len(known & set(top[r].tolist()))))
        return interaction, scores, positive_u, positive_i

    trainer._full_sort_batch_eval = spy
    trainer.evaluate(test, load_best_model=False)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, rows)
    dist.destroy_process_group()
    return everyone if rank == 0 else None


def test_history_masking_holds_on_every_rank(checkpoints):
    from recbole_mm import distributed

    ranks = {}
    for mask in (True, False):
        keys = dict(distributed.rendezvous(2), mask_history=mask)
        ranks[mask] = distributed.launch(_history_worker, (checkpoints["SASRec"], keys, mask), nproc=2)
    masked = ranks[True]
    assert all(masked[r] for r in range(2))  # both ranks ranked rows
    users = [row[0] for rows in masked for row in rows]
    assert sorted(users) == sorted(set(users)) and len(users) == N_USERS  # every user once, over the ranks
    assert sum(row[1] for rows in masked for row in rows) > 0  # the users do have histories
    assert all(row[2] == 0 for rows in masked for row in rows)  # and none of it is recommended
    # the check can fail: without masking, history items do reach the top 10
    assert sum(row[2] for rows in ranks[False] for row in rows) > 0


# ------------------------------------------------------------------------------- 5. what ranks share at evaluation
def _share_worker(rank, port, checkpoint_file):
    """Rank 0's BatchNorm statistics reach every rank; the best checkpoint is read by rank 0 only (the path does not
    exist for rank 1: another node without the checkpoint folder) and sent to the others."""
    import torch.distributed as dist

    from recbole_mm.trainer import trainer as mm_trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        torch.manual_seed(rank)  # each rank's statistics drifted apart while training
        net[1].running_mean.copy_(torch.randn(4))
        net[1].running_var.copy_(torch.rand(4) + 0.5)
        mm_trainer._sync_batchnorm_statistics(net)
        stats = torch.cat([net[1].running_mean, net[1].running_var])

        class Host:  # the parts of MMTrainer that _prepare_distributed_eval reads
            model = torch.nn.Linear(2, 2)
            saved_model_file = checkpoint_file if rank == 0 else checkpoint_file + ".on-another-node"
            logger = __import__("logging").getLogger("share")

        Host.model.load_other_parameter = lambda para: None
        mm_trainer.MMTrainer._prepare_distributed_eval(Host, True, None)
        weights = Host.model.weight.detach().clone()
        everyone = [None, None]
        dist.all_gather_object(everyone, (stats.tolist(), weights.tolist()))
        return everyone if rank == 0 else None  # plain lists: tensors would cross the queue by shared memory
    finally:
        dist.destroy_process_group()


def test_ranks_evaluate_with_rank_0s_statistics_and_checkpoint(tmp_path):
    from recbole_mm import distributed

    saved = torch.nn.Linear(2, 2)
    path = str(tmp_path / "best.pth")
    torch.save({"state_dict": saved.state_dict(), "other_parameter": None}, path)
    (s0, w0), (s1, w1) = distributed.launch(_share_worker, (distributed.free_port(), path), nproc=2)
    torch.manual_seed(0)
    expected = torch.cat([torch.randn(4), torch.rand(4) + 0.5]).tolist()  # what rank 0 drew
    assert s0 == expected and s1 == expected
    assert w0 == saved.weight.detach().tolist() and w1 == w0
