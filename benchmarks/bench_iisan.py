"""IISAN's efficiency claim (issue 9): decoupled side networks on cached taps against fine-tuning the encoders.

One run, same encoders (all-MiniLM-L6-v2 + EfficientNet-Lite0, both pretrained, offline), same data (ml-100k-mm,
the papers' protocol: each user's last 13 interactions, L 10, leave-one-out by time, full ranking, history
masked), same epochs, same user encoder (the papers' SASRec block, D 64, 2 blocks, 2 heads), same loss (in-batch
softmax, logQ-corrected), batch 64, Adam without weight decay, the original's learning rates. Rows:

- baselines: Pop, SASRec (IDs), MoRec two-stage (frozen pooled features, text + image added);
- MoRec end to end (text + image encoders in the loop) under each fine-tune policy: full, LoRA (r 8), the top
  block, BitFit;
- IISAN uncached (the frozen encoders run on every batch), IISAN cached (their per-layer taps extracted once:
  MiniLM's hidden states 0-6 and EfficientNet-Lite0's 7 stage outputs, LayerDrop keeps 4 of 7 on each side),
  IISAN-Versa cached on the asymmetric pair as it is (7 text taps of width 384 beside 8 image taps: the stem and
  7 stages of widths 16-320; surplus-first schedule, text taps mapped 384 -> 320 before the inter SAN).

The tap extraction is timed on its own (fresh cache) and amortised over the epochs. Every row runs in a fresh
process with torch threads = 1 (2-core machine; images at 64 px for every row so that the end-to-end rows fit the
session: the cost ratios, not the absolute seconds, are the result). Peak memory = the process's RSS sampled
during fit (CPU); "added" = the same minus the RSS at fit start.

    python benchmarks/bench_iisan.py [--epochs 5] [--long-epochs 30] [--out-dir /tmp/bench_iisan] [--only LABEL ...]
                                     [--no-write]

Results are kept per row in ``--out-dir`` (a rerun skips rows already measured; delete the folder to start over).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _report import LEAVE_ONE_OUT, PROTOCOL  # noqa: E402

IMAGE_SIZE = 64
COMMON = {**PROTOCOL, "eval_args": LEAVE_ONE_OUT, "keep_last_n": 13, "MAX_ITEM_LIST_LENGTH": 10,
          "train_batch_size": 64, "stopping_step": 10, "learner": "adam", "weight_decay": 0.0}
SEQ = {"n_layers": 2, "n_heads": 2, "dropout_prob": 0.1}
ENCODERS = {"text_encoder": "all-MiniLM-L6-v2", "text_fields": ["title"], "text_max_length": 30,
            "text_lowercase": False, "text_pooling": "cls", "image_encoder": "tf_efficientnet_lite0",
            "image_size": IMAGE_SIZE}
CONTENT = {**SEQ, **ENCODERS, "embedding_size": 64, "seq_encoder": "paper", "seq_mode": "all_position",
           "loss": "inbatch", "train_neg_sample_args": None}
ID = {**SEQ, "hidden_size": 64, "inner_size": 256, "hidden_dropout_prob": 0.1, "attn_dropout_prob": 0.1,
      "loss_type": "CE", "train_neg_sample_args": None, "learning_rate": 0.001}
# MoRec end to end: the original's FFT rates (heads 1e-4, encoders 5e-5); LoRA / BitFit: 4e-4 for what trains
E2E = {**CONTENT, "modality": "text+image", "fusion": "add", "mode": "end2end", "learning_rate": 1e-4,
       "encoder_learning_rate": 5e-5, "encoder_weight_decay": 0.0}
ROWS = [
    ("Pop", "Pop", {}),
    ("SASRec (ID)", "SASRec", ID),
    ("MoRec two-stage", "MoRec", {**CONTENT, "modality": "text+image", "fusion": "add", "mode": "two_stage",
                                  "dnn_layers": 2, "learning_rate": 1e-3}),
    ("IISAN cached", "IISAN", {**CONTENT, "mode": "cached"}),
    ("IISAN-Versa cached", "IISANVersa", {**CONTENT, "mode": "cached"}),
    ("IISAN uncached", "IISAN", {**CONTENT, "mode": "uncached"}),
    ("MoRec E2E top-1 block", "MoRec", {**E2E, "finetune": "top_k", "finetune_top_k": 1}),
    ("MoRec E2E BitFit", "MoRec", {**E2E, "finetune": "bitfit", "encoder_learning_rate": 4e-4}),
    ("MoRec E2E LoRA", "MoRec", {**E2E, "finetune": "lora", "lora_r": 8, "learning_rate": 4e-4}),
    ("MoRec E2E full fine-tuning", "MoRec", {**E2E, "finetune": "full"}),
]
CACHED = {"IISAN cached": "IISAN", "IISAN-Versa cached": "IISANVersa"}
COMPARED = ["IISAN cached", "IISAN-Versa cached", "IISAN uncached", "MoRec E2E top-1 block", "MoRec E2E BitFit",
            "MoRec E2E LoRA", "MoRec E2E full fine-tuning"]  # the TPME set: ways of adapting the same two encoders
CHEAP = ["SASRec (ID)", "MoRec two-stage", "IISAN cached", "IISAN-Versa cached"]  # also run to --long-epochs


def _plain(r):
    return None if r is None else {k: (None if v is None else float(v)) for k, v in r.items()}


def worker(model: str, cfg: dict, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    import recbole_mm

    result = recbole_mm.run_recbole(model=model, dataset="ml-100k-mm", config_dict=cfg)
    json.dump({"test": _plain(result["test_result"]), "cold": _plain(result.get("cold_test_result")),
               "valid": _plain(result.get("best_valid_result")), "efficiency": result.get("efficiency"),
               "epoch_seconds": result.get("epoch_seconds")}, open(out, "w"))


def extract_worker(model: str, cfg: dict, out: str) -> None:
    """Time the extraction of the tap caches ``model`` reads (into a fresh ``features_dir``), per modality."""
    import torch

    torch.set_num_threads(1)
    from recbole_mm.config import Config
    from recbole_mm.data.utils import create_dataset
    from recbole_mm.extract import default_feature_path, get_or_extract, spec_from_config
    from recbole_mm.utils import cfg_get

    config = Config(model=model, dataset="ml-100k-mm", config_dict=cfg)
    dataset = create_dataset(config)
    times = {}
    for modality in ("text", "image"):
        spec = spec_from_config(config, modality, kind="taps", taps=config[f"{modality}_taps"])
        spec.dtype = cfg_get(config, "token_feature_dtype", "float16")
        path = default_feature_path(dataset.dataset_path, spec, cfg["features_dir"])
        if os.path.isfile(path):  # shared with an earlier row (e.g. the text taps of IISAN and IISAN-Versa)
            times[modality] = {"seconds": None, "shared": os.path.basename(path)}
            continue
        start = time.time()
        get_or_extract(config, dataset.dataset_path, dataset.dataset_name, spec, progress=False)
        times[modality] = {"seconds": time.time() - start, "file": os.path.basename(path),
                           "mib": os.path.getsize(path) / 2**20}
    json.dump(times, open(out, "w"))


def _run_row(label: str, model: str, cfg: dict, epochs: int, out_dir: str, suffix: str = "") -> dict:
    from _report import run_worker

    cfg = {**COMMON, **cfg, "epochs": epochs, "checkpoint_dir": os.path.join(out_dir, "saved")}
    if model in ("IISAN", "IISANVersa"):
        cfg["features_dir"] = os.path.join(out_dir, "features")
    tag = (label + suffix).replace(" ", "_").replace("/", "-")
    extract = os.path.join(out_dir, f"{label.replace(' ', '_')}.extract.json")
    if label in CACHED and not os.path.isfile(extract):
        run_worker(__file__, ["extract", model, json.dumps(cfg)], extract, label, out_dir)
    path = os.path.join(out_dir, f"{tag}.json")
    if not os.path.isfile(path):
        print(f"[{time.strftime('%H:%M:%S')}] {label}{suffix} ...", flush=True)
        res = run_worker(__file__, ["run", model, json.dumps(cfg)], path + ".tmp", label, out_dir)
        json.dump(res, open(path, "w"))
        os.remove(path + ".tmp")
    result = json.load(open(path))
    if label in CACHED and not suffix:
        result["extraction"] = json.load(open(extract))
    eff = result.get("efficiency") or {}
    print(f"  {label}{suffix}: NDCG@10 {result['test']['ndcg@10']:.4f}, s/epoch {eff.get('seconds_per_epoch')}", flush=True)
    return result


def run_all(epochs: int, out_dir: str, only=None, long_epochs: int = 0) -> tuple[dict, dict]:
    """``(rows at --epochs, cheap rows at --long-epochs)``, each row's result kept in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    main, long = {}, {}
    for label, model, cfg in ROWS:
        if not only or label in only:
            main[label] = _run_row(label, model, cfg, epochs, out_dir)
    for label, model, cfg in ROWS:
        if long_epochs and label in CHEAP and (not only or label in only):
            long[label] = _run_row(label, model, cfg, long_epochs, out_dir, suffix=f", {long_epochs} epochs")
    return main, long


def _f(v, fmt=".4f") -> str:
    return "-" if v is None else format(v, fmt)


def _epoch(r: dict):
    """Median seconds of the row's training epochs (robust to a slow epoch, e.g. another process on the machine)."""
    from _report import median

    return median(r.get("epoch_seconds") or [])


def render(results: dict, epochs: int, long: dict = None, long_epochs: int = 0) -> str:
    from _report import machine

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from recbole_mm.cli import tpme

    full = results.get("MoRec E2E full fine-tuning")
    trained = [k for k in COMPARED if k in results and _epoch(results[k])]
    lines = [
        f"Machine: {machine()}. `python benchmarks/bench_iisan.py --epochs {epochs}`: ml-100k-mm, each user's last 13 "
        f"interactions, L 10, leave-one-out by time, full ranking, history masked; {epochs} epochs for every trained "
        f"row (best validation HR@10 epoch tested); all-MiniLM-L6-v2 (titles, 30 tokens, CLS) + EfficientNet-Lite0 at "
        f"{IMAGE_SIZE} px for every content row; D 64, the papers' SASRec (2 blocks, 2 heads), in-batch softmax "
        "(logQ), batch 64, Adam. Each row a fresh process, torch threads 1. s / epoch: the median of the row's epochs; "
        "memory: the process's RSS sampled during fit (peak) and its rise over the RSS at fit start (added).",
        "",
        "| model | HR@10 | NDCG@10 | cold HR@10 | s / epoch | s / eval | peak RSS MiB | added MiB | trainable params "
        "| vs full FT: time | memory (peak / added) | NDCG |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        e = r.get("efficiency") or {}
        cold = (r.get("cold") or {}).get("hit@10")
        rel = ["-", "-", "-"]
        if full and _epoch(r) and label != "MoRec E2E full fine-tuning":
            fe = full["efficiency"]
            rel = [f"{_epoch(full) / _epoch(r):.1f}x faster",
                   f"{fe['peak_memory_mib'] / e['peak_memory_mib']:.1f}x / "
                   f"{fe['peak_memory_increase_mib'] / max(e['peak_memory_increase_mib'], 1.0):.1f}x less",
                   f"{100 * (r['test']['ndcg@10'] / full['test']['ndcg@10'] - 1):+.1f}%"]
        lines.append(f"| {label} | {_f(r['test']['hit@10'])} | {_f(r['test']['ndcg@10'])} | {_f(cold)} | "
                     f"{_f(_epoch(r), '.1f')} | {_f(e.get('seconds_per_eval'), '.1f')} | "
                     f"{_f(e.get('peak_memory_mib'), '.0f')} | {_f(e.get('peak_memory_increase_mib'), '.0f')} | "
                     f"{e['trainable_params']:,} | {' | '.join(rel)} |" if e else
                     f"| {label} | {_f(r['test']['hit@10'])} | {_f(r['test']['ndcg@10'])} | {_f(cold)} | - | - | - | - "
                     "| - | - | - | - |")
    extraction = [(k, r["extraction"]) for k, r in results.items() if r.get("extraction")]
    if extraction:
        lines += ["", "Tap extraction (once per dataset and encoder settings; float16 memory maps):", "",
                  "| row | text taps s | image taps s | cache MiB | amortised over the epochs: s / epoch |",
                  "|---|---|---|---|---|"]
        for label, ex in extraction:
            secs = [ex[m].get("seconds") or 0.0 for m in ("text", "image")]
            mib = sum(ex[m].get("mib") or 0.0 for m in ("text", "image"))
            shared = [m for m in ("text", "image") if ex[m].get("shared")]
            note = f" ({' and '.join(shared)} shared with an earlier row)" if shared else ""
            lines.append(f"| {label}{note} | {_f(ex['text'].get('seconds'), '.1f')} | {_f(ex['image'].get('seconds'), '.1f')} "
                         f"| {_f(mib, '.1f')} | {_f(sum(secs) / epochs, '.1f')} |")
    if long:
        lines += ["", f"The cheap rows again with {long_epochs} epochs (best validation epoch tested; early stop after 10 "
                  "epochs without improvement): where the cached side network goes when its epochs cost seconds.", "",
                  "| model | epochs run | HR@10 | NDCG@10 | cold HR@10 | training s (all epochs) |", "|---|---|---|---|---|---|"]
        for label, r in long.items():
            secs = r.get("epoch_seconds") or []
            lines.append(f"| {label} | {len(secs)} | {_f(r['test']['hit@10'])} | {_f(r['test']['ndcg@10'])} | "
                         f"{_f((r.get('cold') or {}).get('hit@10'))} | {sum(secs):.0f} |")
    if len(trained) >= 2:
        effs = [results[k]["efficiency"] for k in trained]
        for key, name in (("peak_memory_mib", "peak RSS"), ("peak_memory_increase_mib", "added RSS")):
            scores = tpme([(_epoch(results[k]), e["trainable_params"], e[key]) for k, e in zip(trained, effs)])
            lines += ["", f"TPME (IISAN's efficiency score over these rows, 0.45 time + 0.1 trainable parameters + 0.45 "
                      f"memory, each min-max normalised; memory = {name}; time = the median epoch; lower is better; "
                      "`recbole-mm tpme` computes it from run files, with the mean epoch):", "", "| model | TPME |",
                      "|---|---|"]
            lines += [f"| {k} | {s:.3f} |" for k, s in sorted(zip(trained, scores), key=lambda x: x[1])]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, model, cfg, out = sys.argv[2:6]
        (extract_worker if kind == "extract" else worker)(model, json.loads(cfg), out)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--long-epochs", type=int, default=30, help="epochs of the cheap rows' second table (0: none)")
    parser.add_argument("--out-dir", default="/tmp/bench_iisan")
    parser.add_argument("--only", nargs="*", help="row labels to run (default: all)")
    parser.add_argument("--no-write", action="store_true", help="print, do not write docs/benchmarks.md")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # as in every worker (the machine line reports it)
    results, long = run_all(args.epochs, args.out_dir, args.only, args.long_epochs)
    body = render(results, args.epochs, long, args.long_epochs)
    print(body)
    if not args.no_write:
        from _report import write_section

        write_section("IISAN: side networks on cached taps against fine-tuning", body)


if __name__ == "__main__":
    main()
