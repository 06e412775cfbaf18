"""Shared pytest fixtures and the suite's no-silent-skip rule.

:func:`require` is the one way a test may depend on something outside the repository (local Slurm,
a ``../shared`` file, an engine venv): locally a missing dependency skips the test with the reason;
under ``CI=true`` it FAILS the test with a message saying what to start or install. On top of that,
under ``CI=true`` a session that skipped any test not marked ``@pytest.mark.gpu`` (GPU-only tests,
which cannot run on the CPU CI machine) ends with a failing exit status, whatever raised the skip.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.engine_fixtures", "tests.real_model_fixtures"]

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEGATRON_DAPO_SHARED", REPO_ROOT.parent / "shared"))


def in_ci() -> bool:
    """True when running under CI (``CI=true``, as set by ``.ci/run`` and CI services)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(condition: object, what: str, how_to_fix: str) -> None:
    """Skip (locally) or fail (``CI=true``) the calling test unless ``condition`` is truthy.

    Args:
        condition: anything truthy when the dependency is present.
        what: what is missing, e.g. ``"local Slurm cluster (sinfo: connection refused)"``.
        how_to_fix: the command or step that provides it, e.g.
            ``"bash ../shared/tools/local-slurm/start_local_slurm.sh"``.
    """
    if not condition:
        unavailable(f"missing {what}; to fix: {how_to_fix}")


def unavailable(msg: str) -> None:
    """Skip (locally) or fail (``CI=true``: a missing dependency is a broken CI) the calling test; ``msg`` says what
    is missing and how to provide it."""
    if in_ci():
        pytest.fail(f"CI=true: {msg}", pytrace=False)
    pytest.skip(msg)


def shared_path(*parts: str) -> Path:
    """Return ``../shared/<parts>``; skip (locally) or fail (CI) the calling test when absent."""
    p = SHARED.joinpath(*parts)
    require(p.exists(), f"shared file {p}",
            "mount the shared data at ../shared (or set MEGATRON_DAPO_SHARED)")
    return p


SLURM_START = ("SLURM_LOCAL_NODES=16 bash ../shared/tools/local-slurm/start_local_slurm.sh && "
               "source /tmp/local-slurm/env.sh (what .ci/run does)")


def require_engine_venv(engine: str) -> Path:
    """The python of the ``.venv-<engine>`` venv (``sglang``/``vllm``), or skip/fail via :func:`require`."""
    from megatron_dapo.engines.launch_common import default_engine_python

    try:
        py = default_engine_python(engine)
    except Exception as e:  # noqa: BLE001 - reported as the missing dependency
        py, err = None, f"{type(e).__name__}: {e}"
    else:
        err = ""
    import sys

    # a venv built by `make engines` is finished once it has its marker file
    ok = py is not None and (py == sys.executable or (Path(py).parents[1] / ".megatron-dapo-engine").exists())
    require(ok, f"engine venv .venv-{engine} {err}".strip(),
            "make engines (or set MEGATRON_DAPO_ENGINE_VENV_ROOT to a checkout that has them)")
    return Path(py)


@pytest.fixture
def shared():
    """Fixture form of :func:`shared_path`."""
    return shared_path


@pytest.fixture
def qwen_tokenizer_dir():
    return shared_path("data", "qwen2.5-tokenizer")


# ------------------------------------------------------------------------------------------------
# Under CI=true, any skip of a test not marked `gpu` fails the session.
# ------------------------------------------------------------------------------------------------
_BAD_SKIPS: list[str] = []


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; the only tests allowed to skip under CI=true")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and not hasattr(rep, "wasxfail") and item.get_closest_marker("gpu") is None:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        _BAD_SKIPS.append(f"{item.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if in_ci() and _BAD_SKIPS and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _BAD_SKIPS and in_ci():
        terminalreporter.section("CI=true: skipped tests not marked gpu (session FAILED)", red=True)
        for line in _BAD_SKIPS:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The demo model of the module (random init + demo BPE tokenizer), created through the CLI (``prepare``)."""
    from helpers import CONFIG, fail_message, run_cli

    d = tmp_path_factory.mktemp("model") / "tiny-qwen2"
    proc = run_cli("prepare", CONFIG, f"model.hf_path={d}")
    assert proc.returncode == 0, fail_message(proc)
    assert proc.stdout.strip().splitlines()[-1] == str(d.resolve())
    return d


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from helpers import _write_tiny_hf

    return _write_tiny_hf(tmp_path_factory.mktemp("tiny_hf"))
