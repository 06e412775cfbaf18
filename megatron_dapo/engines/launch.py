"""``python -m megatron_dapo.engines.launch``: the command line the sbatch scripts run (:func:`main`).

The launchers themselves live by concern: :mod:`megatron_dapo.engines.launch_common` (engine interpreter,
free ports, :class:`~megatron_dapo.engines.launch_common.EngineProcesses`),
:mod:`megatron_dapo.engines.launch_sglang`, :mod:`megatron_dapo.engines.launch_router`,
:mod:`megatron_dapo.engines.launch_vllm` and :mod:`megatron_dapo.engines.launch_cpu`.
"""
from __future__ import annotations

import argparse
import sys
import time

from megatron_dapo.engines.launch_router import build_sglang_router_command, wait_router_routing
from megatron_dapo.engines.launch_sglang import serve_sglang


def main(argv: list[str] | None = None) -> int:
    """``python -m megatron_dapo.engines.launch router-command|wait-router|serve-sglang ...`` (used by the
    sbatch scripts): print the ``sglang-router`` argv one argument per line / wait until it routes (exit 1
    with the missing workers on stderr) / exec an SGLang server (on CPU from ``.venv-sglang``)."""
    ap = argparse.ArgumentParser(prog="python -m megatron_dapo.engines.launch")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("router-command", help="print the sglang-router argv, one argument per line")
    p.add_argument("worker_urls", help="comma-separated engine URLs")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--policy", default="cache_aware")
    p.add_argument("--api-key", default=None)
    p.add_argument("--prometheus-port", type=int, default=None)
    p.add_argument("--request-timeout-s", type=float, default=None)
    p = sub.add_parser("serve-sglang", help="exec one SGLang server (CPU: .venv-sglang, CPU flags and env)")
    p.add_argument("model_path")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when torch sees a GPU")
    p.add_argument("--dtype", default="auto", help="auto: the checkpoint's config.json dtype")
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--engine-python", default=None, help="rollout.engine_python")
    p.epilog = "arguments after -- go to sglang.launch_server"
    p = sub.add_parser("wait-router", help="wait until the router lists every worker as healthy")
    p.add_argument("router_url")
    p.add_argument("worker_urls", help="comma-separated engine URLs")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--pid", type=int, default=None, help="give up when this process (the router step) exits")
    p.add_argument("--api-key", default=None, help="the router's --api-key (it guards /workers too)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # serve-sglang: passed to launch_server
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.cmd == "serve-sglang":
        args.extra = extra
        return serve_sglang(args)
    urls = [u for u in args.worker_urls.split(",") if u]
    if args.cmd == "router-command":
        try:
            cmd = build_sglang_router_command(urls, port=args.port, host=args.host, policy=args.policy,
                                              api_key=args.api_key or None, prometheus_port=args.prometheus_port,
                                              request_timeout_s=args.request_timeout_s)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print("\n".join(cmd))
        return 0
    t0 = time.monotonic()
    missing = wait_router_routing(args.router_url, urls, args.timeout, pid=args.pid, api_key=args.api_key or None)
    if missing:
        print(f"error: sglang-router {args.router_url} does not route to {' '.join(missing)} after "
              f"{time.monotonic() - t0:.0f} s", file=sys.stderr)
        return 1
    print(f"sglang-router {args.router_url} routes to {len(urls)} engine(s) after {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
