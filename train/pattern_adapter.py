"""Stage: train the powder-pattern adapter (crystallm/diffraction/) on the frozen base model.

    python train/pattern_adapter.py configs/adapter-xrd.yaml

Copy `<output_dir>/xrd` into `<model>/adapters/xrd` to ship it beside the model: `crystallm generate --xrd` loads it
by name.
"""

from crystallm.stage_config import read_stage_config
from crystallm.training.adapter import train_pattern_adapter
from crystallm.training.settings import AdapterSettings

if __name__ == "__main__":
    print(train_pattern_adapter(AdapterSettings.from_dict(read_stage_config(__doc__))))
