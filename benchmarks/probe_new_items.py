"""Why a trained content model trails a training-free one on new items: where each puts popular and new items.

Trains one model (default: the protocol benchmark's MoRec two-stage text+image, new-item setting) and scores every
test user, then reports, per model, with history masked:

- the mean training count of the items in each user's top 10 (a popularity prior shows as a high number);
- the share of top-10 slots that hold new items (never trained) against their share of the catalogue;
- the median rank (percentile, 0 = top) of the test targets that are new items, and of those that are warm.

    python benchmarks/probe_new_items.py [--ratio 0.2] [--epochs 30] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def probe(model: str, cfg: dict) -> dict:
    import numpy as np
    import torch

    from recbole_mm.testing import build_run

    config, dataset, train, valid, test, net, trainer = build_run(model, "ml-100k-mm", cfg)
    trainer.fit(train, valid, saved=False)
    train_counts = getattr(train._dataset, "train_item_counts", None)
    if train_counts is None:  # general models: count the training split
        train_counts = np.bincount(train._dataset.inter_feat[dataset.iid_field].numpy(), minlength=dataset.item_num)
    counts = torch.as_tensor(train_counts, dtype=torch.float64)
    new_item = counts == 0
    new_item[0] = False
    history = getattr(test._dataset, "history_index", None)  # sequential; general models: RecBole's index
    top_counts, top_new, ranks_new, ranks_warm = [], [], [], []
    net.eval()
    with torch.no_grad():
        for interaction, recbole_history, positive_u, positive_i in test:
            scores = net.full_sort_predict(interaction).view(len(interaction), -1).clone()
            scores[:, 0] = -float("inf")
            if history is not None:
                rows, items = history.mask_index(interaction[net.USER_ID], positive_i)
                scores[rows, items] = -float("inf")
            elif recbole_history is not None:
                scores[recbole_history] = -float("inf")
            scores, positive_i = scores[positive_u], positive_i
            top = scores.topk(10, dim=1).indices
            top_counts.append(counts[top].mean(1))
            top_new.append(new_item[top].double().mean(1))
            target_scores = scores[torch.arange(len(positive_i)), positive_i]
            valid_items = torch.isfinite(scores).sum(1).double()
            pct = (scores > target_scores[:, None]).sum(1).double() / valid_items
            is_new = new_item[positive_i]
            ranks_new.append(pct[is_new])
            ranks_warm.append(pct[~is_new])
    cat = lambda xs: torch.cat(xs).numpy()  # noqa: E731
    return {
        "top10_mean_train_count": float(cat(top_counts).mean()),
        "top10_share_new": float(cat(top_new).mean()),
        "catalogue_share_new": float(new_item[1:].double().mean()),
        "median_rank_pct_new_targets": float(np.median(cat(ranks_new))),
        "median_rank_pct_warm_targets": float(np.median(cat(ranks_warm))),
        "new_targets": int(len(cat(ranks_new))),
    }


def main() -> None:
    from bench_protocol import COMMON, MOREC, TEXT

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--only", nargs="*", help="MoRec, ContentKNN and / or Pop")
    parser.add_argument("--set", nargs="*", default=[], help="MoRec overrides, key=value (YAML values)")
    args = parser.parse_args()
    import tempfile

    import torch
    import yaml

    torch.set_num_threads(1)
    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    with tempfile.TemporaryDirectory() as tmp:
        base = {**COMMON, "new_item_ratio": args.ratio, "checkpoint_dir": tmp, "epochs": args.epochs}
        runs = {
            "MoRec": ("MoRec", {**base, **MOREC, "modality": "text+image", **overrides}),
            "ContentKNN": ("ContentKNN", {**base, **TEXT, "knn_modality": "text+image", "epochs": 1}),
            "Pop": ("Pop", {**base}),
        }
        for label, (model, cfg) in runs.items():
            if args.only and label not in args.only:
                continue
            print(label, json.dumps(probe(model, cfg)), flush=True)


if __name__ == "__main__":
    main()
