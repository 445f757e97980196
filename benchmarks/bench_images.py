"""Image store: raw pixels vs JPEG tar shards, build and decode throughput, and a training step of an end-to-end image
model with the old synchronous read (raw store, read inside ``forward``) vs decoding in DataLoader workers.

Images: the ml-100k-mm posters under ``$RECBOLE_MM_HOME`` (1682 items, 224 x 224 JPEGs, built on first use), or
``--synthetic N`` random-ish smooth images made with PIL. Stores are built in a temporary folder (the dataset
folder is not touched). Torch threads = 1 in the main process (DataLoader workers decode in their own processes).

Measured:
- bytes per item of each store at ``--size`` (raw uint8 ``S*S*3``; JPEG q``--quality`` shards, index included);
- build throughput (images/s) of the raw store (threads) and of the JPEG store with 1 and 2 encoding processes;
- decode throughput (images/s) of the whole catalogue in batches of 64 through
  :func:`recbole_mm.data.content.item_image_batches` with ``worker`` 0 / 1 / 2 (raw store: memory-map reads);
- MoRec ``mode: end2end``, ``modality: image``, ``loss: bce``: seconds per training step (loader + loss + backward +
  optimizer step, averaged over ``--steps`` steps after one warm-up step) with (a) the raw store read inside
  ``forward`` (the previous release's path), (b) the JPEG store decoded in the collate step with ``worker: 0`` and
  (c) with ``worker: 2``. Encoder: ``--encoder`` (``tiny``: a 2-layer ViT built locally, where reading images
  dominates; ``tf_efficientnet_lite0``: random weights, where the encoder dominates).

    python benchmarks/bench_images.py [--size 224] [--quality 90] [--steps 6] [--encoder tiny] [--out /tmp/bench_out]

Writes ``<out>/images.md`` and ``<out>/images.json`` (machine and date included), not docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import machine  # noqa: E402


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def synthetic_dataset(root: str, n: int) -> tuple[str, str]:
    """A dataset folder ``syn`` with ``n`` items, one user sequence per 10 items, and smooth random images."""
    from PIL import Image

    folder = os.path.join(root, "syn")
    os.makedirs(os.path.join(folder, "images"))
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:256, 0:256] / 255.0
    for k in range(1, n + 1):
        a, b, c = rng.uniform(0, 1, 3)
        img = np.stack([x * 255 * a, y * 255 * b, (x * y * 255 * c + rng.normal(0, 8, x.shape))], -1)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(folder, "images", f"{k}.jpg"), quality=92)
    with open(os.path.join(folder, "syn.item"), "w", encoding="utf-8") as f:
        f.write("item_id:token\ttitle:token_seq\n" + "".join(f"{k}\titem {k}\n" for k in range(1, n + 1)))
    with open(os.path.join(folder, "syn.inter"), "w", encoding="utf-8") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        t = 0
        for u in range(n // 4):
            for k in rng.choice(np.arange(1, n + 1), size=12, replace=False):
                t += 1
                f.write(f"u{u}\t{k}\t1\t{t}\n")
    return root, "syn"


def decode_rate(content, ids, workers: int, size: int) -> float:
    from recbole_mm.data.content import item_image_batches

    start = time.perf_counter()
    n = 0
    for _, px in item_image_batches(content, ids, 64, workers, size):
        n += len(px)
    return n / (time.perf_counter() - start)


def step_time(data_path: str, name: str, cfg: dict, attach: bool, steps: int) -> dict:
    """Seconds per training step (after one warm-up step) and the images read inside the model."""
    from recbole_mm.data.utils import attach_image_decode
    from recbole_mm.testing import build_run

    config, dataset, train, valid, test, model, trainer = build_run("MoRec", name, dict(cfg, data_path=data_path))
    if attach:
        attach_image_decode(train)
    model.train()
    content = model.content
    store = content.image_rows(cfg["image_size"])[0]
    real_decode = content.decode
    in_main = [0.0]

    def timed_decode(*a, **k):  # image reads / decodes done in this process (inside forward for the old path)
        t = time.perf_counter()
        out = real_decode(*a, **k)
        in_main[0] += time.perf_counter() - t
        return out

    content.decode = timed_decode
    times, waits, image_secs, reads_before = [], [], [], None
    it = iter(train)
    for i in range(steps + 1):
        start = time.perf_counter()
        in_main[0] = 0.0
        try:
            batch = next(it)
        except StopIteration:
            it = iter(train)
            batch = next(it)
        wait = time.perf_counter() - start
        batch = batch.to(model.log_pop.device)
        if i == 1:
            reads_before = store.reads
        trainer.optimizer.zero_grad()
        loss = model.calculate_loss(batch)
        loss.backward()
        trainer.optimizer.step()
        if i:  # the first step is a warm-up (workers start, store opened)
            times.append(time.perf_counter() - start)
            waits.append(wait)
            image_secs.append(in_main[0])
    del it
    del content.decode
    return {"seconds_per_step": float(np.mean(times)), "images_read_in_main_process": store.reads - reads_before,
            "seconds_waiting_for_the_batch": float(np.mean(waits)),
            "seconds_reading_images_in_main_process": float(np.mean(image_secs)),
            "store_reads_in_forward": model.content.store_reads_in_forward}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32, help="train_batch_size of the training-step measure")
    parser.add_argument("--encoder", default="tiny", help="tiny | a timm name (random weights)")
    parser.add_argument("--synthetic", type=int, default=0, help="use N synthetic images instead of ml-100k-mm")
    parser.add_argument("--out", default="/tmp/bench_out")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import recbole_mm  # noqa: F401
    from recbole_mm.data.content import ItemContent, catalogue_tokens
    from recbole_mm.data.images import ImageStore, JpegImageStore

    work = tempfile.mkdtemp(prefix="bench-images-")
    try:
        if args.synthetic:
            data_path, name = synthetic_dataset(work, args.synthetic)
            source = f"{args.synthetic} synthetic smooth images (256 px JPEG q92)"
        else:
            from recbole_mm.data.embedded import build_embedded, embedded_dataset_dir

            folder = embedded_dataset_dir("ml-100k-mm")
            if not os.path.isfile(os.path.join(folder, "ml-100k-mm.inter")):
                build_embedded("ml-100k-mm", folder)
            data_path, name = os.path.dirname(folder), "ml-100k-mm"
            source = "ml-100k-mm posters (224 px JPEG)"
        folder = os.path.join(data_path, name)
        tokens = catalogue_tokens(folder, name)
        n, s, q = len(tokens), args.size, args.quality
        image_dir = os.path.join(folder, "images")
        res = {"machine": machine(), "images": source, "items": n, "size": s, "quality": q}

        t = time.perf_counter()
        ImageStore.open_or_build(image_dir, os.path.join(work, "raw", f"{s}px"), s, tokens, workers=2, progress=False)
        res["raw_build_images_per_s"] = n / (time.perf_counter() - t)
        for w in (1, 2):
            d = os.path.join(work, f"jpeg{w}", f"{s}px-jpeg-q{q}")
            t = time.perf_counter()
            JpegImageStore.open_or_build(image_dir, d, s, tokens, quality=q, workers=w, progress=False)
            res[f"jpeg_build_images_per_s_workers{w}"] = n / (time.perf_counter() - t)
        res["raw_bytes_per_item"] = folder_bytes(os.path.join(work, "raw", f"{s}px")) / n
        res["jpeg_bytes_per_item"] = folder_bytes(os.path.join(work, "jpeg2", f"{s}px-jpeg-q{q}")) / n

        base = {"image_size": s, "image_store_dir": os.path.join(work, "jpeg2"), "image_store_quality": q}
        ids = torch.arange(1, n + 1)
        raw_content = ItemContent(["[PAD]"] + tokens, folder, name, dict(base, image_store_format="raw",
                                                                        image_store_dir=os.path.join(work, "raw")))
        res["decode_raw_worker0_images_per_s"] = decode_rate(raw_content, ids, 0, s)
        jpeg_content = ItemContent(["[PAD]"] + tokens, folder, name, base)
        for w in (0, 1, 2):
            res[f"decode_jpeg_worker{w}_images_per_s"] = decode_rate(jpeg_content, ids, w, s)

        if args.encoder == "tiny":
            from recbole_mm.testing import make_tiny_image_encoder

            encoder = make_tiny_image_encoder(os.path.join(work, "vit"), "vit", image_size=s)
        else:
            encoder = args.encoder
        cfg = {
            "embedding_size": 64, "n_layers": 1, "n_heads": 1, "hidden_size": 64, "inner_size": 128,
            "MAX_ITEM_LIST_LENGTH": 10, "mode": "end2end", "modality": "image", "loss": "bce", "finetune": "full",
            "image_encoder": encoder, "image_pretrained": False, "image_size": s, "image_pooling": "mean",
            "train_batch_size": args.batch, "epochs": 1, "show_progress": False, "state": "ERROR",
            "checkpoint_dir": os.path.join(work, "saved"), "image_store_quality": q,
            "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
        }
        res["step_raw_read_in_forward"] = step_time(
            data_path, name, dict(cfg, image_store_format="raw", image_store_dir=os.path.join(work, "raw"), worker=0),
            attach=False, steps=args.steps)
        for w in (0, 2):
            res[f"step_jpeg_collate_worker{w}"] = step_time(
                data_path, name, dict(cfg, image_store_dir=os.path.join(work, "jpeg2"), worker=w), attach=True,
                steps=args.steps)
        res["encoder"] = args.encoder
        res["loadavg"] = open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else "?"
        res["batch"] = args.batch
    finally:
        shutil.rmtree(work, ignore_errors=True)

    old = res["step_raw_read_in_forward"]["seconds_per_step"]
    rows = [
        ("store bytes per item, raw", f"{res['raw_bytes_per_item'] / 1024:.1f} KiB"),
        (f"store bytes per item, JPEG q{q} shards", f"{res['jpeg_bytes_per_item'] / 1024:.1f} KiB "
                                                    f"({res['raw_bytes_per_item'] / res['jpeg_bytes_per_item']:.1f}x smaller)"),
        ("build raw (threads 2)", f"{res['raw_build_images_per_s']:.0f} img/s"),
        ("build JPEG, 1 process", f"{res['jpeg_build_images_per_s_workers1']:.0f} img/s"),
        ("build JPEG, 2 processes", f"{res['jpeg_build_images_per_s_workers2']:.0f} img/s"),
        ("read raw memory map, worker 0", f"{res['decode_raw_worker0_images_per_s']:.0f} img/s"),
    ] + [(f"decode JPEG, worker {w}", f"{res[f'decode_jpeg_worker{w}_images_per_s']:.0f} img/s") for w in (0, 1, 2)]
    for key, label in (("step_raw_read_in_forward", "raw store read inside forward (old)"),
                       ("step_jpeg_collate_worker0", "JPEG decoded in collate, worker 0"),
                       ("step_jpeg_collate_worker2", "JPEG decoded in collate, worker 2")):
        r = res[key]
        rows.append((f"train step: {label}", f"{r['seconds_per_step'] * 1000:.0f} ms ({old / r['seconds_per_step']:.2f}x "
                     f"faster than the old path); of which images read / decoded in the main process "
                     f"{r['seconds_reading_images_in_main_process'] * 1000:.0f} ms "
                     f"({r['images_read_in_main_process']} images), waiting for the batch "
                     f"{r['seconds_waiting_for_the_batch'] * 1000:.0f} ms"))
    table = "| measure | value |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows)
    body = (f"# Image store benchmark\n\n{res['machine']}; load average at the end {res['loadavg']} (shared machine)\n\nImages: {source}, {n} items, {s} px. Training step: MoRec "
            f"end2end image, loss bce, batch {args.batch}, MAX_ITEM_LIST_LENGTH 10, encoder {args.encoder}, mean of "
            f"{args.steps} steps after a warm-up.\n\n{table}\n"
            f"Command: `python benchmarks/bench_images.py --size {s} --quality {q} --steps {args.steps} --batch {args.batch} "
            f"--encoder {args.encoder}{f' --synthetic {args.synthetic}' if args.synthetic else ''}`\n")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "images.md"), "w", encoding="utf-8") as f:
        f.write(body)
    with open(os.path.join(args.out, "images.json"), "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
