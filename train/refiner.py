"""Stage: train the geometry refinement head (crystallm/refinement/, CrystalRefiner) on a saved model, the GPT frozen.

    python train/refiner.py configs/refiner-default.yaml
"""

from crystallm.refinement.training import train_refiner
from crystallm.stage_config import read_stage_config
from crystallm.training.settings import RefinerSettings

if __name__ == "__main__":
    print(train_refiner(RefinerSettings.from_dict(read_stage_config(__doc__))))
