"""Feature extraction throughput vs the bare encoder forward on the same inputs (one run, torch threads = 1).

Text: all-MiniLM-L6-v2 (mean pooling, max length 32) over the ml-100k-mm item texts.
Image: EfficientNet-Lite0 (tf_efficientnet_lite0 + package weights) over the ml-100k-mm posters at 224 px
(the uint8 image store is built before timing; its build time is reported separately).

"bare" = the encoder's forward over pre-built input batches in inference mode, nothing else.
"extract" = :func:`recbole_mm.extract.extract_features` end to end (inputs, forward, memory-mapped writes,
progress file, checksum, sidecar), minus loading the encoder weights (reported separately).
Each is run ``--repeats`` times, interleaved; the best time of each is used. Target: extract >= 85% of bare.

    python benchmarks/bench_extract.py [--repeats 2] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import machine, write_section  # noqa: E402


def bare_forward(encoder, inputs, n: int, batch_size: int) -> float:
    batches = [inputs.batch(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]
    start = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            encoder(*b)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import recbole_mm  # noqa: F401
    import recbole_mm.extract as ex
    from recbole_mm.data.content import ItemContent
    from recbole_mm.data.embedded import build_embedded, embedded_dataset_dir

    folder = embedded_dataset_dir("ml-100k-mm")
    if not os.path.isfile(os.path.join(folder, "ml-100k-mm.inter")):
        build_embedded("ml-100k-mm", folder)
    tokens = ex.catalogue_tokens(folder, "ml-100k-mm")  # every item of the folder
    n = len(tokens)
    t0 = time.perf_counter()
    ItemContent(["[PAD]"] + tokens, folder, "ml-100k-mm", {"image_size": 224}).image_rows(224)
    store_seconds = time.perf_counter() - t0

    specs = {
        "text (all-MiniLM-L6-v2, mean, len 32, batch 64)": (
            ex.ExtractSpec(modality="text", encoder="all-MiniLM-L6-v2", pooling="mean", text_fields=["title", "genres"], max_length=32),
            64,
        ),
        "image (EfficientNet-Lite0, 224 px, batch 32)": (
            ex.ExtractSpec(modality="image", encoder="tf_efficientnet_lite0", pooling="default", image_size=224),
            32,
        ),
    }
    rows = []
    tmp = tempfile.mkdtemp(prefix="bench-extract-")
    try:
        for label, (spec, bs) in specs.items():
            t0 = time.perf_counter()
            encoder = ex.build_encoder(spec).eval()
            load_seconds = time.perf_counter() - t0
            inputs = ex._Inputs(spec, encoder, folder, "ml-100k-mm", tokens, None)
            real_build = ex.build_encoder
            ex.build_encoder = lambda s, _e=encoder: _e  # time extraction without reloading the weights
            bare, full = [], []
            with torch.inference_mode():  # warm-up: the first forward passes of a process are slower
                for lo in range(0, min(n, 4 * bs), bs):
                    encoder(*inputs.batch(lo, min(lo + bs, n)))
            try:
                for r in range(args.repeats):
                    bare.append(bare_forward(encoder, inputs, n, bs))
                    out = os.path.join(tmp, f"{spec.modality}-{r}.npy")
                    t0 = time.perf_counter()
                    ex.extract_features(folder, "ml-100k-mm", spec, out_path=out, batch_size=bs, progress=False)
                    full.append(time.perf_counter() - t0)
                    print(f"  repeat {r}: bare {bare[-1]:.2f} s, extract {full[-1]:.2f} s", flush=True)
            finally:
                ex.build_encoder = real_build
            b, f = min(bare), min(full)
            rows.append((label, n, b, f, n / b, n / f, b / f, load_seconds))
            print(f"{label}: bare {n / b:.1f} items/s, extract {n / f:.1f} items/s, ratio {b / f:.3f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    lines = [
        f"Machine: {machine()}.",
        "",
        "Command: `python benchmarks/bench_extract.py` (ml-100k-mm, every item; best of "
        f"{args.repeats} interleaved repeats after a warm-up). Target: extraction throughput >= 85% of the bare "
        "encoder forward.",
        "",
        "| encoder | items | bare forward s | extract s | bare items/s | extract items/s | extract / bare | weights load s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, n_items, b, f, bt, ft, ratio, load in rows:
        lines.append(f"| {label} | {n_items} | {b:.2f} | {f:.2f} | {bt:.1f} | {ft:.1f} | {ratio:.1%} | {load:.2f} |")
    lines += [
        "",
        f"Image store build (decode + resize {n} posters to 224 px, once per dataset; not in the timings above): "
        f"{store_seconds:.1f} s{' (already built)' if store_seconds < 1 else ''}.",
        "",
        "Extraction adds: reading inputs (token ids trimmed per batch / uint8 pixels from the memory-mapped store), "
        "the float32 copy into the memory-mapped output, a progress file per batch (resumability), and a sha256 of "
        "the output for the sidecar.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("Feature extraction throughput", body)
    return 0 if all(r[6] >= 0.85 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
