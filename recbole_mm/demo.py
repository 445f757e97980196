"""``make demo`` / ``python -m recbole_mm.demo``: MoRec text+image, two-stage, on the embedded ml-100k-mm.

1. builds ml-100k-mm on first use (MovieLens-100K from the recbole package, titles + genres, rendered posters);
2. extracts frozen features once: all-MiniLM-L6-v2 for the text, EfficientNet-Lite0 for the posters (cached in
   the dataset folder; later runs reuse them);
3. trains MoRec (two-stage: Linear + GELU + DNN head over each modality, sum fusion, the seed papers' SASRec
   block, logQ-corrected in-batch softmax over all positions) with RecBole's trainer and early stopping;
4. prints valid / test metrics, overall and on cold items (at most ``cold_item_threshold`` training
   interactions), and writes a training-curve plot.

About 2.5 minutes on 2 CPU cores (the first run adds a minute or two: dataset build and feature extraction). The
same run from the command line::

    recbole-mm run --model MoRec --dataset ml-100k-mm --plot curve.png modality=text+image mode=two_stage \
        fusion=sum text_pooling=mean text_max_length=32 text_lowercase=false embedding_size=64 dnn_layers=2 \
        loss=inbatch learning_rate=0.001 train_batch_size=128 MAX_ITEM_LIST_LENGTH=20 epochs=40 eval_step=2 \
        stopping_step=4 cold_item_threshold=20 "metrics=[Hit,NDCG]" "topk=[10,20]" valid_metric=NDCG@10
"""

from __future__ import annotations

import argparse
import os
import sys
import time

DEMO_CONFIG = {
    "modality": "text+image",
    "mode": "two_stage",
    "fusion": "sum",
    "text_pooling": "mean",  # all-MiniLM-L6-v2 is trained for mean pooling
    "text_max_length": 32,
    "text_lowercase": False,
    "embedding_size": 64,
    "dnn_layers": 2,
    "n_layers": 2,
    "n_heads": 2,
    "loss": "inbatch",
    "learning_rate": 0.001,
    "train_batch_size": 128,
    "MAX_ITEM_LIST_LENGTH": 20,
    "epochs": 40,
    "eval_step": 2,
    "stopping_step": 4,
    "cold_item_threshold": 20,
    "show_progress": False,
    "metrics": ["Hit", "NDCG"],
    "topk": [10, 20],
    "valid_metric": "NDCG@10",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="demo_output", help="where the plot and the result JSON go")
    parser.add_argument("--epochs", type=int, default=DEMO_CONFIG["epochs"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import recbole_mm
    from recbole_mm.cli import _jsonable, _plain_argv, results_table
    from recbole_mm.trainer.trainer import plot_training_curve

    config = dict(DEMO_CONFIG, epochs=args.epochs, checkpoint_dir=os.path.join(args.output_dir, "saved"))
    start = time.time()
    with _plain_argv():
        result = recbole_mm.run_recbole(model="MoRec", dataset="ml-100k-mm", config_dict=config)
    minutes = (time.time() - start) / 60
    os.makedirs(args.output_dir, exist_ok=True)
    plot = plot_training_curve(
        os.path.join(args.output_dir, "morec_training_curve.png"),
        result["train_loss_history"],
        result["valid_score_history"],
        result["valid_epoch_history"],
        "MoRec (text+image, two-stage) on ml-100k-mm",
        f"valid {config['valid_metric']}",
    )
    with open(os.path.join(args.output_dir, "morec_result.json"), "w", encoding="utf-8") as f:
        import json

        json.dump(_jsonable(result), f, indent=1)
    table = results_table(
        {
            "valid": result["best_valid_result"],
            "test": result["test_result"],
            f"valid, cold items (<= {config['cold_item_threshold']} train interactions)": result.get("cold_valid_result"),
            f"test, cold items (<= {config['cold_item_threshold']} train interactions)": result.get("cold_test_result"),
        }
    )
    print(f"\nMoRec (text: all-MiniLM-L6-v2, image: EfficientNet-Lite0; two-stage) on ml-100k-mm, {minutes:.1f} min\n")
    print(table)
    print(f"\nepochs trained: {len(result['train_loss_history'])}; "
          f"seconds per epoch: {sum(result['epoch_seconds']) / len(result['epoch_seconds']):.1f}")
    print(f"training curve: {plot}")
    print(f"log: {result['log_file']}\ncheckpoint: {result['checkpoint_file']}\ntensorboard: {result['tensorboard_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
