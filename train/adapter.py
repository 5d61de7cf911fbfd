"""Stage: train one property's LoRA adapter on the frozen base model (crystallm/generation/conditioning.py for the
prompt).

    python train/adapter.py configs/adapter-band_gap.yaml
"""

from crystallm.stage_config import read_stage_config
from crystallm.training.adapter import train_adapter
from crystallm.training.settings import AdapterSettings

if __name__ == "__main__":
    print(train_adapter(AdapterSettings.from_dict(read_stage_config(__doc__))))
