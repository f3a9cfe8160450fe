"""The ``convexedge`` command line: ``demo``, ``export``, ``refit``, ``distill`` and ``linearize``.

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
        help="export the teacher, a demo's compressed model or its device head, and check parity",
        description="Rebuild MODEL ('teacher' or a folder written by `convexedge demo`), export it "
        "(onnx, tflite, tflite-int8: the model; c, head: its device head), compare the export with its "
        "reference (torch / the numpy head) on the test images, print a table and write parity.json.",
    )
    exp.add_argument(
        "model", help="'teacher' or a `convexedge demo` output folder (or a head store for c/head)"
    )
    exp.add_argument(
        "--format",
        choices=["onnx", "tflite", "tflite-int8", "c", "head"],
        default="onnx",
        help="onnx (fp32, opset 18), tflite (fp32), tflite-int8 (full integer; both need the [tflite] "
        "extra), c (the device head as C99 + int8 variant), head (the device head artifact)",
    )
    exp.add_argument("--out", type=Path, default=Path("convexedge-export"), help="output folder")
    exp.add_argument("--data", type=Path, default=None, help="folder of test_*.npz shards (default: bundled)")
    exp.add_argument("--test-images", type=_positive_int, default=None, help="test images for parity")
    exp.add_argument(
        "--calib",
        type=Path,
        default=None,
        help="folder of train_*.npz shards for int8 calibration / head fit (default: bundled train slice)",
    )
    exp.add_argument(
        "--calib-images", type=_positive_int, default=500, help="calibration images (default 500)"
    )
    exp.add_argument(
        "--int8-ranges",
        choices=["minmax", "ema"],
        default="minmax",
        help="tflite-int8 activation ranges: min/max over all calibration images (default) or the "
        "quantizer's moving average of per-image extremes",
    )
    exp.add_argument(
        "--int8-refit",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="tflite-int8 of a student: refit its V (label-free, same lam) to the input and masks it has "
        "inside the int8 file, then re-quantise; the fp32 files keep the fitted student (default: off)",
    )
    exp.add_argument(
        "--int8-refit-images",
        type=_positive_int,
        default=2000,
        help="unlabeled training images the int8 refit runs on (default 2000)",
    )
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
    ref.add_argument(
        "--anchor", type=float, default=0.0, help="pull toward the serving head, anchor/2 ||V - V0||^2"
    )
    ref.add_argument(
        "--renormalize", choices=["off", "mean", "mean_std"], default="off",
        help="re-estimate the head's input normalisation from the stream before the refit (rows modes)",
    )  # fmt: skip
    dis = sub.add_parser(
        "distill",
        help="replace a span of a CNN by a convex student fitted label-free; or its data-parallel solve",
        description="With --model/--samples-per-class/--span-input: draw K*classes unlabeled training images "
        "at random, capture the span, solve the convex student's lam path, prune and polish, swap, evaluate "
        "on the test shards and save the compressed model and a report (JSON + PNG). Without them: the "
        "data-parallel capture and solve of one span of the bundled ResNet-20 (--nproc N spawns N local gloo "
        "ranks; under torchrun the ranks come from its environment).",
    )
    dis.add_argument("--out", type=Path, default=Path("convexedge-distill"), help="output folder")
    dis.add_argument(
        "--data", type=Path, default=None, help="train_*.npz/test_*.npz shards (default: bundled)"
    )
    dis.add_argument("--model", default=None, help="resnet20 (bundled), resnet18, or pkg.module:factory")
    dis.add_argument("--weights", default=None, help="resnet18 weights .npz (manifest: the .json beside it)")
    dis.add_argument(
        "--span", action="append", default=None,
        help="module replaced by the student (default layer3), or FIRST,LAST of sibling modules; repeatable",
    )  # fmt: skip
    dis.add_argument("--span-input", default=None, help="first module of the span (with --span-output)")
    dis.add_argument("--span-output", default=None, help="last module of the span (with --span-input)")
    dis.add_argument(
        "--samples-per-class", type=_positive_int, default=None,
        help="K: K*classes unlabeled training images drawn at random (labels never read)",
    )  # fmt: skip
    dis.add_argument("--test-images", type=_positive_int, default=None, help="limit of test images")
    dis.add_argument("--kernel-size", type=_positive_int, default=3, help="student kernel (odd)")
    dis.add_argument("--no-polish", action="store_true", help="skip optimal-set pruning and polishing")
    dis.add_argument(
        "--no-lowrank", action="store_true", help="skip the neuron-form (per-gate SVD + refit) compression"
    )
    dis.add_argument(
        "--per-block", action="store_true",
        help="also fit one student per block of the span (layer3: layer3.0/.1/.2) in sequence; saved instead",
    )  # fmt: skip
    dis.add_argument(
        "--lowrank-tolerance", type=float, default=0.02,
        help="neuron form: relative held-out loss increase allowed over the unfactored student",
    )  # fmt: skip
    dis.add_argument("--kd", action="store_true", help="extra row: end-to-end KD fine-tune (T=4) of the swap")
    dis.add_argument("--kd-epochs", type=_positive_int, default=20, help="KD epochs (upper bound)")
    dis.add_argument("--kd-seconds", type=float, default=None, help="KD time budget in seconds")
    dis.add_argument(
        "--images", type=_positive_int, default=2000, help="data-parallel path: unlabeled images"
    )
    dis.add_argument("--gates", type=_positive_int, default=8, help="gates P (gate 0 is the linear path)")
    dis.add_argument("--lam-ratios", default="0.1,0.03,0.01", help="decreasing lam/lam_max, comma-separated")
    dis.add_argument("--tol", type=float, default=1e-4, help="relative KKT residual to stop at")
    dis.add_argument("--max-iter", type=_positive_int, default=500, help="iterations per path point")
    dis.add_argument("--seed", type=int, default=0, help="seed of the gates and of the image sample")
    dis.add_argument("--float64", action="store_true", help="solve in float64 (default float32)")
    dis.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu", help="torch device")
    dis.add_argument("--nproc", type=_positive_int, default=1, help="local gloo ranks to spawn")
    dis.add_argument("--checkpoint-every", type=_positive_int, default=50, help="iterations per checkpoint")
    dis.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    dis.add_argument("--no-progress", action="store_true", help="hide progress bars")

    lin = sub.add_parser(
        "linearize",
        help="cut the model's ReLUs to a budget for private inference (SNL, or BCD from SNL)",
        description="Replace ReLUs by masked ReLUs, search the mask (SNL L1 path; BCD warm-started from it), "
        "fine-tune, export ONNX with masks as constants and check the graph's ReLU count equals --budget. "
        "Rerun the same command to resume a BCD search from OUT/checkpoint.",
    )
    lin.add_argument("--budget", type=_positive_int, required=True, help="ReLUs to keep (per sample)")
    lin.add_argument("--method", choices=["bcd", "snl"], default="bcd")
    lin.add_argument("--dataset", choices=["cifar10", "mnist1d"], default="cifar10", help="model and data")
    lin.add_argument("--out", type=Path, default=Path("convexedge-linearize"), help="output folder")
    lin.add_argument("--data", type=Path, default=None, help="CIFAR-10 train_*/test_*.npz (default: bundled)")
    lin.add_argument("--train-images", type=_positive_int, default=None, help="CIFAR-10 training images")
    lin.add_argument("--val-images", type=_positive_int, default=500, help="validation images for BCD")
    lin.add_argument("--granularity", choices=["pixel", "channel"], default="pixel")
    lin.add_argument("--seed", type=int, default=0)
    lin.add_argument("--snl-epochs", type=_positive_int, default=150, help="SNL max epochs")
    lin.add_argument("--snl-alpha-lr", type=float, default=None, help="SNL score lr (default: 1e-3)")
    lin.add_argument("--finetune-epochs", type=float, default=5.0, help="final fine-tune epochs")
    lin.add_argument("--warm-factor", type=float, default=2.0, help="BCD starts from SNL at this x budget")
    lin.add_argument("--drc", type=_positive_int, default=16, help="BCD: ReLUs per block")
    lin.add_argument("--rt", type=_positive_int, default=8, help="BCD: blocks tried per step")
    lin.add_argument("--adt", type=float, default=0.01, help="BCD: largest accepted accuracy drop")
    lin.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def _run_distill_command(args: argparse.Namespace) -> None:
    """``convexedge distill``: the full pipeline, or the data-parallel solve of one ResNet-20 span."""
    from convexedge.host.distill_cli import DistillOptions, PipelineOptions, run_distill, run_pipeline

    if (args.span_input is None) != (args.span_output is None):
        raise ValueError("--span-input and --span-output go together; give both module names")
    if args.span_input is not None and args.span:
        raise ValueError("give the span either as --span or as --span-input/--span-output, not both")
    spans = [tuple(p.strip() for p in s.split(",")) for s in (args.span or ["layer3"])]
    if args.span_input is not None:
        spans = [
            (args.span_input,) if args.span_input == args.span_output else (args.span_input, args.span_output)
        ]
    pipeline = (
        args.model is not None
        or args.samples_per_class is not None
        or args.span_input is not None
        or len(spans) > 1
        or len(spans[0]) > 1
    )
    lam_ratios = tuple(float(r) for r in args.lam_ratios.split(","))
    if not pipeline:
        run_distill(
            DistillOptions(
                out=str(args.out),
                data=None if args.data is None else str(args.data),
                span=spans[0][0],
                images=args.images,
                kernel_size=args.kernel_size,
                gates=args.gates,
                lam_ratios=lam_ratios,
                tol=args.tol,
                max_iter=args.max_iter,
                seed=args.seed,
                dtype="float64" if args.float64 else "float32",
                device=args.device,
                nproc=args.nproc,
                checkpoint_every=args.checkpoint_every,
                resume=args.resume,
                progress=not args.no_progress,
            )
        )
        return
    if args.nproc != 1 or args.resume or args.float64:
        raise ValueError(
            "--nproc/--resume/--float64 belong to the data-parallel solve of one bundled ResNet-20 span "
            "(run it without --model/--samples-per-class/--span-input); the full pipeline runs in one process"
        )
    run_pipeline(
        PipelineOptions(
            model=args.model or "resnet20",
            weights=args.weights,
            spans=tuple(spans),
            samples_per_class=args.samples_per_class or 100,
            out=str(args.out),
            data=None if args.data is None else str(args.data),
            test_images=args.test_images,
            gates=args.gates,
            kernel_size=args.kernel_size,
            lam_ratios=lam_ratios,
            tol=args.tol,
            max_iter=args.max_iter,
            polish=not args.no_polish,
            lowrank=not args.no_lowrank,
            lowrank_tolerance=args.lowrank_tolerance,
            per_block=args.per_block,
            kd=args.kd,
            kd_epochs=args.kd_epochs,
            kd_seconds=args.kd_seconds,
            seed=args.seed,
            device=args.device,
            progress=not args.no_progress,
        )
    )


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
                    anchor=args.anchor,
                    renormalize=args.renormalize,
                )
            )
        elif args.command == "distill":
            _run_distill_command(args)
        elif args.command == "linearize":
            from convexedge.host.linearize.cli import LinearizeOptions, run_linearize

            run_linearize(
                LinearizeOptions(
                    budget=args.budget,
                    method=args.method,
                    dataset=args.dataset,
                    out=str(args.out),
                    data=None if args.data is None else str(args.data),
                    train_images=args.train_images,
                    val_images=args.val_images,
                    granularity=args.granularity,
                    seed=args.seed,
                    snl_epochs=args.snl_epochs,
                    snl_alpha_lr=args.snl_alpha_lr,
                    finetune_epochs=args.finetune_epochs,
                    warm_factor=args.warm_factor,
                    drc=args.drc,
                    rt=args.rt,
                    adt=args.adt,
                    progress=not args.no_progress,
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
                    calib=None if args.calib is None else str(args.calib),
                    calib_images=args.calib_images,
                    int8_ranges=args.int8_ranges,
                    int8_refit=args.int8_refit,
                    int8_refit_images=args.int8_refit_images,
                )
            )
        return 0
    except ImportError as exc:
        print(
            f"convexedge: error: {exc.name or exc} is not installed; "
            "pip install 'convexedge[export]' (TFLite: 'convexedge[tflite]')",
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
