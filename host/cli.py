"""The ``convexedge`` command line: ``demo``, ``export`` and ``refit``; others arrive with their issues.

Bad arguments, a bad file or bad data print one line on stderr and exit with status 2 (no
traceback); an interrupt (Ctrl-C) exits 130.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from convexedge.device.errors import ConvexEdgeError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="convexedge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser(
        "demo",
        help="compress the bundled CIFAR-10 ResNet-20 with a convex gated-ReLU student",
        description="Capture the teacher's last stage on unlabeled images, fit a convex gated-ReLU "
        "student exactly (FISTA), swap it in, evaluate, and write a report.",
    )
    demo.add_argument("--quick", action="store_true", help="small slice; finishes in under a minute")
    demo.add_argument("--out", type=Path, default=Path("convexedge-demo"), help="output folder")
    demo.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder of train_*.npz / test_*.npz CIFAR shards (default: the bundled slice)",
    )
    demo.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="torch device (auto: cuda when available)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the gates and of the image sample")
    demo.add_argument(
        "--images",
        type=_positive_int,
        default=None,
        help="unlabeled training images to capture (default 2000, quick 200)",
    )
    demo.add_argument(
        "--test-images",
        type=_positive_int,
        default=None,
        help="test images to evaluate on (default: all in the data folder, quick 500)",
    )
    demo.add_argument("--float64", action="store_true", help="solve in float64 (default float32)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.add_argument(
        "--no-device-step",
        action="store_true",
        help="skip the on-device step (head export, numpy runtime, shift, refit)",
    )
    exp = sub.add_parser(
        "export",
        help="export the teacher or a demo's compressed model (ONNX, TFLite) and check parity",
        description="Rebuild MODEL ('teacher' or a folder written by `convexedge demo`), export it, "
        "and compare the export with torch on the test images (parity.json).",
    )
    exp.add_argument("model", help="'teacher' or a `convexedge demo` output folder")
    exp.add_argument(
        "--format",
        choices=["onnx", "tflite"],
        default="onnx",
        help="onnx (fp32, opset 18) or tflite (fp32; needs the [tflite] extra)",
    )
    exp.add_argument("--out", type=Path, default=Path("convexedge-export"), help="output folder")
    exp.add_argument("--data", type=Path, default=None, help="folder of test_*.npz shards (default: bundled)")
    exp.add_argument("--test-images", type=_positive_int, default=None, help="test images for parity")
    ref = sub.add_parser(
        "refit",
        help="simulate a device: refit a head store on a folder of activations",
        description="Stream *.npz files (x: features, target: teacher outputs) into the numpy device "
        "runtime, refit the head once, print the result as JSON.",
    )
    ref.add_argument("heads", help="head store folder (e.g. convexedge-demo/heads)")
    ref.add_argument("activations", help="folder of *.npz with arrays x and target")
    ref.add_argument("--budget-mb", type=float, default=4.0, help="memory budget of the runtime")
    ref.add_argument("--time-budget", type=float, default=1.0, help="seconds the refit may take")
    ref.add_argument("--mode", choices=["reservoir", "window", "gram"], default="reservoir")
    ref.add_argument("--chunk", type=_positive_int, default=64, help="samples per observe() call")
    ref.add_argument("--confirm", action="store_true", help="confirm an accepted head")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``convexedge`` console script; returns the exit status."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "demo":
            from convexedge.host.demo import DemoOptions, run_demo

            run_demo(
                DemoOptions(
                    quick=args.quick,
                    out=str(args.out),
                    data=None if args.data is None else str(args.data),
                    device=args.device,
                    seed=args.seed,
                    images=args.images,
                    test_images=args.test_images,
                    dtype="float64" if args.float64 else "float32",
                    progress=not args.no_progress,
                    device_step=not args.no_device_step,
                )
            )
        elif args.command == "refit":
            from convexedge.host.refit_cli import RefitOptions, run_refit

            run_refit(
                RefitOptions(
                    heads=args.heads,
                    activations=args.activations,
                    memory_budget_mb=args.budget_mb,
                    time_budget_s=args.time_budget,
                    mode=args.mode,
                    chunk=args.chunk,
                    confirm=args.confirm,
                )
            )
        elif args.command == "export":
            from convexedge.converters.export import ExportOptions, run_export

            run_export(
                ExportOptions(
                    model=args.model,
                    format=args.format,
                    out=str(args.out),
                    data=None if args.data is None else str(args.data),
                    test_images=args.test_images,
                )
            )
        return 0
    except ImportError as exc:
        print(
            f"convexedge: error: {exc.name or exc} is not installed; pip install 'convexedge[export]'",
            file=sys.stderr,
        )
        return 2
    except ConvexEdgeError as exc:
        print(f"convexedge: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"convexedge: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("convexedge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
