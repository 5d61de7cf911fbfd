"""Stage: pretrain a crystallm GPT on the pretraining corpus (causal LM + masked-atom + contrastive).

    python train/pretrain.py configs/pretrain-tiny.yaml
    accelerate launch train/pretrain.py configs/pretrain-small.yaml

Kill it and run the same command again: it resumes from `<output_dir>/checkpoint` at the saved step.
"""

from crystallm.stage_config import read_stage_config
from crystallm.training.pretrain import pretrain
from crystallm.training.settings import PretrainingSettings


def main() -> None:
    print(f"saved to {pretrain(PretrainingSettings.from_dict(read_stage_config(__doc__)))}")


if __name__ == "__main__":
    main()
