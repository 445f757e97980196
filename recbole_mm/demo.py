"""``make demo`` / ``python -m recbole_mm.demo``: MoRec text+image, two-stage, on the embedded ml-100k-mm.

1. builds ml-100k-mm on first use (MovieLens-100K from the recbole package, titles + genres, rendered posters);
2. extracts frozen features once: all-MiniLM-L6-v2 for the text, EfficientNet-Lite0 for the posters (cached in
   the dataset folder; later runs reuse them). Steps 1-2 show progress bars (dataset build, image store,
   each extraction), even though training itself runs with ``show_progress: False`` (one log line per epoch);
3. trains MoRec (two-stage: Linear + GELU + DNN head over each modality, added (fusion add), the seed papers' SASRec
   block, logQ-corrected in-batch softmax over all positions) with RecBole's trainer and early stopping;
4. prints valid / test metrics with the user's history masked, overall, on cold items (the long tail holding 10%
   of the training interactions) and on new items (none in training), and writes a training-curve plot.

About 2.5 minutes on 2 CPU cores (the first run adds a minute or two: dataset build and feature extraction). The
same run from the command line::

    recbole-mm run --model MoRec --dataset ml-100k-mm --plot curve.png modality=text+image mode=two_stage \
        fusion=add text_pooling=mean text_max_length=32 text_lowercase=false embedding_size=64 dnn_layers=2 \
        loss=inbatch learning_rate=0.001 train_batch_size=128 MAX_ITEM_LIST_LENGTH=20 epochs=40 eval_step=2 \
        stopping_step=4 cold_item_quantile=0.1 "metrics=[Hit,NDCG]" "topk=[10,20]" valid_metric=NDCG@10
"""

from __future__ import annotations

import argparse
import os
import sys
import time

DEMO_CONFIG = {
    "modality": "text+image",
    "mode": "two_stage",
    "fusion": "add",
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
    "cold_item_quantile": 0.1,  # cold = the long tail holding 10% of the training interactions
    "show_progress": False,
    "metrics": ["Hit", "NDCG"],
    "topk": [10, 20],
    "valid_metric": "NDCG@10",
}


def prepare(config_dict: dict, dataset: str = "ml-100k-mm", progress: bool = True) -> list[str]:
    """Build the dataset and extract the features MoRec reads for ``config_dict`` (with progress bars), before
    training: the model would do it on first use too, but silently when ``show_progress`` is off."""
    from recbole_mm.cli import _plain_argv
    from recbole_mm.config import Config
    from recbole_mm.data.utils import ensure_dataset_folder
    from recbole_mm.extract import get_or_extract, spec_from_config

    with _plain_argv():
        config = Config(model="MoRec", dataset=dataset, config_dict=dict(config_dict, state="WARNING"))
    ensure_dataset_folder(config)
    if config["mode"] != "two_stage":
        return []
    paths = []
    for modality in ("text", "image"):
        if modality in str(config["modality"]).split("+"):
            spec = spec_from_config(config, modality)
            paths.append(get_or_extract(config, config["data_path"], config["dataset"], spec, progress=progress))
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="demo_output", help="where the plot and the result JSON go")
    parser.add_argument("--epochs", type=int, default=DEMO_CONFIG["epochs"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: RECBOLE_MM_THREADS, else recbole_mm's default; see "
                             "docs/configuration.md, Threads)")
    args = parser.parse_args(argv)

    if args.threads:
        os.environ["RECBOLE_MM_THREADS"] = str(args.threads)
    import recbole_mm
    from recbole_mm.cli import _plain_argv, result_rows, results_table
    from recbole_mm.utils import jsonable
    from recbole_mm.threads import configure_threads
    from recbole_mm.trainer.trainer import plot_training_curve

    configure_threads()  # before the extraction too (run_recbole applies the same rule again)

    config = dict(DEMO_CONFIG, epochs=args.epochs, checkpoint_dir=os.path.join(args.output_dir, "saved"))
    start = time.time()
    prepare(config)
    print(f"training MoRec for up to {args.epochs} epochs (one log line per epoch) ...", flush=True)
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

        json.dump(jsonable(result), f, indent=1)
    table = results_table(result_rows(result))
    print(f"\nMoRec (text: all-MiniLM-L6-v2, image: EfficientNet-Lite0; two-stage) on ml-100k-mm, {minutes:.1f} min\n")
    print(table)
    print(f"\nepochs trained: {len(result['train_loss_history'])}; "
          f"seconds per epoch: {sum(result['epoch_seconds']) / len(result['epoch_seconds']):.1f}")
    print(f"training curve: {plot}")
    print(f"log: {result['log_file']}\ncheckpoint: {result['checkpoint_file']}\ntensorboard: {result['tensorboard_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
