"""Stage: train the continuous refinement head (crystallm/diffusion.py) on a saved model, the GPT frozen.

    python train/refiner.py configs/refiner-default.yaml
"""

from crystallm.stages import read_stage_config
from crystallm.training import train_refiner

if __name__ == "__main__":
    print(train_refiner(read_stage_config(__doc__)))
