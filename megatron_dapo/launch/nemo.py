"""``megatron-dapo launch``: submit the Slurm job of ``slurm/*.sbatch`` directly or through nemo-run.

:func:`build_launch_plan` describes the job once (sbatch options, the batch script and its arguments,
environment); :func:`render_dry_run` shows it as an ``sbatch`` command line or, with
``backend="nemo"``, as the batch script nemo-run's ``SlurmExecutor`` would submit; :func:`launch`
submits it. The nemo-run job is *equivalent* to the plain one: its generated batch script carries the
same ``#SBATCH`` resources, ``--requeue`` and ``--signal=B:USR1@S``, and its setup ``exec``\\ s our
batch script, so engines, trainer step, signal forwarding and requeue-on-exit-3 are the same code.

nemo-run is an optional extra (``pip install megatron_dapo[launch]``: ``nemo-run``, ``leptonai<0.47``);
it is imported lazily and a missing install raises :class:`LaunchError` with that hint.
Sources: nemo-run ``SlurmExecutor`` / ``Script`` / ``Experiment`` API (NVIDIA NeMo-Run docs, "Execution").
"""
from __future__ import annotations

import argparse
import glob
import os
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..errors import MegatronDapoError
from megatron_dapo.config import ConfigError, parse_overrides

REPO_ROOT = Path(__file__).resolve().parents[2]

MODES = {
    "colocated": "slurm/dapo.sbatch",
    "disaggregated": "slurm/dapo_disaggregated.sbatch",
    "cpu-smoke": "slurm/cpu_smoke.sbatch",
}


class LaunchError(MegatronDapoError, RuntimeError):
    """Bad launch request, missing optional dependency, or a failed submission."""


@dataclass
class LaunchPlan:
    """One Slurm job. ``sbatch_options`` are ``--key=value`` strings (they override the script's
    ``#SBATCH`` lines); ``script`` is relative to ``repo``; ``env`` is exported to the job."""

    job_name: str
    nodes: int
    gpus_per_node: int
    ntasks_per_node: int
    time: str
    signal: str
    script: str
    script_args: list[str]
    sbatch_options: list[str]
    env: dict[str, str] = field(default_factory=dict)
    repo: str = str(REPO_ROOT)
    partition: Optional[str] = None
    account: Optional[str] = None
    container_image: Optional[str] = None
    container_mounts: list[str] = field(default_factory=list)

    def sbatch_command(self) -> list[str]:
        """``["sbatch", options..., script, config, overrides...]`` (run from ``repo``)."""
        return ["sbatch", *self.sbatch_options, self.script, *self.script_args]


def build_launch_plan(cfg_path: str, overrides: Sequence[str] = (), nodes: int = 1, gpus_per_node: int = 8,
                      mode: str = "colocated", time: str = "24:00:00", partition: Optional[str] = None,
                      account: Optional[str] = None, job_name: Optional[str] = None,
                      rollout_nodes: Optional[int] = None, signal_seconds: int = 900,
                      container_image: Optional[str] = None, container_mounts: Sequence[str] = (),
                      extra_env: Optional[dict[str, str]] = None) -> LaunchPlan:
    """Describe the job for ``mode`` (``colocated``, ``disaggregated``, ``cpu-smoke``).

    ``cfg_path`` must exist; ``overrides`` are ``key=value`` strings, validated for syntax with
    :func:`megatron_dapo.config.parse_overrides`. ``gpus_per_node`` 0 means a CPU job.
    Raises LaunchError naming the bad argument.
    """
    if mode not in MODES:
        raise LaunchError(f"--mode={mode!r}: expected one of {', '.join(MODES)}")
    if not Path(cfg_path).is_file():
        raise LaunchError(f"config file not found: {cfg_path}")
    try:
        parse_overrides(list(overrides))
    except ConfigError as e:
        raise LaunchError(str(e)) from None
    if nodes < 1:
        raise LaunchError(f"--nodes={nodes}: must be >= 1")
    if gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node={gpus_per_node}: must be >= 0")
    if mode == "disaggregated":
        if nodes < 2:
            raise LaunchError("--mode=disaggregated needs --nodes >= 2 (rollout nodes + training nodes)")
        rollout_nodes = rollout_nodes if rollout_nodes is not None else nodes // 2
        if not 1 <= rollout_nodes < nodes:
            raise LaunchError(f"--rollout-nodes={rollout_nodes}: must be in [1, {nodes - 1}]")
    if mode == "cpu-smoke":
        gpus_per_node = 0
    if not 0 < signal_seconds < 86400:
        raise LaunchError(f"signal_seconds={signal_seconds}: must be in (0, 86400)")
    name = job_name or {"colocated": "dapo", "disaggregated": "dapo-disagg", "cpu-smoke": "dapo-cpu-smoke"}[mode]
    ntasks = gpus_per_node if gpus_per_node > 0 else 1
    opts = [f"--job-name={name}", f"--nodes={nodes}", f"--ntasks-per-node={ntasks}", f"--time={time}",
            f"--signal=B:USR1@{signal_seconds}", "--requeue"]
    if gpus_per_node > 0:
        opts.append(f"--gpus-per-node={gpus_per_node}")
    if partition:
        opts.append(f"--partition={partition}")
    if account:
        opts.append(f"--account={account}")
    env = {"DAPO_ROOT": str(REPO_ROOT)}
    if gpus_per_node > 0:
        env["DAPO_GPUS_PER_NODE"] = str(gpus_per_node)
    if mode == "disaggregated":
        env["DAPO_ROLLOUT_NODES"] = str(rollout_nodes)
    if container_image:
        env["DAPO_CONTAINER_IMAGE"] = container_image
        if container_mounts:
            env["DAPO_CONTAINER_MOUNTS"] = ",".join(container_mounts)
    env.update(extra_env or {})
    return LaunchPlan(job_name=name, nodes=nodes, gpus_per_node=gpus_per_node, ntasks_per_node=ntasks, time=time,
                      signal=f"B:USR1@{signal_seconds}", script=MODES[mode],
                      script_args=[str(cfg_path), *overrides], sbatch_options=opts, env=env, partition=partition,
                      account=account, container_image=container_image, container_mounts=list(container_mounts))


def _require_nemo_run():
    try:
        # optional: the launch extra
        import nemo_run  # noqa: F401
    except ImportError as e:
        raise LaunchError("the nemo-run backend needs the optional 'launch' extra: "
                          "pip install 'megatron_dapo[launch]'  (nemo-run, leptonai<0.47)") from e
    return nemo_run


def nemo_executor(plan: LaunchPlan, job_dir: Optional[str] = None):
    """A nemo-run ``SlurmExecutor`` (local tunnel, plain packager) for ``plan``; its setup ``exec``\\ s the
    batch script so the job body is ``slurm/*.sbatch`` itself. Raises LaunchError without nemo-run."""
    run = _require_nemo_run()
    home = job_dir or os.path.join(os.environ.get("NEMORUN_HOME", os.path.expanduser("~/.nemo_run")), "experiments")
    body = " ".join(shlex.quote(a) for a in ["bash", os.path.join(plan.repo, plan.script), *plan.script_args])
    setup = "\n".join([f"cd {shlex.quote(plan.repo)}", "mkdir -p logs", f"exec {body}"])
    executor = run.SlurmExecutor(
        # nemo-run needs a string account; an empty one lets Slurm use the user's default
        account=plan.account or "", partition=plan.partition, nodes=plan.nodes, ntasks_per_node=plan.ntasks_per_node,
        gpus_per_node=plan.gpus_per_node or None, time=plan.time, signal=plan.signal,
        exclusive=True if plan.gpus_per_node else None, mem="0" if plan.gpus_per_node else None,
        env_vars=dict(plan.env), setup_lines=setup, additional_parameters={"requeue": True},
        tunnel=run.LocalTunnel(job_dir=home), packager=run.Packager(),
    )
    executor.job_details.job_name = plan.job_name
    return executor


def render_dry_run(plan: LaunchPlan, backend: str = "sbatch", job_dir: Optional[str] = None) -> str:
    """Text of what :func:`launch` would submit: the ``sbatch`` command line with its environment
    (``backend="sbatch"``), or nemo-run's generated batch script (``backend="nemo"``, written under
    ``job_dir``/``$NEMORUN_HOME``; nothing is submitted). Raises LaunchError for an unknown backend."""
    if backend == "sbatch":
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(plan.env.items()))
        return f"cd {shlex.quote(plan.repo)} && mkdir -p logs && {env} " + " ".join(
            shlex.quote(a) for a in plan.sbatch_command())
    if backend != "nemo":
        raise LaunchError(f"--backend={backend!r}: expected sbatch or nemo")
    run = _require_nemo_run()
    executor = nemo_executor(plan, job_dir)
    with run.Experiment(plan.job_name, executor=executor, log_level="WARN") as exp:
        exp.add(run.Script(inline="true"), name=plan.job_name)
        exp.dryrun(log=False, delete_exp_dir=False)
        exp_dir = exp._exp_dir
    scripts = sorted(glob.glob(os.path.join(exp_dir, "**", "*_sbatch.sh"), recursive=True))
    if not scripts:
        raise LaunchError(f"nemo-run dry run wrote no batch script under {exp_dir}")
    return Path(scripts[0]).read_text()


def launch(plan: LaunchPlan, backend: str = "sbatch") -> str:
    """Submit ``plan``. Returns the job id (``sbatch``) or the nemo-run experiment id.
    Raises LaunchError when submission fails."""
    if backend == "sbatch":
        (Path(plan.repo) / "logs").mkdir(exist_ok=True)
        r = subprocess.run([plan.sbatch_command()[0], "--parsable", *plan.sbatch_command()[1:]], cwd=plan.repo,
                           env={**os.environ, **plan.env}, capture_output=True, text=True)
        if r.returncode != 0:
            raise LaunchError(f"sbatch failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout.strip().split(";")[0]
    if backend != "nemo":
        raise LaunchError(f"--backend={backend!r}: expected sbatch or nemo")
    run = _require_nemo_run()
    with run.Experiment(plan.job_name, executor=nemo_executor(plan), log_level="WARN") as exp:
        exp.add(run.Script(inline="true"), name=plan.job_name)
        exp.run(detach=True)
        return exp._id


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``megatron-dapo launch CONFIG [key=value ...] --nodes N [--mode ...] [--backend sbatch|nemo] [--dry-run]``."""
    ap = argparse.ArgumentParser(prog="megatron-dapo launch", description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--mode", choices=sorted(MODES), default="colocated")
    ap.add_argument("--rollout-nodes", type=int, default=None)
    ap.add_argument("--backend", choices=["sbatch", "nemo"], default="sbatch")
    ap.add_argument("--time", default="24:00:00")
    ap.add_argument("--partition", default=None)
    ap.add_argument("--account", default=None)
    ap.add_argument("--job-name", default=None)
    ap.add_argument("--container-image", default=None)
    ap.add_argument("--container-mounts", default="", help="comma-separated SRC:DST[:ro]")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(list(argv) if argv is not None else None)
    try:
        plan = build_launch_plan(args.config, args.overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                 mode=args.mode, time=args.time, partition=args.partition, account=args.account,
                                 job_name=args.job_name, rollout_nodes=args.rollout_nodes,
                                 container_image=args.container_image,
                                 container_mounts=[m for m in args.container_mounts.split(",") if m])
        if args.dry_run:
            print(render_dry_run(plan, args.backend))
        else:
            print(launch(plan, args.backend))
    except LaunchError as e:
        print(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
