"""``megatron-dapo`` command line.

Subcommands::

    megatron-dapo train   CONFIG [key=value ...] [--dry-run]   the DAPO main job (torchrun / srun aware)
    megatron-dapo prepare CONFIG [key=value ...]               create the tiny demo model / dequantise model.from_gguf if asked; print its path
    megatron-dapo eval    CONFIG [key=value ...] [--model DIR]  AIME-style avg@k / pass@k evaluation
    megatron-dapo launch  CONFIG [key=value ...] --nodes N      build/submit the Slurm job (nemo-run or sbatch)
    megatron-dapo plan    --hf-config DIR --nodes N ...         parallelism planner (tools/plan_parallelism.py)
"""
from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
import warnings
from typing import Optional

from .config import ConfigError, load_config
from .errors import MegatronDapoError


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # megatron-core warns about the absent TE/apex on every import; that is expected on CPU.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    warnings.filterwarnings("ignore", message=".*cuda_graph_scope.*")


def _load(args, validate: bool = True):
    try:
        return load_config(args.config, args.overrides, validate=validate)
    except (ConfigError, FileNotFoundError) as e:
        print(f"megatron-dapo: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_train(args) -> int:
    if args.dry_run:
        # heavy: the training stack (torch, megatron-core) loads only for the subcommand that needs it
        from .dry_run import dry_run

        cfg = _load(args, validate=False)
        return dry_run(cfg, args.config, args.overrides, hf_config=args.hf_config, nodes=args.nodes,
                       gpus_per_node=args.gpus_per_node, gpu_memory_gb=args.gpu_memory_gb)
    cfg = _load(args)
    # a run that seems hung: `kill -QUIT <pid>` prints every thread's stack to stderr and the run goes on
    faulthandler.register(signal.SIGQUIT, all_threads=True)
    # heavy: the training stack (torch, megatron-core) loads only for the subcommand that needs it
    from .trainer import run_training

    return run_training(cfg)


def cmd_prepare(args) -> int:
    cfg = _load(args)
    # heavy: the training stack (torch, megatron-core) loads only for the subcommand that needs it
    from .trainer import prepare_model

    try:
        path = prepare_model(cfg)
    except (MegatronDapoError, FileNotFoundError) as e:   # e.g. the real-model extra is not installed
        print(f"megatron-dapo prepare: {e}", file=sys.stderr)
        return 2
    print(path.resolve(), flush=True)
    return 0


def cmd_eval(argv: list[str]) -> int:
    # heavy: the training stack (torch, megatron-core) loads only for the subcommand that needs it
    from .evaluation import eval_main

    return eval_main(argv)


def cmd_launch(argv: list[str]) -> int:
    # heavy: the training stack (torch, megatron-core) loads only for the subcommand that needs it
    from .launch.nemo import main

    return main(argv)


def cmd_plan(argv: list[str]) -> int:
    # heavy: the training stack (torch, megatron-core) loads only for the subcommand that needs it
    from .launch.planner import main

    return main(argv)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    if argv and argv[0] in ("eval", "launch", "plan"):
        return {"eval": cmd_eval, "launch": cmd_launch, "plan": cmd_plan}[argv[0]](argv[1:])
    p = argparse.ArgumentParser(prog="megatron-dapo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run the DAPO main job")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. actor.lr=1e-6")
    t.add_argument("--dry-run", action="store_true",
                   help="validate, build one rank's shard on the meta device, print memory plan and sbatch")
    t.add_argument("--hf-config", help="dry run: HF config.json (or its dir) when model.hf_path is not here")
    t.add_argument("--nodes", type=int, help="dry run: nodes of the job (default: NODES of the submit.sh beside "
                   "the config, else enough for TP x PP x CP)")
    t.add_argument("--gpus-per-node", type=int, default=8)
    t.add_argument("--gpu-memory-gb", type=float, default=80.0)
    t.set_defaults(fn=cmd_train)
    pr = sub.add_parser("prepare", help="create the tiny demo model or dequantise model.from_gguf when the config asks for it")
    pr.add_argument("config")
    pr.add_argument("overrides", nargs="*")
    pr.set_defaults(fn=cmd_prepare)
    for name, hlp in (("eval", "evaluate a model (avg@k, pass@k)"), ("launch", "build/submit the Slurm job"),
                      ("plan", "list feasible parallel layouts")):
        sub.add_parser(name, help=hlp, add_help=False)
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if a.startswith("-") or "=" not in a]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (overrides are key=value)")
    if rest:
        args.overrides = list(getattr(args, "overrides", []) or []) + rest
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
