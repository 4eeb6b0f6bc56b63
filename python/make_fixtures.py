"""Regenerate every parity fixture under tests/fixtures/ from PyTorch/torchvision (pinned in requirements.txt).

    python python/make_fixtures.py          # the committed fixtures (kept under 4 MB)
    python python/make_fixtures.py --full   # also fixtures-full/: a full-size torchvision resnet34 (not committed)

CI never runs this: the outputs are committed and the Rust tests read them.
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "fixtures"))

import adapt_conv  # noqa: E402
import bands  # noqa: E402
import dicoms  # noqa: E402
import ema  # noqa: E402
import hub_table  # noqa: E402
import images  # noqa: E402  (first: the others read the images)
import nets  # noqa: E402
import ops  # noqa: E402
import optim  # noqa: E402  (after nets: it checks the net fixture's input)
import preprocess  # noqa: E402
import pth_cases  # noqa: E402
import tiffs  # noqa: E402
import tiny_checkpoint  # noqa: E402


def main() -> None:
    full = "--full" in sys.argv[1:]
    out = HERE.parent / "tests" / "fixtures"
    for module in (adapt_conv, bands, dicoms, ema, hub_table, images, preprocess, pth_cases, tiffs, ops, nets, optim):
        print(f"== {module.__name__}", flush=True)
        module.make(out)
    # --full only adds the uncommitted full-size resnet34 under fixtures-full/.
    print("== tiny_checkpoint", flush=True)
    tiny_checkpoint.make(out, full=full)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"tests/fixtures: {total / 1e6:.2f} MB")
    # 3.0 MB until the own-images fixtures (TIFF, DICOM, bands, adapt_input_conv, EMA: about 0.5 MB) came in.
    if total >= 4_000_000:
        sys.exit("fixtures exceed the 4 MB budget")


if __name__ == "__main__":
    main()
