"""Cold start: each command's wall time as a fresh process, against `python -c "import open_clip"` in the same run.

Prepares (once, cached under bench/data/) ViT-L/14-shaped random weights in open_clip's format (1.7 GB, fp32
safetensors) and a store holding one image embedded with them, then times, alternating, `import open_clip`, `import
torch`, `indexer search "a red car"` (the default model, ViT-L-14/openai, given by --weights), `indexer status`,
`indexer dedup` and `indexer export`; prints the median of each and the ratios. Also says, by `python -X importtime`,
whether status, dedup and export import torch. The weights hash is remembered after the first run (as for a user);
page cache warm (the file was just written or read): what a repeated query costs.

    python -m bench.bench_coldstart [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).parent / "data" / "coldstart"
INDEXER = str(Path(sys.executable).parent / "indexer")


def prepare() -> tuple[Path, Path]:
    """(weights file, store dir), made once."""
    DATA.mkdir(parents=True, exist_ok=True)
    weights = DATA / "vit-l-14-random.safetensors"
    if not weights.exists():
        import open_clip
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        net = open_clip.create_model("ViT-L-14", pretrained=None, force_quick_gelu=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights) + ".tmp")
        os.replace(str(weights) + ".tmp", weights)
    store = DATA / "store"
    if not store.exists():
        from PIL import Image

        photos = DATA / "photos"
        photos.mkdir(exist_ok=True)
        Image.new("RGB", (320, 240), (200, 30, 30)).save(photos / "red.jpg")
        subprocess.run(
            [INDEXER, "index", str(photos), "--store", str(store), "--weights", str(weights), "--device", "cpu"],
            check=True,
            capture_output=True,
        )
    return weights, store


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return seconds


def imports_torch(args: list[str]) -> bool:
    code = "import sys; from indexer.cli.main import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code, *args], capture_output=True, text=True)
    return any(line.rstrip().endswith("| torch") for line in proc.stderr.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    weights, store = prepare()
    out = Path(tempfile.mkdtemp()) / "export.parquet"
    s = ["--store", str(store)]
    commands = {
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "python -c 'import open_clip'": [sys.executable, "-c", "import open_clip"],
        "indexer search 'a red car'": [
            INDEXER,
            "search",
            "a red car",
            *s,
            "--weights",
            str(weights),
            "--device",
            "cpu",
        ],
        "indexer status": [INDEXER, "status", *s],
        "indexer dedup": [INDEXER, "dedup", *s],
        "indexer export": [INDEXER, "export", *s, "--output", str(out)],
    }
    timed(commands["indexer search 'a red car'"])  # first run: the weights hash is computed and remembered
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeat):
        for name, cmd in commands.items():
            times[name].append(timed(cmd))
    base = statistics.median(times["python -c 'import open_clip'"])
    print(f"cold start, fresh processes, median of {args.repeat} (ViT-L/14-shaped weights, CPU):")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"  {name:34s} {med:6.2f} s   {med / base:5.2f}x import open_clip")
    for name in ("status", "dedup", "export"):
        extra = ["--output", str(out)] if name == "export" else []
        print(f"  indexer {name} imports torch: {imports_torch([name, *s, *extra])}")


if __name__ == "__main__":
    main()
