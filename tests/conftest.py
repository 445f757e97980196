"""Shared fixtures: one thread, no network, a session cache for embedded datasets, tiny configs and encoders."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

import recbole_mm  # noqa: E402,F401

TINY_SEQ = {
    "hidden_size": 16,
    "inner_size": 32,
    "n_layers": 1,
    "n_heads": 1,
    "MAX_ITEM_LIST_LENGTH": 20,
    "epochs": 1,
    "train_batch_size": 256,
    "eval_batch_size": 256,
    "show_progress": False,
    "count_flops": False,
    "state": "WARNING",
}


@pytest.fixture(scope="session")
def mm_home(tmp_path_factory):
    """RECBOLE_MM_HOME for the whole session: ml-100k-mm is built once."""
    home = tmp_path_factory.mktemp("recbole_mm_home")
    old = os.environ.get("RECBOLE_MM_HOME")
    os.environ["RECBOLE_MM_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("RECBOLE_MM_HOME", None)
    else:
        os.environ["RECBOLE_MM_HOME"] = old


@pytest.fixture(scope="session")
def ml100k_mm(mm_home):
    """Folder of the embedded ml-100k-mm dataset (built on first use)."""
    from recbole_mm.data.embedded import build_embedded, embedded_dataset_dir

    folder = embedded_dataset_dir("ml-100k-mm")
    if not os.path.isfile(os.path.join(folder, "ml-100k-mm.inter")):
        build_embedded("ml-100k-mm", folder)
    return folder


@pytest.fixture(scope="session")
def tiny_root(ml100k_mm, tmp_path_factory):
    """data_path holding `mm-tiny`: the first 60 users of ml-100k-mm with their items' text and posters."""
    from recbole_mm.testing import make_subset_dataset

    root = tmp_path_factory.mktemp("data")
    make_subset_dataset(ml100k_mm, "ml-100k-mm", str(root), "mm-tiny", n_users=60)
    with open(os.path.join(root, "mm-tiny", "mm-tiny.yaml"), "w", encoding="utf-8") as f:
        f.write("load_col:\n  inter: [user_id, item_id, rating, timestamp]\ntext_fields: [title, genres]\n")
    return str(root)


@pytest.fixture(autouse=True)
def _in_tmp_cwd(tmp_path, monkeypatch):
    """RecBole writes log/, log_tensorboard/ and saved/ under the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])


@pytest.fixture
def tiny_config(tmp_path, tiny_root):
    cfg = dict(TINY_SEQ)
    cfg.update(data_path=tiny_root, checkpoint_dir=str(tmp_path / "saved"))
    return cfg


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    from recbole_mm.testing import make_tiny_text_encoder

    return make_tiny_text_encoder(str(tmp_path_factory.mktemp("tiny-bert")), "bert")


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory):
    from recbole_mm.testing import make_tiny_image_encoder

    return make_tiny_image_encoder(str(tmp_path_factory.mktemp("tiny-vit")), "vit", image_size=32)
