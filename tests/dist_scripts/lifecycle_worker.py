"""Engine lifecycle regression worker for tests/test_e2e_paths.py (issue 12): every place that hands the GPUs
back to the actor (an HF export mid-run, a periodic save, the save of a preemption) must leave the engines
able to generate (evaluation, then the next training step), colocated or not.

``python lifecycle_worker.py CONFIG [key=value ...]`` (one process: the trainer initialises a world of one).
Order: step 1 -> HF export -> evaluate -> step 2 -> save -> evaluate -> preemption flag -> fit() (step 3, save,
exit code 3) -> evaluate -> step 4. Prints one line ``RESULT <json>`` with what each phase returned.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_dapo.actor.parallel import destroy_parallel  # noqa: E402
from megatron_dapo.config import load_config  # noqa: E402
from megatron_dapo.trainer import Trainer  # noqa: E402


def _val(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if "avg@" in k}


def main() -> None:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    trainer = Trainer(cfg)
    res: dict = {}
    try:
        trainer.train_one_step()
        trainer.export_hf(cfg.run_dir / "hf_mid_run")
        res["eval_after_export"] = _val(trainer.evaluate())
        trainer.train_one_step()
        trainer.save()
        res["eval_after_save"] = _val(trainer.evaluate())
        trainer.preempt.requested = True
        res["fit_exit_code"] = trainer.fit()
        res["eval_after_preemption_save"] = _val(trainer.evaluate())
        res["step_after_preemption"] = "actor/pg_loss" in trainer.train_one_step()
        res["step"] = trainer.step
        res["engines"] = [trainer.engines.state, trainer.engines.weight_version]
    finally:
        trainer.close()
        destroy_parallel()
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
