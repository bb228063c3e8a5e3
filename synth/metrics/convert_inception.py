"""Convert pytorch-fid's Inception-v3 weights (``.pth``) into the ``.npz`` that the FID extractor reads.

Usage (needs PyTorch, only for this step)::

    python -m synth.metrics.convert_inception pt_inception-2015-12-05-6726825d.pth pt_inception-2015-12-05.npz

The ``.npz`` holds the state dict unchanged: one array per PyTorch name, in PyTorch layout. The names and
layouts are translated when loading (:func:`synth.metrics.inception.from_torch_layout`), which this script
runs once on the result, so a wrong or truncated input fails here rather than at evaluation time. Where
the ``.pth`` comes from: :mod:`synth.metrics.inception`.
"""

import argparse
import sys

import numpy as np

from synth.metrics.inception import from_torch_layout


def convert(pth_path: str, npz_path: str) -> int:
    """Write the state dict of ``pth_path`` to ``npz_path``; return the number of arrays written."""
    try:
        import torch
    except ImportError as error:
        raise SystemExit(
            "Converting the .pth needs PyTorch (pip install torch, CPU build is enough); run this once "
            "anywhere and copy the .npz."
        ) from error
    state = torch.load(pth_path, map_location="cpu", weights_only=True)
    arrays = {name: tensor.detach().numpy() for name, tensor in state.items()}
    from_torch_layout(arrays)  # Raises if a layer is missing or has the wrong shape.
    np.savez(npz_path, **arrays)
    return len(arrays)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: ``<pth> <npz>``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pth", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("npz", help="output .npz path")
    args = parser.parse_args(argv)
    count = convert(args.pth, args.npz)
    print(f"Wrote {count} arrays to {args.npz}.", file=sys.stderr)


if __name__ == "__main__":
    main()
