"""Command line: ``python -m shvit info``, ``bench``, ``tune`` and ``train`` (see ``--help``)."""

from __future__ import annotations

import argparse
import json
import sys

import torch


def _cpu_kernel_paths() -> dict:
    """What the cpp backend's kernels multiply on here: the 'auto' settings resolved (each timed once per process),
    except the dense convs' channel blocks, timed per shape ('auto')."""
    from shvit_kernels.backends import cpp

    if cpp.variant() is None:
        return {}
    return {"fp32_1x1_gemms": cpp.fp32_gemm(), "fp32_dense_conv_blocks": cpp.dense_conv_blocks(),
            "bf16_products": cpp.bf16_products(), "bf16_pair_unit": cpp.bf16_pair_unit()}


def cmd_info(args) -> int:
    import shvit
    import shvit_kernels
    from shvit_kernels import dispatch

    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    forced = shvit_kernels.forced_backend()
    rows = shvit_kernels.backend_table()
    if args.json:  # one JSON document and nothing else on stdout, so it can be piped into a parser
        print(json.dumps({
            "shvit_kernels": shvit_kernels.__version__, "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cuda_device": cuda,
            "forced_backend": forced, "models": shvit.list_models(), "backends": rows,
            "autotune_machine": shvit_kernels.autotune.machine(), "cpu_kernel_paths": _cpu_kernel_paths(),
        }, indent=2))
        return 0
    print(f"shvit-kernels {shvit_kernels.__version__}, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"CUDA {'available: ' + cuda if cuda else 'not available'}")
    print(f"forced backend: {forced or 'none (automatic per call)'}")
    print(f"models: {', '.join(shvit.list_models())}")
    for name in dispatch.BACKENDS:
        mine = [r for r in rows if r["backend"] == name]
        usable = [r["op"] for r in mine if r["usable"]]
        unavailable = dispatch.unavailable_reasons(name)
        status = "usable" if usable else "not usable: " + ("; ".join(unavailable) or "no kernels registered")
        print(f"\n{name}: {status}")
        if usable:
            print(f"  ops: {', '.join(usable)}")
            missing = [r["op"] for r in mine if not r["usable"]]
            if missing:
                print(f"  no kernel (falls back): {', '.join(missing)}")
            if name == "cpp":
                print("  kernel paths: " + ", ".join(f"{k} {v}" for k, v in _cpu_kernel_paths().items()))
    for device_type in ("cpu", "cuda"):
        print(f"\npreference on {device_type}: {' > '.join(dispatch.order(device_type))}")
    from shvit_kernels import autotune

    choices = autotune.cached_choices()
    print(f"\nautotune: {autotune.mode()} (set {autotune.ENV_VAR}=off|inference|all); "
          f"{len(choices)} tuned signatures in {autotune.cache_path()}")
    print("  for: " + ", ".join(f"{k} {v}" for k, v in autotune.machine().items()))
    for signature, backend in choices.items():
        print(f"  {backend:9s} {signature}")
    return 0


def cmd_tune(args) -> int:
    """Time the backends for every op call of a fused model's forward and cache the fastest per signature."""
    import shvit
    from shvit_kernels import autotune

    from .bench import DTYPES, PAPER_IMG_SIZE

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.model not in shvit.list_models():
        raise ValueError(f"--model must be one of {shvit.list_models()}, got {args.model!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.img_size or PAPER_IMG_SIZE[args.model]
    fmt = torch.contiguous_format if args.nchw else torch.channels_last
    model = shvit.fuse(shvit.create_model(args.model)).to(device, DTYPES[args.dtype]).to(memory_format=fmt)
    x = torch.randn(args.batch_size, 3, size, size, device=device, dtype=DTYPES[args.dtype]).contiguous(memory_format=fmt)
    before = autotune.cached_choices()
    with torch.no_grad(), autotune.autotune(True):
        model(x)
    after = autotune.cached_choices()
    new = {k: v for k, v in after.items() if k not in before}
    print(f"{args.model} {size}px batch {args.batch_size} {device} {args.dtype} threads {torch.get_num_threads()}: "
          f"{len(new)} signatures tuned, {len(after)} cached in {autotune.cache_path()}")
    for signature, backend in new.items():
        print(f"  {backend:9s} {signature}")
    return 0


def cmd_bench(args) -> int:
    from .bench import run_model_bench

    report = run_model_bench(
        model=args.model,
        batch_size=args.batch_size,
        img_size=args.img_size,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        channels_last=not args.nchw,
        warmup_s=args.warmup,
        window_s=args.window,
        rounds=args.rounds,
    )
    print(report.to_json() if args.json else report.table())
    if args.output:
        with open(args.output, "w") as f:
            f.write(report.to_json() + "\n")
    return 0


def cmd_train(args) -> int:
    from .train import main as train_main

    return train_main(args)


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help lists every option's default (options without help text too), except None ("not set")."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _describe_defaults(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if action.help is None and action.default not in (None, argparse.SUPPRESS):
            action.help = "(default: %(default)s)"


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """Which model, input and machine set-up: shared by bench, tune and the paper suite."""
    parser.add_argument("--model", default="shvit_s1", help="variant")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 256 on GPU, 16 on CPU (the paper's)")
    parser.add_argument("--img-size", type=int, default=None, help="default: the paper's resolution for the model")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch.set_num_threads; tuned choices are kept per thread count)")
    parser.add_argument("--nchw", action="store_true", help="keep NCHW inputs instead of channels_last")


def add_bench_arguments(bench: argparse.ArgumentParser) -> None:
    """The model-throughput options, shared with the paper suite (``python -m benchmarks.paper_protocol``)."""
    add_workload_arguments(bench)
    bench.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per variant")
    bench.add_argument("--window", type=float, default=0.5, help="seconds per timed window")
    bench.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median reported)")
    bench.add_argument("--json", action="store_true", help="print the report as JSON")
    bench.add_argument("--output", default=None, help="also write the JSON report to this file")


def default_batch_size(args) -> None:
    """Fill in ``--batch-size`` when it was not given: the paper's 256 on GPU, 16 on CPU."""
    if getattr(args, "batch_size", 0) is None:
        on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        args.batch_size = 256 if on_gpu else 16


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shvit", description="SHViT with fused kernels")
    sub = p.add_subparsers(dest="command", required=True)

    # Every subcommand's --help shows the defaults.
    defaults = _DefaultsHelpFormatter
    info = sub.add_parser("info", help="versions, and which backends are built and usable (and why not)",
                          formatter_class=defaults)
    info.add_argument("--json", action="store_true", help="print versions and the backend table as one JSON document")
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser("bench", help="img/s of the reference model against the fused model on the best backends",
                           formatter_class=defaults)
    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    tune = sub.add_parser("tune", help="time the backends for a fused model's op calls and cache the fastest",
                          formatter_class=defaults)
    add_workload_arguments(tune)
    tune.set_defaults(func=cmd_tune)
    from .export import add_export_arguments, cmd_export

    export = sub.add_parser("export", help="write the model as ONNX (standard ops, dynamic batch), checked in ONNX Runtime",
                            formatter_class=defaults)
    add_export_arguments(export)
    export.set_defaults(func=cmd_export)

    from .train import add_train_arguments

    train = sub.add_parser("train", help="train a variant on an ImageFolder or synthetic data (torchrun for several processes)",
                           formatter_class=defaults)
    add_train_arguments(train)
    train.set_defaults(func=cmd_train)
    for subparser in (info, bench, tune, export, train):
        _describe_defaults(subparser)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    default_batch_size(args)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly like other command-line tools
        sys.stdout = None
        return 0


if __name__ == "__main__":
    sys.exit(main())
