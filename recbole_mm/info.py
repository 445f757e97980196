"""``recbole-mm info``: what a dataset folder holds and whether its content and feature files align."""

from __future__ import annotations

import glob
import json
import os

from recbole_mm.data import features as ff
from recbole_mm.data.content import read_atomic, read_item_table
from recbole_mm.data.images import find_images
from recbole_mm.utils import cfg_get


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return max(sum(1 for _ in f) - 1, 0)


def dataset_report(config, verify: bool = False) -> str:
    name, folder = config["dataset"], config["data_path"]
    uid, iid = cfg_get(config, "USER_ID_FIELD", "user_id"), cfg_get(config, "ITEM_ID_FIELD", "item_id")
    lines = [f"dataset {name}", f"folder  {os.path.abspath(folder)}"]
    if cfg_get(config, "dataset_config_file"):
        lines.append(f"yaml    {config['dataset_config_file']}")
    inter_path = os.path.join(folder, f"{name}.inter")
    inter_items: set = set()
    if os.path.isfile(inter_path):
        inter = read_atomic(inter_path, [uid, iid], id_columns=[uid, iid])
        inter_items = set(inter[iid])
        n_u, n_i, n = inter[uid].nunique(), len(inter_items), len(inter)
        density = n / (n_u * n_i) if n_u and n_i else 0.0
        lines += [
            "",
            "interactions (raw file, before RecBole's filtering)",
            f"  {n} interactions, {n_u} users, {n_i} items, density {density:.5f}, "
            f"{n / max(n_u, 1):.2f} per user, {n / max(n_i, 1):.2f} per item",
        ]
    else:
        lines.append(f"no {name}.inter (benchmark files: {sorted(glob.glob(os.path.join(folder, name + '.*.inter')))})")
    for suffix in ("item", "user"):
        path = os.path.join(folder, f"{name}.{suffix}")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                header = f.readline().strip().split("\t")
            lines.append(f"{name}.{suffix}: {_count_lines(path)} rows; columns {', '.join(header)}")

    lines += ["", "content"]
    item_path = os.path.join(folder, f"{name}.item")
    fields = list(cfg_get(config, "text_fields", ["title"]))
    if os.path.isfile(item_path):
        try:
            table = read_item_table(item_path, [iid] + fields, iid)
            covered = inter_items & set(table[iid])
            empty = int((table[fields].apply(lambda c: c.str.strip() == "").all(axis=1)).sum())
            lines.append(
                f"  text {fields}: {len(covered)} of {len(inter_items)} interaction items have a row; {empty} rows empty"
            )
        except KeyError as e:
            lines.append(f"  text {fields}: {e}")
    else:
        lines.append("  text: no .item file")
    image_dir = os.path.join(folder, cfg_get(config, "image_dir", "images"))
    images = find_images(image_dir)
    lines.append(
        f"  images {image_dir}: {len(images)} files; {len(inter_items & set(images))} of {len(inter_items)} interaction items have one"
    )
    store_root = cfg_get(config, "image_store_dir") or os.path.join(folder, "image_store")
    for index_path in sorted(glob.glob(os.path.join(store_root, "*px*", "index.json"))):
        with open(index_path, encoding="utf-8") as f:
            idx = json.load(f)
        fmt = idx.get("format", "raw")
        fmt += f" q{idx['quality']}" if "quality" in idx else ""
        lines.append(
            f"  image store {os.path.dirname(index_path)} ({fmt}): {len(idx['tokens'])} items at {idx['size']}px, "
            f"{len(idx.get('missing', []))} missing, {len(idx.get('corrupt', []))} corrupt"
        )

    lines += ["", "features"]
    feat_root = cfg_get(config, "features_dir") or os.path.join(folder, "features")
    found = sorted(glob.glob(os.path.join(feat_root, "**", "*.npy"), recursive=True))
    found = [p for p in found if ".partial" not in p and ".merging" not in p]
    if not found:
        lines.append(f"  none in {feat_root} (recbole-mm extract --dataset {name} --modality text|image)")
    from tqdm.auto import tqdm

    # --verify reads every file (sha256): a bar per file on stderr, the report stays on stdout
    for path in tqdm(found, desc="verify feature files", unit="file", disable=not verify or not found):
        rel = os.path.relpath(path, feat_root)
        try:
            _, side = ff.open_features(path, verify_checksum=verify)
            tokens = set(side["tokens"])
            missing = sorted(inter_items - tokens)
            status = "aligned" if not missing else f"MISSING {len(missing)} items (first {missing[0]!r})"
            lines.append(
                f"  {rel}: {side.get('modality')} {side.get('kind')} {tuple(side['shape'])} {side['dtype']}, "
                f"encoder {side.get('encoder')}, pooling {side.get('pooling')}; {status}"
                + ("; checksum ok" if verify else "")
            )
        except ff.FeatureFileError as e:
            lines.append(f"  {rel}: ERROR {e}")
    return "\n".join(lines)
