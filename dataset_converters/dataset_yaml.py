"""The dataset yaml ``NAME.yaml`` written next to the atomic files, every key commented ``# (type) meaning``.

Two protocols:

- ``sequential`` (MicroLens, NineRec, PixelRec): leave-one-out by time, full ranking, Hit / NDCG @10/20,
  ``MAX_ITEM_LIST_LENGTH: 10`` as in the papers;
- ``benchmark`` (MMRec format): the split comes from ``NAME.train/valid/test.inter`` (``benchmark_filename``),
  full ranking, Recall / NDCG / Precision / MAP @5/10/20/50, valid metric Recall@20.

``.item`` is not in ``load_col``: the platform reads item texts itself (``text_fields``), so RecBole never joins
item columns into batches. Plain RecBole users pass this file in ``config_file_list``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from dataset_converters import __version__

COMMENT_COLUMN = 40


@dataclass
class YamlSpec:
    converter: str
    time_unit: str  # what the timestamp column holds
    text_fields: list[str] = field(default_factory=lambda: ["title"])
    text_fields_comment: str = ""
    image_dir: Optional[str] = "images"
    protocol: str = "sequential"  # or "benchmark"
    extra_keys: list[tuple[str, str, str]] = field(default_factory=list)  # (key, yaml value, comment)


def _line(text: str, comment: str) -> str:
    return f"{text:<{COMMENT_COLUMN - 1}} # {comment}\n" if comment else text + "\n"


def _list(values: list[str]) -> str:
    return "[" + ", ".join(values) + "]"


def render_yaml(spec: YamlSpec, name: str) -> str:
    out = [
        f"# RecBole dataset config for '{name}', written by dataset_converters {__version__} ({spec.converter}).\n",
        "# recbole_mm loads it automatically; with plain RecBole pass it in config_file_list.\n",
        _line("USER_ID_FIELD: user_id", "(str) user id column of the .inter file"),
        _line("ITEM_ID_FIELD: item_id", "(str) item id column"),
        _line("TIME_FIELD: timestamp", f"(str) time column: {spec.time_unit}"),
        _line("load_col:", "(dict) columns RecBole loads; .item texts are read by recbole_mm, not RecBole"),
        "  inter: [user_id, item_id, timestamp]\n",
    ]
    if spec.protocol == "sequential":
        out += [
            _line("eval_args:", "(dict) papers' protocol: leave-one-out by time, full ranking"),
            _line("  split: {LS: valid_and_test}", "(dict) last item test, second-to-last valid"),
            _line("  order: TO", "(str) time order"),
            _line("  group_by: user", "(str) split per user"),
            _line("  mode: full", "(str) rank all items"),
            _line("metrics: [Hit, NDCG]", "(list) HR and NDCG as in the papers"),
            _line("topk: [10, 20]", "(list) cut-offs"),
            _line("valid_metric: NDCG@10", "(str) early-stopping metric"),
            _line("MAX_ITEM_LIST_LENGTH: 10", "(int) history length of the papers (they keep the last 10+3 items)"),
        ]
    elif spec.protocol == "benchmark":
        out += [
            _line("benchmark_filename: [train, valid, test]", "(list) split files NAME.<part>.inter (MMRec x_label 0/1/2)"),
            _line("eval_args:", "(dict) general model, full ranking; the split itself comes from the files"),
            _line("  split: {RS: [0.8, 0.1, 0.1]}", "(dict) unused with benchmark_filename, required by RecBole"),
            _line("  order: RO", "(str) unused with benchmark_filename"),
            _line("  group_by: user", "(str) evaluate per user"),
            _line("  mode: full", "(str) rank all items"),
            _line("metrics: [Recall, NDCG, Precision, MAP]", "(list) MMRec's metrics"),
            _line("topk: [5, 10, 20, 50]", "(list) MMRec's cut-offs"),
            _line("valid_metric: Recall@20", "(str) MMRec's early-stopping metric"),
        ]
    else:
        raise ValueError(f"unknown protocol {spec.protocol!r}")
    text_comment = "(list) .item text columns the text encoder reads, joined with a space"
    if spec.text_fields_comment:
        text_comment += "; " + spec.text_fields_comment
    out.append(_line(f"text_fields: {_list(spec.text_fields)}", text_comment))
    image_value = spec.image_dir if spec.image_dir else "~"
    out.append(_line(f"image_dir: {image_value}", "(str) folder of <item_token>.<ext> images in the dataset folder"))
    for key, value, comment in spec.extra_keys:
        out.append(_line(f"{key}: {value}", comment))
    return "".join(out)
