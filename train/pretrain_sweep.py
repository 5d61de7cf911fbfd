"""Stage: compare model sizes (and augmentation) at equal wall time: several pretraining runs at once, each given
the steps that fit the config's time budget (`crystallm.training.sweep`).

    python train/pretrain_sweep.py configs/experiments/pretrain-sweep-tiny.yaml
"""

from crystallm.stage_config import read_stage_config
from crystallm.training.sweep import run_sweep


def main() -> None:
    for run in run_sweep(read_stage_config(__doc__)):
        print(f"{run.name}: {run.parameters / 1e6:.2f}M parameters, {run.steps} steps ({run.epochs:.1f} epochs, "
              f"{run.tokens_seen / 1e6:.1f}M tokens, {run.train_seconds:.0f} s); held-out loss: best "
              f"{run.best_eval_loss:.4f} at step {run.best_step}, last {run.last_eval_loss:.4f}")


if __name__ == "__main__":
    main()
