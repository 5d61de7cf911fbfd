"""Stage: train the masked-atom adapter on the frozen base model (crystallm/generation/substitution.py ranks element
substitutions with it; `crystallm substitute` uses it by default).

    python train/masked_atom_adapter.py configs/adapter-masked_atom.yaml
"""

from crystallm.stage_config import read_stage_config
from crystallm.training.adapter import train_masked_atom_adapter
from crystallm.training.settings import AdapterSettings

if __name__ == "__main__":
    print(train_masked_atom_adapter(AdapterSettings.from_dict(read_stage_config(__doc__))))
